"""The GC: evict least recently used objects not in use until the volume is below the watermarks.

It runs when the volume is above the high watermark (bytes or inodes) and evicts until both are
at or below the low one (`volume`), in the order `inventory` plans, never touching what the
roots (`roots`) protect. It is the only code that deletes cache objects.

**Builds in progress.** A build does need the objects it found in the cache until it has
linked them. Builders register their revision (`NodeCache.building`: a flock-held file in
`builds/`, created under a shared lock on `builds.lock`) before they look at the cache. The
GC reads the registrations under an exclusive lock on `builds.lock`, plans, and then evicts in
batches of `BATCH`, each under that exclusive lock after reading the registrations again: a
revision registered since the last read is protected (its `.dir` and objects, in every layout,
or its single object) and any candidate it protects is skipped. A builder that registered
before a batch is seen by it; one that registers after finds that batch's objects gone and
fetches them. Registrations whose flock is free belong to dead builders and are removed.

**When to stop.** Progress is estimated per object, statvfs is read again every
`REMEASURE_EVERY` evictions and its figure replaces the estimate when it is lower, and once more
(`volume.settled`) when the estimate says "done": if the volume is really still above the low
watermark, eviction resumes from the measured figure (see `volume` for why).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import PRIVATE, NodeCache
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import UnsafeFileError, os_error
from datapin_sidecar.node.housekeeping.inventory import (
    LAYOUTS,
    Candidate,
    Inventory,
    in_eviction_order,
    plan,
)
from datapin_sidecar.node.housekeeping.roots import Root
from datapin_sidecar.node.housekeeping.tasks import (
    OnError,
    Task,
    log_item_error,
    sorted_names,
)
from datapin_sidecar.node.housekeeping.volume import (
    VolumeUsage,
    Watermarks,
    above,
    lower,
    minus,
    settled,
)

log = logging.getLogger(__name__)

#: Statvfs is read again after this many evictions (a cheap syscall; bounds estimate drift).
REMEASURE_EVERY: Final = 512
#: Evictions per batch: build registrations are re-read before each (see the module doc), and
#: a builder registering waits for at most one batch.
BATCH: Final = 64
#: Consecutive failed evictions after which a collect gives up (a read-only volume, say).
MAX_FAILED_EVICTIONS: Final = 64

_BUILD: Final = re.compile(r"([0-9a-f]{32}(?:\.dir)?)\.[0-9a-f]+\.tmp")


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
    path = cache.private_dir / "gc.lock"
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


def _protect_revision(cache: NodeCache, inv: Inventory, oid: str, report: OnError) -> None:
    """Protect revision `oid` in every layout the cache holds it in (a build registered)."""
    for layout in LAYOUTS:
        if not oid.endswith(".dir"):
            with contextlib.suppress(ValueError):
                inv.protect(bytes.fromhex(oid), layout)
            continue
        md5 = oid.removesuffix(".dir")
        for d in inv.dirs:
            if d.md5 == md5 and d.layout == layout:
                d.protected, d.parts = True, ()  # a build registers its revision, whole
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


class Builds:
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
            for name in sorted_names(dfd):
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

    def evict(self, c: Candidate) -> tuple[int, int]:
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
            # The parsed manifest is only valid with its `.dir`, and can be tens of MB; the
            # clocks of the revision and its parts date nothing without it.
            name = f"{c.layout}-{c.oid}"
            parts_used = c.dir.part_used if c.dir is not None else ()
            for directory, names in (
                (f"{PRIVATE}/manifests", (name,)),
                (f"{PRIVATE}/used", (name, *parts_used)),
            ):
                for each in names:
                    more = self._unlink(directory, each)
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
    root_revisions: Iterable[Root],
    watermarks: Watermarks,
    *,
    usage: VolumeUsage | None = None,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    on_error: OnError | None = None,
) -> GcReport:
    """Evict least recently used objects not in use until the volume is below `watermarks`.

    `root_revisions` is `roots(...)` (whole revisions and parts: `inventory.plan`); `usage` a
    reading the caller just took (default: measure now); `clock` the time source for
    `seconds`; `on_error` hears of every item skipped. With `dry_run` nothing is evicted and
    `after` is the estimate (manifests are still read as on any run, so a `.dir` that fails
    its md5 is still quarantined). Builds in progress (`NodeCache.building`) are roots too,
    whole, re-read before every batch of evictions. See the
    module doc for the policy.
    """
    started = clock()
    report = on_error or log_item_error
    wm = watermarks
    root_set = set(root_revisions)
    with _gc_lock(cache):
        before = usage if usage is not None else VolumeUsage.measure(cache.root)
        if not above(before, wm.high_percent, wm.inodes_high_percent):
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
        builds = Builds(cache, report)
        try:
            inv = Inventory.take(cache, report, remove_planted=not dry_run)
            with builds.held() as building:
                registered = set(building)
            # Planned without the lock (manifests take a while to read); a build registering
            # meanwhile is seen by the first batch.
            # Builds are protected whole: a registration names a revision, not a part.
            plan(
                cache,
                inv,
                root_set | {(oid, lay) for oid in registered for lay in LAYOUTS},
                on_error=report,
            )
            candidates = in_eviction_order(cache, inv)
            evictor = _Evictor(cache, report, dry_run=dry_run)
            estimate = before
            exhausted = False
            tried = 0
            while True:
                while not exhausted and above(estimate, wm.low_percent, wm.inodes_low_percent):
                    with builds.held() as building:
                        for oid in sorted(building):
                            _protect_revision(cache, inv, oid, report)
                        for _ in range(BATCH):
                            if not above(estimate, wm.low_percent, wm.inodes_low_percent):
                                break
                            candidate = next(candidates, None)
                            if candidate is None:
                                exhausted = True
                                break
                            if candidate.protected(inv):
                                continue  # a build registered it since the plan
                            estimate = minus(estimate, *evictor.evict(candidate))
                            tried += 1
                            if not dry_run and tried % REMEASURE_EVERY == 0:
                                estimate = lower(estimate, VolumeUsage.measure(cache.root))
                if dry_run:
                    after = estimate
                    break
                after = settled(cache.root)
                if exhausted or not above(after, wm.low_percent, wm.inodes_low_percent):
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
        target_reached = not above(after, wm.low_percent, wm.inodes_low_percent)

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
