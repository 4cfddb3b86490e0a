"""A Dataset's status from what a reconcile observed: a pure function, spec and facts in.

Kept apart from the handlers so every condition rule is tested without a server. The rules:

* `RemoteReachable`: the Secret exists and holds a key pair, and the remote answered a probe
  with those keys (reasons: `Reachable`, `SecretNotFound`, `AccessDenied`, `NoSuchBucket`,
  `WrongRegion`, `RemoteTimeout`, `RemoteUnreachable`, `BadRemote`).
* `Resolved`: every named and prefetch revision resolved to a pin, and (when the remote was
  reachable) every pin's `.dir` is in the remote (`Resolved`, `NothingToResolve`,
  `GitFailed`, `UnknownRevision`, `PinNotFound`, `NotPushed`).
* `Prefetched`: every selected node with an agent reports every prefetch pin warm
  (`Warm`, `Prefetching`, `PrefetchFailed`, `NoAgents`, `NothingToPrefetch`, and
  `AgentConfigFailed` when the agents' prefetch ConfigMap or credentials Secret cannot be
  written: only a Dataset that asks for prefetch reports that).
* `Ready`: `RemoteReachable` and `Resolved` are True: Jobs naming the Dataset can run. Its
  reason and message are those of the first condition that is not True.

`lastTransitionTime` changes only when a condition's status changes, as Kubernetes tools
expect; `transitions()` lists the changes, which the controller posts as Events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from datapin_operator.api.models import (
    CONDITION_TYPES,
    Condition,
    ConditionType,
    DatasetStatus,
    PrefetchStatus,
    ResolvedRevision,
    dump,
)
from datapin_operator.errors import OperatorError

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What one reconcile found."""

    generation: int | None
    #: None: the remote answered; else why not (a SecretError or RemoteCheckError).
    remote_error: OperatorError | None
    #: False when the check was not made (e.g. the Secret is missing).
    remote_checked: bool
    #: The remote's endpoint as messages name it (` (<url>)`), or empty when the spec names none.
    endpoint: str = ""
    resolved: Sequence[ResolvedRevision] = ()
    resolution_errors: Sequence[OperatorError] = ()
    #: Resolved pins whose `.dir` the remote does not have.
    not_pushed: Sequence[str] = ()
    prefetch: PrefetchStatus | None = None
    #: Whether the spec asks for any prefetch at all.
    wants_prefetch: bool = False
    #: Why the agents' objects could not be written or their reports read (prefetch only).
    prefetch_error: OperatorError | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """A condition whose status or reason changed: the Event the controller posts."""

    type: ConditionType
    status: str
    reason: str
    message: str
    warning: bool = False


def build_status(obs: Observation, *, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The status to write (camelCase, as stored)."""
    old = {
        c.get("type"): c
        for c in (previous or {}).get("conditions", []) or []
        if isinstance(c, dict)
    }
    fresh: dict[str, tuple[ConditionStatus, str, str]] = {
        t: _condition(t, obs) for t in CONDITION_TYPES if t != "Ready"
    }
    fresh["Ready"] = _ready(fresh)
    conditions = []
    for ctype in CONDITION_TYPES:
        status, reason, message = fresh[ctype]
        before = old.get(ctype) or {}
        since = before.get("lastTransitionTime", now) if before.get("status") == status else now
        conditions.append(
            Condition(
                type=ctype,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=obs.generation,
            )
        )
    return dump(
        DatasetStatus(
            observed_generation=obs.generation,
            conditions=conditions,
            resolved=list(obs.resolved),
            prefetch=obs.prefetch,
        )
    )


def transitions(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[Transition]:
    """Conditions whose status or reason changed: one Event each."""
    old = {
        c.get("type"): (c.get("status"), c.get("reason"))
        for c in (previous or {}).get("conditions", []) or []
        if isinstance(c, dict)
    }
    changes = []
    for c in current.get("conditions", []):
        if old.get(c["type"]) != (c["status"], c["reason"]):
            changes.append(
                Transition(
                    type=c["type"],
                    status=c["status"],
                    reason=c["reason"],
                    message=c.get("message", ""),
                    warning=c["status"] == "False",
                )
            )
    return changes


def _condition(  # noqa: PLR0911 - one return per rule of the module doc
    ctype: ConditionType, obs: Observation
) -> tuple[ConditionStatus, str, str]:
    if ctype == "RemoteReachable":
        if obs.remote_error is not None:
            return "False", obs.remote_error.reason, obs.remote_error.message
        if not obs.remote_checked:
            return "Unknown", "NotChecked", "the remote was not checked yet"
        return "True", "Reachable", f"the remote answered with the Secret's keys{obs.endpoint}"
    if ctype == "Resolved":
        if obs.resolution_errors:
            first = obs.resolution_errors[0]
            more = len(obs.resolution_errors) - 1
            tail = f" (and {more} more revision(s) failed)" if more else ""
            return "False", first.reason, first.message + tail
        if obs.not_pushed:
            pins = ", ".join(obs.not_pushed)
            return (
                "False",
                "NotPushed",
                f"the remote has no {pins}. Fix: `dvc push` that revision to the remote, or "
                "check spec.remote.url and layout",
            )
        if not obs.resolved:
            return "True", "NothingToResolve", "no named or prefetch revisions"
        refs = ", ".join(
            f"{r.ref}={r.pin}" + (f" (folders {r.path})" if r.path else "") for r in obs.resolved
        )
        return "True", "Resolved", f"{len(obs.resolved)} revision(s): {refs}"
    # Prefetched
    if not obs.wants_prefetch:
        return "True", "NothingToPrefetch", "spec.prefetch lists no revisions"
    if obs.prefetch_error is not None:
        return "False", obs.prefetch_error.reason, obs.prefetch_error.message
    p = obs.prefetch
    if p is None or p.total_nodes == 0:
        return (
            "False",
            "NoAgents",
            "no node agent runs on a node spec.prefetch.nodeSelector selects. Fix: check the "
            "selector and that the datapin agent DaemonSet runs there",
        )
    failed = [f"{n.node}: {f}" for n in p.nodes for f in n.failed]
    if failed:
        return "False", "PrefetchFailed", f"{p.summary}; " + "; ".join(failed[:3])
    if p.warm_nodes == p.total_nodes:
        return "True", "Warm", p.summary
    return "False", "Prefetching", p.summary


def _ready(fresh: dict[str, tuple[ConditionStatus, str, str]]) -> tuple[ConditionStatus, str, str]:
    for ctype in ("RemoteReachable", "Resolved"):
        status, reason, message = fresh[ctype]
        if status != "True":
            return "False" if status == "False" else "Unknown", reason, message
    return "True", "Ready", "Jobs can name this Dataset"
