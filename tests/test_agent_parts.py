"""The node agent and parts of revisions (issue 18), as a process on real components.

What the operator and users rely on:

* a prefetch entry with `paths` fetches that part of the revision and its `.dir`, nothing
  else (the GETs a fault proxy in front of a real SeaweedFS saw, the objects in the cache), and
  `/status` reports it warm under `<name>@<pin>:<folders>`, the key the operator parses;
* the same pin whole and as a part are two entries, each warm on its own, and the whole one
  then fetches only what the part did not;
* the part is named in the logs, and no counter grows a label per part;
* the agent's GC keeps the part an entry names and evicts the rest of its revision.

The GC's rules with parts are tested in-process in test_gc_parts.py.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings

from testkit.dvcremote import S3DvcFixture
from testkit.faultproxy import FaultProxy
from testkit.k8svolume import kubelet_update
from testkit.sidecarproc import SidecarProcess
from testkit.trees import object_name, put_revision

PART = ("d1", "d2")
LABEL = "d1,d2"


def _secret(work: Path, fx: S3DvcFixture) -> Path:
    path = work / "agent-secret"
    kubelet_update(
        path,
        {"AWS_ACCESS_KEY_ID": fx.access_key, "AWS_SECRET_ACCESS_KEY": fx.secret_key},
        "2026_11_22_01_00_00.1",
    )
    return path


def _entry(fx: S3DvcFixture, endpoint: str, secret: Path, *paths: str) -> DatasetSettings:
    return DatasetSettings(
        name="images",
        remote=fx.remote_url,
        endpoint_url=endpoint,
        credentials_dir=secret,
        layout=LayoutChoice.DVC3,
        pin=fx.rev,
        paths=list(paths),
    )


def _objects(files: dict[str, bytes], *folders: str) -> set[str]:
    """The object names of `files` beneath `folders` (all of them without folders)."""
    return {
        object_name(data)
        for path, data in files.items()
        if not folders or path.split("/", 1)[0] in folders
    }


def _cached(cache_dir: Path) -> set[str]:
    """Every object in the node cache (DVC 3 layout), `.dir` objects included."""
    base = cache_dir / "files" / "md5"
    if not base.is_dir():
        return set()
    return {shard.name + f.name for shard in base.iterdir() for f in shard.iterdir()}


def _object_gets(proxy: FaultProxy, fx: S3DvcFixture) -> collections.Counter[str]:
    """GETs per object (the `.dir` included) the fault proxy forwarded to the remote. (The
    `.dir` of a prefetch is asked for twice: `remote.find` probes the layout with a GET.)"""
    return collections.Counter(
        "".join(r.path.rsplit("/", 2)[-2:]) for r in proxy.gets() if f"/{fx.prefix}/" in r.path
    )


def test_a_prefetch_entry_with_paths_fetches_only_its_part_and_the_whole_is_another_entry(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    a, _ = dvc3_revisions
    secret = _secret(tmp_path, a)
    listing = tmp_path / "prefetch.json"
    part_entry = _entry(a, fault_proxy.endpoint, secret, *PART)
    listing.write_text(prefetch_file_text([part_entry]))
    settings = {
        "root": str(xfs_dir),
        "prefetch_file": str(listing),
        "prefetch_interval_seconds": "0.2",
        "gc_interval_seconds": "0.2",
        "log_format": "json",
    }
    files = a.files
    part_objects = _objects(files, *PART)
    all_objects = _objects(files)
    assert part_objects < all_objects
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until(
            "the part warm",
            lambda: (
                agent.status()["prefetch"].get(f"images@{a.rev}:{LABEL}", {}).get("state") == "warm"
            ),
        )
        assert list(agent.status()["prefetch"]) == [f"images@{a.rev}:{LABEL}"]
        gets = _object_gets(fault_proxy, a)
        assert set(gets) == part_objects | {a.rev}, "a GET outside the part (or a part miss)"
        assert all(gets[oid] == 1 for oid in part_objects), "an object was downloaded twice"
        assert _cached(xfs_dir / "cache") == part_objects | {a.rev}
        assert agent.sample("datapin_prefetch_revisions", state="warm") == 1

        # The operator adds the whole revision of the same pin: another entry, and only what
        # the part did not hold comes over the wire.
        whole_entry = _entry(a, fault_proxy.endpoint, secret)
        listing.write_text(prefetch_file_text([part_entry, whole_entry]))
        agent.wait_until(
            "the whole revision warm too",
            lambda: agent.sample("datapin_prefetch_revisions", state="warm") == 2,
        )
        prefetch = agent.status()["prefetch"]
        assert prefetch == {
            f"images@{a.rev}": {"state": "warm", "last_error": ""},
            f"images@{a.rev}:{LABEL}": {"state": "warm", "last_error": ""},
        }
        gets = _object_gets(fault_proxy, a)
        assert set(gets) == all_objects | {a.rev}
        assert all(gets[oid] == 1 for oid in all_objects), "an object was downloaded twice"
        assert _cached(xfs_dir / "cache") == all_objects | {a.rev}

        # No counter or gauge of the agent is labelled by part (folder lists are unbounded).
        for name, labels in agent.metrics():
            if name != "datapin_revision_info":
                assert "path" not in dict(labels), name
        assert agent.stop() == 0
    warm = [x for x in agent.log_lines() if str(x.get("msg", "")).startswith("warm")]
    assert {x.get("path") for x in warm} == {LABEL, None}
    assert any(f"(part {LABEL})" in x["msg"] for x in warm)


def test_the_agents_gc_keeps_the_part_a_prefetch_entry_names_and_evicts_the_rest(
    small_xfs: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    """A node that held all of revision A (a Job used it whole) is now asked to keep only
    `d1,d2` warm; the volume is above the high watermark: the agent's GC keeps the part and
    its `.dir` and evicts the rest of A, and the part stays warm without a download."""
    a, _ = dvc3_revisions
    cache = NodeCache(small_xfs / "cache")
    rev = put_revision(cache, a.files)
    assert rev == Revision.parse(a.rev)  # the very revision DVC pushed
    secret = _secret(tmp_path, a)
    listing = tmp_path / "prefetch.json"
    listing.write_text(prefetch_file_text([_entry(a, fault_proxy.endpoint, secret, *PART)]))
    st = os.statvfs(small_xfs)
    used = 100 * (st.f_blocks - st.f_bfree) / st.f_blocks
    settings = {
        "root": str(small_xfs),
        "prefetch_file": str(listing),
        "prefetch_interval_seconds": "0.2",
        "gc_interval_seconds": "0.2",
        # Above the high watermark now, and the low one is out of reach: everything the
        # roots do not protect goes on every pass.
        "gc_high_percent": str(round(used / 2, 2)),
        "gc_low_percent": "0.5",
        "log_format": "json",
    }
    part_objects = _objects(a.files, *PART)
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until(
            "the part warm",
            lambda: (
                agent.status()["prefetch"].get(f"images@{a.rev}:{LABEL}", {}).get("state") == "warm"
            ),
        )
        passes = agent.sample("datapin_gc_runs_total", result="short")
        agent.wait_until(
            "two GC passes after the part was warm",
            lambda: agent.sample("datapin_gc_runs_total", result="short") >= passes + 2,
        )
        assert agent.status()["gc"]["triggered"]
        assert agent.status()["prefetch"][f"images@{a.rev}:{LABEL}"]["state"] == "warm"
        assert agent.stop() == 0
    assert _cached(small_xfs / "cache") == part_objects | {a.rev}
    assert cache.present(a.rev, Layout.DVC3)
    # Either the GC ran before the list was read (and the part came back from the remote),
    # or the part never left: in both cases nothing outside it was downloaded.
    assert set(_object_gets(fault_proxy, a)) <= part_objects | {a.rev}
