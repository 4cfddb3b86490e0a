"""The answering end of the peer protocol (`protocol`): an agent serving its node cache.

An aiohttp application on the agent's peer port, HTTPS with client certificates required
(`tls`), so only agents reach it. It serves objects from the node cache, hands out leases
(`leases`) for objects nobody is fetching, and takes leased objects back, verified into the
cache (`transfer`). Everything a request names is validated (`protocol.parse_object`) before a
path is built from it; a body is bounded by its announced size; no request can make the agent
read or write outside `cache.path(oid, layout)` and its download slot.

Events for metrics go to `events` (`events.PeerEvents`, the node program's metrics), so this
module owns no metrics of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.peers import protocol
from datapin_sidecar.peers.events import Direction, PeerEvents
from datapin_sidecar.peers.leases import Claim, Leases
from datapin_sidecar.peers.transfer import (
    SMALL,
    Committer,
    TransferError,
    check_size,
    claim,
    receive,
)

log = logging.getLogger(__name__)

_CHUNK: Final = 256 * 1024
#: A claims body: 1,024 names of 36 characters, quoted, with room to spare.
_MAX_CLAIMS_BODY: Final = 128 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Home:
    """What the server needs: the cache it serves, the lease table, the committer."""

    cache: NodeCache
    leases: Leases
    committer: Committer
    events: PeerEvents


def build_app(home: Home) -> web.Application:
    app = web.Application(client_max_size=_MAX_CLAIMS_BODY)
    handlers = _Handlers(home)
    app.router.add_post(protocol.CLAIMS, handlers.claims)
    app.router.add_post(protocol.BUNDLE, handlers.bundle)
    path = protocol.OBJECTS + "/{layout}/{oid}"
    app.router.add_get(path, handlers.get)
    app.router.add_put(path, handlers.put)
    app.router.add_delete(path, handlers.delete)
    return app


def _bad(detail: str) -> web.Response:
    return web.Response(status=400, text=detail + "\n")


class _Handlers:
    def __init__(self, home: Home) -> None:
        self.home = home

    def _object(self, request: web.Request) -> tuple[Layout, str]:
        return protocol.parse_object(request.match_info["layout"], request.match_info["oid"])

    async def claims(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
            layout, oids = _parse_oids(body, limit=protocol.MAX_CLAIMS)
        except (ValueError, TypeError, KeyError, web.HTTPRequestEntityTooLarge) as exc:
            return _bad(f"bad claims request: {exc}")
        cache = self.home.cache
        present = await asyncio.to_thread(_present, cache, oids, layout)
        have: list[str] = []
        leases: dict[str, str] = {}
        busy: list[str] = []
        holder = request.remote or "peer"
        for oid, here in zip(oids, present, strict=True):
            if here:
                have.append(oid)
                continue
            got, lease = self.home.leases.take((layout, oid), holder=holder)
            if got is Claim.GRANTED:
                leases[oid] = lease.token
            else:
                busy.append(oid)
        return web.json_response({"have": have, "leases": leases, "busy": busy})

    async def bundle(self, request: web.Request) -> web.StreamResponse:
        try:
            body: Any = await request.json()
            layout, oids = _parse_oids(body, limit=protocol.MAX_BUNDLE)
            wait = protocol.parse_wait(str(body.get("wait", 0)))
        except (ValueError, TypeError, KeyError, web.HTTPRequestEntityTooLarge) as exc:
            return _bad(f"bad bundle request: {exc}")
        if wait > 0:  # the objects still being fetched: wait for their leases, all at once
            leases = [self.home.leases.current((layout, oid)) for oid in oids]
            live = [lease for lease in leases if lease is not None]
            if live:
                await asyncio.gather(*(self.home.leases.wait(lease, wait) for lease in live))
        found = await asyncio.to_thread(_read_small_many, self.home.cache, oids, layout)
        head = json.dumps({"objects": [[oid, len(data)] for oid, data in found]}).encode() + b"\n"
        # Object by object, not one joined buffer: asyncio's TLS transport copies what it has
        # left to encrypt after every 16 KiB record, so one 16 MiB write costs seconds.
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(head) + sum(len(data) for _, data in found)
        await resp.prepare(request)
        await resp.write(head)
        for _, data in found:
            await resp.write(data)
            self.home.events.moved(Direction.SERVED, len(data))
        await resp.write_eof()
        return resp

    async def get(self, request: web.Request) -> web.StreamResponse:
        try:
            layout, oid = self._object(request)
            wait = protocol.parse_wait(request.query.get("wait"))
        except ValueError as exc:
            return _bad(str(exc))
        cache = self.home.cache
        path = cache.path(oid, layout)
        if wait > 0 and not await asyncio.to_thread(os.path.isfile, path):
            lease = self.home.leases.current((layout, oid))
            if lease is not None:
                await self.home.leases.wait(lease, wait)
        return await self._send(request, path)

    async def _send(self, request: web.Request, path: str) -> web.StreamResponse:
        """The object at `path`: a small one read whole in one worker-thread call (a thread
        hop costs the loop more than the read), a large one streamed."""
        try:
            f, size, body = await asyncio.to_thread(_open_object, path)
        except FileNotFoundError:
            return web.Response(status=404)
        if body is not None:
            self.home.events.moved(Direction.SERVED, size)
            return web.Response(body=body, content_type="application/octet-stream")
        try:
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = size
            await resp.prepare(request)
            while chunk := await asyncio.to_thread(f.read, _CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
        finally:
            await asyncio.to_thread(f.close)
        self.home.events.moved(Direction.SERVED, size)
        return resp

    async def put(self, request: web.Request) -> web.Response:
        try:
            layout, oid = self._object(request)
            token = protocol.parse_token(request.headers.get(protocol.LEASE_HEADER))
            size = check_size(oid, request.content_length)
        except (ValueError, TransferError) as exc:
            return _bad(str(exc))
        key = (layout, oid)
        leases = self.home.leases
        if not leases.holds(key, token):
            return web.Response(
                status=409, text="no such lease (expired, or this home restarted)\n"
            )
        slot = await claim(self.home.cache, oid, layout)
        if slot is None:  # in place already, or a process on this node is downloading it
            delivered = await asyncio.to_thread(self.home.cache.present, oid, layout)
            leases.finish(key, token, delivered=delivered)
            return web.Response(status=204 if delivered else 409)
        try:
            await receive(self.home.committer, slot, size, request.content.iter_chunked(_CHUNK))
        except TransferError as exc:
            leases.finish(key, token, delivered=False)
            self.home.events.error(exc.reason)
            log.warning("peer %s delivered %s: %s", request.remote, oid, exc)
            return web.Response(status=422, text=f"{exc}\n")
        except BaseException:
            leases.finish(key, token, delivered=False)
            if slot.fd >= 0:
                await asyncio.shield(asyncio.to_thread(slot.release))
            raise
        leases.finish(key, token, delivered=True)
        self.home.events.moved(Direction.STORED, size)
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        try:
            layout, oid = self._object(request)
            token = protocol.parse_token(request.headers.get(protocol.LEASE_HEADER))
        except ValueError as exc:
            return _bad(str(exc))
        ended = self.home.leases.finish((layout, oid), token, delivered=False)
        return web.Response(status=204 if ended else 409)


def _parse_oids(body: Any, *, limit: int) -> tuple[Layout, list[str]]:
    if not isinstance(body, dict) or not isinstance(body.get("oids"), list):
        raise ValueError('expected {"layout": ..., "oids": [...]}')
    oids = body["oids"]
    if len(oids) > limit:
        raise ValueError(f"at most {limit} objects per request")
    layout = str(body.get("layout"))
    parsed = [protocol.parse_object(layout, str(oid)) for oid in oids]
    return (parsed[0][0] if parsed else Layout(layout)), [oid for _, oid in parsed]


def _read_small_many(
    cache: NodeCache, oids: Sequence[str], layout: Layout
) -> list[tuple[str, bytes]]:
    """The small objects among `oids` that are in the cache, read whole, in order, up to
    `protocol.BUNDLE_BYTES` in all (one worker-thread call for a whole bundle)."""
    found: list[tuple[str, bytes]] = []
    total = 0
    for oid in oids:
        try:
            f, size, body = _open_object(cache.path(oid, layout))
        except (FileNotFoundError, OSError):
            continue
        if body is None:  # large: asked for on its own
            f.close()
            continue
        if total + size > protocol.BUNDLE_BYTES:
            break
        found.append((oid, body))
        total += size
    return found


def _present(cache: NodeCache, oids: Sequence[str], layout: Layout) -> list[bool]:
    return [os.path.isfile(cache.path(oid, layout)) for oid in oids]


def _open_object(path: str) -> tuple[Any, int, bytes | None]:
    """(open file, size, None) of an object, or (None, size, its bytes) when it is small;
    never through a symlink (objects are regular files we installed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(path)
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    if st.st_size > SMALL:
        return f, st.st_size, None
    with f:
        body = f.read()
    return None, len(body), body
