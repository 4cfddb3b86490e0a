"""Adversarial: the GC racing builds in progress (issue 17, finding 5).

With a low watermark, the GC used to evict objects a running materialise had just found in the
cache (or fetched) before it linked them: most concurrent materialises failed with
`FileNotFoundError … not in cache`. The property: GC never evicts an object that a build in
progress needs. A build registers its revision with `NodeCache.building` before it looks at
the cache; every held registration is a GC root, re-read before every batch of evictions
under `builds.lock` (see `cache` and `gc`).

The concurrency case runs real processes (one `materialize` each, which registers its build
itself — see `BUILDER`) against a cache on a small real XFS volume filled from a DVC directory
remote, while a GC evicts everything not in use over and over.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.node.housekeeping import evict as gc_module
from datapin_sidecar.node.housekeeping.evict import BATCH, collect
from datapin_sidecar.node.housekeeping.roots import roots
from datapin_sidecar.node.housekeeping.volume import VolumeUsage, Watermarks

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision

KiB = 1 << 10
ORPHANS = BATCH * 20
#: Watermarks every small volume is above: evict every object no root protects.
EVICT_ALL = Watermarks(high_percent=0.02, low_percent=0.01)

#: One build: materialise (which registers the build) from the cache and the directory remote.
BUILDER = """
import sys
from pathlib import Path
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.remotes.directory import DirectoryRemote
from datapin_sidecar.engine.revision import Revision

cache, rev = NodeCache(sys.argv[1]), Revision.parse(sys.argv[2])
dest, remote = Path(sys.argv[3]), DirectoryRemote(sys.argv[4])
materialize(Request(cache=cache, revision=rev, dest=dest, remote=remote))
"""


def files_of(seed: int, count: int = 24, size: int = 64 * KiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"d{i % 3}/f{i:03d}.bin": rng.randbytes(size) for i in range(count)}


def present(cache: NodeCache, files: dict[str, bytes]) -> bool:
    return all(cache.present(object_name(d), Layout.DVC3) for d in files.values())


def test_a_registered_build_keeps_its_revision_through_a_gc(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    building, other = files_of(1), files_of(2)
    rev = put_revision(cache, building)
    put_revision(cache, other)
    single = os.urandom(200 * KiB)
    single_oid = object_name(single)
    cache.insert_bytes(single, single_oid, Layout.DVC3)

    with cache.building(rev.oid), cache.building(single_oid):
        report = collect(cache, roots(small_xfs), EVICT_ALL)
        assert report.triggered
        assert present(cache, building)
        assert cache.present(rev.oid, Layout.DVC3)
        assert cache.present(single_oid, Layout.DVC3)
        assert not present(cache, other)
    # Once the builds are over, nothing holds them.
    assert os.listdir(cache.builds_dir) == []
    collect(cache, roots(small_xfs), EVICT_ALL)
    assert not cache.present(rev.oid, Layout.DVC3)
    assert not cache.present(single_oid, Layout.DVC3)


def test_a_build_registering_while_the_gc_evicts_is_honoured_from_the_next_batch(
    small_xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration made after the GC planned protects everything not yet evicted: the GC
    re-reads registrations before every batch, and a builder registers between batches.

    The interleaving is made exact rather than left to the scheduler: the build registers
    (through the real `cache.building`, real flocks) right after the GC's first batch released
    `builds.lock` and before its second takes it, the moment a racing builder would hit.
    """
    cache = NodeCache(small_xfs / "cache")
    # Many small unprotected objects first (oldest), so the GC runs several batches.
    for i in range(ORPHANS):
        os.utime(_orphan(cache, i), (1000 + i, 1000 + i))
    late = files_of(3)
    rev = put_revision(cache, late)
    for path in [cache.path(object_name(d), Layout.DVC3) for d in late.values()]:
        os.utime(path, (5000, 5000))
    os.utime(cache.path(rev.oid, Layout.DVC3), (5000, 5000))
    evicted_before: list[int] = []
    batches = 0
    original = gc_module.Builds.held
    with contextlib.ExitStack() as registration:

        def held(self: gc_module.Builds) -> contextlib.AbstractContextManager[set[str]]:
            nonlocal batches
            batches += 1
            if batches == 3:  # the first takes the plan's registrations, the second a batch
                registration.enter_context(cache.building(rev.oid))
                evicted_before.append(ORPHANS - len(_orphans(cache)))
            return original(self)

        monkeypatch.setattr(gc_module.Builds, "held", held)
        collect(cache, set(), EVICT_ALL)
        assert batches > 3, "the GC ran several batches"
        assert 0 < evicted_before[0] < ORPHANS, "registered between batches, mid-GC"
        assert present(cache, late)
        assert cache.present(rev.oid, Layout.DVC3)
    assert _orphans(cache) == [], "everything else went"


def _orphan(cache: NodeCache, i: int) -> str:
    data = i.to_bytes(4, "big") * 256
    oid = object_name(data)
    cache.insert_bytes(data, oid, Layout.DVC3)
    return cache.path(oid, Layout.DVC3)


def _orphans(cache: NodeCache) -> list[str]:
    return [
        oid
        for oid in (object_name(i.to_bytes(4, "big") * 256) for i in range(ORPHANS))
        if cache.present(oid, Layout.DVC3)
    ]


def test_registrations_of_dead_builders_are_removed_and_protect_nothing(
    small_xfs: Path,
) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = files_of(4)
    rev = put_revision(cache, files)
    code = (
        "import sys, time; from datapin_sidecar.engine.cache import NodeCache; "
        "c = NodeCache(sys.argv[1]); "
        "b = c.building(sys.argv[2]); b.__enter__(); print('registered', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(cache.root), rev.oid], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "registered"
        collect(cache, set(), EVICT_ALL)
        assert present(cache, files), "a live builder's registration is a root"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(os.listdir(cache.builds_dir)) == 1  # killed: its file stays, its lock is free
    collect(cache, set(), EVICT_ALL)
    assert os.listdir(cache.builds_dir) == []
    assert not cache.present(rev.oid, Layout.DVC3)


def test_concurrent_materialises_all_succeed_while_the_gc_evicts_everything_unused(
    small_xfs: Path, tmp_path: Path
) -> None:
    """Many real build processes against a warm cache while GC passes evict everything no root
    protects: every build succeeds with an exact tree."""
    remote = tmp_path / "remote"
    remote_cache = NodeCache(remote)
    revisions = {}
    for n in range(8):
        files = files_of(100 + n, count=30, size=32 * KiB)
        revisions[put_revision(remote_cache, files).oid] = files
    cache = NodeCache(small_xfs / "cache")
    for files in revisions.values():
        put_revision(cache, files)  # warm: builds find objects present, then link them
    stop = threading.Event()
    passes: list[int] = []
    failures: list[BaseException] = []

    def gc() -> None:
        try:
            while not stop.is_set():
                report = collect(
                    cache, roots(small_xfs), EVICT_ALL, usage=VolumeUsage.measure(small_xfs)
                )
                passes.append(report.evicted_objects)
        except BaseException as exc:
            failures.append(exc)

    collector = threading.Thread(target=gc, daemon=True)
    collector.start()
    procs = []
    try:
        for i in range(24):
            oid = list(revisions)[i % len(revisions)]
            dest = small_xfs / "workspaces" / f"{i:08x}-0000-4000-8000-{i:012x}" / "ds"
            argv = [sys.executable, "-c", BUILDER, str(cache.root), oid, str(dest)]
            procs.append(
                (
                    oid,
                    dest,
                    subprocess.Popen(
                        [*argv, str(remote)],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                )
            )
        results = [
            (oid, dest, p.communicate(timeout=300)[0], p.returncode) for oid, dest, p in procs
        ]
    finally:
        stop.set()
        collector.join(60)
    assert not failures, failures
    assert len(passes) >= 2, "the GC ran concurrently"
    assert sum(passes) > 0, "the GC evicted concurrently"
    failed = [(dest.parent.name, out[-500:]) for _, dest, out, code in results if code != 0]
    assert not failed, f"{len(failed)} of {len(results)} builds failed: {failed[:2]}"
    for oid, dest, _, _ in results:
        assert tree_bytes((dest / "current").resolve()) == revisions[oid]
