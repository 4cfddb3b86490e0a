"""The kopf handlers: thin adapters from kopf's callbacks to the builders.

`build_registry(app)` registers everything on a fresh `kopf.OperatorRegistry` (no module-level
decorators, so tests run as many operators as they like, each with its own settings):

* `datasets` index: (namespace, name) -> spec of every Dataset, which the controller uses for
  the agents' prefetch lists (kopf fills indexes before it calls handlers). The webhook does
  not: it lists the namespace's Datasets itself, because with kopf peering the standby
  replicas' watches are paused and their index goes stale, while they still serve webhooks.
* Dataset reconcile on resume/create/spec update and every `resync_seconds`
  (`Controller.reconcile` -> status patch + an Event per condition change); a DELETED event
  drops the Dataset from the agents' prefetch lists. A short timer lets the controller
  refresh a prefetch that is not warm yet (`Controller.progress`) between resyncs.
* kopf's scanning is on: it watches CRDs, so a Dataset CRD installed after the operator
  started is served without a restart (app.py logs why nothing is served until then).
* Mutating webhooks for Job and Pod CREATE (`Admission.admit` -> the whole new object; kopf
  diffs it into the JSONPatch). Rejections are `kopf.AdmissionError`s with our message, and
  a Warning Event on the Dataset (when it exists) and on the Job.
* Job ADDED events: a Normal `Injected` Event on each Job that carries pins and the sidecar.

kopf's own progress is kept in annotations under `datapin.dev` (not in status, whose schema
is ours), and of kopf's own log lines only warnings and errors become Events: every other
Event is posted on purpose.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final

import kopf

from datapin_operator.api.models import GROUP, PLURAL, VERSION
from datapin_operator.errors import OperatorError, UnknownDatasetError
from datapin_operator.webhook.inject import is_injected
from datapin_operator.webhook.requests import read_pins

if TYPE_CHECKING:
    from datapin_operator.app import App
    from datapin_operator.reconcile.controller import Outcome

log = logging.getLogger(__name__)


def build_registry(app: App) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    settings = app.settings

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return app.kube.connection_info()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Scanning on: kopf watches CRDs and starts serving Datasets when their CRD appears
        # after we started (a CRD applied by hand, or a chart installed out of order).
        settings.scanning.disabled = False
        logging.getLogger("kopf.objects").addFilter(_QUIET_PROGRESS)  # idempotent
        # Our Events are posted explicitly (`kopf.event`); of kopf's own log lines only
        # warnings and errors (a handler failing) become Events, not "Handler succeeded".
        settings.posting.level = logging.WARNING
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="kopf.datapin.dev"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kopf.datapin.dev"
        )
        settings.persistence.finalizer = "datapin.dev/kopf-finalizer"
        if app.webhook_server is not None:
            settings.admission.server = app.webhook_server
            # In a cluster the chart owns the configuration (helm uninstall removes it, and a
            # stopping replica must not strip the webhooks the others still serve); from a
            # laptop (dev) kopf keeps one pointing at this process and removes it on exit.
            if app.settings.webhook_mode == "dev":
                settings.admission.managed = app.settings.webhook_configuration

    @kopf.on.probe(id="datasets", registry=registry)
    def served(**_: Any) -> str:
        return app.datasets.describe()

    @kopf.index(GROUP, VERSION, PLURAL, id="datasets", registry=registry)
    def datasets(*, namespace: str | None, name: str, spec: Mapping[str, Any], **_: Any) -> Any:
        return {(namespace, name): dict(spec)}

    async def reconcile(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        _write(body, patch, await app.controller.reconcile(body, known=list(_index(kwargs))))

    # While a prefetch is not warm, the controller re-reads the agents' reports on its own
    # (backing-off) schedule; this timer only asks it often enough, and is a no-op otherwise.
    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        id="prefetch-progress",
        interval=min(settings.prefetch_poll_seconds, 5.0),
        initial_delay=min(settings.prefetch_poll_seconds, 5.0),
        registry=registry,
    )
    async def progress(*, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        outcome = await app.controller.progress(body)
        if outcome is not None:
            _write(body, patch, outcome)

    # A failed reconcile (the API server briefly away) is retried at the resync pace, not
    # kopf's default minute.
    backoff = min(settings.resync_seconds, 10.0)
    for decorator in (
        kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", backoff=backoff, registry=registry),
        kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", backoff=backoff, registry=registry),
        kopf.on.update(
            GROUP, VERSION, PLURAL, id="reconcile", field="spec", backoff=backoff, registry=registry
        ),
        kopf.timer(
            GROUP,
            VERSION,
            PLURAL,
            id="resync",
            interval=settings.resync_seconds,
            initial_delay=settings.resync_seconds,
            backoff=backoff,
            registry=registry,
        ),
    ):
        decorator(reconcile)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def deleted(
        *,
        event: Mapping[str, Any],
        namespace: str | None,
        name: str,
        **kwargs: Any,
    ) -> None:
        datasets = _index(kwargs)
        if event.get("type") == "DELETED" and namespace is not None:
            await app.controller.forget(
                (namespace, name), known=[k for k in datasets if k != (namespace, name)]
            )

    if settings.webhook_mode != "off":
        _register_webhooks(app, registry)

    @kopf.on.event("batch", "v1", "jobs", registry=registry)
    def injected(*, event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
        if event.get("type") != "ADDED":
            return  # the initial listing and later changes: already told, or not news
        template = (body.get("spec") or {}).get("template") or {}
        if not is_injected(template):
            return
        try:
            pins = read_pins(body.metadata.annotations) or {}
        except OperatorError:
            return
        shown = ", ".join(
            f"{p.dataset}={p.ref} ({p.pin})"
            + (f" folders {p.part.label}" if not p.part.whole else "")
            for p in pins.values()
        )
        kopf.event(body, type="Normal", reason="Injected", message=f"datapin pinned {shown}")

    return registry


class _QuietProgress(logging.Filter):
    """Drops kopf's "Timer 'prefetch-progress' succeeded." line: the timer fires every few
    seconds for every Dataset and almost always does nothing, so the line would be most of
    the operator's log. Its failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("'prefetch-progress' succeeded.")


_QUIET_PROGRESS: Final = _QuietProgress()


def _write(body: kopf.Body, patch: kopf.Patch, outcome: Outcome) -> None:
    """Patch the status keys that changed, and post an Event per condition change."""
    old = dict(body.get("status") or {})
    for key in old:
        if key not in outcome.status:
            patch.status[key] = None  # e.g. prefetch removed from the spec
    for key, value in outcome.status.items():
        if old.get(key) != value:
            patch.status[key] = value
    for t in outcome.transitions:
        kopf.event(
            body,
            type="Warning" if t.warning else "Normal",
            reason=t.reason,
            message=f"{t.type} is {t.status}: {t.message}",
        )


def _register_webhooks(app: App, registry: kopf.OperatorRegistry) -> None:
    async def mutate(
        *,
        body: kopf.Body,
        patch: kopf.Patch,
        dryrun: bool,
        **_: Any,
    ) -> None:
        namespace = body.metadata.namespace or "default"
        try:
            admitted = await app.admission.admit(body, namespace=namespace)
        except OperatorError as exc:
            if not dryrun:
                _reject_events(app, body, namespace, exc)
            raise kopf.AdmissionError(exc.message, code=400) from None
        if admitted is None:
            return
        new = admitted.obj

        def become(obj: Any) -> None:
            obj.clear()
            obj.update(json.loads(json.dumps(new)))

        patch.fns.append(become)

    kopf.on.mutate("batch", "v1", "jobs", id="jobs", operations=["CREATE"], registry=registry)(
        mutate
    )
    kopf.on.mutate(
        "",
        "v1",
        "pods",
        id="pods",
        operations=["CREATE"],
        ignore_failures=app.settings.pod_failure_policy == "Ignore",
        registry=registry,
    )(mutate)


def _reject_events(app: App, body: kopf.Body, namespace: str, exc: OperatorError) -> None:
    """Warning Events on the Dataset (if it exists) and on the Job, posted in the background
    so the answer to the API server does not wait for them."""
    kind = body.get("kind") or "object"
    meta = body.get("metadata") or {}
    who = meta.get("name") or f"{meta.get('generateName') or ''}*"
    posts = []
    dataset = getattr(exc, "dataset", None)
    if dataset and not isinstance(exc, UnknownDatasetError):
        ref = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Dataset",
            "metadata": {"name": dataset, "namespace": namespace},
        }
        message = f"{kind} {namespace}/{who} rejected: {exc.message}"
        posts.append(
            app.kube.post_event(ref, type_="Warning", reason="AdmissionRejected", message=message)
        )
    if meta.get("name") and kind == "Job":
        job = {**dict(body), "metadata": {**meta, "namespace": namespace}}
        posts.append(
            app.kube.post_event(job, type_="Warning", reason="InjectionFailed", message=exc.message)
        )
    for post in posts:
        task = asyncio.create_task(_logged(post))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)


#: Event posts in flight (a task with no reference may be collected before it runs).
_BACKGROUND: set[asyncio.Task[None]] = set()


async def _logged(post: Coroutine[Any, Any, None]) -> None:
    try:
        await post
    except Exception as exc:  # an Event is best effort; the answer went out already
        log.warning("could not post an Event: %s", exc)


def _index(kwargs: Mapping[str, Any]) -> kopf.Index[Any, Any]:
    """The `datasets` index kopf passes by name (not part of its callback protocols)."""
    index: kopf.Index[Any, Any] = kwargs["datasets"]
    return index
