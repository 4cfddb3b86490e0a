"""The HTTP face of the sidecar and the agent: `/readyz`, `/healthz`, `/metrics`, `/status`.

* `/readyz` is the native sidecar's startupProbe: 200 only once every dataset of the pod is
  published (its app containers start after it), 503 with the reason before that. It stays
  200 while a new revision is being built, because the old one is still served.
* `/healthz` is liveness: 200 while the program's loop answers and its work is not wedged;
  the program's `Health.alive` says so.
* `/metrics` is the Prometheus exposition of the injected registry (no global registry).
* `/status` is JSON of what is served and what is pending, for humans and tests.

aiohttp's server is already in the image (the S3 client uses aiohttp), so this costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(slots=True)
class Health:
    """What the probes answer; the program updates it as it goes."""

    ready: bool = False
    #: Why not ready (shown in the 503 body, and so in `kubectl describe pod` probe events).
    waiting_for: str = "starting"
    alive: Callable[[], bool] = lambda: True
    status: Callable[[], dict[str, object]] = field(default=dict)


def make_app(registry: CollectorRegistry, health: Health) -> web.Application:
    """The app factory: the registry and the health state are injected."""

    async def readyz(_: web.Request) -> web.Response:
        if health.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {health.waiting_for}\n")

    async def healthz(_: web.Request) -> web.Response:
        if health.alive():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="unhealthy\n")

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(health.status(), sort_keys=True, indent=1) + "\n",
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


async def serve(app: web.Application, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app`; returns the runner (to clean up) and the bound port (0 picks one)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
