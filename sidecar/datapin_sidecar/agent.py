"""The node agent (`agent` mode, a DaemonSet): owns the node cache.

Three loops in one TaskGroup, each on its own interval:

* **prefetch** — the operator writes the list of revisions to keep warm into a file (a
  ConfigMap mounted into the agent); each listed revision's objects are fetched into the cache
  (`prefetch.prefetch`: no tree, once per node). A revision that failed is retried with
  backoff; one that is warm is re-checked every `scan_interval` (something may have removed
  objects by hand). A bad file is logged and the previous list kept.
* **gc** — statvfs of the node volume every `gc_interval`; workspaces of pods that left the
  node are removed (`gc.reap_workspaces`, when kubelet's pods directory is mounted); abandoned
  partial downloads go (`gc.clean_slots`); above the high watermark (bytes or inodes) the
  least recently used objects that no published workspace and no prefetch entry needs are
  evicted down to the low watermark (`gc.collect`).
* **scan** — objects and bytes in the cache, for the node metrics (a full directory walk,
  so on its own, slower interval).

Everything the agent does is observable: node metrics (`datapin_volume_*`, `datapin_cache_*`,
evictions, GC runs) plus the per-dataset fetch metrics the sidecars export, for prefetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .cache import NodeCache
from .errors import DatapinError, UsageError
from .gc import (
    GcReport,
    VolumeUsage,
    Watermarks,
    clean_slots,
    collect,
    kubelet_pods_liveness,
    reap_workspaces,
    roots,
    scan,
    touch_used,
)
from .hashing import Layout
from .logs import log_context
from .metrics import Metrics
from .prefetch import PrefetchResult, prefetch
from .remote import Remote
from .remotes import open_remote
from .revision import Revision
from .settings import DatasetSettings, Settings

log = logging.getLogger(__name__)


class PrefetchList(BaseModel):
    """The operator's prefetch file: `{"revisions": [<dataset settings with a pin>, ...]}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    revisions: list[DatasetSettings] = []


def read_prefetch_list(path: Path) -> list[DatasetSettings]:
    """Parse the prefetch file; an error names the file, the entry and the fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []  # the operator has not written one yet: nothing to prefetch
    except OSError as exc:
        raise UsageError(f"prefetch file {path}: cannot read it ({exc.strerror})") from None
    try:
        entries = PrefetchList.model_validate_json(text).revisions
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(
            f"prefetch file {path}: {where}: {first['msg']} ({exc.error_count()} problem(s)). "
            "Fix: it is written by the datapin operator; check its logs"
        ) from None
    missing = [e.name for e in entries if e.pin is None]
    if missing:
        raise UsageError(f"prefetch file {path}: entries without a pin: {', '.join(missing)}")
    return entries


@dataclass(slots=True)
class Warmth:
    """The prefetch state of one (dataset, pin)."""

    state: str = "pending"  # pending | warm | failed
    checked: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""


class Agent:
    """One node's cache: prefetch, GC, workspace reaping, node metrics."""

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.environ = environ
        self.metrics = metrics
        self.clock = clock
        self.cache = NodeCache(settings.cache_dir)
        self.watermarks = Watermarks(
            high_percent=settings.gc_high_percent,
            low_percent=settings.gc_low_percent,
            inodes_high_percent=settings.gc_inodes_high_percent,
            inodes_low_percent=settings.gc_inodes_low_percent,
        )
        self.live: Callable[[str], bool] | None = (
            kubelet_pods_liveness(settings.kubelet_pods_dir)
            if settings.kubelet_pods_dir is not None
            else None
        )
        self.entries: list[DatasetSettings] = []
        self.warmth: dict[tuple[str, str], Warmth] = {}
        self.last_gc: GcReport | None = None
        self.cycles = 0
        #: Called after every GC cycle (the program updates its probes from it).
        self.on_cycle: Callable[[], None] = lambda: None
        self.stopping = asyncio.Event()
        self.cancel = threading.Event()
        self._remotes: dict[str, Remote] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._last_scan = 0.0
        self._list_error = ""
        self._warned: set[str] = set()  # odd names under workspaces/, warned about once
        for name, value in (
            (("bytes", "high"), settings.gc_high_percent),
            (("bytes", "low"), settings.gc_low_percent),
            (("inodes", "high"), settings.gc_inodes_high_percent),
            (("inodes", "low"), settings.gc_inodes_low_percent),
        ):
            metrics.watermark.labels(*name).set(value / 100)

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Agent]:
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        self.settings.workspaces_dir.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack
            yield self
            self._stack = None

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping: cancelling the work in flight")
        self.stopping.set()
        self.cancel.set()
        for remote in self._remotes.values():
            abort = getattr(remote, "abort", None)
            if abort is not None:
                abort()

    def ready(self) -> bool:
        return self.cycles > 0

    def status(self) -> dict[str, object]:
        gc = self.last_gc
        return {
            "ready": self.ready(),
            "prefetch": {
                f"{name}@{pin}": {"state": w.state, "last_error": w.last_error}
                for (name, pin), w in sorted(self.warmth.items())
            },
            "gc": None
            if gc is None
            else {
                "triggered": gc.triggered,
                "target_reached": gc.target_reached,
                "evicted_objects": gc.evicted_objects,
                "evicted_bytes": gc.evicted_bytes,
            },
        }

    # -- loops ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the loops until `stop()`."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every(self.settings.prefetch_interval_seconds, self.prefetch))
            tg.create_task(self._every(self.settings.gc_interval_seconds, self.collect))
            tg.create_task(self._every(self.settings.scan_interval_seconds, self.scan))

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self.stopping.is_set():
            try:
                await step()
            except DatapinError as exc:
                log.error("%s failed: %s", step.__name__, exc)
            except Exception:
                log.exception("%s failed unexpectedly (a bug: please report it)", step.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)

    # -- prefetch -------------------------------------------------------------------------------

    async def prefetch(self) -> None:
        if self.settings.prefetch_file is not None:
            try:
                self.entries = read_prefetch_list(self.settings.prefetch_file)
                self._list_error = ""
            except UsageError as exc:
                if str(exc) != self._list_error:
                    log.error("%s; keeping the previous prefetch list", exc)
                    self._list_error = str(exc)
        wanted = {(e.name, e.pin or ""): e for e in self.entries}
        for key in set(self.warmth) - set(wanted):
            del self.warmth[key]
        now = self.clock()
        due = []
        for key, entry in wanted.items():
            w = self.warmth.setdefault(key, Warmth())
            recheck = w.state == "warm" and now - w.checked >= self.settings.scan_interval_seconds
            if (w.state != "warm" and w.retry_at <= now) or recheck:
                due.append(entry)
        for entry in due:
            if self.stopping.is_set():
                break
            await self._prefetch_one(entry)
        self._count_warmth()

    async def _prefetch_one(self, entry: DatasetSettings) -> None:
        revision = Revision.parse(entry.pin or "")
        w = self.warmth[(entry.name, entry.pin or "")]
        layout = None if entry.layout == "auto" else Layout(entry.layout)
        with log_context(dataset=entry.name, revision=entry.ref or revision.oid):
            started = time.monotonic()
            try:
                remote = await self._remote(entry)
                result: PrefetchResult = await asyncio.to_thread(
                    prefetch, self.cache, revision, remote, layout=layout
                )
            except (DatapinError, asyncio.CancelledError) as exc:
                if self.stopping.is_set():
                    return
                if isinstance(exc, asyncio.CancelledError):
                    raise
                w.state, w.failures, w.last_error = "failed", w.failures + 1, str(exc)
                w.retry_at = self.clock() + min(
                    self.settings.retry_max_seconds, 2.0 ** min(w.failures, 16)
                )
                self.metrics.observe_failure(entry.name, exc, seconds=time.monotonic() - started)
                log.error("prefetch failed: %s", exc, extra={"reason": exc.reason})
                return
            now = self.clock()
            w.state, w.checked, w.failures, w.last_error = "warm", now, 0, ""
            m = self.metrics
            m.dataset(entry.name)
            m.fetched_objects.labels(entry.name).inc(result.fetched_objects)
            m.fetched_bytes.labels(entry.name).inc(result.fetched_bytes)
            m.waited_objects.labels(entry.name).inc(result.waited_objects)
            for reason, n in result.retries.items():
                m.retries.labels(entry.name, reason).inc(n)
            m.last_success.labels(entry.name).set(now)
            touch_used(self.cache, revision, Layout(result.layout), now=now)
            log.info(
                "warm: %d objects, %d were present, %d fetched (%d bytes), %.3f s",
                result.objects,
                result.present,
                result.fetched_objects,
                result.fetched_bytes,
                result.seconds,
            )

    async def _remote(self, entry: DatasetSettings) -> Remote:
        key = entry.model_dump_json(exclude={"pin", "ref"})
        remote = self._remotes.get(key)
        if remote is None:
            assert self._stack is not None  # noqa: S101 - only called inside opened()
            remote = await self._stack.enter_async_context(
                open_remote(entry, jobs=self.settings.jobs, environ=self.environ)
            )
            self._remotes[key] = remote
        return remote

    def _count_warmth(self) -> None:
        for state in ("warm", "pending", "failed"):
            n = sum(1 for w in self.warmth.values() if w.state == state)
            self.metrics.prefetch.labels(state).set(n)

    # -- gc ---------------------------------------------------------------------------------------

    async def collect(self) -> None:
        s = self.settings
        m = self.metrics
        if self.live is not None:
            removed = await asyncio.to_thread(
                reap_workspaces,
                s.root,
                live=self.live,
                grace=s.workspace_grace_seconds,
                warned=self._warned,
            )
            if removed:
                m.workspaces_removed.inc(len(removed))
                log.info("removed the workspaces of %d pod(s) gone from the node", len(removed))
        slots = await asyncio.to_thread(clean_slots, self.cache, max_age=s.gc_slot_max_age_seconds)
        m.slots_removed.inc(slots)
        protected = [
            (Revision.parse(e.pin or ""), Layout(e.layout))
            for e in self.entries
            if e.layout != "auto"
        ] + [
            (Revision.parse(e.pin or ""), layout)
            for e in self.entries
            if e.layout == "auto"
            for layout in Layout
        ]
        in_use = await asyncio.to_thread(roots, s.root, protected)
        try:
            report = await asyncio.to_thread(collect, self.cache, in_use, self.watermarks)
        except Exception:
            m.gc_runs.labels("error").inc()
            raise
        self.last_gc = report
        self._observe_volume(report.after)
        if report.triggered:
            m.gc_runs.labels("reached" if report.target_reached else "short").inc()
            m.evicted_objects.inc(report.evicted_objects)
            m.evicted_bytes.inc(report.evicted_bytes)
            if report.cache_objects is not None and report.cache_bytes is not None:
                m.cache_objects.set(report.cache_objects)
                m.cache_bytes.set(report.cache_bytes)
            log.info(
                "gc: evicted %d objects (%d bytes) of %d revision(s); volume %.1f%% -> %.1f%% "
                "used%s",
                report.evicted_objects,
                report.evicted_bytes,
                len(report.evicted_revisions),
                report.before.used_percent,
                report.after.used_percent,
                ""
                if report.target_reached
                else " (short of the low watermark: the rest is in use)",
            )
        self.cycles += 1
        self.on_cycle()

    def _observe_volume(self, usage: VolumeUsage) -> None:
        m = self.metrics
        m.volume_size.set(usage.size_bytes)
        m.volume_used.set(usage.used_bytes)
        m.volume_free.set(usage.free_bytes)
        m.volume_inodes.set(usage.inodes)
        m.volume_inodes_used.set(usage.inodes_used)

    async def scan(self) -> None:
        objects, size = await asyncio.to_thread(scan, self.cache)
        self.metrics.cache_objects.set(objects)
        self.metrics.cache_bytes.set(size)
        self._observe_volume(await asyncio.to_thread(VolumeUsage.measure, self.settings.root))


def prefetch_file_text(entries: list[DatasetSettings]) -> str:
    """The prefetch file for `entries` (what the operator writes; used by tests and docs)."""
    return json.dumps(
        {"revisions": [e.model_dump(mode="json", exclude_none=True) for e in entries]},
        indent=1,
        sort_keys=True,
    )
