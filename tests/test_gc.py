"""The node agent's housekeeping: what users rely on when a node's cache volume fills up.

* GC never evicts what a pod on the node uses (published and spare trees, the prefetch list),
  evicts the rest least recently used first, and really brings the volume (measured, not just
  estimated) below the low watermark.
* A pod's tree keeps reading right whatever the GC does to the cache.
* Abandoned download slots and the workspaces of pods that are gone are removed; live ones
  (a held flock, a pod kubelet still knows, a pod scheduled a moment ago) never are.

Every GC test runs on a fresh small reflink XFS volume (`small_xfs`), so that the watermarks
are about a real, nearly full filesystem and the statvfs figures are the kernel's.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import Workspace
from datapin_sidecar.errors import UsageError
from datapin_sidecar.node.housekeeping.clock import touch_used
from datapin_sidecar.node.housekeeping.evict import collect
from datapin_sidecar.node.housekeeping.inventory import scan
from datapin_sidecar.node.housekeeping.reaper import kubelet_pods_liveness, reap_workspaces
from datapin_sidecar.node.housekeeping.roots import roots
from datapin_sidecar.node.housekeeping.slots import clean_slots
from datapin_sidecar.node.housekeeping.volume import VolumeUsage, Watermarks

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision

MiB = 1 << 20
UIDS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 10)]


def random_files(seed: int, count: int, size: int, prefix: str = "f") -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}/{i:03d}.bin": rng.randbytes(size) for i in range(count)}


def object_paths(cache: NodeCache, files: Mapping[str, bytes], layout: Layout) -> list[Path]:
    return [Path(cache.path(object_name(data, layout), layout)) for data in files.values()]


def dir_path(cache: NodeCache, rev: Revision, layout: Layout = Layout.DVC3) -> Path:
    return Path(cache.path(rev.oid, layout))


def allocated(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def publish(root: Path, cache: NodeCache, rev: Revision, uid: str, dataset: str = "ds") -> Path:
    """A pod's workspace with `rev` published in it; returns the link consumers read."""
    result = materialize(
        Request(cache=cache, revision=rev, dest=root / "workspaces" / uid / dataset)
    )
    return Path(result.path)


def marks_freeing(root: Path, need: int, *, margin: int) -> Watermarks:
    """Watermarks the volume is above now, with a low one reached only after `need` bytes
    more than `margin` are freed."""
    os.sync()
    usage = VolumeUsage.measure(root)
    usable = usage.used_bytes + usage.free_bytes
    low = 100.0 * (usage.used_bytes - need + margin) / usable
    assert 0 < low < usage.used_percent
    return Watermarks(high_percent=(low + usage.used_percent) / 2, low_percent=low)


def orphan(cache: NodeCache, data: bytes) -> Path:
    oid = object_name(data)
    cache.insert_bytes(data, oid, Layout.DVC3)
    return Path(cache.path(oid, Layout.DVC3))


# -- the cache GC -------------------------------------------------------------------------------


def test_gc_evicts_only_what_no_pod_uses_and_reaches_the_low_watermark(
    small_xfs: Path,
) -> None:
    root = small_xfs
    cache = NodeCache(root / "cache")
    files_a = random_files(1, 6, 10 * MiB, "a")  # in use by a pod
    files_b = random_files(2, 11, 10 * MiB, "b")  # not in use (legacy layout)
    rev_a = put_revision(cache, files_a)
    rev_b = put_revision(cache, files_b, layout=Layout.LEGACY)
    touch_used(cache, rev_b, Layout.LEGACY, now=time.time() - 3600)
    orphans = [orphan(cache, random.Random(10 + i).randbytes(MiB)) for i in range(3)]
    # A `.dir` that hashes right but is no manifest: evicted as an orphan, not an error.
    bad = b"not a manifest"
    cache.insert_bytes(bad, object_name(bad) + ".dir", Layout.DVC3)
    link = publish(root, cache, rev_a, UIDS[0])

    unused = object_paths(cache, files_b, Layout.LEGACY) + orphans
    used = [*object_paths(cache, files_a, Layout.DVC3), dir_path(cache, rev_a)]
    unused_bytes = allocated(unused)
    marks = marks_freeing(root, unused_bytes, margin=MiB // 2)
    objects_before, bytes_before = scan(cache)

    report = collect(cache, roots(root), marks)

    assert all(p.exists() for p in used)
    assert not any(p.exists() for p in unused)
    assert tree_bytes(link.resolve()) == files_a
    assert report.triggered
    assert report.target_reached
    assert report.before.used_percent > marks.high_percent
    assert report.after.used_percent <= marks.low_percent
    assert VolumeUsage.measure(root).used_percent <= marks.low_percent
    assert report.kept_in_use_objects == len(used)
    objects_after, bytes_after = scan(cache)
    assert (report.cache_objects, report.cache_bytes) == (objects_after, bytes_after)
    assert report.evicted_objects == objects_before - objects_after
    assert report.evicted_bytes == bytes_before - bytes_after
    assert report.freed_bytes_estimate >= unused_bytes
    # B's clock is older than the orphans', and its `.dir` goes right after its objects.
    assert rev_b.oid in report.evicted_revisions
    assert not dir_path(cache, rev_b, Layout.LEGACY).exists()
    assert not (cache.manifests_dir / f"legacy-{rev_b.oid}").exists()
    assert not (cache.root / ".datapin" / "used" / f"legacy-{rev_b.oid}").exists()
    assert (cache.manifests_dir / f"dvc3-{rev_a.oid}").exists()


def test_gc_evicts_the_least_recently_used_revision_first(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    shared = {"shared.bin": random.Random(99).randbytes(4 * MiB)}
    old_own = random_files(1, 4, 4 * MiB, "old")
    files = {
        "old": {**old_own, **shared},
        "mid": {**random_files(2, 4, 4 * MiB, "mid"), **shared},
        "new": random_files(3, 4, 4 * MiB, "new"),
    }
    now = time.time()
    revs = {}
    for age, name in enumerate(("new", "mid", "old"), start=1):
        revs[name] = put_revision(cache, files[name])
        touch_used(cache, revs[name], Layout.DVC3, now=now - 1000 * age)
    # Inserted last, so their own mtimes are the newest: without used-files the order would
    # be the reverse.
    marks = marks_freeing(
        small_xfs, allocated(object_paths(cache, old_own, Layout.DVC3)), margin=MiB
    )

    report = collect(cache, roots(small_xfs), marks)

    assert report.target_reached
    assert not any(p.exists() for p in object_paths(cache, old_own, Layout.DVC3))
    # The shared object lives as long as the newer revision naming it.
    for name in ("mid", "new"):
        assert all(p.exists() for p in object_paths(cache, files[name], Layout.DVC3))
        assert dir_path(cache, revs[name]).exists()
    assert report.evicted_objects == len(old_own)
    assert report.evicted_revisions == ()


def test_gc_goes_on_until_the_volume_itself_is_below_the_low_watermark(small_xfs: Path) -> None:
    # Objects of X are reflinked into a tree no workspace records (a copy outside the
    # workspaces): unlinking them frees no blocks, though the estimate says it does.
    cache = NodeCache(small_xfs / "cache")
    files_x = random_files(1, 4, 5 * MiB, "x")
    files_y = random_files(2, 4, 5 * MiB, "y")
    rev_x = put_revision(cache, files_x)
    rev_y = put_revision(cache, files_y)
    touch_used(cache, rev_x, Layout.DVC3, now=time.time() - 2000)
    touch_used(cache, rev_y, Layout.DVC3, now=time.time() - 1000)
    copy = materialize(Request(cache=cache, revision=rev_x, dest=small_xfs / "elsewhere"))
    marks = marks_freeing(small_xfs, 10 * MiB, margin=MiB)

    report = collect(cache, roots(small_xfs), marks)

    assert report.target_reached
    assert VolumeUsage.measure(small_xfs).used_percent <= marks.low_percent
    assert not any(p.exists() for p in object_paths(cache, files_x, Layout.DVC3))
    y_left = [p.exists() for p in object_paths(cache, files_y, Layout.DVC3)]
    assert y_left.count(False) == 2  # 10 MiB, really freed this time
    assert report.evicted_revisions == (rev_x.oid,)
    assert tree_bytes(Path(copy.path).resolve()) == files_x


def test_gc_below_the_high_watermark_does_nothing(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = random_files(1, 4, MiB)
    rev = put_revision(cache, files)
    report = collect(cache, roots(small_xfs), Watermarks())
    assert not report.triggered
    assert report.target_reached
    assert report.evicted_objects == 0
    assert (report.cache_objects, report.cache_bytes) == (None, None)
    assert report.after == report.before
    assert all(p.exists() for p in object_paths(cache, files, Layout.DVC3))
    assert dir_path(cache, rev).exists()


def test_gc_never_evicts_roots_even_when_the_target_is_out_of_reach(
    small_xfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = small_xfs
    cache = NodeCache(root / "cache")
    files = random_files(1, 4, 10 * MiB)
    rev = put_revision(cache, files)
    link = publish(root, cache, rev, UIDS[0])
    stray = orphan(cache, random.Random(5).randbytes(2 * MiB))
    used_percent = VolumeUsage.measure(root).used_percent
    marks = Watermarks(high_percent=used_percent - 1, low_percent=1.0)

    with caplog.at_level(logging.WARNING, logger="datapin_sidecar.node.housekeeping"):
        report = collect(cache, roots(root), marks)

    assert report.triggered
    assert not report.target_reached
    assert not stray.exists()
    assert all(p.exists() for p in object_paths(cache, files, Layout.DVC3))
    assert dir_path(cache, rev).exists()
    assert report.kept_in_use_objects == len(files) + 1
    assert tree_bytes(link.resolve()) == files
    assert "held by 1 revisions in use" in caplog.text


def test_gc_dry_run_deletes_nothing(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = random_files(1, 5, 6 * MiB)
    rev = put_revision(cache, files)
    paths = [*object_paths(cache, files, Layout.DVC3), dir_path(cache, rev)]
    marks = marks_freeing(small_xfs, allocated(paths[:-1]), margin=MiB // 2)
    before = scan(cache)

    report = collect(cache, roots(small_xfs), marks, dry_run=True)

    assert report.triggered
    assert report.target_reached  # as planned
    assert report.evicted_objects >= len(files)
    assert report.after.used_percent <= marks.low_percent
    assert all(p.exists() for p in paths)
    assert scan(cache) == before
    assert VolumeUsage.measure(small_xfs).used_percent > marks.high_percent


def test_gc_keeps_revisions_on_the_prefetch_list(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    files_p = random_files(1, 4, 5 * MiB, "p")
    files_q = random_files(2, 4, 5 * MiB, "q")
    rev_p = put_revision(cache, files_p)
    rev_q = put_revision(cache, files_q)
    marks = Watermarks(high_percent=VolumeUsage.measure(small_xfs).used_percent - 1, low_percent=1)
    in_use = roots(small_xfs, prefetch=[(rev_p, Layout.DVC3)])
    assert in_use == {(rev_p.oid, Layout.DVC3)}

    report = collect(cache, in_use, marks)

    assert not report.target_reached
    assert all(p.exists() for p in object_paths(cache, files_p, Layout.DVC3))
    assert dir_path(cache, rev_p).exists()
    assert not any(p.exists() for p in object_paths(cache, files_q, Layout.DVC3))
    assert report.evicted_revisions == (rev_q.oid,)


def test_roots_are_published_and_spare_trees_of_every_workspace(xfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    rev_a = put_revision(cache, {"x": b"a"})
    rev_b = put_revision(cache, {"x": b"b"})
    rev_c = put_revision(cache, {"x": b"c\r\n"}, layout=Layout.LEGACY)
    publish(xfs_dir, cache, rev_a, UIDS[0])
    publish(xfs_dir, cache, rev_b, UIDS[0])  # a becomes the spare
    publish(xfs_dir, cache, rev_c, UIDS[1], "other")
    broken = publish(xfs_dir, cache, rev_a, UIDS[2])
    (broken.parent / ".revs" / ".meta" / f"{rev_a.md5}.json").write_text("{broken")
    (xfs_dir / "workspaces" / UIDS[3] / "not-datapin").mkdir(parents=True)
    (xfs_dir / "workspaces" / UIDS[3] / ".pod.json").write_text("{}")

    assert roots(xfs_dir) == {
        (rev_a.oid, Layout.DVC3),
        (rev_b.oid, Layout.DVC3),
        (rev_c.oid, Layout.LEGACY),
    }
    assert roots(xfs_dir / "nowhere") == set()


def test_touch_used_sets_the_lru_clock_and_never_fails(xfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    rev = Revision.parse("0" * 32 + ".dir")
    touch_used(cache, rev, Layout.LEGACY, now=1234.0)
    used = xfs_dir / "cache" / ".datapin" / "used" / f"legacy-{rev.oid}"
    assert used.stat().st_mtime == 1234.0
    touch_used(cache, rev, Layout.LEGACY)
    assert abs(used.stat().st_mtime - time.time()) < 60
    # A cache that cannot take the hint (here: its root is a file) is no error.
    (xfs_dir / "file").write_bytes(b"")
    touch_used(NodeCache(xfs_dir / "file"), rev, Layout.DVC3)


# -- download slots ---------------------------------------------------------------------------


def test_clean_slots_removes_only_old_slots_nobody_holds(xfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    now = time.time()
    old = now - 7200

    held_slots: list[Slot] = []

    def slot(n: int, *, held: bool, mtime: float, journal: bool = False) -> Path:
        oid = f"{n:032x}"
        claimed = cache.claim(oid, Layout.DVC3)
        assert claimed is not None
        os.write(claimed.fd, b"partial")
        path = Path(claimed.path)
        if journal:
            Path(claimed.journal).write_bytes(b"journal")
            os.utime(claimed.journal, (mtime, mtime))
        os.utime(path, (mtime, mtime))
        if not held:
            claimed.release()
        else:
            held_slots.append(claimed)
        return path

    live = slot(1, held=True, mtime=old, journal=True)  # a downloader still at it
    abandoned = slot(2, held=False, mtime=old, journal=True)
    paused = slot(3, held=False, mtime=now - 60)  # its downloader may resume it
    lone_old = Path(cache.slot_path(f"{4:032x}", Layout.DVC3) + ".parts")
    lone_young = Path(cache.slot_path(f"{5:032x}", Layout.DVC3) + ".parts")
    for path, mtime in ((lone_old, old), (lone_young, now)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"journal")
        os.utime(path, (mtime, mtime))

    assert clean_slots(cache, max_age=3600, clock=lambda: now) == 1

    assert live.exists()
    assert Path(f"{live}.parts").exists()
    assert not abandoned.exists()
    assert not Path(f"{abandoned}.parts").exists()
    assert paused.exists()
    assert not lone_old.exists()
    assert lone_young.exists()
    # Once its downloader is gone for long enough, the held one goes too.
    for held in held_slots:
        held.release()
    assert clean_slots(cache, max_age=3600, clock=lambda: now) == 1
    assert not live.exists()
    assert clean_slots(NodeCache(xfs_dir / "empty")) == 0


# -- workspaces of pods that are gone -----------------------------------------------------------


def make_workspace(root: Path, uid: str, *, age: float, pod_json_age: float | None = None) -> Path:
    pod = root / "workspaces" / uid
    (pod / "ds").mkdir(parents=True)
    if pod_json_age is not None:
        (pod / ".pod.json").write_text('{"uid": "%s"}' % uid)  # noqa: UP031
        t = time.time() - pod_json_age
        os.utime(pod / ".pod.json", (t, t))
    t = time.time() - age
    os.utime(pod, (t, t))
    return pod


def test_reap_workspaces_removes_only_pods_that_are_gone(
    xfs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = xfs_dir
    workspaces = root / "workspaces"
    kubelet = root / "kubelet-pods"
    (kubelet / UIDS[0]).mkdir(parents=True)
    live = kubelet_pods_liveness(kubelet)

    # A gone pod with a real, read-only materialised tree in it.
    cache = NodeCache(root / "cache")
    rev = put_revision(cache, {"d/x": b"x", "y": b"y"})
    publish(root, cache, rev, UIDS[1])
    gone = workspaces / UIDS[1]
    (gone / ".pod.json").write_text("{}")
    tree = (gone / "ds" / "current").resolve()
    os.chmod(tree / "d", 0o555)  # noqa: S103 - read-only, not permissive
    os.chmod(tree, 0o555)  # noqa: S103
    for path in (gone / ".pod.json", gone):
        os.utime(path, (time.time() - 3600,) * 2)

    make_workspace(root, UIDS[0], age=3600, pod_json_age=3600)  # kubelet still has it
    make_workspace(root, UIDS[2], age=10)  # just scheduled
    make_workspace(root, UIDS[3], age=3600, pod_json_age=10)  # sidecar just wrote it
    busy = make_workspace(root, UIDS[4], age=3600, pod_json_age=3600)
    make_workspace(root, "not-a-pod", age=3600)
    trash = workspaces / f".trash-{UIDS[5]}-0123abcd"
    (trash / "sub").mkdir(parents=True)
    (trash / "sub" / "f").write_bytes(b"f")
    os.chmod(trash / "sub", 0o555)  # noqa: S103

    warned: set[str] = set()
    with (
        Workspace(busy / "ds").locked(),
        caplog.at_level(logging.WARNING, logger="datapin_sidecar.node.housekeeping"),
    ):
        removed = reap_workspaces(root, live=live, grace=300, warned=warned)

    assert removed == [UIDS[1]]
    assert sorted(os.listdir(workspaces)) == sorted(
        [UIDS[0], UIDS[2], UIDS[3], UIDS[4], "not-a-pod"]
    )
    assert "not-a-pod" in caplog.text
    assert warned == {"not-a-pod"}
    # The lock is free now; a second pass takes the busy one, and warns no more.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datapin_sidecar.node.housekeeping"):
        assert reap_workspaces(root, live=live, grace=300, warned=warned) == [UIDS[4]]
    assert "not-a-pod" not in caplog.text
    # Later, kubelet forgets the young ones too, and time passes.
    (kubelet / UIDS[0]).rmdir()
    later = time.time() + 3600
    assert reap_workspaces(root, live=live, grace=300, clock=lambda: later) == [
        UIDS[0],
        UIDS[2],
        UIDS[3],
    ]
    assert os.listdir(workspaces) == ["not-a-pod"]
    assert reap_workspaces(root / "nowhere", live=live) == []


def test_kubelet_pods_liveness_follows_kubelet_pod_dirs(xfs_dir: Path) -> None:
    pods = xfs_dir / "pods"
    (pods / UIDS[0]).mkdir(parents=True)
    live = kubelet_pods_liveness(pods)
    assert live(UIDS[0])
    assert not live(UIDS[1])
    with pytest.raises(UsageError, match="mount the kubelet pods directory"):
        kubelet_pods_liveness(xfs_dir / "missing")


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"low_percent": 90.0}, "low_percent=90.0 must be below high_percent=85.0"),
        ({"high_percent": 101.0}, "high_percent=101.0"),
        ({"low_percent": 0.0}, "low_percent=0.0 must be above 0"),
        ({"inodes_low_percent": 85.0}, "inodes_low_percent=85.0 must be below"),
        ({"inodes_high_percent": float("nan")}, "inodes_high_percent=nan"),
    ],
)
def test_watermarks_reject_impossible_values(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(UsageError, match=re.escape(field)) as info:
        Watermarks(**kwargs)
    assert "Fix:" in str(info.value)


def test_watermarks_defaults_are_valid() -> None:
    marks = Watermarks()
    assert (marks.high_percent, marks.low_percent) == (85.0, 70.0)
    assert (marks.inodes_high_percent, marks.inodes_low_percent) == (85.0, 70.0)
