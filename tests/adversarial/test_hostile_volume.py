"""Adversarial: the node agent against what a hostile pod (or a subverted writer) plants on
the node volume.

Each hostile object is built for real on a real XFS volume: meta files replaced by FIFOs, by
symlinks to /dev/zero or by huge files; a dead pod's workspace lock replaced by a FIFO;
directories planted in the cache's fetch area, `tmp/`, `used/` and `builds/`; symlinked shard
directories in the cache and the fetch area pointing outside the volume; names that are not
ours. The properties (issue 17, finding 2):

* nothing blocks: every housekeeping call returns (guarded by a timeout, so a regression fails
  instead of hanging the suite), and the real agent process becomes ready and stops on SIGTERM;
* nothing outside the volume is followed, changed or deleted;
* one bad item is counted (`datapin_agent_item_errors_total{task}`) and skipped; the cycle
  goes on: the GC still evicts down to the low watermark, keeps what a live pod uses, and
  reaps gone pods' workspaces.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import TreeInfo
from datapin_sidecar.node.housekeeping.evict import collect
from datapin_sidecar.node.housekeeping.inventory import scan
from datapin_sidecar.node.housekeeping.reaper import reap_workspaces
from datapin_sidecar.node.housekeeping.roots import roots
from datapin_sidecar.node.housekeeping.slots import clean_slots
from datapin_sidecar.node.housekeeping.tasks import Task
from datapin_sidecar.node.housekeeping.volume import VolumeUsage, Watermarks

from testkit.dvcrepo import tree_bytes
from testkit.sidecarproc import SidecarProcess
from testkit.trees import object_name, put_revision

T = TypeVar("T")
MiB = 1 << 20
GONE = "0000000a-0000-4000-8000-00000000000a"
LIVE = "0000000b-0000-4000-8000-00000000000b"
HOSTILE = "0000000c-0000-4000-8000-00000000000c"


def bounded(fn: Callable[[], T], timeout: float = 20.0) -> T:
    """`fn()`, failing the test (instead of hanging it) if it does not return in time."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"{fn} blocked for more than {timeout} s"
    if errors:
        raise errors[0]
    return out[0]


class Errors:
    """An `on_error` that records what was skipped."""

    def __init__(self) -> None:
        self.items: list[tuple[Task, str, BaseException]] = []

    def __call__(self, task: Task, path: str, exc: BaseException) -> None:
        self.items.append((task, path, exc))

    def paths(self, task: Task) -> set[str]:
        return {p for t, p, _ in self.items if t is task}


def outside(tmp_path: Path) -> Path:
    """A directory off the node volume with files named like cache objects and slots."""
    victim = tmp_path / "outside"
    victim.mkdir()
    for name in ("0" * 30, "1" * 30 + ".dir", f"dvc3-{'ef' + '2' * 30}", "keep.txt"):
        (victim / name).write_bytes(b"precious")
        os.utime(victim / name, (1, 1))  # "abandoned" long ago, by any age rule
    return victim


def assert_untouched(victim: Path) -> None:
    names = sorted(os.listdir(victim))
    assert len(names) == 4, names
    assert all((victim / n).read_bytes() == b"precious" for n in names)


def state_meta(root: Path, uid: str, dataset: str) -> Path:
    """The current layout's meta directory (datapin's records, outside the pod's view)."""
    path = root / "workspaces" / uid / ".state" / dataset / ".meta"
    path.mkdir(parents=True, exist_ok=True)
    (path.parent / ".datapin").write_text("datapin workspace 1\n")
    return path


def info(rev: Revision, layout: Layout = Layout.DVC3) -> str:
    return TreeInfo(revision=rev.oid, layout=str(layout), files=1, bytes=1).to_json()


def plant_hostile_metas(root: Path, cache: NodeCache) -> None:
    """A pod's workspaces whose meta files are a FIFO, a link to /dev/zero and a huge file, in
    both the current (`.state/`) and the legacy (`.revs/.meta`, an older sidecar's dataset
    without `.state/` records) places."""
    pod = root / "workspaces" / HOSTILE
    for meta in (state_meta(root, HOSTILE, "ds"), pod / "legacy" / ".revs" / ".meta"):
        meta.mkdir(parents=True, exist_ok=True)
        os.mkfifo(meta / f"{'a' * 32}.json")
        (meta / f"{'b' * 32}.json").symlink_to("/dev/zero")
        with open(meta / f"{'c' * 32}.json", "wb") as f:
            f.truncate(1 << 30)  # sparse: 1 GiB that costs nothing
        (meta / f"{'d' * 32}.json").mkdir()
    # A symlinked `.revs` in a legacy workspace, pointing at another pod's records.
    (pod / "other").mkdir()
    (pod / "other" / ".revs").symlink_to(root / "workspaces" / LIVE / "ds" / ".revs")


def plant_cache_debris(cache: NodeCache, victim: Path) -> None:
    """Directories and symlinks where the cache has only regular files of its own."""
    old = time.time() - 7 * 86400
    slot_dir = Path(cache.slot_path("ab" + "3" * 30, Layout.DVC3))
    slot_dir.mkdir(parents=True)  # a directory where a download slot belongs
    (slot_dir / "inner").write_bytes(b"x")
    os.utime(slot_dir, (old, old))
    (cache.fetch_dir / "ef").symlink_to(victim)  # a symlinked fetch shard
    for private in (cache.tmp_dir, cache.root / ".datapin" / "used", cache.builds_dir):
        (private / "planted-dir" / "sub").mkdir(parents=True)
        os.mkfifo(private / "planted-fifo")
    (cache.root / ".datapin" / "used" / "dvc3-link").symlink_to(victim / "keep.txt")
    # Symlinked object shards, in both layouts: never listed, never evicted through.
    for prefix in (cache.root / "files" / "md5", cache.root):
        (prefix / free_shard(prefix)).symlink_to(victim)


def free_shard(prefix: Path) -> str:
    return next(f"{n:02x}" for n in range(256) if not (prefix / f"{n:02x}").exists())


def planted_shards(cache: NodeCache) -> list[Path]:
    return [
        p
        for prefix in (cache.root / "files" / "md5", cache.root)
        for p in prefix.iterdir()
        if p.is_symlink()
    ]


def test_roots_read_both_meta_places_and_skip_what_a_pod_planted(xfs_dir: Path) -> None:
    cache = NodeCache(xfs_dir / "cache")
    current = put_revision(cache, {"x": b"current layout"})
    legacy = put_revision(cache, {"x": b"older sidecar"})
    (state_meta(xfs_dir, LIVE, "ds") / f"{current.md5}.json").write_text(info(current))
    materialize(Request(cache=cache, revision=legacy, dest=xfs_dir / "workspaces" / LIVE / "old"))
    plant_hostile_metas(xfs_dir, cache)
    (xfs_dir / "workspaces" / "not-a-pod-uid").mkdir()
    # A pod whose dataset is managed in the current layout owns `DEST/.revs/`: a meta file it
    # writes there must not pin a revision in the cache.
    pinned = put_revision(cache, {"x": b"a revision the pod wants kept"})
    planted = xfs_dir / "workspaces" / LIVE / "ds" / ".revs" / ".meta"
    planted.mkdir(parents=True)
    (planted / f"{pinned.md5}.json").write_text(info(pinned))
    errors = Errors()

    found = bounded(lambda: roots(xfs_dir, on_error=errors))

    assert found == {(current.oid, Layout.DVC3), (legacy.oid, Layout.DVC3)}
    skipped = errors.paths(Task.ROOTS)
    for name in ("a", "b", "c", "d"):
        assert any(p.endswith(f"{name * 32}.json") and "/.state/" in p for p in skipped), name
        assert any(p.endswith(f"{name * 32}.json") and "/.revs/" in p for p in skipped), name
    assert any(p.endswith("other/.revs/.meta") for p in skipped)


def test_collect_and_scan_never_follow_planted_links_and_go_on(
    small_xfs: Path, tmp_path: Path
) -> None:
    cache = NodeCache(small_xfs / "cache")
    victim = outside(tmp_path)
    keep = put_revision(cache, {f"k/{i}": os.urandom(MiB) for i in range(20)})
    put_revision(cache, {f"d/{i}": os.urandom(MiB) for i in range(60)})
    (state_meta(small_xfs, LIVE, "ds") / f"{keep.md5}.json").write_text(info(keep))
    plant_hostile_metas(small_xfs, cache)
    plant_cache_debris(cache, victim)
    assert len(planted_shards(cache)) == 2
    errors = Errors()
    os.sync()
    usage = VolumeUsage.measure(small_xfs)
    usable = usage.used_bytes + usage.free_bytes
    low = 100.0 * (usage.used_bytes - 40 * MiB) / usable
    marks = Watermarks(high_percent=usage.used_percent - 1, low_percent=low)

    objects, _ = bounded(lambda: scan(cache, on_error=errors))
    assert objects == 20 + 60 + 2
    in_use = bounded(lambda: roots(small_xfs, on_error=errors))
    report = bounded(lambda: collect(cache, in_use, marks, on_error=errors), timeout=60)
    assert report.target_reached
    assert report.evicted_objects >= 40
    assert bounded(lambda: clean_slots(cache, max_age=60, on_error=errors)) == 0

    assert_untouched(victim)
    manifest = cache.load_manifest(keep, Layout.DVC3)
    assert all(cache.present(manifest.md5(i), Layout.DVC3) for i in range(len(manifest)))
    assert cache.present(keep.oid, Layout.DVC3)
    # Planted things in the cache's private areas and symlinked shards are gone (never followed).
    for planted in (
        Path(cache.slot_path("ab" + "3" * 30, Layout.DVC3)),
        cache.fetch_dir / "ef",
        cache.tmp_dir / "planted-dir",
        cache.tmp_dir / "planted-fifo",
        cache.builds_dir / "planted-dir",
    ):
        assert not os.path.lexists(planted), planted
    assert planted_shards(cache) == []
    for task in (Task.COLLECT, Task.SLOTS, Task.SCAN):
        assert errors.paths(task), task


def test_reaping_a_dead_pod_whose_lock_is_a_fifo_or_a_symlink(xfs_dir: Path) -> None:
    """A lock that is not a regular file cannot be held by any sidecar (they open it with
    safefs): it never blocks the agent nor keeps the dead pod's workspace."""
    cache = NodeCache(xfs_dir / "cache")
    rev = put_revision(cache, {"x": b"data"})
    victim = xfs_dir / "victim-lock"
    victim.write_bytes(b"")
    for uid, (legacy_lock, state_lock) in {
        GONE: ("fifo", "fifo"),
        HOSTILE: ("symlink", "symlink"),
    }.items():
        dest = xfs_dir / "workspaces" / uid / "ds"
        materialize(Request(cache=cache, revision=rev, dest=dest))
        state = state_meta(xfs_dir, uid, "ds").parent
        for lock, kind in ((dest / ".revs" / ".lock", legacy_lock), (state / ".lock", state_lock)):
            lock.unlink(missing_ok=True)
            if kind == "fifo":
                os.mkfifo(lock)
            else:
                lock.symlink_to(victim)
    held = open(victim, "rb")  # noqa: SIM115 - a live sidecar elsewhere holding the target
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        errors = Errors()
        removed = bounded(
            lambda: reap_workspaces(xfs_dir, live=lambda _: False, grace=0, on_error=errors)
        )
    finally:
        held.close()
    assert sorted(removed) == sorted([GONE, HOSTILE])
    assert os.listdir(xfs_dir / "workspaces") == []
    assert victim.exists()
    assert len(errors.paths(Task.REAP)) == 4


def test_agent_process_survives_a_hostile_volume(small_xfs: Path, tmp_path: Path) -> None:
    """The real agent on a volume with every hostile object at once: it becomes ready, evicts
    down to the low watermark, reaps the gone pods (one with a FIFO lock), counts the bad
    items, touches nothing outside the volume and stops promptly on SIGTERM."""
    cache = NodeCache(small_xfs / "cache")
    victim = outside(tmp_path)
    in_use = {f"a/{i}.bin": os.urandom(MiB) for i in range(30)}
    rev_a = put_revision(cache, in_use)
    put_revision(cache, {f"b/{i}.bin": os.urandom(MiB) for i in range(100)})
    live_tree = small_xfs / "workspaces" / LIVE / "ds"
    materialize(Request(cache=cache, revision=rev_a, dest=live_tree))
    gone_tree = small_xfs / "workspaces" / GONE / "ds"
    materialize(Request(cache=cache, revision=rev_a, dest=gone_tree))
    (gone_tree / ".revs" / ".lock").unlink()
    os.mkfifo(gone_tree / ".revs" / ".lock")
    plant_hostile_metas(small_xfs, cache)
    plant_cache_debris(cache, victim)
    (small_xfs / "workspaces" / "not-a-pod").mkdir()
    pods = tmp_path / "kubelet-pods"
    for uid in (LIVE, HOSTILE):
        (pods / uid).mkdir(parents=True)
    os.sync()
    used = VolumeUsage.measure(small_xfs).used_percent
    settings = {
        "root": str(small_xfs),
        "gc_interval_seconds": "0.3",
        "gc_high_percent": str(round(used - 5, 1)),
        "gc_low_percent": str(round(used - 30, 1)),
        "gc_slot_max_age_seconds": "1",
        "kubelet_pods_dir": str(pods),
        "workspace_grace_seconds": "0",
        "log_format": "json",
    }
    with SidecarProcess("agent", tmp_path, settings) as agent:
        agent.wait_until("ready", lambda: agent.get("/readyz")[0] == 200, timeout=30)
        agent.wait_until(
            "a GC pass that reached the low watermark",
            lambda: agent.sample("datapin_gc_runs_total", result="reached") >= 1,
            timeout=30,
        )
        agent.wait_until(
            "the gone pod reaped", lambda: agent.sample("datapin_workspaces_removed_total") == 1
        )
        for task in ("roots", "collect", "slots"):
            assert agent.sample("datapin_agent_item_errors_total", task=task) > 0, task
        assert agent.get("/healthz")[0] == 200
        cycles = agent.sample("datapin_gc_runs_total", result="error")
        assert cycles == 0
        started = time.monotonic()
        assert agent.stop(timeout=10) == 0
        assert time.monotonic() - started < 10
    lines = agent.log_lines()
    fifo_lines = [x for x in lines if "a" * 32 + ".json" in str(x.get("msg", ""))]
    assert len(fifo_lines) == 2, "each bad item is logged once, not every cycle"
    assert_untouched(victim)
    assert not (small_xfs / "workspaces" / GONE).exists()
    assert (small_xfs / "workspaces" / "not-a-pod").is_dir()
    assert tree_bytes((live_tree / "current").resolve()) == in_use
    assert all(cache.present(object_name(d), Layout.DVC3) for d in in_use.values())


def test_a_download_claim_clears_what_was_planted_at_its_slot(
    xfs_dir: Path, tmp_path: Path
) -> None:
    """A sidecar claiming a slot never opens a FIFO or directory planted at its name (it would
    block or fail) nor creates it through a symlinked shard (outside the volume)."""
    cache = NodeCache(xfs_dir / "cache")
    victim = outside(tmp_path)
    fifo_oid, dir_oid, link_oid = "ab" + "1" * 30, "ac" + "2" * 30, "ef" + "2" * 30
    Path(cache.slot_path(fifo_oid, Layout.DVC3)).parent.mkdir(parents=True)
    os.mkfifo(cache.slot_path(fifo_oid, Layout.DVC3))
    Path(cache.slot_path(dir_oid, Layout.DVC3), "sub").mkdir(parents=True)
    (cache.fetch_dir / "ef").symlink_to(victim)  # holds a file named like link_oid's slot

    for oid in (fifo_oid, dir_oid, link_oid):
        slot = bounded(lambda oid=oid: cache.claim(oid, Layout.DVC3))
        assert slot is not None
        os.write(slot.fd, b"bytes")
        slot.discard()
    assert_untouched(victim)
    assert (cache.fetch_dir / "ef").is_dir()
    assert not (cache.fetch_dir / "ef").is_symlink()
