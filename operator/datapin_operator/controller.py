"""Reconcile one Dataset: observe the world, then compute its status (status.py).

Observing, in order, each step feeding the next:

1. the spec parses (the CRD schema should have caught anything bad; this is the backstop);
2. the remote's Secret exists and holds a key pair;
3. every named and prefetch revision resolves to a pin (git refs through the DVC repo);
4. the remote answers with those keys and holds every pin's `.dir`;
5. for prefetch: the selected nodes get the pins in their agents' lists (fleet.py), and the
   agents' reports say how far they got.

A failure in one step is recorded and the others still run where they can, so the status
names every problem at once rather than one per resync. `resolvedAt` is kept while a ref
keeps its pin, so a resync that changes nothing writes nothing new.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .errors import OperatorError, RemoteCheckError, ResolutionError, SecretError
from .fleet import DatasetKey, Fleet, PrefetchEntry, summarise
from .kube import Kube
from .models import DatasetSpec, PrefetchStatus, ResolvedRevision
from .remotecheck import RemoteKeys, check_remote, git_credentials_from_secret, keys_from_secret
from .resolve import Resolver
from .settings import Settings
from .status import Observation, Transition, build_status, transitions

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class BadSpecError(OperatorError):
    """A spec the API server accepted but the models do not (a CRD older than the operator)."""

    reason = "BadSpec"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    status: dict[str, Any]
    transitions: list[Transition]


class Controller:
    """Everything a reconcile needs, built once in `main()`."""

    def __init__(self, *, settings: Settings, kube: Kube, resolver: Resolver, fleet: Fleet):
        self.settings = settings
        self.kube = kube
        self.resolver = resolver
        self.fleet = fleet

    async def reconcile(self, body: Mapping[str, Any], *, known: Iterable[DatasetKey]) -> Outcome:
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
            return Outcome(status=status, transitions=transitions(previous, status))

        obs = await self._observe(namespace, name, spec, generation, previous, known)
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
    ) -> Observation:
        secret_ref = spec.remote.credentials_secret_ref
        remote_error: OperatorError | None = None
        keys: RemoteKeys | None = None
        try:
            data = await self.kube.get_secret(namespace, secret_ref.name)
            keys = keys_from_secret(data, ref=secret_ref, namespace=namespace)
        except SecretError as exc:
            remote_error = exc

        errors: list[OperatorError] = []
        resolved = await self._resolve(namespace, name, spec, previous, errors)

        not_pushed: list[str] = []
        checked = False
        if keys is not None:
            try:
                not_pushed = await check_remote(
                    spec.remote,
                    keys,
                    pins=[(r.pin, r.layout) for r in resolved],
                    request_timeout=self.settings.remote_timeout_seconds,
                    where=f"Secret {namespace}/{secret_ref.name}",
                )
                checked = True
            except RemoteCheckError as exc:
                remote_error = exc

        prefetch = await self._prefetch(namespace, name, spec, resolved, keys, known)
        endpoint = f" ({spec.remote.endpoint})" if spec.remote.endpoint else ""
        return Observation(
            generation=generation,
            remote_error=remote_error,
            remote_checked=checked,
            resolved=resolved,
            resolution_errors=errors,
            not_pushed=not_pushed,
            prefetch=prefetch,
            wants_prefetch=bool(spec.prefetch and spec.prefetch.revisions),
            endpoint=endpoint,
        )

    async def _resolve(
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        previous: Mapping[str, Any] | None,
        errors: list[OperatorError],
    ) -> list[ResolvedRevision]:
        wanted = list(
            dict.fromkeys([*spec.revisions, *(spec.prefetch.revisions if spec.prefetch else [])])
        )
        if not wanted:
            return []
        credentials = None
        if spec.source is not None and spec.source.credentials_secret_ref is not None:
            git_secret = spec.source.credentials_secret_ref.name
            try:
                credentials = git_credentials_from_secret(
                    await self.kube.get_secret(namespace, git_secret),
                    secret=git_secret,
                    namespace=namespace,
                )
            except SecretError as exc:
                errors.append(exc)
        before = {
            (r.get("ref"), r.get("pin")): r.get("resolvedAt")
            for r in (previous or {}).get("resolved", []) or []
            if isinstance(r, dict)
        }
        resolved = []
        for revision in wanted:
            try:
                r = await self.resolver.resolve(
                    dataset=name, spec=spec, revision=revision, git_credentials=credentials
                )
            except ResolutionError as exc:
                errors.append(exc)
                continue
            resolved.append(
                ResolvedRevision(
                    ref=revision,
                    pin=r.pin,
                    layout=r.layout,
                    commit=r.commit,
                    resolved_at=before.get((revision, r.pin)) or now_iso(),
                )
            )
        return resolved

    async def _prefetch(  # noqa: PLR0917 - private; the steps of one reconcile
        self,
        namespace: str,
        name: str,
        spec: DatasetSpec,
        resolved: list[ResolvedRevision],
        keys: RemoteKeys | None,
        known: Iterable[DatasetKey],
    ) -> PrefetchStatus | None:
        key = (namespace, name)
        if spec.prefetch is None or not spec.prefetch.revisions or keys is None:
            self.fleet.set(key, [])
            await self.fleet.sync(known)
            return None
        wanted = set(spec.prefetch.revisions)
        nodes = frozenset(n.name for n in await self.kube.list_nodes(spec.prefetch.node_selector))
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
            )
            for r in resolved
            if r.ref in wanted
        ]
        self.fleet.set(key, entries)
        await self.fleet.sync(known)
        agents, reports = await self.fleet.reports()
        return summarise(entries, agents=agents, reports=reports)

    async def forget(self, key: DatasetKey, *, known: Iterable[DatasetKey]) -> None:
        """A Dataset was deleted: its revisions leave the agents' lists."""
        self.fleet.drop(key)
        await self.fleet.sync(known)
