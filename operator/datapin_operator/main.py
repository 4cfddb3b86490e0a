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

`main()` reads the environment once into `Settings`, builds the `App` (`app.py`: API client,
git source, resolver, fleet, controller and admission), hands it to the kopf registry, and runs
kopf until SIGTERM/SIGINT. Exit codes: 0 stopped cleanly, 2 bad settings. `App` and
`build_app` live in `app.py` (and are re-exported here), so that `handlers.py` takes an `App`
without importing this module: no import cycle.
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
from typing import Any, Final

import kopf
import yaml
from datapin_sidecar.logs import configure_logging

from datapin_operator.api.crd import crd_yaml
from datapin_operator.api.rbac import build_rbac
from datapin_operator.app import App, build_app
from datapin_operator.errors import SettingsError
from datapin_operator.handlers import build_registry
from datapin_operator.metrics import serve as serve_metrics
from datapin_operator.settings import describe, load_settings

__all__ = ["App", "build_app", "main", "run"]

log = logging.getLogger("datapin_operator")

#: How often a missing Dataset CRD is looked for again (only to log its arrival).
_CRD_CHECK_SECONDS: Final = 5.0


async def run(app: App, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Run kopf with the app's handlers until `stop` is set.

    With `metrics_port` set, the app's registry is served at /metrics beside kopf. With a TLS
    keeper the certificate is made current first (the server loads its files when
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
        if settings.metrics_port:
            # On every interface in a cluster (Prometheus scrapes the pod's address); from a
            # laptop only where the webhook is served.
            cluster = settings.webhook_mode == "cluster"
            host = "0.0.0.0" if cluster else settings.webhook_host  # noqa: S104 - the pod's IPs
            tasks.create_task(
                serve_metrics(app.registry, host=host, port=settings.metrics_port, stop=stop)
            )
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
