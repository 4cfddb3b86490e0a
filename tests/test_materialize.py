"""Materialise and publish: what a training pod relies on.

Each test runs on a reflink XFS volume and on the ext4 root filesystem (`fs_dir`), so both
the reflink path and the hardlink fallback are exercised by the same assertions. Reflinks are
proved by the filesystem (shared extents, free space), never by a return code.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Linker, LinkMode, Strategy
from datapin_sidecar.engine.materialize import Progress, Request, Result, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import LinkError
from datapin_sidecar.progress import Reporter
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision
from testkit.xfs import free_bytes, shared_extents

FILES_A = {
    "train/cat/001.jpg": b"\xff\xd8" + b"cat" * 3000,
    "train/cat/002.jpg": b"\xff\xd8" + b"cat2" * 2000,
    "train/dog/001.jpg": b"\xff\xd8" + b"dog" * 2500,
    "labels.csv": b"file,label\n001,cat\n",
    "empty.txt": b"",
    "dup-a": b"same bytes",
    "dup-b": b"same bytes",
    "données/é.txt": "unicodé\n".encode(),
}
FILES_B = {
    **{k: v for k, v in FILES_A.items() if k != "train/dog/001.jpg"},
    "labels.csv": b"file,label\n001,cat\n002,cat\n",
    "val/001.jpg": b"\xff\xd8" + b"val" * 100,
    "train/dog": b"now a file where a directory was",
}
FILES_C = {
    **{k: v for k, v in FILES_A.items() if k != "dup-b"},
    "train/cat/003.jpg": b"\xff\xd8" + b"cat3" * 10,
    "labels.csv": b"file,label\n001,cat\n003,cat\n",
}


def published(link: Path) -> dict[str, bytes]:
    """The tree a reader sees through the published symlink."""
    return tree_bytes(link.resolve())


def run(cache: NodeCache, rev: Revision, dest: Path, **kw: object) -> Result:
    return materialize(Request(cache=cache, revision=rev, dest=dest, **kw))  # type: ignore[arg-type]


def expected_mode(fs: Path) -> LinkMode:
    return LinkMode.REFLINK if os.statvfs(fs).f_fsid and _is_xfs(fs) else LinkMode.HARDLINK


def _is_xfs(path: Path) -> bool:
    with open("/proc/mounts") as f:
        best = ""
        fstype = ""
        for line in f:
            _, mnt, typ, *_ = line.split()
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype == "xfs"


@pytest.fixture
def cache(fs_dir: Path) -> NodeCache:
    return NodeCache(fs_dir / "cache")


def test_cold_then_warm_gives_exact_tree_with_best_link_mode(
    fs_dir: Path, cache: NodeCache
) -> None:
    rev = put_revision(cache, FILES_A)
    result = run(cache, rev, fs_dir / "pod")
    mode = expected_mode(fs_dir)
    assert published(fs_dir / "pod" / "current") == FILES_A
    assert os.readlink(fs_dir / "pod" / "current") == f".revs/{rev.md5}"
    assert result.mode == mode
    assert result.read_only is mode.read_only
    assert result.files == len(FILES_A)
    assert result.bytes == sum(len(v) for v in FILES_A.values())
    assert result.hits == len(FILES_A)
    assert result.misses == 0
    # Zero-byte files are created fresh, never linked to a shared inode.
    empty = fs_dir / "pod" / "current" / "empty.txt"
    assert os.stat(empty).st_nlink == 1
    for path in (fs_dir / "pod" / "current").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_reflinks_share_extents_and_cost_no_space(xfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    big = {f"shard-{i}.bin": os.urandom(8 << 20) for i in range(4)}  # 32 MiB
    rev = put_revision(cache, big)
    os.sync()
    before = free_bytes(xfs_dir)
    result = run(cache, rev, xfs_dir / "pod", strategy=Strategy.REFLINK)
    os.sync()
    after = free_bytes(xfs_dir)
    assert result.modes == {"reflink": 4}
    assert not result.read_only
    for name, data in big.items():
        clone = xfs_dir / "pod" / "current" / name
        assert shared_extents(clone), f"{name} does not share extents with the cache"
        assert os.stat(clone).st_ino != os.stat(cache.path(object_name(data), Layout.DVC3)).st_ino
    # 32 MiB of clones: free space moves by metadata only (well under 1 MiB).
    assert before - after < 1 << 20, f"free space dropped by {before - after} bytes"


def test_hardlink_mode_is_read_only_and_shares_the_cache_inode(
    fs_dir: Path, cache: NodeCache
) -> None:
    rev = put_revision(cache, FILES_A)
    result = run(cache, rev, fs_dir / "pod", strategy=Strategy.HARDLINK)
    assert result.read_only
    assert result.mode == "hardlink"
    linked = fs_dir / "pod" / "current" / "labels.csv"
    obj = cache.path(object_name(FILES_A["labels.csv"]), Layout.DVC3)
    assert os.stat(linked).st_ino == os.stat(obj).st_ino
    assert stat.S_IMODE(os.stat(linked).st_mode) == 0o444


def test_copy_mode_shares_nothing(fs_dir: Path, cache: NodeCache) -> None:
    rev = put_revision(cache, FILES_A)
    result = run(cache, rev, fs_dir / "pod", strategy=Strategy.COPY)
    assert result.modes.get("copy") == len(FILES_A)
    copied = fs_dir / "pod" / "current" / "train" / "cat" / "001.jpg"
    assert os.stat(copied).st_nlink == 1
    assert not shared_extents(copied)
    assert published(fs_dir / "pod" / "current") == FILES_A


def test_reflink_requested_where_impossible_is_a_clear_error(rootfs_dir: Path) -> None:
    cache = NodeCache(rootfs_dir / "cache")
    rev = put_revision(cache, FILES_A)
    with pytest.raises(LinkError, match=r"--link reflink is not possible.*Fix: use --link auto"):
        run(cache, rev, rootfs_dir / "pod", strategy=Strategy.REFLINK)
    assert not (rootfs_dir / "pod" / "current").exists()


def test_cross_device_falls_back_to_copy(xfs_dir: Path, rootfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    rev = put_revision(cache, FILES_A)
    result = run(cache, rev, rootfs_dir / "pod")
    assert result.mode == "copy"
    assert not result.read_only
    assert published(rootfs_dir / "pod" / "current") == FILES_A


def test_probe_is_remembered_per_filesystem_pair(fs_dir: Path, cache: NodeCache) -> None:
    linker = Linker()
    cache.tmp_dir.mkdir(parents=True)
    (fs_dir / "d1").mkdir()
    (fs_dir / "d2").mkdir()
    first = linker.modes_for(cache_tmp=str(cache.tmp_dir), dest_dir=str(fs_dir / "d1"))
    # Same filesystem pair: answered from memory, so even a vanished probe dir is not touched.
    os.rmdir(cache.tmp_dir)
    cache.tmp_dir.mkdir()
    assert linker.modes_for(cache_tmp=str(cache.tmp_dir), dest_dir=str(fs_dir / "d2")) is first
    assert first[0] == expected_mode(fs_dir)


def test_switch_reuses_unchanged_files_and_recycles_the_spare(
    fs_dir: Path, cache: NodeCache
) -> None:
    a = put_revision(cache, FILES_A)
    b = put_revision(cache, FILES_B)
    dest = fs_dir / "pod"
    run(cache, a, dest)
    kept = dest / "current" / "train" / "cat" / "001.jpg"
    ino_a = os.stat(kept).st_ino

    first = run(cache, b, dest)
    assert published(dest / "current") == FILES_B
    assert first.base == "published"
    assert first.reused == 6  # cat/001, cat/002, empty, dup-a, dup-b, données/é.txt
    assert first.hits == 3  # labels.csv changed, val/001.jpg and train/dog are new
    assert first.bytes == sum(len(v) for v in FILES_B.values())
    # A left .revs/<A> (the old revision is gone) and was kept as the spare.
    assert not (dest / ".revs" / a.md5).exists()
    assert (dest / ".revs" / f".spare-{a.md5}").is_dir()

    # Next switch recycles the spare (A) in place into C: only A->C changes are touched.
    c = put_revision(cache, FILES_C)
    third = run(cache, c, dest)
    assert third.base == "spare"
    assert (third.hits, third.removed) == (2, 2)  # labels.csv + cat/003 in; labels + dup-b out
    assert published(dest / "current") == FILES_C
    # The unchanged file was never re-linked: same inode as in the very first tree.
    assert os.stat(dest / "current" / "train" / "cat" / "001.jpg").st_ino == ino_a
    assert third.bytes == sum(len(v) for v in FILES_C.values())
    assert (dest / ".revs" / f".spare-{b.md5}").is_dir()

    # Back to B: the spare is B itself, so nothing is linked at all.
    back = run(cache, b, dest)
    assert (back.base, back.hits, back.removed) == ("spare", 0, 0)
    assert published(dest / "current") == FILES_B


def test_switch_leaves_a_intact_until_the_swap(fs_dir: Path, cache: NodeCache) -> None:
    a = put_revision(cache, FILES_A)
    b = put_revision(cache, FILES_B)
    dest = fs_dir / "pod"
    run(cache, a, dest)
    seen: list[dict[str, bytes]] = []

    def look(_: object) -> None:
        # Called during B's build: readers must still see all of A.
        seen.append(published(dest / "current"))

    materialize(Request(cache=cache, revision=b, dest=dest), progress=look)
    assert seen
    assert all(tree == FILES_A for tree in seen[:-1])
    assert published(dest / "current") == FILES_B


def test_rematerialise_is_a_noop_without_reading_the_manifest(
    fs_dir: Path, cache: NodeCache
) -> None:
    rev = put_revision(cache, FILES_A)
    dest = fs_dir / "pod"
    first = run(cache, rev, dest)
    # Remove the manifest from the cache: a no-op must not need it.
    dir_path = Path(cache.path(rev.oid, Layout.DVC3))
    dir_path.unlink()
    again = run(cache, rev, dest)
    assert again.noop
    assert again.files == first.files
    assert again.read_only == first.read_only
    assert published(dest / "current") == FILES_A


def test_no_spare_deletes_the_old_tree(fs_dir: Path, cache: NodeCache) -> None:
    a = put_revision(cache, FILES_A)
    b = put_revision(cache, FILES_B)
    dest = fs_dir / "pod"
    run(cache, a, dest)
    run(cache, b, dest, keep_spare=False)
    assert sorted(p.name for p in (dest / ".revs").iterdir() if not p.name.startswith(".")) == [
        b.md5
    ]
    assert not any(p.name.startswith(".spare-") for p in (dest / ".revs").iterdir())


def test_missing_objects_are_fetched_once_from_a_directory_remote(fs_dir: Path) -> None:
    remote_dir = fs_dir / "remote"
    rev = put_revision(NodeCache(remote_dir), FILES_A)
    cache = NodeCache(fs_dir / "cache")
    result = run(cache, rev, fs_dir / "pod", remote=DirectoryRemote(remote_dir))
    assert published(fs_dir / "pod" / "current") == FILES_A
    assert result.misses == len(FILES_A)
    # dup-a and dup-b share one object: fetched once; plus the revision's `.dir`.
    assert result.fetched_objects == len(set(FILES_A.values())) + 1
    warm = run(cache, rev, fs_dir / "pod2", remote=DirectoryRemote(remote_dir))
    assert (warm.hits, warm.misses, warm.fetched_objects) == (len(FILES_A), 0, 0)
    # Objects landed in the DVC layout, read-only.
    obj = Path(cache.path(object_name(FILES_A["labels.csv"]), Layout.DVC3))
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444


def test_single_file_revision(fs_dir: Path, cache: NodeCache) -> None:
    data = b"model weights"
    oid = object_name(data)
    cache.insert_bytes(data, oid, Layout.DVC3)
    run(cache, Revision.parse(oid), fs_dir / "pod", file_name="model.bin")
    assert published(fs_dir / "pod" / "current") == {"model.bin": data}


def test_one_md5_two_layouts_two_trees(fs_dir: Path, cache: NodeCache) -> None:
    """Legacy names CRLF text by its LF form, so one `.dir` md5 can name two different trees.

    The layout (from the `.dvc` file) picks the tree; trees of different layouts never share
    entries, and each is published under its own key.
    """
    crlf = b"a,b\r\n1,2\r\n"
    lf = crlf.replace(b"\r\n", b"\n")
    assert object_name(crlf, Layout.LEGACY) == object_name(lf, Layout.DVC3)
    legacy = put_revision(cache, {"t.csv": crlf, "same.bin": b"\x00bin"}, layout=Layout.LEGACY)
    modern = put_revision(cache, {"t.csv": lf, "same.bin": b"\x00bin"}, layout=Layout.DVC3)
    assert legacy == modern  # byte-identical manifests
    dest = fs_dir / "pod"
    first = run(cache, legacy, dest, layout=Layout.LEGACY)
    assert published(dest / "current")["t.csv"] == crlf
    assert os.readlink(dest / "current") == f".revs/{legacy.md5}-legacy"
    switched = run(cache, modern, dest, layout=Layout.DVC3)
    assert published(dest / "current") == {"t.csv": lf, "same.bin": b"\x00bin"}
    assert (first.base, switched.base) == ("fresh", "fresh")
    # auto prefers DVC 3 and accepts what is published: a no-op now.
    assert run(cache, modern, dest).noop
    back = run(cache, legacy, dest, layout=Layout.LEGACY)
    assert not back.noop
    assert published(dest / "current")["t.csv"] == crlf


def test_progress_bar_on_a_tty_and_lines_elsewhere() -> None:
    tty = io.StringIO()
    bar = Reporter(tty, tty=True, interval=0)
    bar(Progress(phase="link", done=50, total=100))
    bar(Progress(phase="done", done=100, total=100))
    assert "\r  link [############------------]  50% 50/100" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the bar is erased before the summary
    log = io.StringIO()
    lines = Reporter(log, tty=False, interval=3600)
    lines(Progress(phase="link", done=0, total=100))
    lines(Progress(phase="link", done=50, total=100))  # within the interval: not printed
    lines(Progress(phase="fetch", done=1, total=4))  # a new phase always is
    assert log.getvalue() == "progress: link 0/100 (0%)\nprogress: fetch 1/4 (25%)\n"
