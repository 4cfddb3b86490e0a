"""The HTTP face of the sidecar and the agent: `/readyz`, `/healthz`, `/metrics`, `/status`.

* `/readyz` is the native sidecar's startupProbe: 200 only once every dataset of the pod is
  published (its app containers start after it), 503 with the reason before that. It stays
  200 while a new revision is being built, because the old one is still served.
* `/healthz` is liveness: 200 while the program's loop answers and its work is not wedged;
  the program's `Health.alive` says so.
* `/metrics` is the Prometheus exposition of the injected registry (no global registry).
* `/status` is JSON of what is served and what is pending, for humans and tests.

The server is asyncio's own (`asyncio.start_server`), not aiohttp's: four GET routes from
kubelet's probes and a Prometheus scrape need no framework, and `import aiohttp.web` cost
~100-150 ms of the sidecar's start-up (it loads aiohttp's client too, which builds a verified
TLS context at import), on every pod start, even for a directory remote that never uses aiohttp.
On a warm node start-up is most of a pod's time to ready (bench/bench_startup.py).

What it speaks is the part of HTTP/1.1 those clients use: one request per connection
(`Connection: close` on every answer, which HTTP/1.1 clients honour), `GET` and `HEAD`, the
query string ignored, any request body ignored. A request head must arrive within
`REQUEST_TIMEOUT` seconds and fit in `MAX_REQUEST_HEAD` bytes, so a client that trickles or
floods cannot hold a connection's memory for long; anything unparseable gets 400, an unknown
path 404, another method 405. A handler that raises answers 500 and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: A probe's or a scrape's request head is a few hundred bytes; kubelet allows 10 KiB of headers.
MAX_REQUEST_HEAD: Final = 16 * 1024
#: Seconds a client has to send its request head (kubelet's probes time out after 1 s).
REQUEST_TIMEOUT: Final = 10.0
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(slots=True)
class Health:
    """What the probes answer; the program updates it as it goes."""

    ready: bool = False
    #: Why not ready (shown in the 503 body, and so in `kubectl describe pod` probe events).
    waiting_for: str = "starting"
    alive: Callable[[], bool] = lambda: True
    status: Callable[[], dict[str, object]] = field(default=dict)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT


def _text(text: str, status: int = 200) -> Response:
    return Response(status, text.encode())


@dataclass(frozen=True, slots=True)
class App:
    """The routes: path -> handler (called on the event loop, so it must not block)."""

    routes: Mapping[str, Callable[[], Response]]


def make_app(registry: CollectorRegistry, health: Health) -> App:
    """The app factory: the registry and the health state are injected."""

    def readyz() -> Response:
        if health.ready:
            return _text("ready\n")
        return _text(f"not ready: {health.waiting_for}\n", 503)

    def healthz() -> Response:
        if health.alive():
            return _text("ok\n")
        return _text("unhealthy\n", 503)

    def metrics() -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def status() -> Response:
        body = json.dumps(health.status(), sort_keys=True, indent=1) + "\n"
        return Response(200, body.encode(), "application/json; charset=utf-8")

    return App({"/readyz": readyz, "/healthz": healthz, "/metrics": metrics, "/status": status})


class Runner:
    """A listening server; `cleanup()` stops it (the name aiohttp's runner had)."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server

    async def cleanup(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def serve(app: App, *, host: str, port: int) -> tuple[Runner, int]:
    """Start `app`; returns the runner (to clean up) and the bound port (0 picks one)."""

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer(app, reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or never finished its request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await writer.wait_closed()

    server = await asyncio.start_server(
        connected, host, port, reuse_address=True, limit=MAX_REQUEST_HEAD
    )
    sockets = server.sockets
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return Runner(server), bound


async def _answer(app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head_only = False
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    except asyncio.IncompleteReadError:
        return  # closed before a whole request head
    except asyncio.LimitOverrunError:
        response = _text("request head too large\n", 431)
    else:
        method, _, rest = head.partition(b" ")
        target, _, version = rest.partition(b"\r\n")[0].partition(b" ")
        head_only = method == b"HEAD"
        handler = app.routes.get(target.partition(b"?")[0].decode("latin-1"))
        if not version.startswith(b"HTTP/1.") or not target.startswith(b"/"):
            response = _text("bad request\n", 400)
        elif handler is None:
            response = _text("not found\n", 404)
        elif method not in (b"GET", b"HEAD"):
            response = _text("method not allowed: GET or HEAD\n", 405)
        else:
            try:
                response = handler()
            except Exception:
                log.exception("answering %s failed (a bug: please report it)", target[:100])
                response = _text("internal error\n", 500)
    writer.write(_head(response))
    if not head_only:
        writer.write(response.body)
    await writer.drain()


def _head(response: Response) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
    ]
    if response.status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
