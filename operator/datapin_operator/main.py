"""`datapin-operator`: the program the chart's Deployment runs, and its helpers.

    datapin-operator run        the operator: Dataset controller + mutating webhook
                                (DATAPIN_WEBHOOK_MODE=cluster behind the webhook Service)
    datapin-operator dev        the same from a laptop against any cluster: the webhook is
                                served on 127.0.0.1 with a self-signed certificate, and a
                                MutatingWebhookConfiguration pointing at that URL is kept
                                current (the cluster's API server must reach this address)
    datapin-operator crd        print the Dataset CRD (generated from the models)
    datapin-operator rbac       print the least-privilege RBAC manifests
    datapin-operator settings   print every DATAPIN_* setting with its default

`main()` is the app factory: it reads the environment once into `Settings`, builds the API
client, git source, resolver, fleet, controller and admission (`App`), hands them to the kopf
registry, and runs kopf until SIGTERM/SIGINT. Exit codes: 0 stopped cleanly, 2 bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import kopf
import yaml
from datapin_sidecar.logs import configure_logging

from datapin_operator.api.crd import crd_yaml
from datapin_operator.api.models import GROUP, PLURAL, VERSION
from datapin_operator.api.rbac import build_rbac
from datapin_operator.errors import SettingsError
from datapin_operator.handlers import build_registry
from datapin_operator.kube import Kube
from datapin_operator.reconcile.controller import Controller
from datapin_operator.reconcile.fleet import Fleet
from datapin_operator.resolve.gitsource import GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings, describe, load_settings
from datapin_operator.webhook.admission import Admission
from datapin_operator.webhook.certs import DevWebhookServer, ServiceWebhookServer
from datapin_operator.webhook.tls import CA, CERT, CURRENT, KEY, TLSKeeper

log = logging.getLogger("datapin_operator")

#: How often a missing Dataset CRD is looked for again (only to log its arrival).
_CRD_CHECK_SECONDS: Final = 5.0


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
    resolver = Resolver(git)
    fleet = Fleet(kube, settings)
    return App(
        settings=settings,
        kube=kube,
        controller=Controller(settings=settings, kube=kube, resolver=resolver, fleet=fleet),
        admission=Admission(
            settings=settings,
            secrets=kube.get_secret,
            datasets=kube.list_datasets,
            resolver=resolver,
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


async def run(app: App, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Run kopf with the app's handlers until `stop` is set.

    With a TLS keeper the certificate is made current first (the server loads its files when
    it starts), then kept current beside kopf. With `peering` set, the replicas elect one to
    reconcile through kopf peering: each takes a random priority, because replicas of equal
    priority would all pause each other; the webhook is served by every replica regardless.
    """
    registry = build_registry(app)
    settings = app.settings
    if app.tls is not None:
        await app.tls.ensure()
    health = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    async with asyncio.TaskGroup() as tasks:
        if app.tls is not None:
            tasks.create_task(app.tls.run(interval=settings.webhook_tls_check_seconds, stop=stop))
        tasks.create_task(app.datasets.run(interval=_CRD_CHECK_SECONDS, stop=stop))
        await kopf.operator(
            registry=registry,
            clusterwide=True,
            standalone=settings.peering is None,
            peering_name=settings.peering,
            priority=secrets.randbelow(2**31 - 1) + 1 if settings.peering else 0,
            liveness_endpoint=health,
            stop_flag=stop,
            ready_flag=ready,
        )
        stop.set()  # kopf may also end on its own (a fatal error): stop the keeper too


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datapin-operator",
        description="The datapin operator: Datasets, revision pins, sidecar injection.",
    )
    parser.add_argument(
        "command", choices=["run", "dev", "crd", "rbac", "settings"], help="what to do"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `datapin-operator` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "settings":
        sys.stdout.write(describe())
        return 0
    if args.command == "crd":
        sys.stdout.write(crd_yaml())
        return 0
    overrides: dict[str, Any] = {"webhook_mode": "dev"} if args.command == "dev" else {}
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"datapin-operator: {exc}", file=sys.stderr)
        return 2
    if args.command == "rbac":
        rbac = build_rbac(
            namespace=settings.namespace,
            webhook_configuration=settings.webhook_configuration,
            prefetch_configmap=settings.prefetch_configmap,
            agent_credentials_secret=settings.agent_credentials_secret,
            webhook_tls_secret=settings.webhook_tls_secret,
        )
        sys.stdout.write(yaml.safe_dump_all(rbac, sort_keys=False))
        return 0
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, static={"mode": "operator"}
    )
    app = build_app(settings)
    try:
        asyncio.run(_run_until_signalled(app))
    except KeyboardInterrupt:
        return 130
    finally:
        app.kube.close()
    return 0


async def _run_until_signalled(app: App) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "datapin operator starting (namespace %s, webhook %s)",
        app.settings.namespace,
        app.settings.webhook_mode,
    )
    await run(app, stop=stop)
