"""The operator's parts, built once from `Settings`: `App` and its factory `build_app`.

`build_app` builds the API client, the metrics registry (one per app, injected into every part
that counts: no global metrics), the git source, the resolver, the folder-index cache of pins
(shared by the webhook and the controller), the fleet, the controller, the
admission and the webhook server; `handlers.py` registers kopf callbacks over an `App` and
`main.py` runs it. `App` lives here, apart from both, so that neither imports the other
(handlers need the type, main needs the handlers).

`DatasetResource` tracks whether the API server serves Datasets (their CRD is installed), for
the log and the /healthz body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry

from datapin_operator.api.models import GROUP, PLURAL, VERSION
from datapin_operator.kube import Kube
from datapin_operator.metrics import OperatorMetrics
from datapin_operator.reconcile.controller import Controller
from datapin_operator.reconcile.fleet import Fleet
from datapin_operator.resolve.gitsource import GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings
from datapin_operator.webhook.admission import Admission, part_index
from datapin_operator.webhook.certs import DevWebhookServer, ServiceWebhookServer
from datapin_operator.webhook.tls import CA, CERT, CURRENT, KEY, TLSKeeper

log = logging.getLogger("datapin_operator")


class DatasetResource:
    """Whether the API server serves Datasets (their CRD is installed), as last seen.

    kopf (scanning on) starts serving the resource by itself when the CRD appears; this is
    the operator saying so: one warning with the fix while the CRD is missing, one line when
    it appears, and the state in the /healthz body (`datasets`). Liveness stays green: a
    restart would not install the CRD.
    """

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.served: bool | None = None  # None: not checked yet

    def describe(self) -> str:
        if self.served is None:
            return "unknown"
        return "served" if self.served else f"missing: {MISSING_CRD}"

    async def check(self) -> bool:
        served = await self.kube.serves(GROUP, VERSION, PLURAL)
        if not served and self.served is not False:
            log.warning("%s", MISSING_CRD)
        elif served and self.served is False:
            log.info("the Dataset CRD is installed now: serving Datasets")
        self.served = served
        return served

    async def run(self, *, interval: float, stop: asyncio.Event) -> None:
        """Check until the CRD is served (or `stop`); a failed check is retried."""
        while not stop.is_set():
            try:
                if await self.check():
                    return
            except Exception as exc:  # the API server away, or no answer: try again
                log.info("could not ask the API server for the Dataset resource: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


#: Logged (once) while the API server does not serve Datasets.
MISSING_CRD: Final = (
    f"the API server does not serve {PLURAL}.{GROUP}/{VERSION}: the Dataset CRD is not "
    "installed, so no Dataset is reconciled and Jobs naming one are refused. Fix: install it "
    "(`datapin-operator crd | kubectl apply -f -`, or helm install/upgrade the datapin chart); "
    "the operator serves it as soon as it exists, no restart needed"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class App:
    """Everything the handlers use, built once."""

    settings: Settings
    kube: Kube
    #: Every family of `OperatorMetrics`, served at /metrics (`metrics_port`).
    registry: CollectorRegistry
    controller: Controller
    admission: Admission
    tls: TLSKeeper | None  # the shared self-signed certificate (cluster mode, no cert files)
    webhook_server: Any  # a kopf webhook server, or None when the webhook is off
    datasets: DatasetResource


def build_app(settings: Settings, *, kube: Kube | None = None) -> App:
    """The app factory (tests call it with settings of their own)."""
    kube = kube or Kube.from_settings(settings)
    git = GitSource(
        cache_dir=settings.git_cache_dir,
        timeout=settings.git_timeout_seconds,
        ref_ttl=settings.git_ref_ttl_seconds,
        allow_protocols=tuple(settings.git_allow_protocols),
    )
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    resolver = Resolver(git, secrets=kube.get_secret, metrics=metrics)
    fleet = Fleet(kube, settings, metrics=metrics)
    # One folder-index cache: the controller's checks of named and prefetch folders warm
    # the webhook's answers for Jobs naming them.
    parts = part_index(settings)
    return App(
        settings=settings,
        kube=kube,
        registry=registry,
        controller=Controller(
            settings=settings,
            kube=kube,
            resolver=resolver,
            fleet=fleet,
            metrics=metrics,
            parts=parts,
        ),
        admission=Admission(
            settings=settings,
            secrets=kube.get_secret,
            datasets=kube.list_datasets,
            resolver=resolver,
            metrics=metrics,
            parts=parts,
        ),
        tls=tls_keeper(settings, kube),
        webhook_server=webhook_server(settings),
        datasets=DatasetResource(kube),
    )


def tls_keeper(settings: Settings, kube: Kube) -> TLSKeeper | None:
    """The certificate Secret's keeper: cluster mode without certificate files."""
    if settings.webhook_mode != "cluster" or settings.webhook_cert_file is not None:
        return None
    return TLSKeeper(
        kube=kube,
        namespace=settings.namespace,
        secret=settings.webhook_tls_secret,
        service=settings.webhook_service,
        configuration=settings.webhook_configuration,
        directory=settings.webhook_cert_dir,
        days=settings.webhook_cert_days,
        renew_days=settings.webhook_renew_days,
    )


def webhook_server(settings: Settings) -> Any:
    if settings.webhook_mode == "off":
        return None
    if settings.webhook_mode == "dev":
        return DevWebhookServer(
            addr=settings.webhook_host,
            port=settings.webhook_port or None,
            host=settings.webhook_host,
        )
    if settings.webhook_cert_file is not None:  # e.g. cert-manager's, mounted from a Secret
        files = (settings.webhook_cert_file, settings.webhook_key_file, settings.webhook_ca_file)
    else:  # the shared self-signed certificate TLSKeeper publishes
        current = settings.webhook_cert_dir / CURRENT
        files = (current / CERT, current / KEY, current / CA)
    certfile, pkeyfile, cafile = files
    server = ServiceWebhookServer(
        service=settings.webhook_service,
        namespace=settings.namespace,
        port=settings.webhook_port,
        certfile=certfile,
        pkeyfile=pkeyfile,
        cafile=cafile,
    )
    # kopf restarts its server when the files change: a renewal is served within this.
    server.file_check_interval = min(settings.webhook_tls_check_seconds, 60.0)
    return server
