"""A hostile S3 server: answers S3 GETs for a set of objects the way a broken or malicious
endpoint would, to prove the client bounds its time, memory and disk whatever comes back.

Why not the fault proxy: `FaultProxy` forwards to a real S3 server and can only cut or delay
what that server sends; the hostile answers here (a body that never ends, a Content-Length or a
Content-Range that lies) are ones no real server produces, so they are written by hand. It is a
real TCP server on 127.0.0.1 speaking HTTP/1.1 over asyncio streams, in a daemon thread, so the
client under test uses its real sockets (in this process or in a child process).

Objects are served path-style (`/<bucket>/<key>`), without checking signatures. Each key may be
given a :class:`Hostility`; every other key is answered honestly (ranges, 416 on an empty
object, 404 for an unknown key). Every loop is bounded: an endless body stops at `cap` bytes or
when the client goes away, a trickle at the end of the object. `sent` counts the body bytes the
server managed to hand over per key, which is how a test tells "read no further" from "read it
all".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["HostileS3", "Hostility"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_PIECE = 64 * 1024


class Hostility(enum.Enum):
    """What the server does to a key's GETs."""

    #: Correct headers, then the body one byte per `interval` seconds.
    TRICKLE = "trickle"
    #: A 206 with a correct Content-Range, then a chunked body that goes on past it (to `cap`).
    ENDLESS_CHUNKED = "endless_chunked"
    #: A 206 whose Content-Length is `length` (far more than the range), body to `cap`.
    LYING_LENGTH = "lying_length"
    #: A 200 (Range ignored) whose Content-Length is `length`, body to `cap`.
    LYING_WHOLE = "lying_whole"
    #: A 206 of the range asked for, but a Content-Range total of `total`; junk bytes.
    HUGE_TOTAL = "huge_total"


@dataclass
class _Rule:
    kind: Hostility
    times: int | None  # None: always
    params: dict[str, float] = field(default_factory=dict)


class HostileS3:
    """Serve `objects` (key -> bytes) of `bucket`; see the module doc. Use as a context."""

    def __init__(self, bucket: str, objects: dict[str, bytes]) -> None:
        self.bucket = bucket
        self.objects = dict(objects)
        self._rules: dict[str, _Rule] = {}
        self._lock = threading.Lock()
        #: Body bytes handed to the client, per key.
        self.sent: Counter[str] = Counter()
        #: GETs answered, per key.
        self.gets: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> HostileS3:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hostile(
        self, key: str, kind: Hostility, *, times: int | None = None, **params: float
    ) -> None:
        """Answer the next `times` GETs of `key` (None: all) with `kind`."""
        with self._lock:
            self._rules[key] = _Rule(kind, times, params)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _rule(self, key: str) -> _Rule | None:
        with self._lock:
            rule = self._rules.get(key)
            if rule is None or rule.times == 0:
                return None
            if rule.times is not None:
                rule.times -= 1
            return rule

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                path = urllib.parse.unquote(target.split("?", 1)[0])
                key = path.removeprefix(f"/{self.bucket}/")
                if not await self._answer(writer, key, headers.get("range")):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, key: str, range_: str | None) -> bool:
        """Answer one GET; whether the connection may serve another."""
        with self._lock:
            self.gets[key] += 1
        data = self.objects.get(key)
        if data is None:
            body = b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>"
            await self._send(writer, 404, {"Content-Length": str(len(body))}, body, key)
            return True
        start, end = 0, len(data) - 1
        match = _RANGE.fullmatch(range_ or "")
        if match:
            start = int(match.group(1))
            if match.group(2):
                end = min(end, int(match.group(2)))
        if start >= len(data):
            await self._send(writer, 416, {"Content-Length": "0"}, b"", key)
            return True
        part = data[start : end + 1]
        content_range = f"bytes {start}-{end}/{len(data)}"
        rule = self._rule(key)
        if rule is None:
            headers = {"Content-Length": str(len(part)), "Content-Range": content_range}
            await self._send(writer, 206, headers, part, key)
            return True
        cap = int(rule.params.get("cap", 64 * 1024 * 1024))
        if rule.kind is Hostility.TRICKLE:
            headers = {"Content-Length": str(len(part)), "Content-Range": content_range}
            await self._send(writer, 206, headers, b"", key)
            for i in range(len(part)):
                await asyncio.sleep(rule.params.get("interval", 1.0))
                await self._write(writer, part[i : i + 1], key)
            return True
        if rule.kind is Hostility.ENDLESS_CHUNKED:
            headers = {"Transfer-Encoding": "chunked", "Content-Range": content_range}
            await self._send(writer, 206, headers, b"", key)
            await self._stream(writer, part, cap, key, chunked=True)
            return False
        if rule.kind in (Hostility.LYING_LENGTH, Hostility.LYING_WHOLE):
            length = int(rule.params["length"])
            headers = {"Content-Length": str(length)}
            if rule.kind is Hostility.LYING_LENGTH:
                headers["Content-Range"] = content_range
            status = 206 if rule.kind is Hostility.LYING_LENGTH else 200
            await self._send(writer, status, headers, b"", key)
            await self._stream(writer, part, min(cap, length), key, chunked=False)
            return False
        # HUGE_TOTAL
        total = int(rule.params["total"])
        want = end - start + 1 if match and match.group(2) else total - start
        want = min(want, cap)
        headers = {
            "Content-Length": str(want),
            "Content-Range": f"bytes {start}-{start + want - 1}/{total}",
        }
        await self._send(writer, 206, headers, b"", key)
        await self._stream(writer, b"", want, key, chunked=False)
        return False

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
        body: bytes,
        key: str,
    ) -> None:
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n")
        await self._write(writer, body, key)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, key: str) -> None:
        writer.write(data)
        await writer.drain()
        with self._lock:
            self.sent[key] += len(data)

    async def _stream(
        self, writer: asyncio.StreamWriter, first: bytes, cap: int, key: str, *, chunked: bool
    ) -> None:
        """`first`, then junk, up to `cap` body bytes or until the client goes away."""
        junk = b"x" * _PIECE
        sent = 0
        piece = first or junk
        while sent < cap:
            piece = piece[: cap - sent]
            framed = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            writer.write(framed)
            try:
                await writer.drain()
            except ConnectionError:
                return
            if writer.is_closing():
                return
            sent += len(piece)
            with self._lock:
                self.sent[key] += len(piece)
            piece = junk
