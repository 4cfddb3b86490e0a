"""Reconcile one Dataset: observe the world, then compute its status (status.py).

Observing, in order, each step feeding the next:

1. the spec parses (the CRD schema should have caught anything bad; this is the backstop);
2. the remote's Secret exists and holds a key pair;
3. every named and prefetch revision resolves to a pin (git refs through the DVC repo, with
   the git Secret the resolver reads);
4. the remote answers with those keys and holds every pin's `.dir`, and every revision
   that stands for folders (a prefetch entry `v2:images/train`, a named revision
   `<md5>.dir:<folders>`, a source path inside an out) names folders its `.dir` holds, read
   through the webhook's own folder-index cache (`resolve/partindex.py`), so a bad folder is
   a `Resolved=False` naming the folders there are, and the admissions that follow are
   answered from memory;
5. for prefetch: the selected nodes get the pins (and parts) in their agents' lists
   (fleet.py), and the agents' reports say how far they got. An entry whose folders are not
   in its pin is left off the lists.

A failure in one step is recorded and the others still run where they can, so the status
names every problem at once rather than one per resync. `resolvedAt` is kept while a ref
keeps its pin, so a resync that changes nothing writes nothing new. The agents' objects are
the cluster's, not the Dataset's: failing to write them (no namespace, RBAC) is a
`Prefetched=False` condition on Datasets that prefetch, and nothing at all on the others.

Prefetch progress is not left to the resync (a minute): while a Dataset's prefetch is not
warm, `progress()` re-reads the agents' reports on a short, backing-off interval (from
`prefetch_poll_seconds`, doubling while nothing changes, at most `_POLL_CAP`), for at most
`prefetch_watch_seconds` after the list was written or the watch began, and rebuilds only the
prefetch part of the last observation. A Dataset shows warm seconds after its agents are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import PathNotInRevisionError
from pydantic import ValidationError

from datapin_operator.api.models import (
    DatasetSpec,
    PrefetchStatus,
    ResolvedRevision,
    join_revision,
    split_revision,
)
from datapin_operator.errors import (
    AgentConfigError,
    BadSpecError,
    OperatorError,
    PartNotFoundError,
    RemoteCheckError,
    SecretError,
)
from datapin_operator.kube import API_ERRORS, Kube
from datapin_operator.metrics import OperatorMetrics
from datapin_operator.reconcile.fleet import (
    DatasetKey,
    Fleet,
    PrefetchEntry,
    agent_config_error,
    summarise,
)
from datapin_operator.reconcile.remotecheck import (
    RemoteKeys,
    check_remote,
    keys_from_secret,
)
from datapin_operator.reconcile.status import Observation, Transition, build_status, transitions
from datapin_operator.resolve.partindex import PartIndex
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings

log = logging.getLogger(__name__)

#: The longest pause between two reads of the agents' reports while a prefetch is not warm.
_POLL_CAP: Final = 15.0


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    status: dict[str, Any]
    transitions: list[Transition]


@dataclass(slots=True, kw_only=True)
class _Watch:
    """A Dataset whose prefetch is not warm yet: what its next `progress()` rebuilds from."""

    observation: Observation
    entries: list[PrefetchEntry]
    started: float
    next_at: float
    delay: float


class Controller:
    """Everything a reconcile needs, built once in `main()`."""

    def __init__(
        self,
        *,
        settings: Settings,
        kube: Kube,
        resolver: Resolver,
        fleet: Fleet,
        metrics: OperatorMetrics | None = None,
        parts: PartIndex | None = None,
    ):
        self.settings = settings
        self.kube = kube
        self.resolver = resolver
        self.fleet = fleet
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self.parts = parts
        self._watches: dict[DatasetKey, _Watch] = {}

    async def reconcile(self, body: Mapping[str, Any], *, known: Iterable[DatasetKey]) -> Outcome:
        """The Dataset's status and the Events to post; counted with the problems it found
        (`datapin_operator_reconcile_errors_total`, by the reasons its conditions show)."""
        try:
            outcome, problems = await self._reconcile(body, known=known)
        except Exception as exc:  # kopf retries it; counted, then raised on
            self.metrics.reconciled([exc])
            raise
        self.metrics.reconciled(problems)
        return outcome

    async def _reconcile(
        self, body: Mapping[str, Any], *, known: Iterable[DatasetKey]
    ) -> tuple[Outcome, list[OperatorError]]:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        previous = body.get("status") or None
        generation = meta.get("generation")
        try:
            spec = DatasetSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            error = BadSpecError(
                f"spec.{where}: {first['msg']}. Fix: correct the Dataset (kubectl explain "
                "dataset.spec) or upgrade the CRD with the operator's chart"
            )
            obs = Observation(
                generation=generation,
                remote_error=error,
                remote_checked=False,
                resolution_errors=[error],
            )
            status = build_status(obs, previous=previous, now=now_iso())
            return Outcome(status=status, transitions=transitions(previous, status)), [error]

        obs, entries, wrote = await self._observe(
            namespace, name, spec, generation, previous, known
        )
        self._watch((namespace, name), obs, entries, wrote=wrote)
        status = build_status(obs, previous=previous, now=now_iso())
        problems = [
            e
            for e in (obs.remote_error, *obs.resolution_errors, obs.prefetch_error)
            if e is not None
        ]
        return Outcome(status=status, transitions=transitions(previous, status)), problems

    def _watch(
        self, key: DatasetKey, obs: Observation, entries: list[PrefetchEntry], *, wrote: bool
    ) -> None:
        """Start (or restart, when the list was just written) polling a Dataset that is not
        warm; stop for one that is, or that prefetches nothing."""
        p = obs.prefetch
        if (
            p is None
            or obs.prefetch_error is not None
            or (p.total_nodes and p.warm_nodes == p.total_nodes)
        ):
            self._watches.pop(key, None)
            return
        now = time.monotonic()
        first = self.settings.prefetch_poll_seconds
        current = self._watches.get(key)
        if current is None or wrote:
            if wrote:  # the list changed for every Dataset on it: all poll afresh
                for other in self._watches.values():
                    other.started, other.delay, other.next_at = now, first, now + first
            self._watches[key] = _Watch(
                observation=obs, entries=entries, started=now, next_at=now + first, delay=first
            )
        else:
            current.observation, current.entries = obs, entries

    async def progress(self, body: Mapping[str, Any]) -> Outcome | None:
        """The status again with fresh agent reports, if this Dataset's prefetch is being
        watched and its next read is due; None otherwise (nothing to write)."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        watch = self._watches.get(key)
        now = time.monotonic()
        if watch is None or now < watch.next_at:
            return None
        if now - watch.started > self.settings.prefetch_watch_seconds:
            log.info("prefetch of %s/%s: not warm yet; left to the resync", *key)
            self._watches.pop(key, None)
            return None
        if meta.get("generation") != watch.observation.generation:
            return None  # the spec changed: its own reconcile is on the way
        try:
            agents, reports = await self.fleet.reports()
        except API_ERRORS as exc:
            log.info("prefetch of %s/%s: agents not listed (%s); retrying", *key, exc)
            watch.next_at = now + watch.delay
            return None
        prefetch = summarise(watch.entries, agents=agents, reports=reports)
        changed = prefetch != watch.observation.prefetch
        watch.delay = (
            self.settings.prefetch_poll_seconds
            if changed
            else min(watch.delay * 2, max(_POLL_CAP, self.settings.prefetch_poll_seconds))
        )
        watch.next_at = time.monotonic() + watch.delay
        obs = dataclasses.replace(watch.observation, prefetch=prefetch)
        watch.observation = obs
        if prefetch.total_nodes and prefetch.warm_nodes == prefetch.total_nodes:
            self._watches.pop(key, None)
        previous = body.get("status") or None
        status = build_status(obs, previous=previous, now=now_iso())
        return Outcome(status=status, transitions=transitions(previous, status))

    async def _observe(  # noqa: PLR0917 - private; the steps of one reconcile
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        generation: int | None,
        previous: Mapping[str, Any] | None,
        known: Iterable[DatasetKey],
    ) -> tuple[Observation, list[PrefetchEntry], bool]:
        secret_ref = spec.remote.credentials_secret_ref
        remote_error: OperatorError | None = None
        keys: RemoteKeys | None = None
        try:
            data = await self.kube.get_secret(namespace, secret_ref.name)
            keys = keys_from_secret(data, ref=secret_ref, namespace=namespace)
        except SecretError as exc:
            remote_error = exc

        errors: list[OperatorError] = []
        by_entry = await self._resolve(namespace, name, spec, previous, errors)
        resolved = list(dict.fromkeys(by_entry.values()))  # named and prefetched: once each

        not_pushed: list[str] = []
        checked = False
        if keys is not None:
            try:
                not_pushed = await check_remote(
                    spec.remote,
                    keys,
                    pins=list(dict.fromkeys((r.pin, r.layout) for r in resolved)),
                    request_timeout=self.settings.remote_timeout_seconds,
                    where=f"Secret {namespace}/{secret_ref.name}",
                )
                checked = True
            except RemoteCheckError as exc:
                remote_error = exc
        if checked and keys is not None:
            bad = await self._check_parts(namespace, name, spec, keys, resolved, not_pushed)
            errors += bad.values()
            by_entry = {entry: r for entry, r in by_entry.items() if r not in bad}

        prefetch, prefetch_error, entries, wrote = await self._prefetch(
            namespace, name, spec, by_entry, keys, known
        )
        obs = Observation(
            generation=generation,
            remote_error=remote_error,
            remote_checked=checked,
            endpoint=f" ({spec.remote.endpoint})" if spec.remote.endpoint else "",
            not_pushed=not_pushed,
            resolved=resolved,
            resolution_errors=errors,
            wants_prefetch=bool(spec.prefetch and spec.prefetch.revisions),
            prefetch=prefetch,
            prefetch_error=prefetch_error,
        )
        return obs, entries, wrote

    async def _resolve(
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        previous: Mapping[str, Any] | None,
        errors: list[OperatorError],
    ) -> dict[str, ResolvedRevision]:
        """Every named revision and prefetch entry (`<revision>[:<folders>]`), as the spec
        writes it, -> how it resolved; what fails is in `errors`."""
        entries = list(
            dict.fromkeys([*spec.revisions, *(spec.prefetch.revisions if spec.prefetch else [])])
        )
        asked = {entry: split_revision(entry) for entry in entries}  # the models checked them
        found, failed = await self.resolver.resolve_many(
            namespace,
            dataset=name,
            spec=spec,
            revisions=list(dict.fromkeys(revision for revision, _ in asked.values())),
        )
        errors += failed
        before = {
            (r.get("ref"), r.get("pin"), r.get("path")): r.get("resolvedAt")
            for r in (previous or {}).get("resolved", []) or []
            if isinstance(r, dict)
        }
        result: dict[str, ResolvedRevision] = {}
        for entry, (revision, part) in asked.items():
            r = found.get(revision)
            if r is None:
                continue
            if not part.whole and not r.part.whole:
                errors.append(
                    PartNotFoundError(
                        f"prefetch entry {entry!r} asks for folders {part.label}, but "
                        f"{revision!r} already stands for folders {r.part.label} "
                        f"({r.part_source}); a revision's folders are said in one place. Fix: "
                        f"list {revision!r} alone, or {join_revision(r.pin, part)}",
                        dataset=name,
                        revision=entry,
                    )
                )
                continue
            path = (part if not part.whole else r.part).label or None
            result[entry] = ResolvedRevision(
                ref=revision,
                pin=r.pin,
                path=path,
                layout=r.layout,
                commit=r.commit,
                resolved_at=before.get((revision, r.pin, path)) or now_iso(),
            )
        return result

    async def _check_parts(  # noqa: PLR0917 - private; the steps of one reconcile
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        keys: RemoteKeys,
        resolved: list[ResolvedRevision],
        not_pushed: list[str],
    ) -> dict[ResolvedRevision, OperatorError]:
        """The revisions with folders their pin does not hold (or that cannot be checked)."""
        bad: dict[ResolvedRevision, OperatorError] = {}
        if self.parts is None:
            return bad
        secret = spec.remote.credentials_secret_ref.name
        for r in resolved:
            if r.path is None or r.pin in not_pushed:
                continue
            try:
                await self.parts.check(
                    remote=spec.remote,
                    keys=keys,
                    pin=r.pin,
                    layout=r.layout,
                    part=Part.parse([r.path]),
                    where=f"Secret {namespace}/{secret}",
                )
            except PathNotInRevisionError as exc:
                bad[r] = PartNotFoundError(str(exc), dataset=name, revision=r.ref)
            except RemoteCheckError as exc:
                bad[r] = PartNotFoundError(
                    f"folders {r.path} cannot be checked: {exc.message}",
                    dataset=name,
                    revision=r.ref,
                )
        return bad

    async def _prefetch(  # noqa: PLR0917 - private; the steps of one reconcile
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        by_entry: Mapping[str, ResolvedRevision],
        keys: RemoteKeys | None,
        known: Iterable[DatasetKey],
    ) -> tuple[PrefetchStatus | None, AgentConfigError | None, list[PrefetchEntry], bool]:
        """(progress, why the agents' objects failed, this Dataset's entries, list written)."""
        key = (namespace, name)
        if spec.prefetch is None or not spec.prefetch.revisions or keys is None:
            self.fleet.set(key, [])
            # A failure is logged by the fleet; nothing of this Dataset's depends on it.
            with contextlib.suppress(AgentConfigError):
                await self.fleet.sync(known)
            return None, None, [], False
        try:
            listed = await self.kube.list_nodes(spec.prefetch.node_selector)
        except API_ERRORS as exc:
            # Its last entries stay on the lists (a failed read is no reason to drop them); a
            # Dataset never seen counts as seen, so it holds up no other Dataset's list.
            if not self.fleet.knows(key):
                self.fleet.set(key, [])
            what = "cannot list the nodes spec.prefetch.nodeSelector selects"
            error = agent_config_error(exc, what=what, namespace=self.settings.namespace)
            return None, error, [], False
        nodes = frozenset(n.name for n in listed)
        # `golden` and its pin itself, both listed: one entry for the agents.
        prefetched: dict[tuple[str, str | None], ResolvedRevision] = {}
        for entry in spec.prefetch.revisions:
            if entry in by_entry:
                prefetched.setdefault((by_entry[entry].pin, by_entry[entry].path), by_entry[entry])
        entries = [
            PrefetchEntry(
                namespace=namespace,
                dataset=name,
                pin=r.pin,
                layout=r.layout,
                ref=r.ref,
                remote=spec.remote,
                keys=keys,
                nodes=nodes,
                part=Part.parse([r.path]) if r.path else Part.WHOLE,
            )
            for r in prefetched.values()
        ]
        self.fleet.set(key, entries)
        try:
            wrote = await self.fleet.sync(known)
        except AgentConfigError as exc:
            return None, exc, entries, False
        try:
            agents, reports = await self.fleet.reports()
        except API_ERRORS as exc:
            ns = self.settings.namespace
            what = f"cannot list the node agents' pods in namespace {ns}"
            error = agent_config_error(exc, what=what, namespace=ns)
            return None, error, entries, wrote
        return summarise(entries, agents=agents, reports=reports), None, entries, wrote

    async def forget(self, key: DatasetKey, *, known: Iterable[DatasetKey]) -> None:
        """A Dataset was deleted: its revisions leave the agents' lists."""
        self.fleet.drop(key)
        self._watches.pop(key, None)
        # A failure is logged by the fleet; the next reconcile of any Dataset writes again.
        with contextlib.suppress(AgentConfigError):
            await self.fleet.sync(known)
