"""Prometheus metrics of the operator, on an injected registry, and their `/metrics` endpoint.

Design (the node side's `datapin_sidecar.node.metrics` is the model):

* No global metrics. `OperatorMetrics(registry)` declares every family on the registry it is
  given; `app.build_app` makes one `CollectorRegistry` per program and hands the same
  `OperatorMetrics` to the admission, the resolver, the controller and the fleet. The parts
  also default to a private, unexported registry of their own, so a part built alone (a test,
  a benchmark) needs no metrics wiring and counts into nothing anyone reads.
* Names: `datapin_operator_` prefix, written out in each declaration (a name copied from the
  dashboard finds its family here), base units, `_total` on counters.
* Labels are closed sets, never names or user text: `result` (an enum below), `reason` (a
  CamelCase reason of an error class in `errors.py`, or one of the reasons below), `kind`
  (`resolver.RevisionKind`), `state`. There is deliberately no `namespace` or `dataset`
  label: a cluster may hold thousands of Datasets, each would multiply every family, and
  what one Dataset is doing is already in its status conditions and Events. Every replica
  serves the webhook, so each exports its own admissions; the scrape's `pod` label tells them
  apart and the dashboard sums over them. Reconciles and agent reports come from the one
  replica kopf peering elected.
* Series a panel reads are created at zero (every admission result with its fixed reasons,
  every resolve kind, both report results), so "no rejections" reads 0, not "no data".
* Nothing secret can reach a label: reasons are class attributes, not messages.

`serve` exposes the registry at `/metrics` with aiohttp (the operator runs it already, for its
agent reports): one GET handler on the operator's event loop, which renders the exposition in
well under a millisecond for these few families, so no thread is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from datapin_operator.errors import OperatorError, RejectedError, ResolutionError
from datapin_operator.kube import API_ERRORS
from datapin_operator.resolve.kinds import RevisionKind


class AdmissionResult(StrEnum):
    """What the webhook answered."""

    ADMITTED = "admitted"  # injected (and pinned): the object changed
    SKIPPED = "skipped"  # not ours, or injected already: admitted unchanged
    REJECTED = "rejected"  # an `OperatorError`: refused with its message
    ERROR = "error"  # anything else: kopf answers with an error (Jobs then fail to apply)


class AdmissionReason(StrEnum):
    """The `reason` of admissions that were not rejected (rejections carry their error's)."""

    PINNED = "Pinned"  # revisions resolved now
    REUSED = "Reused"  # pins already recorded on the object (a re-applied Job, say)
    NOT_ANNOTATED = "NotAnnotated"  # no datapin.dev/ annotation asks for a dataset
    ALREADY_INJECTED = "AlreadyInjected"  # a Pod of an admitted Job, a second webhook pass
    API_ERROR = "ApiError"  # the API server (listing Datasets, reading a Secret) failed
    UNEXPECTED = "Unexpected"  # a bug: see the operator's log


class Placement(StrEnum):
    """Whether an injected pod got a preference for warm nodes (placement.py)."""

    PREFERRED = "preferred"
    NONE = "none"  # no node reports its pins warm


class ReportResult(StrEnum):
    """One GET of an agent's /status."""

    OK = "ok"
    FAILED = "failed"


class ResolveResult(StrEnum):
    OK = "ok"
    FAILED = "failed"


class AgentState(StrEnum):
    REPORTING = "reporting"
    SILENT = "silent"  # listed, but its /status did not answer (or it is not Running)


#: Admission latency: a literal or named pin takes milliseconds, a git ref a fetch (seconds);
#: the API server gives up after the webhook's timeoutSeconds (15 in the chart, 30 at most).
ADMISSION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    30.0,
)
#: Resolve latency: a pin or a name microseconds, git milliseconds (cached) to a minute (clone).
RESOLVE_BUCKETS: Final = (0.0001, 0.001, *ADMISSION_BUCKETS[3:], 60.0)


def _reasons(*roots: type[OperatorError]) -> tuple[str, ...]:
    """The reasons of `roots` and of every class below them, sorted."""
    seen: set[str] = set()
    stack: list[type[OperatorError]] = list(roots)
    while stack:
        cls = stack.pop()
        seen.add(cls.reason)
        stack.extend(cls.__subclasses__())
    return tuple(sorted(seen))


#: The reasons of errors the webhook refuses with (created at zero).
REJECTION_REASONS: Final = _reasons(RejectedError, ResolutionError)


def error_reason(exc: BaseException) -> str:
    """The `reason` label of an error: its class's reason, or what kind of failure it was.

    The class attribute, not an instance's: some instances refine it from a server's answer,
    and a label must stay a closed set.
    """
    if isinstance(exc, OperatorError):
        return type(exc).reason
    if isinstance(exc, API_ERRORS):
        return AdmissionReason.API_ERROR.value
    return AdmissionReason.UNEXPECTED.value


class OperatorMetrics:
    """Every metric the operator exports (see the module doc)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        #: The registry the families are on (a private one when none is given).
        self.registry = registry if registry is not None else CollectorRegistry()
        self.admissions = Counter(
            "datapin_operator_admissions_total",
            "Jobs and Pods the webhook answered, by result (admitted, skipped, rejected, "
            "error) and reason.",
            ["result", "reason"],
            registry=self.registry,
        )
        self.admission_seconds = Histogram(
            "datapin_operator_admission_seconds",
            "Time to answer one admission (resolving, checking Secrets, injecting), by result.",
            ["result"],
            buckets=ADMISSION_BUCKETS,
            registry=self.registry,
        )
        self.placements = Counter(
            "datapin_operator_placements_total",
            "Injected pods by warm-node preference: preferred (some node reports a pin warm), "
            "none.",
            ["result"],
            registry=self.registry,
        )
        self.resolve_seconds = Histogram(
            "datapin_operator_resolve_seconds",
            "Time to resolve a revision to a pin, by what it was (pin, named, git) and result.",
            ["kind", "result"],
            buckets=RESOLVE_BUCKETS,
            registry=self.registry,
        )
        self.resolve_errors = Counter(
            "datapin_operator_resolve_errors_total",
            "Revisions that did not resolve, by reason (webhook and reconciles).",
            ["reason"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "datapin_operator_reconciles_total",
            "Dataset reconciles run (on change and at every resync).",
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "datapin_operator_reconcile_errors_total",
            "Problems reconciles found, by reason (one per failed step of a reconcile: the "
            "reason of the condition it sets; ApiError or Unexpected when the reconcile "
            "itself failed and kopf retries it).",
            ["reason"],
            registry=self.registry,
        )
        self.agent_reports = Counter(
            "datapin_operator_agent_reports_total",
            "Reads of the node agents' /status, by result (ok, failed).",
            ["result"],
            registry=self.registry,
        )
        self.agents = Gauge(
            "datapin_operator_agents",
            "Node agents at the last read of their reports: reporting, or silent (listed but "
            "not answering).",
            ["state"],
            registry=self.registry,
        )
        for reason in (AdmissionReason.PINNED, AdmissionReason.REUSED):
            self.admissions.labels(AdmissionResult.ADMITTED, reason)
        for reason in (AdmissionReason.NOT_ANNOTATED, AdmissionReason.ALREADY_INJECTED):
            self.admissions.labels(AdmissionResult.SKIPPED, reason)
        for rejection in REJECTION_REASONS:
            self.admissions.labels(AdmissionResult.REJECTED, rejection)
        for reason in (AdmissionReason.API_ERROR, AdmissionReason.UNEXPECTED):
            self.admissions.labels(AdmissionResult.ERROR, reason)
        for admission in AdmissionResult:
            self.admission_seconds.labels(admission)
        for placement in Placement:
            self.placements.labels(placement)
        for kind in RevisionKind:
            for resolve in ResolveResult:
                self.resolve_seconds.labels(kind, resolve)
        for report in ReportResult:
            self.agent_reports.labels(report)
        for state in AgentState:
            self.agents.labels(state).set(0)

    # -- what the parts call ------------------------------------------------------------------

    def admitted(self, result: AdmissionResult, reason: str, *, seconds: float) -> None:
        self.admissions.labels(result, reason).inc()
        self.admission_seconds.labels(result).observe(seconds)

    def placed(self, placement: Placement) -> None:
        self.placements.labels(placement).inc()

    def resolved(self, kind: RevisionKind, *, seconds: float) -> None:
        self.resolve_seconds.labels(kind, ResolveResult.OK).observe(seconds)

    def resolve_failed(
        self, exc: ResolutionError, kind: RevisionKind | None, *, seconds: float
    ) -> None:
        """A failed resolve; `kind` is what it failed as (None: it was none of them)."""
        self.resolve_errors.labels(error_reason(exc)).inc()
        if kind is not None:
            self.resolve_seconds.labels(kind, ResolveResult.FAILED).observe(seconds)

    def reconciled(self, problems: Iterable[BaseException]) -> None:
        self.reconciles.inc()
        for problem in problems:
            self.reconcile_errors.labels(error_reason(problem)).inc()

    def reported(self, *, ok: int, failed: int, silent: int) -> None:
        """One round of agent reports: `silent` agents were listed and did not report."""
        self.agent_reports.labels(ReportResult.OK).inc(ok)
        self.agent_reports.labels(ReportResult.FAILED).inc(failed)
        self.agents.labels(AgentState.REPORTING).set(ok)
        self.agents.labels(AgentState.SILENT).set(silent)


async def serve(registry: CollectorRegistry, *, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `registry` at http://host:port/metrics until `stop` is set."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


__all__: Sequence[str] = [
    "AdmissionReason",
    "AdmissionResult",
    "OperatorMetrics",
    "Placement",
    "error_reason",
    "serve",
]
