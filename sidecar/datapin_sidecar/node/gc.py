"""Node housekeeping for the node agent: cache GC, abandoned download slots, dead workspaces.

The node agent (one per node) owns a volume rooted at `R`::

    R/cache/                                  the NodeCache (see `cache`)
    R/cache/.datapin/used/<layout>-<md5>.dir  empty; mtime = last materialise/prefetch (LRU clock)
    R/cache/.datapin/gc.lock                  flock: one GC at a time
    R/cache/.datapin/builds/, builds.lock     builds in progress (`NodeCache.building`)
    R/workspaces/<pod-uid>/.pod.json          written by the pod's sidecar (may be absent)
    R/workspaces/<pod-uid>/<dataset>/         DEST, mounted by the pod (maybe writable): `current`
                                              and the trees under `.revs/`; pod-controlled
    R/workspaces/<pod-uid>/.state/<dataset>/  datapin's records of DEST, in no pod's view:
                                              `.datapin`, `.lock`, `.meta/<key>.json` (TreeInfo)

Older sidecars kept the same records in `DEST/.revs/` (`.datapin`, `.lock`, `.meta/`); they
are still honoured for a dataset that has no `.state/` records.

It is the only process that deletes cache objects. Everything here is synchronous
(filesystem-bound; the agent runs it in worker threads) and keeps no global state.

**The volume is hostile.** Pods control everything under `workspaces/` (names, file types,
sizes, symlinks, even the legacy records), and a subverted writer may have planted things in
the cache. So every path there is opened with `safefs`: directories one component at a time
without following symlinks, files only if they are regular (no FIFO, device or symlink is ever
opened, so nothing blocks) and meta files bounded (`META_LIMIT`, `MAX_META_FILES`); unlinks
are relative to a directory descriptor, so a shard swapped for a symlink cannot redirect
them. What is not ours in the cache's own areas (a directory where a download slot or temp
file belongs, a symlinked shard) is removed without being followed. An item that cannot be
handled is reported to the caller's `on_error(task, path, error)` (the agent counts and logs
it once) and skipped; the rest of the work goes on.

**What may be evicted.** The roots are the revisions in use: the revision and layout named by
every meta file of every workspace on the node (both places; a meta file exists for the
published and the spare tree of each), the agent's prefetch list, and every build in progress.
Their `.dir` objects and every object their manifests name are never evicted. Workspace roots
are read without taking workspace locks: a race with a sidecar is benign, because a tree
never depends on the cache entry it came from (trees are reflinks, hardlinks or copies, so
unlinking the cache's name leaves the tree's bytes alone). Evicting an object a published
tree still uses costs a re-download at worst, never a broken tree. Trees need their
revision's `.dir` only to be recycled by the next switch, and a materialise without it falls
back to a fresh build.

**Builds in progress.** A build does need the objects it found in the cache until it has
linked them. Builders register their revision (`NodeCache.building`: a flock-held file in
`builds/`, created under a shared lock on `builds.lock`) before they look at the cache. The
GC reads the registrations under an exclusive lock on `builds.lock`, plans, and then evicts in
batches of `BATCH`, each under that exclusive lock after reading the registrations again: a
revision registered since the last read is protected (its `.dir` and objects, in every layout,
or its single object) and any candidate it protects is skipped. A builder that registered
before a batch is seen by it; one that registers after finds that batch's objects gone and
fetches them. Registrations whose flock is free belong to dead builders and are removed.

**Which goes first.** Least recently used, by revision: a revision's clock is the mtime of its
used-file (`touch_used`, written whenever it is materialised or prefetched), or of its `.dir`
object when it has none. An object takes the newest clock among the non-root revisions that
name it, so an object shared by an old and a new revision lives as long as the new one; an
object no revision names (an orphan: a revision whose `.dir` went, a damaged `.dir`, a
single-file revision) takes its own mtime. A revision's `.dir` goes right after its last
object at the same clock, so a revision is never left with objects and no manifest to find
them by. Ties are broken by layout, then path, so a plan is reproducible.

**When to stop.** GC runs when the volume is above the high watermark (bytes or inodes) and
evicts until both are at or below the low one. Progress is *estimated* per object, because
statvfs is a volume-wide figure: an object frees `st_blocks * 512` bytes and one inode only if
the cache holds its last link (`st_nlink == 1`); a hardlinked object frees nothing while a
tree still links it. The estimate can be wrong both ways: another writer on the volume, or
extents a reflinked tree outside the roots still shares (a dead pod's workspace not reaped
yet), make unlinks free less than `st_blocks`; so statvfs is read again every 512 evictions,
and its figure replaces the estimate when it is lower, and once more when the estimate says
"done": if the volume is really still above the low watermark, eviction resumes from the
measured figure. That needs statvfs to be current after unlink. Measured on this project's
test XFS (kernel 6.18, reflink=1): it is not quite. Unlinking 40 1 MiB files then a 64 MiB one
and calling statvfs at once showed 34 MiB / 34 inodes freed, not 104 MiB / 41: XFS frees an
unlinked inode's blocks in a background worker (inodegc), which statfs kicks but does not
wait for. One more statvfs about a millisecond later showed everything freed, and unlinking
3000 files of 40 KiB settled within 10 ms. Hence `_settled`: re-read statvfs every 10 ms until
two readings agree (at most one second, since other writers may never let it settle). A
lagging reading is harmless at the periodic checks, where only a lower figure is taken.

**Other housekeeping.** `clean_slots` removes download slots whose downloader died long ago
(their flock is free), and `reap_workspaces` removes the workspaces of pods that are gone
(taking every workspace lock of the pod first; a lock that is not a regular file cannot be
held by any sidecar and does not keep a gone pod's workspace); the agent should reap before
it collects, so that reflinked trees of dead pods stop holding extents the GC would otherwise
try to free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import TreeInfo
from datapin_sidecar.errors import UnsafeFileError, UsageError, os_error

log = logging.getLogger(__name__)

#: Statvfs is read again after this many evictions (a cheap syscall; bounds estimate drift).
REMEASURE_EVERY: Final = 512
#: Evictions per batch: build registrations are re-read before each (see the module doc), and
#: a builder registering waits for at most one batch.
BATCH: Final = 64
#: A meta file is a small JSON record; anything larger is not ours.
META_LIMIT: Final = 64 * 1024
#: Meta files read per workspace meta directory (a workspace has two or three trees).
MAX_META_FILES: Final = 256
#: Consecutive failed evictions after which a collect gives up (a read-only volume, say).
MAX_FAILED_EVICTIONS: Final = 64


class Task(enum.StrEnum):
    """The agent's housekeeping tasks, as the `task` label of item errors."""

    ROOTS = "roots"
    COLLECT = "collect"
    SLOTS = "slots"
    REAP = "reap"
    SCAN = "scan"
    BUILDS = "builds"
    PREFETCH = "prefetch"


#: `(task, path, error)`: one item (a file, a directory, a workspace) that a task skipped.
OnError = Callable[[Task, str, BaseException], None]


def log_item_error(task: Task, path: str, exc: BaseException) -> None:
    """The default `OnError`: a warning (the agent counts and de-duplicates instead)."""
    log.warning("%s: skipped %s: %s", task, path, exc, extra={"task": str(task), "path": path})


_LAYOUTS: Final = (Layout.DVC3, Layout.LEGACY)
_SHARD: Final = re.compile(r"[0-9a-f]{2}")
_OBJECT: Final = re.compile(r"[0-9a-f]{30}(\.dir)?")
_TREE_KEY: Final = re.compile(r"[0-9a-f]{32}(?:-legacy)?")
_POD_UID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PRIVATE: Final = ".datapin"
_TRASH: Final = ".trash-"
_STATE: Final = ".state"
_BUILD: Final = re.compile(r"([0-9a-f]{32}(?:\.dir)?)\.[0-9a-f]+\.tmp")
_JOURNAL: Final = ".parts"
_SETTLE_POLL: Final = 0.01
_SETTLE_MAX: Final = 1.0


def _private(cache: NodeCache) -> Path:
    return cache.root / _PRIVATE


def _used_dir(cache: NodeCache) -> Path:
    return _private(cache) / "used"


# -- the LRU clock ----------------------------------------------------------------------------


def touch_used(
    cache: NodeCache, revision: Revision, layout: Layout, *, now: float | None = None
) -> None:
    """Record that `revision` was just materialised or prefetched on this node (best effort).

    A failure is swallowed: the used-file is only an LRU hint, and a materialise must never
    fail because the hint could not be written (without it the `.dir`'s mtime is the clock).
    """
    path = _used_dir(cache) / f"{layout}-{revision.oid}"
    times = None if now is None else (now, now)
    try:
        try:
            # Never through a symlink someone planted: that would touch a file elsewhere.
            os.utime(path, times, follow_symlinks=False)  # the usual case: one syscall
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(safefs.open_regular(path, os.O_WRONLY | os.O_CREAT))
            os.utime(path, times, follow_symlinks=False)
    except OSError as exc:
        log.debug(
            "could not mark revision %s as used: %s",
            revision.oid,
            exc,
            extra={"revision": revision.oid, "layout": str(layout)},
        )


# -- volume usage -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Watermarks:
    """GC starts above a high watermark (bytes or inodes) and evicts down to the low ones."""

    high_percent: float = 85.0
    low_percent: float = 70.0
    inodes_high_percent: float = 85.0
    inodes_low_percent: float = 70.0

    def __post_init__(self) -> None:
        for low_name, high_name in (
            ("low_percent", "high_percent"),
            ("inodes_low_percent", "inodes_high_percent"),
        ):
            low: float = getattr(self, low_name)
            high: float = getattr(self, high_name)
            # Written as negations so that NaN fails every check.
            if not 0 < high <= 100:
                raise UsageError(
                    f"watermark {high_name}={high} is not a percentage of the volume. "
                    f"Fix: set {high_name} above 0 and at most 100 (default 85)"
                )
            if not low > 0:
                raise UsageError(
                    f"watermark {low_name}={low} must be above 0 (GC would have to empty the "
                    f"volume). Fix: set {low_name} between 0 and {high_name} (default 70)"
                )
            if not low < high:
                raise UsageError(
                    f"watermark {low_name}={low} must be below {high_name}={high}: GC starts "
                    f"above {high_name} and evicts down to {low_name}. Fix: lower {low_name} "
                    f"or raise {high_name} (defaults 70 and 85)"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeUsage:
    """One statvfs reading. `free_bytes` is what an unprivileged writer can use (f_bavail)."""

    size_bytes: int
    used_bytes: int
    free_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int

    @classmethod
    def measure(cls, path: str | os.PathLike[str]) -> VolumeUsage:
        st = os.statvfs(path)
        return cls(
            size_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            free_bytes=st.f_bavail * st.f_frsize,
            inodes=st.f_files,
            inodes_used=st.f_files - st.f_ffree,
            inodes_free=st.f_favail,
        )

    @property
    def used_percent(self) -> float:
        """As `df` computes Use%: used / (used + available), so reserved blocks count as full."""
        usable = self.used_bytes + self.free_bytes
        return 100.0 * self.used_bytes / usable if usable > 0 else 0.0

    @property
    def inodes_used_percent(self) -> float:
        # Filesystems with dynamic inodes (btrfs) report no inode total: never the limit there.
        return 100.0 * self.inodes_used / self.inodes if self.inodes > 0 else 0.0


def _above(usage: VolumeUsage, bytes_percent: float, inodes_percent: float) -> bool:
    return usage.used_percent > bytes_percent or usage.inodes_used_percent > inodes_percent


def _minus(usage: VolumeUsage, freed_bytes: int, freed_inodes: int) -> VolumeUsage:
    freed_bytes = min(freed_bytes, usage.used_bytes)
    freed_inodes = min(freed_inodes, usage.inodes_used)
    return dataclasses.replace(
        usage,
        used_bytes=usage.used_bytes - freed_bytes,
        free_bytes=usage.free_bytes + freed_bytes,
        inodes_used=usage.inodes_used - freed_inodes,
        inodes_free=usage.inodes_free + freed_inodes,
    )


def _lower(estimate: VolumeUsage, real: VolumeUsage) -> VolumeUsage:
    """Per dimension, whichever of the two says less is used."""
    b = real if real.used_percent < estimate.used_percent else estimate
    i = real if real.inodes_used_percent < estimate.inodes_used_percent else estimate
    return VolumeUsage(
        size_bytes=b.size_bytes,
        used_bytes=b.used_bytes,
        free_bytes=b.free_bytes,
        inodes=i.inodes,
        inodes_used=i.inodes_used,
        inodes_free=i.inodes_free,
    )


def _settled(path: Path) -> VolumeUsage:
    """Statvfs once XFS's background inode reclaim has caught up (see the module doc)."""
    deadline = time.monotonic() + _SETTLE_MAX
    last = VolumeUsage.measure(path)
    while time.monotonic() < deadline:
        time.sleep(_SETTLE_POLL)
        now = VolumeUsage.measure(path)
        if (now.used_bytes, now.inodes_used) == (last.used_bytes, last.inodes_used):
            return now
        last = now
    return last


# -- roots ------------------------------------------------------------------------------------


def _listdir(path: str | os.PathLike[str]) -> list[str]:
    """Names in `path`; empty if it is gone or not a directory (things vanish under a scan)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _names(fd: int) -> list[str]:
    """Names in the open directory `fd`, sorted."""
    return sorted(os.listdir(fd))


def roots(
    root: Path,
    prefetch: Iterable[tuple[Revision, Layout]] = (),
    *,
    on_error: OnError | None = None,
) -> set[tuple[str, Layout]]:
    """`(oid, layout)` of every revision in use on the node: see the module doc.

    A read-only scan of every meta file under `root/workspaces/<uid>/`, in both places (the
    current `.state/<dataset>/.meta/` and older sidecars' `<dataset>/.revs/.meta/`); no
    workspace lock is taken. Everything under `workspaces/` is opened without following
    symlinks or blocking, and meta files are read bounded (`META_LIMIT`), because a pod may
    control them; an unreadable one is reported to `on_error` and skipped.
    """
    report = on_error or log_item_error
    found = {(revision.oid, layout) for revision, layout in prefetch}
    workspaces = Path(root) / "workspaces"
    try:
        wfd = safefs.open_dir(workspaces)
    except FileNotFoundError:
        return found
    except OSError as exc:
        report(Task.ROOTS, str(workspaces), exc)
        return found
    try:
        for pod in _names(wfd):
            if pod.startswith("."):
                continue  # a workspace being deleted (`.trash-`)
            try:
                pfd = safefs.open_dir(pod, dir_fd=wfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(Task.ROOTS, str(workspaces / pod), exc)
                continue
            try:
                found |= _pod_roots(pfd, workspaces / pod, report)
            except Exception as exc:
                report(Task.ROOTS, str(workspaces / pod), exc)
            finally:
                os.close(pfd)
    finally:
        os.close(wfd)
    return found


def _meta_dirs(pfd: int) -> Iterator[str]:
    """Relative paths of the meta directories of one pod's workspaces (both layouts).

    A dataset with records in `.state/` is managed in the current layout, where its
    `DEST/.revs/` belongs to the pod: a `.meta/` there is not ours and pins nothing.
    """
    names = _names(pfd)
    current: list[str] = []
    if _STATE in names:
        try:
            sfd = safefs.open_dir(_STATE, dir_fd=pfd)
        except (FileNotFoundError, UnsafeFileError):
            pass
        else:
            try:
                current = _names(sfd)
            finally:
                os.close(sfd)
    yield from (f"{_STATE}/{d}/.meta" for d in current)
    yield from (f"{n}/.revs/.meta" for n in names if not n.startswith(".") and n not in current)


def _pod_roots(pfd: int, where: Path, report: OnError) -> set[tuple[str, Layout]]:
    found: set[tuple[str, Layout]] = set()
    for rel in _meta_dirs(pfd):
        try:
            mfd = safefs.open_dir_beneath(pfd, rel)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a workspace (yet), or a file a pod put there
        except OSError as exc:
            report(Task.ROOTS, str(where / rel), exc)
            continue
        try:
            names = [n for n in _names(mfd) if n.endswith(".json")]
            if len(names) > MAX_META_FILES:
                report(
                    Task.ROOTS,
                    str(where / rel),
                    UnsafeFileError(
                        str(where / rel),
                        f"holds {len(names)} meta files; read the first {MAX_META_FILES}",
                    ),
                )
                names = names[:MAX_META_FILES]
            for name in names:
                try:
                    data = safefs.read_regular(name, limit=META_LIMIT, dir_fd=mfd)
                    info = TreeInfo.from_json(data.decode())
                    found.add((Revision.parse(info.revision).oid, Layout(info.layout)))
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    # Its objects stay unprotected: evicting them costs a re-download, never
                    # the tree.
                    report(Task.ROOTS, str(where / rel / name), exc)
        finally:
            os.close(mfd)
    return found


# -- the cache inventory ----------------------------------------------------------------------


def _open_prefix(cache: NodeCache, layout: Layout) -> int:
    """The directory holding `layout`'s shards, opened without following a symlink below the
    cache root (the root itself is the agent's configuration)."""
    rfd = os.open(cache.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return safefs.open_dir_beneath(rfd, layout.prefix())
    finally:
        os.close(rfd)


def _walk(
    cache: NodeCache, layout: Layout, report: OnError, *, task: Task, remove_planted: bool = False
) -> Iterator[tuple[str, os.stat_result]]:
    """`(oid, lstat)` of every object file in `layout`, in path order.

    Only names shaped like objects count: a DVC cache also holds `runs/`, `tmp/` and the like,
    and the legacy layout's prefix is the cache root itself (where `files/` and `.datapin/`
    are). A shard that is not a directory (a symlink someone planted) is never followed: it is
    reported, and with `remove_planted` unlinked (its target is left alone).
    """
    try:
        pfd = _open_prefix(cache, layout)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        report(task, cache.prefix(layout), exc)
        return
    try:
        for shard in _names(pfd):
            if not _SHARD.fullmatch(shard):
                continue
            try:
                sfd = safefs.open_dir(shard, dir_fd=pfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(task, cache.prefix(layout) + shard, exc)
                if remove_planted and isinstance(exc, UnsafeFileError):
                    with contextlib.suppress(OSError):
                        safefs.remove_tree(shard, dir_fd=pfd)
                continue
            try:
                with os.scandir(sfd) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for entry in entries:
                    if not _OBJECT.fullmatch(entry.name) or not entry.is_file(
                        follow_symlinks=False
                    ):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield shard + entry.name, st
            finally:
                os.close(sfd)
    finally:
        os.close(pfd)


def scan(cache: NodeCache, *, on_error: OnError | None = None) -> tuple[int, int]:
    """`(objects, bytes)` in the cache, both layouts, `.dir` objects included, `.datapin/` not."""
    report = on_error or log_item_error
    objects = size = 0
    for layout in _LAYOUTS:
        for _, st in _walk(cache, layout, report, task=Task.SCAN):
            objects += 1
            size += st.st_size
    return objects, size


@dataclass(slots=True)
class _Dir:
    """A `.dir` object; `clock` is its revision's LRU time."""

    layout: Layout
    md5: str
    size: int
    mtime: float
    clock: float = 0.0
    protected: bool = False


class _Inventory:
    """Every object in the cache, lean enough for caches of millions of objects.

    Plain objects are keyed by their 16 raw md5 bytes (what `Manifest.md5_raw` yields, with no
    hex conversion per manifest entry) and their numbers kept in flat arrays, not in a Python
    object each: what remains per object is essentially one dict entry.
    """

    def __init__(self) -> None:
        self.index: dict[Layout, dict[bytes, int]] = {layout: {} for layout in _LAYOUTS}
        self.keys: list[bytes] = []
        self.layout_of = bytearray()  # index into _LAYOUTS
        self.size = array("q")
        self.clock = array("d")  # own mtime until a revision names the object
        self.named = bytearray()  # some non-root revision names it
        self.protected = bytearray()
        self.dirs: list[_Dir] = []

    @classmethod
    def take(cls, cache: NodeCache, report: OnError, *, remove_planted: bool) -> _Inventory:
        inv = cls()
        for n, layout in enumerate(_LAYOUTS):
            index = inv.index[layout]
            for oid, st in _walk(
                cache, layout, report, task=Task.COLLECT, remove_planted=remove_planted
            ):
                if oid.endswith(".dir"):
                    inv.dirs.append(
                        _Dir(layout=layout, md5=oid[:32], size=st.st_size, mtime=st.st_mtime)
                    )
                    continue
                key = bytes.fromhex(oid)
                index[key] = len(inv.keys)
                inv.keys.append(key)
                inv.layout_of.append(n)
                inv.size.append(st.st_size)
                inv.clock.append(st.st_mtime)
        inv.named = bytearray(len(inv.keys))
        inv.protected = bytearray(len(inv.keys))
        return inv

    @property
    def objects(self) -> int:
        return len(self.keys) + len(self.dirs)

    @property
    def total_bytes(self) -> int:
        return sum(self.size) + sum(d.size for d in self.dirs)

    def protect(self, key: bytes, layout: Layout) -> None:
        i = self.index[layout].get(key)
        if i is not None:
            self.protected[i] = 1

    def name(self, key: bytes, layout: Layout, clock: float) -> None:
        i = self.index[layout].get(key)
        if i is None or self.protected[i]:
            return
        if not self.named[i] or clock > self.clock[i]:
            self.clock[i] = clock
        self.named[i] = 1


@dataclass(frozen=True, slots=True)
class _Candidate:
    path: str
    layout: Layout
    oid: str
    is_dir: bool
    index: int = -1  # in the inventory's arrays (objects)
    dir: _Dir | None = None  # (`.dir` objects)

    def protected(self, inv: _Inventory) -> bool:
        """Protected now: a build may have registered since the plan was made."""
        if self.dir is not None:
            return self.dir.protected
        return bool(inv.protected[self.index])


def _candidates(cache: NodeCache, inv: _Inventory) -> Iterator[_Candidate]:
    """Unprotected objects, oldest clock first; a `.dir` after the objects of its clock."""
    objects = sorted(
        (i for i in range(len(inv.keys)) if not inv.protected[i]), key=inv.clock.__getitem__
    )  # stable: equal clocks stay in layout, then path, order
    dirs = sorted(
        (d for d in inv.dirs if not d.protected),
        key=lambda d: (d.clock, _LAYOUTS.index(d.layout), d.md5),
    )
    j = 0
    for i in objects:
        clock = inv.clock[i]
        while j < len(dirs) and dirs[j].clock < clock:
            yield _dir_candidate(cache, dirs[j])
            j += 1
        layout = _LAYOUTS[inv.layout_of[i]]
        oid = inv.keys[i].hex()
        yield _Candidate(cache.path(oid, layout), layout, oid, is_dir=False, index=i)
    for d in dirs[j:]:
        yield _dir_candidate(cache, d)


def _dir_candidate(cache: NodeCache, d: _Dir) -> _Candidate:
    oid = d.md5 + ".dir"
    return _Candidate(cache.path(oid, d.layout), d.layout, oid, is_dir=True, dir=d)


def _plan(cache: NodeCache, inv: _Inventory, root_revisions: set[tuple[str, Layout]]) -> None:
    """Mark what roots protect and give every other object its LRU clock."""
    used: dict[str, float] = {}
    with contextlib.suppress(OSError):  # no used-files (or not a directory of ours): no hints
        ufd = safefs.open_dir(_used_dir(cache))
        try:
            with os.scandir(ufd) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        used[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        finally:
            os.close(ufd)
    for oid, layout in root_revisions:
        if not oid.endswith(".dir"):
            with contextlib.suppress(ValueError):  # a single-file revision: the object itself
                inv.protect(bytes.fromhex(oid), layout)
    for d in inv.dirs:
        d.protected = (d.md5 + ".dir", d.layout) in root_revisions
        d.clock = used.get(f"{d.layout}-{d.md5}.dir", d.mtime)
    gone: set[int] = set()
    # Roots first: `name` must know every protected object before it assigns clocks.
    for d in sorted(inv.dirs, key=lambda d: not d.protected):
        revision = Revision(md5=d.md5, is_dir=True)
        try:
            manifest = cache.load_manifest(revision, d.layout)
        except Exception as exc:
            # A bad `.dir` is quarantined by load_manifest or, if it parses badly but hashes
            # right, evicted like any object no revision names: at its own mtime.
            log.warning(
                "GC: cannot read manifest %s (%s layout): %s; %s",
                revision.oid,
                d.layout,
                exc,
                "the objects of this revision in use are not protected"
                if d.protected
                else "treating it as an unreferenced object",
                extra={"revision": revision.oid, "layout": str(d.layout)},
            )
            d.clock = d.mtime
            if not os.path.lexists(cache.path(revision.oid, d.layout)):
                gone.add(id(d))
            continue
        if d.protected:
            for i in range(len(manifest)):
                inv.protect(manifest.md5_raw(i), d.layout)
        else:
            for i in range(len(manifest)):
                inv.name(manifest.md5_raw(i), d.layout, d.clock)
    if gone:  # quarantined just now: no longer in the cache
        inv.dirs = [d for d in inv.dirs if id(d) not in gone]


# -- the GC -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GcReport:
    """What one `collect` did (or, with `dry_run`, would do)."""

    triggered: bool  # the volume was above a high watermark
    target_reached: bool  # False only if a triggered GC could not get below the low ones
    evicted_objects: int  # `.dir` objects included
    evicted_bytes: int  # sum of st_size
    freed_bytes_estimate: int  # st_blocks of objects whose last link was the cache's
    evicted_revisions: tuple[str, ...]  # oids of the `.dir` objects evicted
    kept_in_use_objects: int  # objects protected by roots (their `.dir` objects included)
    before: VolumeUsage
    after: VolumeUsage  # measured (estimated with `dry_run`)
    cache_objects: int | None  # after eviction; None when not triggered (see `scan`)
    cache_bytes: int | None
    seconds: float


@contextlib.contextmanager
def _gc_lock(cache: NodeCache) -> Iterator[None]:
    path = _private(cache) / "gc.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = safefs.open_regular(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise os_error(str(cache.root), exc, volume="node cache") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _protect_revision(cache: NodeCache, inv: _Inventory, oid: str, report: OnError) -> None:
    """Protect revision `oid` in every layout the cache holds it in (a build registered)."""
    for layout in _LAYOUTS:
        if not oid.endswith(".dir"):
            with contextlib.suppress(ValueError):
                inv.protect(bytes.fromhex(oid), layout)
            continue
        md5 = oid.removesuffix(".dir")
        for d in inv.dirs:
            if d.md5 == md5 and d.layout == layout:
                d.protected = True
        if not os.path.lexists(cache.path(oid, layout)):
            continue  # the builder fetches it; its objects are fetched after it too
        try:
            manifest = cache.load_manifest(Revision(md5=md5, is_dir=True), layout)
        except FileNotFoundError:
            continue
        except Exception as exc:
            report(Task.BUILDS, cache.path(oid, layout), exc)
            continue
        for i in range(len(manifest)):
            inv.protect(manifest.md5_raw(i), layout)


class _Builds:
    """The registrations of builds in progress (`NodeCache.building`), read under
    `builds.lock`, which the GC holds exclusively for one read and one batch of evictions."""

    def __init__(self, cache: NodeCache, report: OnError) -> None:
        self.cache = cache
        self.report = report
        self.seen: set[str] = set()
        try:
            cache.builds_lock.parent.mkdir(parents=True, exist_ok=True)
            self.fd = safefs.open_regular(cache.builds_lock, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise os_error(str(cache.root), exc, volume="node cache") from exc

    def close(self) -> None:
        os.close(self.fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[set[str]]:
        """Exclusively: no build can register meanwhile. Yields the oids newly registered."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            live = self.read()
            new = live - self.seen
            self.seen |= live
            yield new
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read(self) -> set[str]:
        """Oids of held registrations; dead builders' ones (a free flock) are removed."""
        live: set[str] = set()
        try:
            dfd = safefs.open_dir(self.cache.builds_dir)
        except FileNotFoundError:
            return live
        except OSError as exc:
            self.report(Task.BUILDS, str(self.cache.builds_dir), exc)
            return live
        try:
            for name in _names(dfd):
                match = _BUILD.fullmatch(name)
                try:
                    fd = safefs.open_regular(name, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self.report(Task.BUILDS, f"{self.cache.builds_dir}/{name}", exc)
                    if isinstance(exc, UnsafeFileError):
                        with contextlib.suppress(OSError):
                            safefs.remove_tree(name, dir_fd=dfd)  # planted: never ours
                    continue
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        if match is not None:
                            live.add(match.group(1))
                        continue
                    # A free lock: its builder died (builders register under our lock, so
                    # none is between creating and locking its file now).
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dfd)
                finally:
                    os.close(fd)
        finally:
            os.close(dfd)
        return live


class _Evictor:
    """Unlinks candidates and keeps the tally; never through a symlink."""

    def __init__(self, cache: NodeCache, report: OnError, *, dry_run: bool) -> None:
        self.cache = cache
        self.report = report
        self.dry_run = dry_run
        self.objects = 0
        self.size = 0
        self.freed_bytes = 0
        self.freed_inodes = 0
        self.failed = 0  # consecutive failures
        self.revisions: list[str] = []

    def evict(self, c: _Candidate) -> tuple[int, int]:
        """Remove one candidate; returns the (bytes, inodes) it is expected to free."""
        relative = f"{c.layout.prefix()}{c.oid[:2]}"
        freed = self._unlink(relative, c.oid[2:])
        if freed is None:
            return 0, 0  # gone already (quarantined, or someone else's cleanup), or failed
        size, freed_bytes, freed_inodes = freed
        self.objects += 1
        self.size += size
        if c.is_dir:
            self.revisions.append(c.oid)
            # The parsed manifest is only valid with its `.dir`, and can be tens of MB.
            for directory in (f"{_PRIVATE}/manifests", f"{_PRIVATE}/used"):
                more = self._unlink(directory, f"{c.layout}-{c.oid}")
                if more is not None:
                    freed_bytes += more[1]
                    freed_inodes += more[2]
        self.freed_bytes += freed_bytes
        self.freed_inodes += freed_inodes
        return freed_bytes, freed_inodes

    def _unlink(self, relative: str, name: str) -> tuple[int, int, int] | None:
        path = f"{self.cache.root}/{relative}/{name}"
        try:
            rfd = os.open(self.cache.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dfd = safefs.open_dir_beneath(rfd, relative)
            finally:
                os.close(rfd)
            try:
                st = os.lstat(name, dir_fd=dfd)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeFileError(path, "is not a regular file")
                if not self.dry_run:
                    os.unlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)
        except (FileNotFoundError, NotADirectoryError):
            self.failed = 0
            return None
        except OSError as exc:
            self.report(Task.COLLECT, path, exc)
            self.failed += 1
            if self.failed >= MAX_FAILED_EVICTIONS:
                raise os_error(str(self.cache.root), exc, volume="node cache") from exc
            return None
        self.failed = 0
        # An object that trees still hardlink keeps its blocks and inode after our unlink.
        last_link = st.st_nlink == 1
        return st.st_size, st.st_blocks * 512 if last_link else 0, int(last_link)


def collect(
    cache: NodeCache,
    root_revisions: Iterable[tuple[str, Layout]],
    watermarks: Watermarks,
    *,
    usage: VolumeUsage | None = None,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    on_error: OnError | None = None,
) -> GcReport:
    """Evict least recently used objects not in use until the volume is below `watermarks`.

    `root_revisions` is `roots(...)`; `usage` a reading the caller just took (default: measure
    now); `clock` the time source for `seconds`; `on_error` hears of every item skipped. With
    `dry_run` nothing is evicted and `after` is the estimate (manifests are still read as on
    any run, so a `.dir` that fails its md5 is still quarantined). Builds in progress
    (`NodeCache.building`) are roots too, re-read before every batch of evictions. See the
    module doc for the policy.
    """
    started = clock()
    report = on_error or log_item_error
    wm = watermarks
    root_set = set(root_revisions)
    with _gc_lock(cache):
        before = usage if usage is not None else VolumeUsage.measure(cache.root)
        if not _above(before, wm.high_percent, wm.inodes_high_percent):
            return GcReport(
                triggered=False,
                target_reached=True,
                evicted_objects=0,
                evicted_bytes=0,
                freed_bytes_estimate=0,
                evicted_revisions=(),
                kept_in_use_objects=0,
                before=before,
                after=before,
                cache_objects=None,
                cache_bytes=None,
                seconds=clock() - started,
            )
        if not dry_run:
            cache.clean_temp()
        builds = _Builds(cache, report)
        try:
            inv = _Inventory.take(cache, report, remove_planted=not dry_run)
            with builds.held() as building:
                registered = set(building)
            # Planned without the lock (manifests take a while to read); a build registering
            # meanwhile is seen by the first batch.
            _plan(cache, inv, root_set | {(oid, lay) for oid in registered for lay in _LAYOUTS})
            candidates = _candidates(cache, inv)
            evictor = _Evictor(cache, report, dry_run=dry_run)
            estimate = before
            exhausted = False
            tried = 0
            while True:
                while not exhausted and _above(estimate, wm.low_percent, wm.inodes_low_percent):
                    with builds.held() as building:
                        for oid in sorted(building):
                            _protect_revision(cache, inv, oid, report)
                        for _ in range(BATCH):
                            if not _above(estimate, wm.low_percent, wm.inodes_low_percent):
                                break
                            candidate = next(candidates, None)
                            if candidate is None:
                                exhausted = True
                                break
                            if candidate.protected(inv):
                                continue  # a build registered it since the plan
                            estimate = _minus(estimate, *evictor.evict(candidate))
                            tried += 1
                            if not dry_run and tried % REMEASURE_EVERY == 0:
                                estimate = _lower(estimate, VolumeUsage.measure(cache.root))
                if dry_run:
                    after = estimate
                    break
                after = _settled(cache.root)
                if exhausted or not _above(after, wm.low_percent, wm.inodes_low_percent):
                    break
                # Unlinks freed less than estimated (extents a tree outside the roots still
                # shares, or someone else writing): go on from what the volume says.
                log.info(
                    "GC: volume still at %.1f%% after the estimate reached the low watermark; "
                    "evicting more",
                    after.used_percent,
                    extra={"used_percent": after.used_percent, "estimate": estimate.used_percent},
                )
                estimate = after
        finally:
            builds.close()
        target_reached = not _above(after, wm.low_percent, wm.inodes_low_percent)

    kept = sum(1 for p in inv.protected if p) + sum(1 for d in inv.dirs if d.protected)
    if not target_reached:
        held = sum(s for s, p in zip(inv.size, inv.protected, strict=True) if p) + sum(
            d.size for d in inv.dirs if d.protected
        )
        log.warning(
            "GC: the node cache volume stays above the low watermark (%.1f%% of bytes, "
            "%.1f%% of inodes; low %.1f%% / %.1f%%) after evicting every object not in use: "
            "%d objects (%d bytes) are held by %d revisions in use. Fix: a larger volume, or "
            "fewer datasets pinned on this node",
            after.used_percent,
            after.inodes_used_percent,
            wm.low_percent,
            wm.inodes_low_percent,
            kept,
            held,
            len(root_set),
            extra={"held_bytes": held, "held_objects": kept, "roots": len(root_set)},
        )
    result = GcReport(
        triggered=True,
        target_reached=target_reached,
        evicted_objects=evictor.objects,
        evicted_bytes=evictor.size,
        freed_bytes_estimate=evictor.freed_bytes,
        evicted_revisions=tuple(evictor.revisions),
        kept_in_use_objects=kept,
        before=before,
        after=after,
        cache_objects=inv.objects - evictor.objects,
        cache_bytes=inv.total_bytes - evictor.size,
        seconds=clock() - started,
    )
    log.info(
        "GC%s: evicted %d objects (%d bytes, %d revisions); volume %.1f%% -> %.1f%%",
        " (dry run)" if dry_run else "",
        result.evicted_objects,
        result.evicted_bytes,
        len(result.evicted_revisions),
        before.used_percent,
        after.used_percent,
        extra={
            "dry_run": dry_run,
            "evicted_objects": result.evicted_objects,
            "evicted_bytes": result.evicted_bytes,
            "evicted_revisions": len(result.evicted_revisions),
            "kept_in_use_objects": kept,
            "used_percent_before": before.used_percent,
            "used_percent_after": after.used_percent,
            "seconds": result.seconds,
        },
    )
    return result


# -- download slots ---------------------------------------------------------------------------


def clean_slots(
    cache: NodeCache,
    *,
    max_age: float = 3600.0,
    clock: Callable[[], float] = time.time,
    on_error: OnError | None = None,
) -> int:
    """Remove download slots abandoned longer than `max_age` seconds. Returns how many.

    A slot whose flock is held belongs to a live downloader and is never touched. A free one
    may still be resumed by the next claimant of its object, which is why only old ones go.
    Journals (`.parts`) go with their slot, or alone when their slot is gone and they are old.
    Anything in the fetch area that is not a regular file (a directory or symlink planted
    there, a symlinked shard) is not ours: it is reported and removed without being followed.
    """
    report = on_error or log_item_error
    now = clock()
    removed = 0
    try:
        ffd = safefs.open_dir(cache.fetch_dir)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        report(Task.SLOTS, str(cache.fetch_dir), exc)
        return 0
    try:
        for shard in _names(ffd):
            where = f"{cache.fetch_dir}/{shard}"
            try:
                sfd = safefs.open_dir(shard, dir_fd=ffd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(Task.SLOTS, where, exc)
                if isinstance(exc, UnsafeFileError):
                    _remove_planted(shard, ffd, where, report)
                continue
            try:
                removed += _clean_shard(sfd, where, now, max_age, report)
            except Exception as exc:
                report(Task.SLOTS, where, exc)
            finally:
                os.close(sfd)
    finally:
        os.close(ffd)
    if removed:
        log.info("removed %d abandoned download slots", removed, extra={"slots": removed})
    return removed


def _remove_planted(name: str, dir_fd: int, where: str, report: OnError) -> None:
    try:
        safefs.remove_tree(name, dir_fd=dir_fd)
    except OSError as exc:
        report(Task.SLOTS, where, exc)


def _clean_shard(sfd: int, where: str, now: float, max_age: float, report: OnError) -> int:
    removed = 0
    names = _names(sfd)
    regular: list[str] = []
    for name in names:
        try:
            mode = os.lstat(name, dir_fd=sfd).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            regular.append(name)
            continue
        report(Task.SLOTS, f"{where}/{name}", UnsafeFileError(name, "is not a regular file"))
        _remove_planted(name, sfd, f"{where}/{name}", report)
    slots = {n for n in regular if _JOURNAL not in n}
    for name in sorted(slots):
        journals = [n for n in regular if n.startswith(name + _JOURNAL)]
        try:
            if _remove_slot(name, journals, sfd, now, max_age):
                removed += 1
        except OSError as exc:
            report(Task.SLOTS, f"{where}/{name}", exc)
    for name in regular:
        if _JOURNAL in name and name[: name.rindex(_JOURNAL)] not in slots:
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(name, dir_fd=sfd).st_mtime > max_age:
                    os.unlink(name, dir_fd=sfd)
    return removed


def _remove_slot(name: str, journals: list[str], sfd: int, now: float, max_age: float) -> bool:
    try:
        fd = safefs.open_regular(name, dir_fd=sfd)
    except FileNotFoundError:
        return False
    try:
        if not _abandoned(fd, name, sfd, now, max_age):
            return False
        # Journals first, the slot last, the lock released after both (as `Slot.discard`).
        for journal in journals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal, dir_fd=sfd)
        try:
            os.unlink(name, dir_fd=sfd)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def _abandoned(fd: int, name: str, sfd: int, now: float, max_age: float) -> bool:
    """Take the slot's lock (kept until `fd` closes) and say whether it is old and ours."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        # Installing a slot links it to its object name before unlinking the slot, so a
        # lock on an installed slot's inode (nlink 1: the object) says nothing about the
        # file now at `name`, which may be a new claimant's.
        current = os.lstat(name, dir_fd=sfd)
    except (BlockingIOError, FileNotFoundError):
        return False  # a live downloader, or finished meanwhile
    if (current.st_ino, current.st_dev) != (st.st_ino, st.st_dev):
        return False
    return now - st.st_mtime > max_age  # a younger one may be resumed by its downloader


# -- workspaces of pods that are gone ---------------------------------------------------------


def reap_workspaces(
    root: Path,
    *,
    live: Callable[[str], bool],
    grace: float = 300.0,
    clock: Callable[[], float] = time.time,
    warned: set[str] | None = None,
    on_error: OnError | None = None,
) -> list[str]:
    """Remove `root/workspaces/<uid>/` of pods that are gone; returns the uids removed.

    A pod is gone when `live(uid)` is False and both the directory and its `.pod.json` are
    older than `grace` seconds (a pod just scheduled may not be visible to `live` yet). A
    workspace some sidecar is materialising into (a `.state/<dataset>/.lock`, or an older
    sidecar's `<dataset>/.revs/.lock`, is held) is skipped. A lock that is not a regular file
    (a FIFO, a symlink: only the pod could have put it there) is never opened or followed; no
    sidecar can hold it, so it does not keep the workspace: it is reported and the workspace
    reaped. Removal renames the directory to `.trash-<uid>-<random>` first, so a crash never
    leaves a half-deleted tree under a pod's uid, and leftover `.trash-*` directories go
    first; deletion never follows a symlink (`safefs.remove_tree`).

    Names that are not pod UIDs are left alone and logged once per call, or once per name
    for the lifetime of `warned` if the caller keeps that set across calls.
    """
    report = on_error or log_item_error
    workspaces = Path(root) / "workspaces"
    names = sorted(_listdir(workspaces))
    for name in names:
        if name.startswith(_TRASH):
            _remove(workspaces / name, uid=None, report=report)
    now = clock()
    removed: list[str] = []
    odd = [n for n in names if not n.startswith(_TRASH) and not _POD_UID.fullmatch(n)]
    new_odd = [n for n in odd if warned is None or n not in warned]
    if new_odd:
        log.warning(
            "%s holds %d entries that are not pod UIDs (%s); left alone. Fix: remove them by "
            "hand if nothing uses them",
            workspaces,
            len(new_odd),
            ", ".join(new_odd[:5]) + (" ..." if len(new_odd) > 5 else ""),
            extra={"entries": new_odd},
        )
        if warned is not None:
            warned.update(new_odd)
    for uid in names:
        if not _POD_UID.fullmatch(uid) or live(uid):
            continue
        pod_dir = workspaces / uid
        try:
            if not _older_than(pod_dir, now - grace):
                continue
            trash = workspaces / f"{_TRASH}{uid}-{secrets.token_hex(4)}"
            with contextlib.ExitStack() as locks:
                if not _lock_all(pod_dir, locks, report):
                    log.info(
                        "workspace of gone pod %s is being materialised into; reaping it later",
                        uid,
                        extra={"pod_uid": uid},
                    )
                    continue
                os.rename(pod_dir, trash)
        except OSError as exc:
            report(Task.REAP, str(pod_dir), exc)
            continue
        _remove(trash, uid=uid, report=report)
        removed.append(uid)
    if removed:
        log.info(
            "removed workspaces of %d pods that are gone",
            len(removed),
            extra={"pod_uids": removed},
        )
    return removed


def _older_than(pod_dir: Path, cutoff: float) -> bool:
    try:
        st = os.lstat(pod_dir)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
        return False
    try:
        return os.lstat(pod_dir / ".pod.json").st_mtime < cutoff
    except FileNotFoundError:
        return True  # a sidecar that never wrote one: the directory's age decides


def _lock_dirs(pfd: int) -> Iterator[str]:
    """Relative paths of the directories holding a pod's workspace locks (both layouts)."""
    for name in _names(pfd):
        if name == _STATE:
            try:
                sfd = safefs.open_dir(name, dir_fd=pfd)
            except (FileNotFoundError, UnsafeFileError):
                continue
            try:
                datasets = _names(sfd)
            finally:
                os.close(sfd)
            yield from (f"{_STATE}/{d}" for d in datasets)
        elif not name.startswith("."):
            yield f"{name}/.revs"


def _lock_all(pod_dir: Path, locks: contextlib.ExitStack, report: OnError) -> bool:
    """Take every dataset's workspace lock without waiting; False if one is held.

    The locks stay held (in `locks`) until the directory is renamed away, so no sidecar can
    start a materialise in between. See `reap_workspaces` for locks that are not files.
    """
    pfd = safefs.open_dir(pod_dir)
    try:
        for rel in _lock_dirs(pfd):
            where = f"{pod_dir}/{rel}/.lock"
            try:
                dfd = safefs.open_dir_beneath(pfd, rel)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except UnsafeFileError as exc:
                report(Task.REAP, where, exc)  # a symlinked `.revs`: nothing to lock there
                continue
            try:
                fd = safefs.open_regular(".lock", dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except UnsafeFileError as exc:
                report(Task.REAP, where, exc)
                continue
            finally:
                os.close(dfd)
            locks.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
    finally:
        os.close(pfd)
    return True


def _remove(path: Path, *, uid: str | None, report: OnError) -> None:
    try:
        safefs.remove_tree(path)
    except OSError as exc:
        # It keeps its `.trash-` name, so the next reap tries again.
        report(Task.REAP, str(path), exc)


def kubelet_pods_liveness(pods_dir: Path) -> Callable[[str], bool]:
    """`live(uid)` from kubelet's own records: `pods_dir/<uid>` exists while the pod does.

    Kubelet keeps `/var/lib/kubelet/pods/<uid>` until a deleted pod's volumes are torn down,
    which is exactly when its workspace stops being needed. Should `pods_dir` itself
    disappear later (an unmounted volume), every pod counts as live: an empty view of the
    node must never read as "every pod is gone".
    """
    pods = Path(pods_dir)
    if not pods.is_dir():
        raise UsageError(
            f"kubelet pods directory {pods} does not exist, so the node agent cannot tell "
            "which pods are gone. Fix: mount the kubelet pods directory "
            "(/var/lib/kubelet/pods) read-only into the node agent at this path, or disable "
            "workspace reaping"
        )

    def live(uid: str) -> bool:
        return (pods / uid).is_dir() or not pods.is_dir()

    return live
