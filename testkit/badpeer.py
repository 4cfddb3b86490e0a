"""A peer agent that misbehaves: it holds the peer certificate (a compromised or buggy agent),
says it has every object, and then serves bytes that are not the object (`corrupt`) or dies in
the middle of a body (`cut`: headers and half the bytes, then the connection is closed).

It runs the real protocol's routes on a real aiohttp server with mutual TLS, in a thread with
its own loop, so the agent under test reaches it exactly as it reaches a real peer. It counts
the objects it answered for (one per GET, each object of a bundle), so a test knows the bad
peer was actually asked.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from datapin_sidecar.peers import protocol


class BadPeer:
    def __init__(self, host: str, port: int, tls_dir: Path, *, mode: str) -> None:
        if mode not in ("corrupt", "cut"):
            raise ValueError(f"mode must be corrupt or cut, not {mode!r}")
        self.host, self.port, self.mode = host, port, mode
        self.context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=tls_dir / "ca.crt"
        )
        self.context.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.gets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> BadPeer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post(protocol.CLAIMS, self._claims)
        app.router.add_get(protocol.OBJECTS + "/{layout}/{oid}", self._get)
        app.router.add_post(protocol.BUNDLE, self._bundle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context).start()

    async def _claims(self, request: web.Request) -> web.Response:
        body: Any = await request.json()
        return web.json_response({"have": body["oids"], "leases": {}, "busy": []})

    async def _bundle(self, request: web.Request) -> web.StreamResponse:
        oids = (await request.json())["oids"]
        self.gets += len(oids)
        size = 4096
        head = json.dumps({"objects": [[oid, size] for oid in oids]}).encode() + b"\n"
        resp = web.StreamResponse()
        resp.content_length = len(head) + size * len(oids)
        await resp.prepare(request)
        await resp.write(head)
        if self.mode == "corrupt":
            await resp.write(b"\0" * size * len(oids))
            await resp.write_eof()
            return resp
        await resp.write(b"\0" * (size // 2))
        assert request.transport is not None
        request.transport.close()
        return resp

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.gets += 1
        size = 4096
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        if self.mode == "corrupt":
            await resp.write(b"\0" * size)
            await resp.write_eof()
            return resp
        await resp.write(b"\0" * (size // 2))
        assert request.transport is not None
        request.transport.close()
        return resp
