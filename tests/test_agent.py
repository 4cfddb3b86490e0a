"""The node agent (`datapin-sidecar agent`) as a process, on real components.

The GC's own rules are tested in-process in test_gc.py; here the program is checked end to end:
it prefetches what the operator's file lists (once per node, from a real SeaweedFS filled by real
`dvc push`), a pod started afterwards is a warm start, the GC keeps the in-use revision while
evicting the rest down to the low watermark, workspaces of pods kubelet no longer has are
removed, and everything shows in /metrics.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

from datapin_sidecar.agent import prefetch_file_text
from datapin_sidecar.cache import NodeCache
from datapin_sidecar.hashing import Layout
from datapin_sidecar.materialize import Request, materialize
from datapin_sidecar.revision import Revision
from datapin_sidecar.settings import DatasetSettings

from tests.support.dvcremote import S3DvcFixture
from tests.support.dvcrepo import tree_bytes
from tests.support.k8svolume import kubelet_update
from tests.support.seaweed import SeaweedServer
from tests.support.sidecarproc import SidecarProcess
from tests.support.trees import put_revision


def _secret(work: Path, fx: S3DvcFixture) -> Path:
    path = work / "agent-secret"
    kubelet_update(
        path,
        {"AWS_ACCESS_KEY_ID": fx.access_key, "AWS_SECRET_ACCESS_KEY": fx.secret_key},
        "2026_11_22_01_00_00.1",
    )
    return path


def _objects(cache: NodeCache, fx: S3DvcFixture) -> list[str]:
    manifest = cache.load_manifest(Revision.parse(fx.rev), Layout.DVC3)
    return sorted({manifest.md5(i) for i in range(len(manifest))})


def test_agent_prefetches_the_list_and_a_pod_then_starts_warm(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, b = dvc3_revisions
    secret = _secret(tmp_path, a)
    entries = [
        DatasetSettings(
            name="images",
            remote=fx.remote_url,
            endpoint_url=seaweed.endpoint,
            credentials_dir=secret,
            layout="dvc3",
            pin=fx.rev,
            ref=ref,
        )
        for fx, ref in ((a, "v1"), (b, "v2"))
    ]
    listing = tmp_path / "prefetch.json"
    listing.write_text(prefetch_file_text(entries))
    settings = {
        "root": str(xfs_dir),
        "prefetch_file": str(listing),
        "prefetch_interval_seconds": "0.2",
        "gc_interval_seconds": "0.2",
        "log_format": "json",
    }
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until(
            "both revisions warm",
            lambda: agent.sample("datapin_prefetch_revisions", state="warm") == 2,
        )
        assert agent.get("/readyz")[0] == 200
        cache = NodeCache(xfs_dir / "cache")
        for fx in (a, b):
            assert all(cache.present(oid, Layout.DVC3) for oid in _objects(cache, fx))
        fetched = agent.sample("datapin_remote_fetched_bytes_total", dataset="images")
        assert fetched >= sum(len(v) for v in {**a.files, **b.files}.values()) * 0.5
        assert agent.sample("datapin_volume_size_bytes") > 0
        assert agent.sample("datapin_gc_watermark_ratio", kind="bytes", level="high") == 0.85
        status = agent.status()
        assert status["prefetch"][f"images@{a.rev}"]["state"] == "warm"
        assert agent.stop() == 0
    # A pod on this node now costs metadata only: materialising without any remote works.
    result = materialize(
        Request(
            cache=NodeCache(xfs_dir / "cache"),
            revision=Revision.parse(a.rev),
            dest=xfs_dir / "workspaces" / str(uuid.uuid4()) / "images",
        )
    )
    assert result.misses == 0
    assert result.hits == len(a.files)
    assert all(a.secret_key not in json.dumps(x) for x in agent.log_lines())


def test_agent_gc_keeps_the_published_revision_and_reaps_gone_pods(
    small_xfs: Path, tmp_path: Path
) -> None:
    """Two revisions fill the volume past the high watermark; one is published by a live pod.

    The agent evicts the other down to the low watermark, keeps every object of the live one,
    and removes the workspace of a pod kubelet no longer has.
    """
    cache = NodeCache(small_xfs / "cache")
    rng = random.Random(3)
    in_use = {f"a/{i}.bin": rng.randbytes(1 << 20) for i in range(40)}  # 40 MiB
    unused = {f"b/{i}.bin": rng.randbytes(1 << 20) for i in range(110)}  # 110 MiB
    rev_a = put_revision(cache, in_use)
    put_revision(cache, unused)
    live_uid, gone_uid = str(uuid.uuid4()), str(uuid.uuid4())
    live_tree = small_xfs / "workspaces" / live_uid / "images"
    materialize(Request(cache=cache, revision=rev_a, dest=live_tree))
    gone_tree = small_xfs / "workspaces" / gone_uid / "images"
    materialize(Request(cache=cache, revision=rev_a, dest=gone_tree))
    pods = tmp_path / "kubelet-pods"
    (pods / live_uid).mkdir(parents=True)
    st = os.statvfs(small_xfs)
    used = 100 * (st.f_blocks - st.f_bfree) / st.f_blocks
    settings = {
        "root": str(small_xfs),
        "gc_interval_seconds": "0.2",
        "gc_high_percent": str(round(used - 5, 1)),
        "gc_low_percent": str(round(used - 30, 1)),
        "kubelet_pods_dir": str(pods),
        "workspace_grace_seconds": "0",
        "log_format": "json",
    }
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until(
            "a GC pass that reached the low watermark",
            lambda: agent.sample("datapin_gc_runs_total", result="reached") >= 1,
        )
        assert agent.sample("datapin_cache_evictions_total") > 0
        assert agent.sample("datapin_workspaces_removed_total") == 1
        assert agent.stop() == 0
    assert not (small_xfs / "workspaces" / gone_uid).exists()
    assert live_tree.is_dir()
    st = os.statvfs(small_xfs)
    assert 100 * (st.f_blocks - st.f_bfree) / st.f_blocks <= used - 30
    assert tree_bytes((live_tree / "current").resolve()) == in_use
    manifest = cache.load_manifest(rev_a, Layout.DVC3)
    assert all(cache.present(manifest.md5(i), Layout.DVC3) for i in range(len(manifest)))
