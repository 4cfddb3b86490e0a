"""The node agent (`datapin-sidecar agent`) as a process, on real components.

The GC's own rules are tested in-process in test_gc.py; here the program is checked end to end:
it prefetches what the operator's file lists (once per node, from a real SeaweedFS filled by real
`dvc push`), a pod started afterwards is a warm start, the GC keeps the in-use revision while
evicting the rest down to the low watermark, workspaces of pods kubelet no longer has are
removed, and everything shows in /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings

from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import tree_bytes
from testkit.k8svolume import kubelet_update
from testkit.seaweed import SeaweedServer
from testkit.sidecarproc import SidecarProcess
from testkit.trees import put_revision


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


class HangingServer:
    """A TCP server that accepts connections and never answers: the worst S3 endpoint."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.held.append(conn)
                self.accepted += 1

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_one_tenants_hanging_endpoint_never_keeps_another_dataset_from_warming(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    """Prefetch entries run concurrently, each with its own backoff: the dataset listed first
    talks to an endpoint that accepts and never answers, the second one is warm at once, and
    the agent is ready and stops promptly on SIGTERM with the stuck fetch still in flight."""
    a, _ = dvc3_revisions
    secret = _secret(tmp_path, a)
    hanging = HangingServer()
    stuck = DatasetSettings(
        name="stuck",
        remote="s3://stuck-bucket/dvcstore",
        endpoint_url=f"http://127.0.0.1:{hanging.port}",
        credentials_dir=secret,
        layout="dvc3",
        pin=a.rev,
    )
    images = DatasetSettings(
        name="images",
        remote=a.remote_url,
        endpoint_url=seaweed.endpoint,
        credentials_dir=secret,
        layout="dvc3",
        pin=a.rev,
    )
    listing = tmp_path / "prefetch.json"
    listing.write_text(prefetch_file_text([stuck, images]))
    settings = {
        "root": str(xfs_dir),
        "prefetch_file": str(listing),
        "prefetch_interval_seconds": "0.2",
        "gc_interval_seconds": "0.2",
        "log_format": "json",
    }
    try:
        with SidecarProcess("agent", tmp_path, settings) as agent:
            agent.wait_until(
                "images warm while stuck hangs",
                lambda: agent.status()["prefetch"][f"images@{a.rev}"]["state"] == "warm",
                timeout=20,
            )
            assert hanging.accepted > 0, "the stuck entry really was fetching"
            assert agent.status()["prefetch"][f"stuck@{a.rev}"]["state"] != "warm"
            assert agent.get("/readyz")[0] == 200
            assert agent.get("/healthz")[0] == 200
            started = time.monotonic()
            assert agent.stop(timeout=10) == 0
            assert time.monotonic() - started < 10
    finally:
        hanging.close()
    cache = NodeCache(xfs_dir / "cache")
    assert all(cache.present(oid, Layout.DVC3) for oid in _objects(cache, a))


def test_a_prefetch_list_written_after_start_and_a_filling_cache_show_within_seconds(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    """With the default intervals (prefetch list 30 s, scan 300 s): the operator's file that
    appears after the agent started is acted on within seconds, and the cache gauges follow
    objects a sidecar adds within seconds."""
    a, _ = dvc3_revisions
    secret = _secret(tmp_path, a)
    listing = tmp_path / "config" / "prefetch.json"
    settings = {"root": str(xfs_dir), "prefetch_file": str(listing), "log_format": "json"}
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until("ready", lambda: agent.get("/readyz")[0] == 200, timeout=20)
        assert agent.sample("datapin_cache_objects") == 0
        # A sidecar fills the cache: the gauges follow.
        cache = NodeCache(xfs_dir / "cache")
        files = {f"s/{i}.bin": os.urandom(4096) for i in range(50)}
        put_revision(cache, files)
        agent.wait_until(
            "the cache gauges to count the sidecar's objects",
            lambda: agent.sample("datapin_cache_objects") == 51,
            timeout=10,
        )
        assert agent.sample("datapin_cache_bytes") >= 50 * 4096
        # The operator writes the list the way kubelet projects a ConfigMap: after start.
        entry = DatasetSettings(
            name="images",
            remote=a.remote_url,
            endpoint_url=seaweed.endpoint,
            credentials_dir=secret,
            layout="dvc3",
            pin=a.rev,
        )
        kubelet_update(
            listing.parent, {"prefetch.json": prefetch_file_text([entry])}, "2026_12_02_01_00_00.1"
        )
        agent.wait_until(
            "the late prefetch list warm",
            lambda: agent.sample("datapin_prefetch_revisions", state="warm") == 1,
            timeout=15,
        )
        agent.wait_until(
            "the gauges to count the prefetched objects",
            lambda: agent.sample("datapin_cache_objects") >= 51 + len(_objects(cache, a)),
            timeout=10,
        )
        assert agent.stop() == 0
