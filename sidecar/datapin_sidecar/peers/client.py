"""The asking end of the peer protocol (`protocol`): one aiohttp session, mutual TLS.

Every failure a peer can cause (refused connection, TLS, timeout, a 5xx, a body that is not
the object, a malformed answer) is a `PeerError` with a short `reason` (a metric label); the
caller falls back to the remote for the objects concerned. Deadlines: connecting 5 s; between
bytes `read_timeout`, plus the `wait` the home was asked to hold a GET for; a whole body at
least `min_rate` bytes per second after its headers, so a trickling peer costs bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.peers import protocol
from datapin_sidecar.peers.rendezvous import Member
from datapin_sidecar.peers.transfer import SMALL, Committer, TransferError, check_size, receive

_CHUNK: Final = 256 * 1024

log = logging.getLogger(__name__)


class PeerError(Exception):
    """A peer could not help; `reason` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """A home's answer to a claims request."""

    have: tuple[str, ...] = ()
    leases: dict[str, str] | None = None
    busy: tuple[str, ...] = ()


class PeerClient:
    """Use as `async with PeerClient(...) as client:`."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        connections: int = 64,
        read_timeout: float = 30.0,
        min_rate: float = 1024 * 1024,
    ) -> None:
        self._ssl = ssl_context
        self._connections = connections
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerClient:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl, limit=self._connections, limit_per_host=self._connections
        )
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    def _url(self, member: Member, path: str) -> str:
        return f"https://{member}{path}"

    def _timeout(self, wait: float = 0.0) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(sock_connect=5, sock_read=self.read_timeout + wait)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("PeerClient used outside `async with`")
        return self._session

    async def claims(self, member: Member, layout: Layout, oids: Sequence[str]) -> Claims:
        """Ask `member` (their home) about `oids` (at most `protocol.MAX_CLAIMS`)."""
        body = {"layout": layout.value, "oids": list(oids)}
        asked = set(oids)
        with _errors(member):
            async with self.session.post(
                self._url(member, protocol.CLAIMS), json=body, timeout=self._timeout()
            ) as resp:
                if resp.status != 200:
                    raise PeerError(_status_reason(resp.status), f"{member} answered {resp.status}")
                try:
                    answer: Any = await resp.json()
                    have = tuple(str(o) for o in answer["have"])
                    leases = {str(o): str(t) for o, t in answer["leases"].items()}
                    busy = tuple(str(o) for o in answer["busy"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise PeerError(
                        "protocol", f"{member} sent a malformed claims answer"
                    ) from None
        if not ({*have, *leases, *busy} <= asked):
            raise PeerError("protocol", f"{member} answered about objects nobody asked for")
        return Claims(have=have, leases=leases, busy=busy)

    async def bundle(
        self,
        member: Member,
        layout: Layout,
        slots: Mapping[str, Slot],
        committer: Committer,
        *,
        wait: float = 0.0,
    ) -> tuple[dict[str, int], list[str], PeerError | None]:
        """The small objects of `slots` that `member` sends in one bundle, into the cache:
        (oid -> size received, oids whose bytes were not the object, why the bundle failed).
        A received object's slot is installed, a corrupt one's discarded, the others' left
        claimed for the caller; objects committed before a failure count as received."""
        body = {"layout": layout.value, "oids": list(slots), "wait": wait}
        got: dict[str, int] = {}
        corrupt: list[str] = []
        commits: list[tuple[str, int, asyncio.Task[bool]]] = []
        failure: PeerError | None = None
        try:
            with _errors(member):
                async with self.session.post(
                    self._url(member, protocol.BUNDLE), json=body, timeout=self._timeout(wait)
                ) as resp:
                    if resp.status != 200:
                        raise PeerError(
                            _status_reason(resp.status), f"{member} answered {resp.status}"
                        )
                    line = await resp.content.readline()
                    if not line.endswith(b"\n") or len(line) > protocol.MAX_BUNDLE_HEAD:
                        raise PeerError("protocol", f"{member} sent a bundle without its head")
                    try:
                        entries = protocol.parse_bundle_head(line, set(slots))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise PeerError("protocol", f"{member}: {exc}") from None
                    total = sum(n for _, n in entries)
                    if resp.content_length not in (None, len(line) + total):
                        raise PeerError("protocol", f"{member}: a bundle of the wrong length")
                    async with asyncio.timeout(self.read_timeout + total / self.min_rate):
                        for oid, size in entries:
                            try:
                                data = await resp.content.readexactly(size)
                            except asyncio.IncompleteReadError:
                                raise PeerError("truncated", f"{member} cut a bundle") from None
                            task = asyncio.create_task(committer.commit(slots[oid], data))
                            commits.append((oid, size, task))
        except PeerError as exc:
            failure = exc
        finally:
            for oid, size, task in commits:  # each committed batch installs or discards its slot
                try:
                    ok = await asyncio.shield(task)
                except Exception as exc:  # its batch failed (a full volume): the remote's turn
                    log.info("peer fetch: %s from %s not committed: %s", oid, member, exc)
                    continue
                if ok:
                    got[oid] = size
                else:
                    corrupt.append(oid)
        return got, corrupt, failure

    async def get(
        self, member: Member, slot: Slot, committer: Committer, *, wait: float = 0.0
    ) -> int | None:
        """The object of `slot` from `member` into the cache: its size, or None when the home
        does not have it (404; the slot is kept). PeerError on anything else; the slot is then
        discarded."""
        url = self._url(member, protocol.object_path(slot.layout, slot.oid))
        with _errors(member):
            async with self.session.get(
                url, params={"wait": f"{wait:g}"}, timeout=self._timeout(wait)
            ) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise PeerError(_status_reason(resp.status), f"{member} answered {resp.status}")
                size = check_size(slot.oid, resp.content_length)
                async with asyncio.timeout(self.read_timeout + size / self.min_rate):
                    await receive(committer, slot, size, resp.content.iter_chunked(_CHUNK))
                return size

    async def put(
        self, member: Member, cache: NodeCache, oid: str, layout: Layout, token: str
    ) -> int:
        """Deliver a leased object (in our cache) to its home; the bytes sent. A small one is
        read in one worker-thread call, a large one streamed from the file."""
        path = cache.path(oid, layout)
        with _errors(member):
            f, size, body = await asyncio.to_thread(_open_to_send, path)
            try:
                headers = {protocol.LEASE_HEADER: token, "Content-Length": str(size)}
                async with (
                    asyncio.timeout(self.read_timeout + size / self.min_rate),
                    self.session.put(
                        self._url(member, protocol.object_path(layout, oid)),
                        data=body if body is not None else f,
                        headers=headers,
                        timeout=self._timeout(),
                    ) as resp,
                ):
                    if resp.status != 204:
                        raise PeerError(
                            _status_reason(resp.status), f"{member} answered {resp.status}"
                        )
            finally:
                if f is not None:
                    await asyncio.to_thread(f.close)
        return size

    async def release(self, member: Member, oid: str, layout: Layout, token: str) -> None:
        """Give a lease back (we could not fetch the object)."""
        with _errors(member):
            async with self.session.delete(
                self._url(member, protocol.object_path(layout, oid)),
                headers={protocol.LEASE_HEADER: token},
                timeout=self._timeout(),
            ):
                pass


@contextlib.contextmanager
def _errors(member: Member) -> Iterator[None]:
    """Whatever a peer exchange raises, as a `PeerError` (cancellation passes)."""
    try:
        yield
    except PeerError:
        raise
    except TransferError as exc:
        raise PeerError(exc.reason, f"{member}: {exc}") from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise PeerError("timeout", f"{member} timed out") from None
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise PeerError("tls", f"{member}: TLS failed ({type(exc).__name__})") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise PeerError("connection", f"{member}: {type(exc).__name__}: {exc}") from None


def _open_to_send(path: str) -> tuple[Any, int, bytes | None]:
    """(open file, size, None), or (None, size, the bytes) for a small object."""
    f = open(path, "rb")  # noqa: SIM115 - returned open for streaming, closed by the caller
    try:
        size = os.fstat(f.fileno()).st_size
        if size > SMALL:
            return f, size, None
        body = f.read()
    except BaseException:
        f.close()
        raise
    f.close()
    return None, len(body), body


def _status_reason(status: int) -> str:
    return "http_5xx" if status >= 500 else "http_4xx"
