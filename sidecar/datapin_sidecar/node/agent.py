"""The node agent (`agent` mode, a DaemonSet): owns the node cache.

Loops in one TaskGroup, each on its own interval:

* **prefetch** — the operator writes the list of revisions to keep warm into a file (a
  ConfigMap mounted into the agent). The file is checked every `LIST_CHECK_SECONDS` (a `stat`;
  it is re-read when it changed, appeared, or `prefetch_interval` passed), so a list written
  after the agent started is picked up within seconds. Each listed (dataset, pin, part) is its
  own task: its objects are fetched into the cache (`prefetch.prefetch`: no tree, once per
  node; an entry with `paths` fetches that part of the revision and its `.dir` only, and only
  that part is a GC root), at most `PREFETCH_CONCURRENCY` at a time, and an entry holding a
  slot longer than `PREFETCH_SLOT_SECONDS` gives it up (and keeps running), so one tenant's
  slow, endless or failing endpoint never keeps another dataset from becoming warm. Any
  failure of an entry (a `DatapinError`, `MemoryError`, any exception) is logged, counted and
  retried with that entry's own backoff; one that is warm is re-checked every
  `scan_interval`. A bad file is logged and the previous list kept. `/status` reports each
  entry under `<name>@<pin>`, or `<name>@<pin>:<folders>` for a part (`Part.label`, `a,b`):
  the whole revision and a part of it are separate entries, and the operator reads exactly
  these keys. Logs name the part; the prefetch metrics stay per dataset (a part is no label
  of a counter: folder lists are unbounded).
* **gc** — every `gc_interval`: workspaces of pods that left the node are removed
  (`housekeeping.reaper`, when kubelet's pods directory is mounted); abandoned partial
  downloads go (`housekeeping.slots`); above the high watermark (bytes or inodes) the least
  recently used objects that no workspace, no prefetch entry and no build in progress needs
  are evicted down to the low watermark (`housekeeping.evict`). A workspace or an entry that
  uses a part of a revision keeps that part's objects (`housekeeping.roots`).
* **gauges** — statvfs of the node volume every `GAUGE_SECONDS`; the cache's objects and bytes
  are counted again (a full walk, in a worker thread) when the volume's used bytes or inodes
  moved since the last count, at most once per `max(GAUGE_SECONDS, 4 * the last walk's
  duration)`, and at least every `scan_interval`: the gauges follow sidecars filling a node
  within seconds without the walk running back to back on a large cache.

* **node plugin** — with `DATAPIN_CSI_SOCKET`, the CSI node plugin (`node.plugin`): publishes
  datasets into pods, follows their pins; its trees are GC roots while a volume uses them, and
  unused ones go first above the high watermark.

**The volume is hostile.** Pods control names under `workspaces/`, and a subverted writer may
have planted anything in the cache. Every housekeeping function opens such paths with `safefs`
(no symlink followed, no FIFO or device opened, bounded reads) and reports an item it cannot
handle to `Agent.item_error`: counted in `datapin_agent_item_errors_total{task}`, logged once
per (task, path, problem), skipped; the cycle goes on. A GC cycle counts as done even when a
step failed (the step's failure is an item error too), so readiness (`ready()`: a first cycle
completed) reflects the agent, not one bad item. Blocking work runs in daemon threads
(`_in_thread`), so SIGTERM stops the agent promptly even while a worker is stuck on a remote.

Everything the agent does is observable: node metrics (`datapin_volume_*`, `datapin_cache_*`,
evictions, GC runs, item errors) plus the per-dataset fetch metrics the sidecars export, for
prefetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.prefetch import PrefetchResult, prefetch
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import DatapinError, UsageError
from datapin_sidecar.logs import log_context
from datapin_sidecar.node.housekeeping.clock import touch_used
from datapin_sidecar.node.housekeeping.evict import GcReport, collect
from datapin_sidecar.node.housekeeping.inventory import scan
from datapin_sidecar.node.housekeeping.reaper import kubelet_pods_liveness, reap_workspaces
from datapin_sidecar.node.housekeeping.roots import RevisionRoot, roots
from datapin_sidecar.node.housekeeping.slots import clean_slots
from datapin_sidecar.node.housekeeping.tasks import Task
from datapin_sidecar.node.housekeeping.volume import VolumeUsage, Watermarks, above
from datapin_sidecar.node.peering import open_peers, run_membership, wrap
from datapin_sidecar.node.plugin import PluginState, serve_plugin
from datapin_sidecar.node.program import Program
from datapin_sidecar.node.remotes import open_remote
from datapin_sidecar.node.settings import DatasetSettings
from datapin_sidecar.peers.exchange import Peers

log = logging.getLogger(__name__)

#: Prefetch entries running at once.
PREFETCH_CONCURRENCY: Final = 4
#: An entry running longer than this gives its concurrency slot to the others (and goes on).
PREFETCH_SLOT_SECONDS: Final = 120.0
#: How often the prefetch file is stat'ed for changes.
LIST_CHECK_SECONDS: Final = 2.0
#: How often statvfs is read for the volume gauges (and a cache walk considered).
GAUGE_SECONDS: Final = 2.0
#: Distinct item errors remembered for logging once; the memory is reset when full.
_LOGGED_MAX: Final = 4096

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def _in_thread(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`asyncio.to_thread` on a daemon thread: a worker stuck on a remote or a volume never
    keeps the process from exiting (the default executor is joined at shutdown)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return  # cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = ctx.run(fn, *args, **kwargs)
        except BaseException as exc:
            outcome: tuple[_T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=getattr(fn, "__name__", "worker"), daemon=True).start()
    return await future


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


#: What a prefetch entry is known by: (dataset, pin, part). The same pin whole and as a part
#: are two entries, each warm on its own.
EntryKey = tuple[str, str, Part]


def entry_key(entry: DatasetSettings) -> EntryKey:
    return (entry.name, entry.pin or "", entry.part)


def status_key(key: EntryKey) -> str:
    """`<name>@<pin>`, or `<name>@<pin>:<a,b>` for a part: the keys of `/status` the operator
    parses (see the module doc)."""
    name, pin, part = key
    return f"{name}@{pin}" if part.whole else f"{name}@{pin}:{part.label}"


@dataclass(slots=True)
class Warmth:
    """The prefetch state of one (dataset, pin, part)."""

    state: str = "pending"  # pending | warm | failed
    checked: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    running: bool = False


class Agent(Program):
    """One node's cache: prefetch, GC, workspace reaping, node metrics."""

    def _setup(self) -> None:
        settings, metrics = self.settings, self.metrics
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
        self.warmth: dict[EntryKey, Warmth] = {}
        self.last_gc: GcReport | None = None
        self.cycles = 0
        #: Called after every GC cycle (the program updates its probes from it).
        self.on_cycle: Callable[[], None] = lambda: None
        self._remote_lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._list_error = ""
        self._list_stat: tuple[int, int, int, int] | None = None
        self._list_read = float("-inf")
        self._slots = asyncio.Semaphore(PREFETCH_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._scanned_usage: tuple[int, int] | None = None
        self._scan_done = float("-inf")
        self._scan_seconds = 0.0
        self._logged: set[tuple[str, str, str]] = set()
        self._logged_lock = threading.Lock()
        self._warned: set[str] = set()  # odd names under workspaces/, warned about once
        #: This agent among its peers (`DATAPIN_PEER_PORT`), once `opened()`.
        self.peers: Peers | None = None
        #: The CSI node plugin's parts once it runs (`DATAPIN_CSI_SOCKET`).
        self.plugin = PluginState()
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
            if self.settings.peer_port:
                self.peers = await stack.enter_async_context(
                    open_peers(self.settings, cache=self.cache, metrics=self.metrics)
                )
            yield self
            self._stack = None

    def _stopped(self) -> None:
        for task in self._tasks:
            task.cancel()  # they await a thread, not do the work: cancelling is immediate

    def item_error(self, task: Task, path: str, exc: BaseException) -> None:
        """One item a task skipped: counted, logged once per (task, path, problem).

        Called from worker threads too.
        """
        self.metrics.item_errors.labels(str(task)).inc()
        key = (str(task), path, f"{type(exc).__name__}: {exc}")
        with self._logged_lock:
            if key in self._logged:
                return
            if len(self._logged) >= _LOGGED_MAX:
                self._logged.clear()
            self._logged.add(key)
        log.warning(
            "%s: skipped %s: %s (counted in datapin_agent_item_errors_total; logged once)",
            task,
            path,
            key[2],
            extra={"task": str(task), "path": path},
        )

    def ready(self) -> bool:
        return self.cycles > 0

    def status(self) -> dict[str, object]:
        gc = self.last_gc
        return {
            "ready": self.ready(),
            "prefetch": {
                status_key(key): {"state": w.state, "last_error": w.last_error}
                for key, w in sorted(self.warmth.items(), key=lambda kw: status_key(kw[0]))
            },
            "csi": self.plugin.status() if self.settings.csi_socket is not None else None,
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
        s = self.settings
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    self._every(min(s.prefetch_interval_seconds, LIST_CHECK_SECONDS), self.prefetch)
                )
                tg.create_task(self._every(s.gc_interval_seconds, self.collect))
                tg.create_task(
                    self._every(min(s.scan_interval_seconds, GAUGE_SECONDS), self.gauges)
                )
                if self.peers is not None:
                    tg.create_task(run_membership(self.peers, self.metrics, self.stopping))
                if s.csi_socket is not None:
                    tg.create_task(
                        serve_plugin(
                            s,
                            environ=self.environ,
                            cache=self.cache,
                            metrics=self.metrics,
                            state=self.plugin,
                            stopping=self.stopping,
                            run=_in_thread,
                            build_remote=self._through_peers,
                        )
                    )
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self.stopping.is_set():
            try:
                await step()
            except DatapinError as exc:
                log.error("%s failed: %s", step.__name__, exc)
            except Exception:  # MemoryError included: the loop goes on
                log.exception("%s failed unexpectedly (a bug: please report it)", step.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)

    # -- prefetch -------------------------------------------------------------------------------

    def _reload_list(self) -> None:
        """Re-read the prefetch file if it changed (a `stat`), appeared, or is due."""
        path = self.settings.prefetch_file
        if path is None:
            return
        try:
            st = os.stat(path)  # follows the ConfigMap's `..data` symlink swap
            current: tuple[int, int, int, int] | None = (
                st.st_dev,
                st.st_ino,
                st.st_mtime_ns,
                st.st_size,
            )
        except OSError:
            current = None
        now = time.monotonic()
        due = now - self._list_read >= self.settings.prefetch_interval_seconds
        if current == self._list_stat and not due:
            return
        self._list_stat = current
        self._list_read = now
        try:
            self.entries = read_prefetch_list(path)
            self._list_error = ""
        except UsageError as exc:
            if str(exc) != self._list_error:
                log.error("%s; keeping the previous prefetch list", exc)
                self._list_error = str(exc)

    async def prefetch(self) -> None:
        """Start every entry that is due and not running; each runs as its own task."""
        await _in_thread(self._reload_list)
        wanted = {entry_key(e): e for e in self.entries}
        for key in set(self.warmth) - set(wanted):
            if not self.warmth[key].running:
                del self.warmth[key]
        now = self.clock()
        for key, entry in wanted.items():
            w = self.warmth.setdefault(key, Warmth())
            if w.running or self.stopping.is_set():
                continue
            recheck = w.state == "warm" and now - w.checked >= self.settings.scan_interval_seconds
            if (w.state != "warm" and w.retry_at <= now) or recheck:
                w.running = True
                task = asyncio.create_task(self._prefetch_entry(entry, w))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._count_warmth()

    async def _prefetch_entry(self, entry: DatasetSettings, w: Warmth) -> None:
        """One entry, within a concurrency slot it gives up after `PREFETCH_SLOT_SECONDS`."""
        slot = False
        try:
            await self._slots.acquire()
            slot = True
            where = {"dataset": entry.name, "revision": entry.ref or entry.pin or ""}
            if not entry.part.whole:
                where["path"] = entry.part.label  # the folders, on every line of the entry
            with log_context(**where):
                work = asyncio.ensure_future(self._prefetch_one(entry, w))
                try:
                    try:
                        await asyncio.wait_for(asyncio.shield(work), PREFETCH_SLOT_SECONDS)
                    except TimeoutError:
                        log.warning(
                            "prefetch still running after %.0f s; letting other entries go first",
                            PREFETCH_SLOT_SECONDS,
                        )
                        self._slots.release()
                        slot = False
                        await work
                except asyncio.CancelledError:
                    work.cancel()
                    raise
        finally:
            w.running = False
            if slot:
                self._slots.release()
            if not self.stopping.is_set():
                self._count_warmth()

    async def _prefetch_one(self, entry: DatasetSettings, w: Warmth) -> None:
        started = time.monotonic()
        try:
            revision = Revision.parse(entry.pin or "")
            layout = entry.layout.pinned
            remote = await self._remote(entry)
            result: PrefetchResult = await _in_thread(
                prefetch, self.cache, revision, remote, layout=layout, part=entry.part
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # MemoryError and bugs too: one entry never stops the rest
            if self.stopping.is_set():
                return
            w.state, w.failures = "failed", w.failures + 1
            w.last_error = str(exc) or type(exc).__name__
            w.retry_at = self.clock() + self.backoff(w.failures)
            self.metrics.observe_failure(entry.name, exc, seconds=time.monotonic() - started)
            if isinstance(exc, DatapinError):
                log.error("prefetch failed: %s", exc, extra={"reason": exc.reason})
            else:
                self.item_error(Task.PREFETCH, status_key(entry_key(entry)), exc)
            return
        now = self.clock()
        w.state, w.checked, w.failures, w.last_error = "warm", now, 0, ""
        m = self.metrics
        m.tally(
            entry.name,
            {
                "fetched_objects": result.fetched_objects,
                "fetched_bytes": result.fetched_bytes,
                "waited_objects": result.waited_objects,
            },
        )
        for reason, n in result.retries.items():
            m.retries.labels(entry.name, reason).inc(n)
        m.last_success.labels(entry.name).set(now)
        # A part dates its own clock, not its revision's (`housekeeping.clock`).
        touch_used(self.cache, revision, Layout(result.layout), part=entry.part, now=now)
        log.info(
            "warm%s: %d objects, %d were present, %d fetched (%d bytes), %.3f s",
            "" if entry.part.whole else f" (part {entry.part.label})",
            result.objects,
            result.present,
            result.fetched_objects,
            result.fetched_bytes,
            result.seconds,
        )

    async def _remote(self, entry: DatasetSettings) -> Remote:
        # One client per remote, whatever revision or part of it an entry names.
        key = entry.model_dump_json(exclude={"pin", "ref", "paths"})
        async with self._remote_lock:  # entries run concurrently: one client per remote
            remote = self.remotes.get(key)
            if remote is None:
                assert self._stack is not None  # noqa: S101 - only called inside opened()
                remote = await self._stack.enter_async_context(
                    open_remote(entry, jobs=self.settings.jobs, environ=self.environ)
                )
                self.remotes[key] = remote
        return self._through_peers(remote)

    def _through_peers(self, remote: Remote) -> Remote:
        """`remote` with this agent's peers asked first, when peer fetch is on."""
        return wrap(self.peers, remote)

    def _count_warmth(self) -> None:
        for state in ("warm", "pending", "failed"):
            n = sum(1 for w in self.warmth.values() if w.state == state)
            self.metrics.prefetch.labels(state).set(n)

    # -- gc ---------------------------------------------------------------------------------------

    async def collect(self) -> None:
        """One GC cycle. Each step's failure is an item error; the cycle still completes."""
        s = self.settings
        m = self.metrics
        report = self.item_error
        if self.live is not None:
            try:
                removed = await _in_thread(
                    reap_workspaces,
                    s.root,
                    live=self.live,
                    grace=s.workspace_grace_seconds,
                    warned=self._warned,
                    on_error=report,
                )
            except Exception as exc:
                report(Task.REAP, str(s.workspaces_dir), exc)
            else:
                if removed:
                    m.workspaces_removed.inc(len(removed))
                    log.info("removed the workspaces of %d pod(s) gone from the node", len(removed))
        try:
            slots = await _in_thread(
                clean_slots, self.cache, max_age=s.gc_slot_max_age_seconds, on_error=report
            )
        except Exception as exc:
            report(Task.SLOTS, str(self.cache.fetch_dir), exc)
        else:
            m.slots_removed.inc(slots)
        try:
            await self._collect(report)
        except Exception:
            m.gc_runs.labels("error").inc()
            raise
        finally:
            self.cycles += 1
            self.on_cycle()

    async def _collect(self, report: Callable[[Task, str, BaseException], None]) -> None:
        m = self.metrics
        protected: list[RevisionRoot] = []
        for e in self.entries:
            try:
                revision = Revision.parse(e.pin or "")
            except DatapinError as exc:
                report(Task.ROOTS, f"prefetch entry {e.name}", exc)
                continue
            layouts = e.layout.candidates
            protected += [(revision, layout, e.part) for layout in layouts]
        if self.plugin.publisher is not None:
            protected += await _in_thread(self.plugin.roots, on_error=report)
            await self._remove_unused_trees(report)
        in_use = await _in_thread(roots, self.settings.root, protected, on_error=report)
        result = await _in_thread(collect, self.cache, in_use, self.watermarks, on_error=report)
        self.last_gc = result
        self._observe_volume(result.after)
        if result.triggered:
            m.gc_runs.labels("reached" if result.target_reached else "short").inc()
            m.evicted_objects.inc(result.evicted_objects)
            m.evicted_bytes.inc(result.evicted_bytes)
            if result.cache_objects is not None and result.cache_bytes is not None:
                m.cache_objects.set(result.cache_objects)
                m.cache_bytes.set(result.cache_bytes)
                self._scanned_usage = None  # let the gauges loop count again
            log.info(
                "gc: evicted %d objects (%d bytes) of %d revision(s); volume %.1f%% -> %.1f%% "
                "used%s",
                result.evicted_objects,
                result.evicted_bytes,
                len(result.evicted_revisions),
                result.before.used_percent,
                result.after.used_percent,
                ""
                if result.target_reached
                else " (short of the low watermark: the rest is in use)",
            )

    async def _remove_unused_trees(
        self, report: Callable[[Task, str, BaseException], None]
    ) -> None:
        """Above the high watermark, shared trees no volume uses go before cache objects:
        they cost inodes and metadata, and the next publish of their revision rebuilds them
        from whatever the cache still holds."""
        w = self.watermarks
        usage = await _in_thread(VolumeUsage.measure, self.settings.root)
        if not above(usage, w.high_percent, w.inodes_high_percent):
            return
        try:
            removed = await _in_thread(self.plugin.remove_unused_trees)
        except Exception as exc:
            report(Task.COLLECT, str(self.settings.root / "trees"), exc)
            return
        if removed:
            log.info("gc: removed %d shared tree(s) no volume used", len(removed))

    def _observe_volume(self, usage: VolumeUsage) -> None:
        m = self.metrics
        m.volume_size.set(usage.size_bytes)
        m.volume_used.set(usage.used_bytes)
        m.volume_free.set(usage.free_bytes)
        m.volume_inodes.set(usage.inodes)
        m.volume_inodes_used.set(usage.inodes_used)

    async def gauges(self) -> None:
        """Volume gauges now; cache gauges when the volume moved (see the module doc)."""
        usage = await _in_thread(VolumeUsage.measure, self.settings.root)
        self._observe_volume(usage)
        if self.plugin.publisher is not None:
            trees, volumes = await _in_thread(self.plugin.counts)
            self.metrics.shared_trees.set(trees)
            self.metrics.published_volumes.set(volumes)
        now = time.monotonic()
        moved = (usage.used_bytes, usage.inodes_used) != self._scanned_usage
        gap = max(GAUGE_SECONDS, 4 * self._scan_seconds)
        if (moved and now - self._scan_done >= gap) or (
            now - self._scan_done >= self.settings.scan_interval_seconds
        ):
            await self.scan(usage)

    async def scan(self, usage: VolumeUsage | None = None) -> None:
        """Count the cache's objects and bytes (a full walk, in a worker thread)."""
        started = time.monotonic()
        objects, size = await _in_thread(scan, self.cache, on_error=self.item_error)
        self.metrics.cache_objects.set(objects)
        self.metrics.cache_bytes.set(size)
        self._scan_done = time.monotonic()
        self._scan_seconds = self._scan_done - started
        if usage is None:
            usage = await _in_thread(VolumeUsage.measure, self.settings.root)
            self._observe_volume(usage)
        self._scanned_usage = (usage.used_bytes, usage.inodes_used)


def prefetch_file_text(entries: list[DatasetSettings]) -> str:
    """The prefetch file for `entries` (what the operator writes; used by tests and docs)."""
    return json.dumps(
        {"revisions": [e.model_dump(mode="json", exclude_none=True) for e in entries]},
        indent=1,
        sort_keys=True,
    )
