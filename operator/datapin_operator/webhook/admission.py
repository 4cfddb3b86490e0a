"""What the mutating webhook does with a Job or Pod being created: resolve, pin, inject.

The flow, for a Job (a Pod is the same with the Pod as its own template):

1. Parse the `datapin.dev/*` annotations of the Job and of its pod template (`requests.py`;
   the Job's win). None: not ours, admitted unchanged.
2. Already injected (a second webhook pass, or a Pod of an admitted Job): unchanged.
3. Pins already recorded (`datapin.dev/pins` on the Job or the template): reused as they are.
   This is what makes a Job's pin immutable: the Job controller copies the template, pins
   included, into every Pod, and the Pod webhook never resolves again, so every Pod of the Job
   sees the same bytes even if the tag moved in between.
4. Otherwise each dataset is looked up among the namespace's Datasets (listed fresh from the
   API server for each admission: with several replicas only one has kopf's watches running,
   and a webhook answering from a stale copy would pin to an old named revision or reject a
   Dataset created a second ago), its Secret is checked
   for a key pair (a pod whose sidecar cannot authenticate would fail after scheduling, far
   from the user's `kubectl apply`), and its revision is resolved (`resolve/resolver.py`, which
   reads the git Secret of `spec.source` itself).
5. Folders (`datapin.dev/path`, or a revision that stands for folders: a named
   `<md5>.dir:<folders>`, a source path inside an out) are checked against the pin's `.dir`
   in the Dataset's remote, read with the Dataset's keys once per pin and remembered
   (`resolve/partindex.py`): a folder the revision does not hold is refused here with the
   folders it does hold, not on a node minutes later. Only pins with folders are read; reused
   pins were checked when the Job was admitted. The part goes into the pins
   (`PinRecord.part`), which the csi volume (`path` attribute) and the sidecar both read.
6. `inject.py` builds the new pod template; the pins go on the Job and on the template.
7. Unless `DATAPIN_PREFER_WARM_NODES` is off, the template prefers the nodes whose agents
   report the pins (or, for a part, the pin or a part holding it) warm, read from the same
   listing's Dataset statuses (`placement.py`, which says why this is a preference and never
   a requirement). It is added in the pass that
   injects, so like the pins it is decided once per Job and copied into every Pod.

Every answer is counted by result and reason and timed (`metrics.py`): admitted (`Pinned`,
`Reused`), skipped (`NotAnnotated`, `AlreadyInjected`), rejected (the error's reason) or error.

Any `OperatorError` is a rejection whose message says what is wrong and how to fix it. The
class is free of kopf: the handlers adapt it (`handlers.py`), and tests drive it directly too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from datapin_sidecar.errors import PathNotInRevisionError
from datapin_sidecar.pins import PinRecord, format_pins

from datapin_operator.api.models import DatasetSpec
from datapin_operator.errors import (
    OperatorError,
    PartNotFoundError,
    RemoteCheckError,
    UnknownDatasetError,
)
from datapin_operator.kube import DatasetListing
from datapin_operator.metrics import (
    AdmissionReason,
    AdmissionResult,
    OperatorMetrics,
    Placement,
    error_reason,
)
from datapin_operator.reconcile.remotecheck import RemoteKeys, keys_from_secret
from datapin_operator.resolve.partindex import PartIndex
from datapin_operator.resolve.resolver import Resolved, Resolver, SecretReader
from datapin_operator.settings import Settings
from datapin_operator.webhook.inject import DatasetMount, inject, is_injected
from datapin_operator.webhook.placement import WarmNodes, prefer, preferred_terms, warm_nodes
from datapin_operator.webhook.requests import MountRequest, Request, parse_request, read_pins

#: namespace -> the Datasets there: their specs and statuses (`kube.list_datasets`), or only
#: their specs, name -> spec (then nothing is known warm and no placement is added).
DatasetLister = Callable[[str], Awaitable[DatasetListing | Mapping[str, Mapping[str, Any]]]]


@dataclass(frozen=True, slots=True)
class Catalog:
    """The Datasets the webhook can see: (namespace, name) -> spec, and -> status."""

    specs: Mapping[tuple[str, str], Mapping[str, Any]]
    statuses: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, namespace: str, listed: DatasetListing | Mapping[str, Mapping[str, Any]]
    ) -> Catalog:
        """The Datasets of one namespace as a lister returned them."""
        if not isinstance(listed, DatasetListing):
            listed = DatasetListing(specs=listed)
        return cls(
            {(namespace, name): spec for name, spec in listed.specs.items()},
            {(namespace, name): status for name, status in listed.statuses.items()},
        )

    def get(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.specs.get((namespace, name))

    def status(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.statuses.get((namespace, name))

    def names(self, namespace: str) -> list[str]:
        return sorted(n for ns, n in self.specs if ns == namespace)


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted:
    """The object to admit, and how its pins came about."""

    obj: dict[str, Any]
    request: Request
    pins: tuple[PinRecord, ...]
    #: True when the pins were already recorded (a Pod of an admitted Job, a re-applied Job).
    reused: bool
    #: The nodes each dataset's pin is warm on, as the Datasets' statuses said (empty when
    #: `DATAPIN_PREFER_WARM_NODES` is off); the pod template prefers them (placement.py).
    warm: tuple[WarmNodes, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """Job/Pod CREATE -> the object to admit (see the module doc)."""

    settings: Settings
    secrets: SecretReader
    datasets: DatasetLister
    resolver: Resolver
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    #: Folder indexes of pins (shared with the controller); one from `settings` if not given.
    parts: PartIndex | None = None

    def __post_init__(self) -> None:
        if self.parts is None:
            object.__setattr__(self, "parts", part_index(self.settings))

    async def admit(self, obj: Mapping[str, Any], *, namespace: str) -> Admitted | None:
        """The mutated object, or None when it is not ours or already done; counted and
        timed by result and reason (`datapin_operator_admissions_total`)."""
        started = time.perf_counter()
        try:
            outcome = await self._admit(obj, namespace=namespace)
        except OperatorError as exc:
            self._count(AdmissionResult.REJECTED, error_reason(exc), started)
            raise
        except Exception as exc:
            self._count(AdmissionResult.ERROR, error_reason(exc), started)
            raise
        if isinstance(outcome, AdmissionReason):
            self._count(AdmissionResult.SKIPPED, outcome, started)
            return None
        reason = AdmissionReason.REUSED if outcome.reused else AdmissionReason.PINNED
        self._count(AdmissionResult.ADMITTED, reason, started)
        if self.settings.prefer_warm_nodes:
            found = any(w.nodes for w in outcome.warm)
            self.metrics.placed(Placement.PREFERRED if found else Placement.NONE)
        return outcome

    def _count(self, result: AdmissionResult, reason: str, started: float) -> None:
        self.metrics.admitted(result, reason, seconds=time.perf_counter() - started)

    async def _admit(self, obj: Mapping[str, Any], *, namespace: str) -> Admitted | AdmissionReason:
        new = copy.deepcopy(dict(obj))
        template = _template(new)
        own = (new.get("metadata") or {}).get("annotations") or {}
        tmpl_annotations = (template.get("metadata") or {}).get("annotations") or {}
        merged = {**tmpl_annotations, **own} if template is not new else dict(own)
        request = parse_request(
            merged, mount_root=self.settings.mount_root, default_mode=self.settings.default_mode
        )
        if request is None:
            return AdmissionReason.NOT_ANNOTATED
        if is_injected(template):
            return AdmissionReason.ALREADY_INJECTED
        catalog = Catalog.of(namespace, await self.datasets(namespace))
        recorded = read_pins(own) or read_pins(tmpl_annotations)
        # Where each dataset's part was said, for messages: the annotation or the Dataset.
        sources: dict[str, str] = {}
        if recorded is not None and set(request.datasets) <= set(recorded):
            # The part too is the recorded one: the Pods of a Job serve what the Job was
            # admitted with, folders included.
            pins = tuple(recorded[d] for d in request.datasets)
            reused = True
        else:
            pinned = [await self._pin(catalog, namespace, m) for m in request.mounts]
            pins = tuple(p for p, _ in pinned)
            sources = {p.dataset: source for p, source in pinned}
            reused = False
        mounts = [
            DatasetMount(request=m, spec=self._spec(catalog, namespace, m.dataset), pin=p)
            for m, p in zip(request.mounts, pins, strict=True)
        ]
        for mount in mounts:
            keys = await self._check_secret(namespace, mount.spec)
            if not reused:
                await self._check_part(namespace, mount, keys, source=sources[mount.pin.dataset])
        injected = inject(template, request=request, mounts=mounts, settings=self.settings)
        warm: tuple[WarmNodes, ...] = ()
        if self.settings.prefer_warm_nodes:
            warm = tuple(
                warm_nodes(
                    catalog.status(namespace, p.dataset), dataset=p.dataset, pin=p.pin, part=p.part
                )
                for p in pins
            )
            terms = preferred_terms(warm, weight=self.settings.warm_node_weight)
            injected["spec"] = prefer(injected.get("spec") or {}, terms)
        if template is new:
            new = injected
        else:
            new["spec"]["template"] = injected
            meta = new.setdefault("metadata", {})
            meta["annotations"] = {**(meta.get("annotations") or {}), **format_pins(pins)}
        return Admitted(obj=new, request=request, pins=pins, reused=reused, warm=warm)

    @staticmethod
    def _spec(catalog: Catalog, namespace: str, dataset: str) -> DatasetSpec:
        raw = catalog.get(namespace, dataset)
        if raw is None:
            raise UnknownDatasetError(
                dataset=dataset, namespace=namespace, known=catalog.names(namespace)
            )
        return DatasetSpec.model_validate(raw)

    async def _pin(
        self, catalog: Catalog, namespace: str, mount: MountRequest
    ) -> tuple[PinRecord, str]:
        """The pin of one dataset, with its part, and where the part was said."""
        spec = self._spec(catalog, namespace, mount.dataset)
        resolved = await self.resolver.resolve_in(
            namespace, dataset=mount.dataset, spec=spec, revision=mount.revision
        )
        part, source = resolved.part, resolved.part_source
        if not mount.part.whole:
            if not resolved.part.whole:
                raise _part_twice(mount, resolved)
            part, source = mount.part, mount.part_key
        record = PinRecord(
            dataset=mount.dataset,
            pin=resolved.pin,
            ref=mount.revision,
            layout=resolved.layout,
            commit=resolved.commit,
            part=part,
        )
        return record, source

    async def _check_secret(self, namespace: str, spec: DatasetSpec) -> RemoteKeys:
        ref = spec.remote.credentials_secret_ref
        return keys_from_secret(
            await self.secrets(namespace, ref.name), ref=ref, namespace=namespace
        )

    async def _check_part(
        self, namespace: str, mount: DatasetMount, keys: RemoteKeys, *, source: str
    ) -> None:
        """Refuse folders the pin does not hold (read from its `.dir`, once per pin)."""
        pin = mount.pin
        if pin.part.whole or self.parts is None:
            return
        secret = mount.spec.remote.credentials_secret_ref.name
        try:
            await self.parts.check(
                remote=mount.spec.remote,
                keys=keys,
                pin=pin.pin,
                layout=mount.layout,
                part=pin.part,
                where=f"Secret {namespace}/{secret}",
                wait=self.settings.part_index_wait_seconds,
            )
        except PathNotInRevisionError as exc:
            raise PartNotFoundError(
                f"{source} asks for folders {pin.part.label}, but {exc}",
                dataset=pin.dataset,
                revision=pin.ref,
            ) from None
        except RemoteCheckError as exc:
            raise RemoteCheckError(
                f"Dataset {pin.dataset!r} revision {pin.ref!r}: the folders {pin.part.label} "
                f"({source}) cannot be checked against {pin.pin}: {exc.message}",
                reason=exc.reason,
            ) from None


def part_index(settings: Settings) -> PartIndex:
    """The folder-index cache `settings` describe (the app builds one and shares it)."""
    mib = 1024 * 1024
    return PartIndex(
        scratch=settings.part_index_dir,
        max_bytes=settings.part_index_cache_mib * mib,
        max_dir_bytes=settings.part_index_max_dir_mib * mib,
        request_timeout=settings.remote_timeout_seconds,
    )


def _part_twice(mount: MountRequest, resolved: Resolved) -> PartNotFoundError:
    """Folders asked of a revision that already stands for folders: refused, not guessed."""
    fix = (
        f"remove {mount.part_key} to get {resolved.part.label}, or name the pin "
        f"{resolved.pin} in datapin.dev/revision and keep {mount.part_key}"
    )
    if resolved.part_source == "spec.source.path":
        fix += (
            "; to let Jobs choose folders of a git revision, point the Dataset's "
            "spec.source.path at the whole out (e.g. data.dvc)"
        )
    return PartNotFoundError(
        f"{mount.part_key} asks for folders {mount.part.label}, but the revision already "
        f"stands for folders {resolved.part.label} ({resolved.part_source}); a revision's "
        f"folders are said in one place. Fix: {fix}",
        dataset=mount.dataset,
        revision=mount.revision,
    )


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a workload, or the Pod itself."""
    spec = obj.get("spec") or {}
    template = spec.get("template") if obj.get("kind") != "Pod" else None
    if isinstance(template, dict):
        template.setdefault("metadata", {})
        return template
    return obj
