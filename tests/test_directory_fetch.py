"""The directory remote's batched fetch: claims, copies or reflinks, one syncfs per batch.

What `DirectoryRemote.fetch` promises (its module doc), each on a real filesystem: the XFS loop
volume (reflinks) and the root filesystem (plain copies), with the remote on the cache's own
volume or on another one:

* the md5 is the judge: bytes that do not hash to their name never enter the cache, whether
  they were copied (small, streamed) or reflinked, and no slot or temp file is left behind;
* what enters the cache equals the remote's bytes; a large object on the cache's own XFS
  volume is a reflink (shared extents), one from another filesystem a copy;
* a symlink at an object's name is refused, never followed out of the remote;
* a slot a dead downloader left (junk bytes, a journal) is overwritten, never trusted;
* an object another process holds the slot of is still fetched (through a temp file);
* `abort` stops the fetch and leaves no slot claimed;
* present, absent and corrupt objects are told apart across batches and threads.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.remotes.directory import CLONE_MIN_BYTES, SMALL_BYTES, DirectoryRemote
from datapin_sidecar.remotes.slotfiles import MiB

from testkit.trees import object_name
from testkit.xfs import shared_extents

L = Layout.DVC3


def _put(remote: Path, data: bytes) -> str:
    """Write `data` into the directory remote under its md5 (as `dvc push` would)."""
    oid = object_name(data)
    path = Path(NodeCache(remote).path(oid, L))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return oid


def _leftovers(cache: NodeCache) -> list[str]:
    """Files left in the cache's private work areas (slots, journals, temp files)."""
    found = []
    for area in (cache.fetch_dir, cache.tmp_dir):
        if area.exists():
            found += [str(p) for p in area.rglob("*") if p.is_file()]
    return found


def _replace(remote: Path, oid: str, data: bytes) -> None:
    """Put other bytes under `oid`'s name: a corrupt copy on the remote."""
    path = Path(NodeCache(remote).path(oid, L))
    path.unlink()
    path.write_bytes(data)


#: Sizes that take each copy path: one read (small), streamed, and (same XFS) reflinked.
SIZES = {"small": 4096, "streamed": SMALL_BYTES + MiB + 7, "clone-sized": CLONE_MIN_BYTES + 3}


@pytest.mark.parametrize("kind", list(SIZES))
@pytest.mark.parametrize("where", ["same-xfs", "rootfs-remote"])
def test_a_corrupt_object_never_enters_the_cache(
    xfs_dir: Path, rootfs_dir: Path, kind: str, where: str
) -> None:
    remote = (xfs_dir if where == "same-xfs" else rootfs_dir) / "remote"
    cache = NodeCache(xfs_dir / "cache")
    good = os.urandom(SIZES[kind])
    oid = _put(remote, good)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    _replace(remote, oid, bytes(bad))
    ok = _put(remote, os.urandom(100))

    report = DirectoryRemote(remote, jobs=4).fetch(cache, [oid, ok], L)

    assert report.corrupt == [oid]
    assert report.fetched == 1
    assert not cache.present(oid, L)
    assert cache.present(ok, L)
    assert _leftovers(cache) == []
    # A good copy on the remote later is fetched: nothing of the bad one was kept.
    _replace(remote, oid, good)
    assert DirectoryRemote(remote).fetch(cache, [oid], L).fetched == 1
    assert Path(cache.path(oid, L)).read_bytes() == good


@pytest.mark.parametrize("kind", ["short", "long"])
def test_an_object_of_another_size_is_refused(xfs_dir: Path, kind: str) -> None:
    """Bytes added or cut (a truncated upload, a file still growing) fail like any others."""
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    good = os.urandom(SMALL_BYTES + 5 * MiB)
    oid = _put(remote, good)
    _replace(remote, oid, good[:-1] if kind == "short" else good + b"x")
    assert DirectoryRemote(remote).fetch(cache, [oid], L).corrupt == [oid]
    assert not cache.present(oid, L)
    assert _leftovers(cache) == []


def test_a_large_object_on_the_same_xfs_is_a_verified_reflink(xfs_dir: Path) -> None:
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    data = os.urandom(8 * MiB + 11)
    oid = _put(remote, data)
    report = DirectoryRemote(remote).fetch(cache, [oid], L)
    assert (report.fetched, report.fetched_bytes) == (1, len(data))
    installed = Path(cache.path(oid, L))
    assert installed.read_bytes() == data
    assert shared_extents(installed)
    assert installed.stat().st_mode & 0o777 == 0o444


def test_objects_from_another_filesystem_are_copies_equal_to_the_source(
    xfs_dir: Path, rootfs_dir: Path
) -> None:
    remote, cache = rootfs_dir / "remote", NodeCache(xfs_dir / "cache")
    blobs = [os.urandom(n) for n in (0, 1, 4096, SMALL_BYTES, SMALL_BYTES + 1, 9 * MiB)]
    oids = [_put(remote, b) for b in blobs]
    report = DirectoryRemote(remote, jobs=3).fetch(cache, oids, L)
    assert report.fetched == len(set(oids))
    for oid, data in zip(oids, blobs, strict=True):
        installed = Path(cache.path(oid, L))
        assert installed.read_bytes() == data
        assert not shared_extents(installed)
    assert _leftovers(cache) == []


def test_a_symlink_at_an_objects_name_is_not_followed(xfs_dir: Path, rootfs_dir: Path) -> None:
    """A link out of the remote to a file with the right bytes is still not the object."""
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    data = os.urandom(2 * MiB)
    oid = _put(remote, data)
    outside = rootfs_dir / "secret"
    outside.write_bytes(data)
    path = Path(NodeCache(remote).path(oid, L))
    path.unlink()
    path.symlink_to(outside)
    assert DirectoryRemote(remote).fetch(cache, [oid], L).corrupt == [oid]
    assert not cache.present(oid, L)


@pytest.mark.parametrize("size", [4096, 12 * MiB])
def test_a_dead_downloaders_slot_is_overwritten(xfs_dir: Path, size: int) -> None:
    """Junk longer than the object and a parts journal, left by a killed fetch: the object is
    copied afresh (and truncated to its size), the journal removed."""
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    data = os.urandom(size)
    oid = _put(remote, data)
    slot = Path(cache.slot_path(oid, L))
    slot.parent.mkdir(parents=True)
    slot.write_bytes(os.urandom(size + 4 * MiB))
    journal = Path(str(slot) + ".parts")
    journal.write_bytes(b"datapin-parts 1 1 1\n1")
    report = DirectoryRemote(remote).fetch(cache, [oid], L)
    assert report.fetched == 1
    assert Path(cache.path(oid, L)).read_bytes() == data
    assert _leftovers(cache) == []


def test_an_object_whose_slot_another_process_holds_is_still_fetched(xfs_dir: Path) -> None:
    """The holder may be slow or stuck: the fetch copies it through a temp file of its own
    instead of waiting, and leaves the holder's slot alone."""
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    data = os.urandom(5000)
    oid = _put(remote, data)
    held = NodeCache(cache.root).claim(oid, L)  # its own open file: a lock like another's
    assert held is not None
    try:
        report = DirectoryRemote(remote).fetch(cache, [oid], L)
        assert report.fetched == 1
        assert Path(cache.path(oid, L)).read_bytes() == data
        assert Path(held.path).exists()
    finally:
        held.discard()


def test_many_objects_across_batches_and_threads(xfs_dir: Path) -> None:
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    blobs = [os.urandom(1000 + i) for i in range(700)]
    oids = [_put(remote, b) for b in blobs]
    for oid in oids[:50]:  # already in the cache
        cache.insert_file(NodeCache(remote).path(oid, L), oid, L)
    absent = [object_name(f"never pushed {i}".encode()) for i in range(5)]
    corrupt = oids[100:103]
    for oid in corrupt:
        _replace(remote, oid, b"not it")
    threads: set[int] = set()
    ticks: list[int] = []

    def progress(done: int) -> None:
        threads.add(threading.get_ident())
        ticks.append(done)

    report = DirectoryRemote(remote, jobs=4).fetch(cache, [*oids, *absent], L, progress)

    assert report.present == 50
    assert report.fetched == 700 - 50 - 3
    assert sorted(report.absent) == sorted(absent)
    assert sorted(report.corrupt) == sorted(corrupt)
    assert threads == {threading.get_ident()}  # the ticker is called from the caller's thread
    assert ticks == sorted(ticks)
    assert ticks[-1] == 697
    for oid, data in zip(oids, blobs, strict=True):
        if oid not in corrupt:
            assert Path(cache.path(oid, L)).read_bytes() == data
    assert _leftovers(cache) == []


def test_abort_stops_the_fetch_and_leaves_no_claim(xfs_dir: Path) -> None:
    remote, cache = xfs_dir / "remote", NodeCache(xfs_dir / "cache")
    oids = [_put(remote, os.urandom(2000 + i)) for i in range(300)]
    directory = DirectoryRemote(remote, jobs=2)

    def progress(done: int) -> None:
        directory.abort()  # what SIGTERM does, from another thread, mid-fetch

    with pytest.raises(asyncio.CancelledError):
        directory.fetch(cache, oids, L, progress)
    with pytest.raises(asyncio.CancelledError):
        directory.fetch(cache, oids[:1], L)
    # Every slot was installed or given back: a fresh remote fetches what is missing.
    report = DirectoryRemote(remote).fetch(cache, oids, L)
    assert report.fetched + report.present == len(oids)
    assert _leftovers(cache) == []


def test_jobs_out_of_range_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jobs"):
        DirectoryRemote(tmp_path, jobs=0)
