"""The pod's sidecar: `once` (init container) and `run` (native sidecar) modes.

What a pod asks for is a *pin* per dataset (`<md5>.dir`), written by the operator's webhook in
the pod's `datapin.dev/pins` annotation and read here from a downward-API file (or, outside
Kubernetes, from each dataset's `pin` setting). Each dataset is published at
`<workspace>/<dataset>/<link>` (see `workspace`): the app container mounts
`<workspace>/<dataset>` and reads `<mount>/current/...`. The dataset's records (marker, lock,
tree records) are kept in `<workspace>/.state/<dataset>/`, which no pod mounts, so a pod with a
writable mount cannot touch what datapin trusts.

* `once` materialises every dataset (in parallel) and exits: 0 when all are published, else the
  exit code of the first failure (see `errors.py`), with every failure's message in the
  termination-message file so `kubectl describe pod` shows why.
* `run` does the same, then serves `/readyz` (200 once all are published), `/healthz` and
  `/metrics`, and follows the annotations file: when a pin changes the new tree is built beside
  the old and swapped in atomically (the materialiser's contract), so readers see all of one
  revision or all of the other. A failed switch keeps the old revision and is retried with
  backoff; an unreadable annotations file is an error in the log and a metric, and the previous
  pins stay. Before the first publish, a permanent error (missing objects, wrong keys, a bad
  revision) ends the program with its message, because a restart with backoff and a reason in
  `kubectl describe` serve the user better than a probe that silently never passes; transient
  remote trouble is retried.
* SIGTERM: the work in flight is cancelled (the S3 client aborts its requests, the linker
  stops at its next progress tick), every build unwinds through the materialiser's normal
  failure path (claims released, the partial tree removed), and the program exits 0 with the
  cache and the published tree consistent.

The materialiser is synchronous and runs in worker threads; cancellation reaches it through a
threading.Event checked by its progress callback and `S3Remote.abort()`, never by killing a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Progress, Request, Result, materialize
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_layout
from datapin_sidecar.errors import DatapinError, RemoteError, StoppedError, UsageError
from datapin_sidecar.logs import log_context
from datapin_sidecar.node.housekeeping.clock import touch_used
from datapin_sidecar.node.program import Program
from datapin_sidecar.node.remotes import open_remote
from datapin_sidecar.node.settings import DatasetSettings, Settings
from datapin_sidecar.pins import Pin, read_pins

log = logging.getLogger(__name__)

#: The workspace's directory of the datasets' records (`<workspace>/.state/<dataset>/`): dataset
#: names cannot start with a dot, so no pod mounts it.
STATE_DIR = ".state"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What one dataset should serve."""

    dataset: str
    revision: Revision
    layout: Layout | None
    ref: str
    #: The folders to serve (`engine.part`): the pin's, or the settings' `paths` without pins.
    part: Part = Part.WHOLE


@dataclass(slots=True)
class DatasetState:
    """What is known about one dataset while the program runs (for /status and decisions)."""

    serving: Target | None = None
    path: str = ""
    desired: Target | None = None
    last_error: str = ""
    failures: int = 0
    retry_at: float = 0.0


def targets(settings: Settings) -> dict[str, Target]:
    """The pins to serve now: the annotations file if configured, else the settings."""
    known = {d.name: d for d in settings.datasets}
    if settings.annotations_file is None:
        missing = [d.name for d in settings.datasets if d.pin is None]
        if missing or not known:
            raise UsageError(
                "no revision to serve: set DATAPIN_ANNOTATIONS_FILE (the downward-API file "
                "of the pod's annotations) or a `pin` for every dataset in DATAPIN_DATASETS"
                + (f" (no pin: {', '.join(missing)})" if missing else "")
            )
        return {
            d.name: Target(
                dataset=d.name,
                revision=Revision.parse(d.pin or ""),
                layout=d.layout.pinned,
                ref=d.ref or d.pin or "",
                part=d.part,
            )
            for d in settings.datasets
        }
    pins = read_pins(settings.annotations_file)
    unknown = sorted(set(pins) - set(known))
    if unknown:
        raise UsageError(
            f"{settings.annotations_file}: datapin.dev/pins names dataset(s) "
            f"{', '.join(unknown)} that this sidecar has no settings for (DATAPIN_DATASETS "
            f"has {', '.join(sorted(known)) or 'none'}). Fix: re-create the pod so the "
            "webhook injects settings for every pinned dataset"
        )
    return {name: _target(pin, known[name]) for name, pin in pins.items()}


def _target(pin: Pin, dataset: DatasetSettings) -> Target:
    layout = pin.layout
    if layout is None:
        layout = dataset.layout.pinned
    return Target(
        dataset=pin.dataset, revision=pin.revision, layout=layout, ref=pin.ref, part=pin.part
    )


class Sidecar(Program):
    """One pod's datasets, materialised and (in `run` mode) kept current."""

    def _setup(self) -> None:
        settings, metrics = self.settings, self.metrics
        self.workspace = self._workspace_dir(settings)
        self.datasets = {d.name: d for d in settings.datasets}
        self.states: dict[str, DatasetState] = {name: DatasetState() for name in self.datasets}
        self._annotations_digest = ""
        self._last_annotations_error = ""
        for name in self.datasets:
            metrics.dataset(name)

    @staticmethod
    def _workspace_dir(settings: Settings) -> Path:
        if settings.workspace_dir is not None:
            return settings.workspace_dir
        if not settings.pod_uid:
            raise UsageError(
                "DATAPIN_POD_UID is not set: set it from the downward API (env valueFrom "
                "fieldRef metadata.uid), or set DATAPIN_WORKSPACE_DIR outside Kubernetes"
            )
        return settings.workspaces_dir / settings.pod_uid

    # -- lifecycle ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Sidecar]:
        """Open every dataset's remote (closed on exit) and claim the pod's workspace."""
        self._write_pod_record()
        async with contextlib.AsyncExitStack() as stack:
            for name, dataset in self.datasets.items():
                self.remotes[name] = await stack.enter_async_context(
                    open_remote(dataset, jobs=self.settings.jobs, environ=self.environ)
                )
            yield self

    def _write_pod_record(self) -> None:
        """`<workspace>/.pod.json`: who owns this workspace (read by the agent and humans)."""
        record = self.workspace / ".pod.json"
        if record.exists():
            return
        self.workspace.mkdir(parents=True, exist_ok=True)
        s = self.settings
        data = {
            "uid": s.pod_uid or "",
            "namespace": s.pod_namespace,
            "name": s.pod_name,
            "node": s.node_name,
            "created": self.clock(),
        }
        tmp = self.workspace / f".pod.json.tmp-{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
        os.rename(tmp, record)

    # -- once -------------------------------------------------------------------------------------

    async def once(self) -> list[tuple[str, DatapinError]]:
        """Publish every dataset; the failures, by dataset (empty: all published)."""
        wanted = targets(self.settings)
        failures: list[tuple[str, DatapinError]] = []

        async def one(target: Target) -> None:
            try:
                await self.apply(target)
            except DatapinError as exc:
                failures.append((target.dataset, exc))

        async with asyncio.TaskGroup() as tg:
            for target in wanted.values():
                tg.create_task(one(target))
        return sorted(failures, key=lambda f: f[0])

    # -- run --------------------------------------------------------------------------------------

    def ready(self) -> bool:
        return bool(self.states) and all(s.serving is not None for s in self.states.values())

    def waiting_for(self) -> str:
        pending = [
            f"{name}" + (f" ({s.last_error})" if s.last_error else "")
            for name, s in sorted(self.states.items())
            if s.serving is None
        ]
        return "publishing " + "; ".join(pending) if pending else ""

    def status(self) -> dict[str, object]:
        def show(t: Target | None) -> dict[str, str] | None:
            if t is None:
                return None
            shown = {"ref": t.ref, "pin": t.revision.oid}
            return shown | {"path": t.part.label} if not t.part.whole else shown

        return {
            "ready": self.ready(),
            "datasets": {
                name: {
                    "serving": show(s.serving),
                    "desired": show(s.desired),
                    "path": s.path,
                    "last_error": s.last_error,
                    "failures": s.failures,
                }
                for name, s in sorted(self.states.items())
            },
        }

    async def run(self, on_change: Callable[[], None] = lambda: None) -> None:
        """Serve until `stop()`; raise the first permanent error that comes before ready."""
        while not self.stopping.is_set():
            self._refresh_desired()
            due = [
                s.desired
                for s in self.states.values()
                if s.desired is not None and s.desired != s.serving and s.retry_at <= self.clock()
            ]
            if due:
                async with asyncio.TaskGroup() as tg:
                    for target in due:
                        tg.create_task(self._apply_or_back_off(target))
                on_change()
            if self.stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.stopping.wait(), timeout=self.settings.watch_interval_seconds
                )

    def _refresh_desired(self) -> None:
        """Read the pins; keep the previous ones (and say why) when they cannot be read."""
        path = self.settings.annotations_file
        if path is not None:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = "unreadable"
            if digest == self._annotations_digest:
                return
            self._annotations_digest = digest
        try:
            wanted = targets(self.settings)
        except DatapinError as exc:
            self.metrics.annotation_errors.inc()
            if str(exc) != self._last_annotations_error:
                log.error("cannot read the pins; still serving the previous ones: %s", exc)
                self._last_annotations_error = str(exc)
            if not any(s.desired for s in self.states.values()) and isinstance(exc, UsageError):
                raise
            return
        self._last_annotations_error = ""
        for name, target in wanted.items():
            state = self.states[name]
            if state.desired != target:
                if state.desired is not None:
                    log.info(
                        "pin changed: %s -> %s",
                        state.desired.revision,
                        target.revision,
                        extra={"dataset": name, "ref": target.ref},
                    )
                state.desired = target
                state.retry_at = 0.0
                state.failures = 0

    async def _apply_or_back_off(self, target: Target) -> None:
        state = self.states[target.dataset]
        try:
            await self.apply(target)
        except DatapinError as exc:
            if self.stopping.is_set():
                return
            state.failures += 1
            state.last_error = str(exc)
            delay = self.backoff(state.failures)
            state.retry_at = self.clock() + delay
            transient = isinstance(exc, RemoteError) and exc.cause.transient
            if state.serving is None and not transient:
                raise
            log.warning(
                "materialise failed; %s, retrying in %.0f s: %s",
                "still serving " + str(state.serving.revision) if state.serving else "not ready",
                delay,
                exc,
                extra={"dataset": target.dataset, "revision": target.ref},
            )

    # -- one materialise ---------------------------------------------------------------------------

    async def apply(self, target: Target) -> Result:
        """Publish `target` for its dataset, with metrics, logs and state."""
        state = self.states[target.dataset]
        started = time.monotonic()
        with log_context(dataset=target.dataset, revision=target.ref):
            request = Request(
                cache=self.cache,
                revision=target.revision,
                dest=self.workspace / target.dataset,
                strategy=Strategy(self.settings.link),
                remote=self.remotes.get(target.dataset),
                link_name=self.settings.link_name,
                verify=self.settings.verify,
                layout=target.layout,
                spare_grace=self.settings.spare_grace_seconds,
                writable=self.datasets[target.dataset].writable,
                # Records out of the pod's view: it mounts only `<workspace>/<dataset>`.
                state=self.workspace / STATE_DIR / target.dataset,
                part=target.part,
            )
            try:
                if self.cancel.is_set():
                    raise StoppedError()
                result = await asyncio.to_thread(_materialize, request, self.cancel)
            except asyncio.CancelledError:
                if not self.cancel.is_set():
                    raise
                raise StoppedError() from None
            except DatapinError as exc:
                if not isinstance(exc, StoppedError):
                    self.metrics.observe_failure(
                        target.dataset, exc, seconds=time.monotonic() - started
                    )
                    log.error("materialise failed: %s", exc, extra={"reason": exc.reason})
                raise
            except Exception as exc:
                self.metrics.observe_failure(
                    target.dataset, exc, seconds=time.monotonic() - started
                )
                log.exception("materialise failed unexpectedly (a bug: please report it)")
                raise DatapinError(f"unexpected {type(exc).__name__}: {exc}") from exc
            now = self.clock()
            self.metrics.observe(target.dataset, result, now=now)
            self.metrics.serving(
                target.dataset, ref=target.ref, pin=target.revision.oid, path=target.part.label
            )
            touch_used(
                self.cache,
                target.revision,
                tree_layout(Path(result.tree).name),
                part=target.part,
                now=now,
            )
            state.serving = target
            state.path = result.path
            state.last_error = ""
            state.failures = 0
            log.info(
                "%s %s at %s: %d files, %d hits, %d fetched (%d bytes), %s, %.3f s",
                "already serving" if result.noop else "published",
                target.revision,
                result.path,
                result.files,
                result.hits,
                result.fetched_objects,
                result.fetched_bytes,
                result.mode,
                result.seconds,
                extra={"base": result.base, "read_only": result.read_only},
            )
            return result


def _materialize(request: Request, cancel: threading.Event) -> Result:
    """The materialiser in a worker thread, stopped at its next progress tick on `cancel`."""

    def progress(_: Progress) -> None:
        if cancel.is_set():
            raise StoppedError()

    try:
        return materialize(request, progress=progress)
    except asyncio.CancelledError:
        # S3Remote.abort() cancelled the fetch this thread was waiting for.
        raise StoppedError() from None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the program ends: exit code and the termination message (empty on success)."""

    code: int
    message: str = ""


def outcome_of(failures: list[tuple[str, DatapinError]]) -> Outcome:
    if not failures:
        return Outcome(0)
    message = "\n".join(f"dataset {name}: {exc}" for name, exc in failures)
    return Outcome(failures[0][1].exit_code, message)
