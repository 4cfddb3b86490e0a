"""A fault-injecting HTTP/1.1 reverse proxy, to put real S3 failure modes between a client and
SeaweedFS.

Why: the S3 fetcher must survive what Backblaze B2 and S3 actually do - 503 SlowDown with
``Retry-After``, connections reset or cut short mid-object, a flipped bit, latency, B2 rejecting
checksum headers - and prove it downloads every object exactly once and resumes rather than
restarts. SeaweedFS never does these on its own, and mocking the client's HTTP layer would not
exercise its real sockets. So the proxy is a real TCP server the client connects to, and it
forwards to a real S3 server.

Design:

- Hand-written HTTP/1.1 over asyncio streams rather than an HTTP framework, because faithfulness
  and control matter more than features here: the request head is forwarded *byte for byte*
  (method, target, every header in its order and case, ``Host`` included - the client signed its
  SigV4 over the Host it sent us, and SeaweedFS verifies against the Host it receives), and the
  faults need the raw socket (RST via ``SO_LINGER`` 0, a FIN after a short body).
- Each client connection gets its own upstream connection, opened lazily and reused while both
  sides keep it alive: keep-alive is preserved one to one and no request can observe another's.
- Bodies stream in 256 KiB pieces in both directions, never buffered whole (objects can be
  1 GiB). Chunked bodies are decoded and re-chunked so byte faults count payload bytes.
  ``Expect: 100-continue`` works because the request body is copied concurrently with reading
  the response, and interim 1xx responses are relayed.
- The proxy runs its own event loop in a daemon thread, so sync tests, async tests (on their own
  loop) and subprocesses can all use it; everything tests call is thread-safe (one lock around
  rules, flags and the request log).
- Faults are :class:`Rule` objects matched by method and by a substring or regex of the
  percent-decoded path (or of path plus ``?query``), applying to the next ``times`` matching
  requests (``None``: always). At most one latency rule and one other rule apply per request;
  ``b2_strict`` is checked before the rules and does not consume them.
- The request log (:class:`RequestRecord`) is updated *before* bytes are written, so a test that
  has read a response never sees a stale record of it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import fcntl
import re
import secrets
import socket
import struct
import termios
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["FaultProxy", "PathMatch", "RequestRecord", "Rule", "s3_error_body"]

CHUNK = 256 * 1024
_HEAD_LIMIT = 64 * 1024
_FLUSH_TIMEOUT = 2.0

PathMatch = str | re.Pattern[str] | None
_T = TypeVar("_T")

_B2_HEADER = re.compile(r"^(x-amz-checksum-.*|x-amz-sdk-checksum-algorithm)$", re.IGNORECASE)

_BODY_FAULTS = frozenset({"reset", "truncate", "flip"})
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def s3_error_body(code: str, message: str) -> bytes:
    """The XML error document S3 and B2 send, e.g. ``<Error><Code>SlowDown</Code>...``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()


@dataclass
class Rule:
    """One fault: ``kind`` with ``params``, for requests matching ``method`` and ``path``.

    ``times`` is how many more matching requests it applies to (``None``: all); ``applied``
    counts how often it did. Read them through :meth:`FaultProxy.rules` for a consistent view.
    """

    kind: str
    params: dict[str, Any]
    method: str | None = None
    path: PathMatch = None
    times: int | None = 1
    applied: int = 0

    def matches(self, method: str, path: str, target: str) -> bool:
        r"""Does this rule (with uses left) cover a request? ``path`` is percent-decoded without
        the query, ``target`` is decoded ``path?query``: a pattern matching either counts, so
        ``re.compile(r"/a\.bin$")`` and ``"list-type=2"`` both work.
        """
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path is None:
            return True
        if isinstance(self.path, re.Pattern):
            return any(self.path.search(s) is not None for s in (path, target))
        return self.path in target  # a substring of the path is one of the target


@dataclass
class RequestRecord:
    """What the proxy saw and answered for one request (a snapshot when read by tests)."""

    method: str
    target: str
    """Request target exactly as sent (percent-encoded path and query)."""
    path: str
    """Percent-decoded path without the query: the S3 ``/bucket/key``."""
    range: str | None
    """The ``Range`` header, if any."""
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    status: int | None = None
    """Status answered to the client (None: none was sent, e.g. the proxy went down)."""
    content_length: int | None = None
    """Body length promised by the answer's Content-Length, if it had one."""
    body_bytes: int = 0
    """Body bytes handed to the client's connection."""
    fault: str | None = None
    """Faults applied, ``+``-joined (``"latency+reset"``), or None."""
    forwarded: bool = False
    """Whether the request went to the upstream server (False: answered by the proxy)."""
    complete: bool = False
    """The whole answer was sent (False for resets, truncations and errors)."""
    error: str | None = None
    """Why the exchange ended abnormally, if it did."""

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


class _BadRequestError(ValueError):
    pass


@dataclass
class _Request:
    head: bytes
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    @property
    def decoded_target(self) -> str:
        path, sep, query = self.target.partition("?")
        return urllib.parse.unquote(path) + sep + query

    @property
    def framing(self) -> tuple[str, int]:
        te = self.header("transfer-encoding")
        if te is not None and "chunked" in te.lower():
            return "chunked", 0
        return "length", int(self.header("content-length") or 0)

    @property
    def expects_continue(self) -> bool:
        return (self.header("expect") or "").lower() == "100-continue"

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.header("connection"))


def _keep_alive(version: str, connection: str | None) -> bool:
    tokens = {t.strip().lower() for t in (connection or "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequestError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def _iter_body(
    reader: asyncio.StreamReader, framing: str, length: int
) -> AsyncIterator[bytes]:
    """Yield the payload of a body in pieces of at most CHUNK bytes (chunked: decoded)."""
    if framing == "length":
        remaining = length
        while remaining:
            data = await reader.read(min(CHUNK, remaining))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data
    elif framing == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers: dropped, nothing here sends any that matter
                return
            while size:
                data = await reader.read(min(CHUNK, size))
                if not data:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(data)
                yield data
            await reader.readexactly(2)
    else:  # until EOF
        while data := await reader.read(CHUNK):
            yield data


def _frame(framing: str, data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if framing == "chunked" else data


def _unsent_bytes(sock: Any) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until written bytes have left the process *and* the kernel's send queue, so that a
    following RST (which discards the send queue) cannot eat bytes we promised to deliver.
    """
    transport = writer.transport
    transport.set_write_buffer_limits(high=0)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    deadline = time.monotonic() + _FLUSH_TIMEOUT
    with contextlib.suppress(OSError):
        # No event fires when the kernel's send queue drains: poll it.
        while _unsent_bytes(sock) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def _abort_rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class _Exchange:
    """One request being handled: what every step of answering it needs."""

    req: _Request
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    record: RequestRecord


class _Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.transport.is_closing())

    def close(self) -> None:
        self.writer.transport.abort()


class FaultProxy:
    """HTTP/1.1 reverse proxy to ``upstream`` (``http://host:port``) that injects faults.

    Use as ``with FaultProxy(seaweed.endpoint) as proxy:`` and point the client at
    ``proxy.endpoint``. Fault methods return the :class:`Rule` they added.
    """

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = upstream
        self._up_host, self._up_port = parsed.hostname, parsed.port
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._records: list[RequestRecord] = []
        self._b2_strict = False
        self._down: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        if self._server is None and self.port == 0:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"faultproxy->{self.upstream}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening, abort live connections, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown(), timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        assert self._loop is not None
        fut: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_HEAD_LIMIT, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _abort_connections(self) -> None:
        for writer in list(self._conns):
            _abort_rst(writer)

    async def _shutdown(self) -> None:
        await self._stop_listening()
        self._abort_connections()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- faults ------------------------------------------------------------------------------

    def _add(
        self,
        kind: str,
        params: dict[str, Any],
        method: str | None,
        path: PathMatch,
        times: int | None,
    ) -> Rule:
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None (always), not {times!r}")
        rule = Rule(kind=kind, params=params, method=method, path=path, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def slowdown(
        self,
        retry_after: float | None = None,
        *,
        method: str | None = None,
        path: PathMatch = None,
        times: int | None = 1,
    ) -> Rule:
        """Answer ``503 SlowDown`` (with ``Retry-After: <retry_after>`` when given)."""
        return self._add("slowdown", {"retry_after": retry_after}, method, path, times)

    def status(
        self,
        code: int,
        s3_code: str,
        message: str = "Injected by FaultProxy.",
        *,
        method: str | None = None,
        path: PathMatch = None,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
    ) -> Rule:
        """Answer ``code`` with an S3 XML error body (e.g. 500 InternalError, 404 NoSuchKey)."""
        params = {"code": code, "s3_code": s3_code, "message": message, "headers": headers or {}}
        return self._add("status", params, method, path, times)

    def reset(
        self,
        after_bytes: int,
        *,
        method: str | None = "GET",
        path: PathMatch = None,
        times: int | None = 1,
    ) -> Rule:
        """Forward status and headers (full Content-Length), ``after_bytes`` of body, then RST.

        If the body is shorter, all of it is sent and the connection is still reset.
        """
        return self._add("reset", {"after_bytes": after_bytes}, method, path, times)

    def truncate(
        self,
        after_bytes: int,
        *,
        method: str | None = "GET",
        path: PathMatch = None,
        times: int | None = 1,
    ) -> Rule:
        """Like :meth:`reset` but a clean close (FIN) after ``after_bytes`` of the body."""
        return self._add("truncate", {"after_bytes": after_bytes}, method, path, times)

    def flip(
        self,
        offset: int,
        *,
        bit: int = 0,
        method: str | None = "GET",
        path: PathMatch = None,
        times: int | None = 1,
    ) -> Rule:
        """Flip bit ``bit`` of body byte ``offset`` (offset within this response's body)."""
        if not 0 <= bit <= 7:
            raise ValueError(f"bit must be 0..7, not {bit}")
        return self._add("flip", {"offset": offset, "bit": bit}, method, path, times)

    def latency(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: PathMatch = None,
        times: int | None = 1,
    ) -> Rule:
        """Wait ``seconds`` before handling the request (combines with one other fault)."""
        return self._add("latency", {"seconds": seconds}, method, path, times)

    @property
    def b2_strict(self) -> bool:
        """When on, answer 400 InvalidArgument to any request with a checksum header, like B2."""
        with self._lock:
            return self._b2_strict

    @b2_strict.setter
    def b2_strict(self, on: bool) -> None:
        with self._lock:
            self._b2_strict = bool(on)

    def clear_faults(self) -> None:
        """Remove every rule and turn ``b2_strict`` off (the log is kept)."""
        with self._lock:
            self._rules.clear()
            self._b2_strict = False

    def rules(self) -> list[Rule]:
        with self._lock:
            return [dataclasses.replace(r, params=dict(r.params)) for r in self._rules]

    def down(self, how: str = "refuse") -> None:
        """Make the endpoint unreachable: ``"refuse"`` stops listening (connection refused),
        ``"reset"`` accepts and resets every connection. Live connections are reset either way.
        """
        if how not in ("refuse", "reset"):
            raise ValueError(f"how must be 'refuse' or 'reset', not {how!r}")

        async def go() -> None:
            with self._lock:
                self._down = how
            if how == "refuse":
                await self._stop_listening()
            self._abort_connections()

        self._call(go())

    def up(self) -> None:
        """Undo :meth:`down`: listen again on the same port."""

        async def go() -> None:
            with self._lock:
                self._down = None
            if self._server is None:
                await self._listen()

        self._call(go())

    # -- counters ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of every request seen since the last :meth:`reset_counters`, in order."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    def gets(self, path_substring: str | None = None) -> list[RequestRecord]:
        """The GET requests, optionally only those whose decoded path contains the substring."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and (path_substring is None or path_substring in r.path)
        ]

    def count_ok_gets(self) -> collections.Counter[str]:
        """Decoded path -> number of GETs answered 200/206 and sent in full."""
        return collections.Counter(
            r.path for r in self.gets() if r.status in (200, 206) and r.complete
        )

    def reset_counters(self) -> None:
        with self._lock:
            self._records.clear()

    def _update(self, record: RequestRecord, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)

    def _match(self, req: _Request, kinds: Callable[[str], bool]) -> Rule | None:
        path, target = urllib.parse.unquote(req.target.partition("?")[0]), req.decoded_target
        with self._lock:
            for rule in self._rules:
                if kinds(rule.kind) and rule.matches(req.method, path, target):
                    if rule.times is not None:
                        rule.times -= 1
                    rule.applied += 1
                    return dataclasses.replace(rule)
        return None

    # -- the proxy ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._conns.add(writer)
        upstream: list[_Upstream] = []
        try:
            with self._lock:
                down = self._down
            if down is not None:
                _abort_rst(writer)
                return
            while await self._exchange(reader, writer, upstream):
                pass
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass  # the client went away or spoke garbage: nothing to answer
        except asyncio.CancelledError:
            pass  # closing down: _shutdown already reset the connection
        finally:
            for up in upstream:
                up.close()
            self._conns.discard(writer)
            self._tasks.discard(task)
            # close(), not abort(): a response may still sit in the transport's buffer.
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # clean close between requests
        start, headers = _parse_head(head)
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequestError(f"malformed request line {start!r}")
        return _Request(head, parts[0], parts[1], parts[2], headers)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: list[_Upstream],
    ) -> bool:
        """Handle one request; True to keep the client connection for the next one."""
        try:
            req = await self._read_request(reader)
        except _BadRequestError:
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return False
        if req is None:
            return False
        record = RequestRecord(
            method=req.method,
            target=req.target,
            path=urllib.parse.unquote(req.target.partition("?")[0]),
            range=req.header("range"),
            headers=tuple(req.headers),
        )
        with self._lock:
            self._records.append(record)
        ex = _Exchange(req, reader, writer, record)
        faults: list[str] = []

        lat = self._match(req, lambda k: k == "latency")
        if lat is not None:
            faults.append("latency")
            self._update(record, fault="+".join(faults))
            await asyncio.sleep(float(lat.params["seconds"]))

        if self.b2_strict:
            seen = next((k for k, _ in req.headers if _B2_HEADER.match(k)), None)
            if seen is not None:
                faults.append("b2_strict")
                self._update(record, fault="+".join(faults))
                message = f"Unsupported header '{seen}' received for this API call."
                return await self._answer(ex, 400, "InvalidArgument", message)

        rule = self._match(req, lambda k: k != "latency")
        if rule is not None:
            faults.append(rule.kind)
            self._update(record, fault="+".join(faults))
            if rule.kind == "slowdown":
                extra = {}
                if rule.params["retry_after"] is not None:
                    extra["Retry-After"] = f"{rule.params['retry_after']:g}"
                message = "Please reduce your request rate."
                return await self._answer(ex, 503, "SlowDown", message, extra)
            if rule.kind == "status":
                p = rule.params
                return await self._answer(ex, p["code"], p["s3_code"], p["message"], p["headers"])
        body_rule = rule if rule is not None and rule.kind in _BODY_FAULTS else None
        return await self._forward(ex, upstream, body_rule)

    async def _answer(
        self,
        ex: _Exchange,
        status: int,
        s3_code: str,
        message: str,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Answer locally with an S3 XML error, as the server would."""
        req = ex.req
        # Under Expect: 100-continue the client holds its body back until told; a final answer
        # without the body read leaves the connection unusable, so it closes.
        keep = req.keep_alive and not req.expects_continue
        if keep:
            async for _ in _iter_body(ex.reader, *req.framing):
                pass
        body = s3_error_body(s3_code, message)
        headers = {
            "Content-Type": "application/xml",
            "Content-Length": str(len(body)),
            "Date": email.utils.formatdate(usegmt=True),
            "Server": "datapin-faultproxy",
            "x-amz-request-id": secrets.token_hex(8).upper(),
            **(extra or {}),
            "Connection": "keep-alive" if keep else "close",
        }
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        send_body = req.method != "HEAD"
        self._update(
            ex.record,
            status=status,
            content_length=len(body),
            body_bytes=len(body) if send_body else 0,
            complete=True,
        )
        ex.writer.write(head.encode("latin-1") + b"\r\n" + (body if send_body else b""))
        await ex.writer.drain()
        return keep

    async def _connect_upstream(self, upstream: list[_Upstream]) -> _Upstream:
        if upstream and upstream[0].usable:
            return upstream[0]
        for old in upstream:
            old.close()
        upstream.clear()
        r, w = await asyncio.open_connection(self._up_host, self._up_port, limit=_HEAD_LIMIT)
        upstream.append(_Upstream(r, w))
        return upstream[0]

    async def _forward(self, ex: _Exchange, upstream: list[_Upstream], rule: Rule | None) -> bool:
        try:
            up = await self._connect_upstream(upstream)
        except OSError as exc:
            self._update(ex.record, error=f"upstream unreachable: {exc}")
            return await self._answer(ex, 502, "BadGateway", f"upstream {self.upstream}: {exc}")
        self._update(ex.record, forwarded=True)
        up.writer.write(ex.req.head)

        async def copy_request_body() -> None:
            framing, length = ex.req.framing
            async for data in _iter_body(ex.reader, framing, length):
                up.writer.write(_frame(framing, data))
                await up.writer.drain()
            if framing == "chunked":
                up.writer.write(b"0\r\n\r\n")
            await up.writer.drain()

        body_task = asyncio.create_task(copy_request_body())

        def on_body_done(task: asyncio.Task[None]) -> None:
            # The client broke off its upload: the server would wait for the rest until its own
            # timeout, so make the response read fail now.
            if not task.cancelled() and task.exception() is not None:
                up.close()

        body_task.add_done_callback(on_body_done)
        try:
            return await self._relay_response(ex, up, rule, body_task)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,  # a malformed response head or chunk size
        ) as exc:
            self._update(ex.record, error=f"{type(exc).__name__}: {exc}")
            upstream.clear()
            up.close()
            return False
        finally:
            if not body_task.done():
                body_task.cancel()
            with contextlib.suppress(BaseException):
                await body_task

    async def _relay_response(
        self, ex: _Exchange, up: _Upstream, rule: Rule | None, body_task: asyncio.Task[None]
    ) -> bool:
        req, writer, record = ex.req, ex.writer, ex.record
        while True:
            head = await up.reader.readuntil(b"\r\n\r\n")
            start, headers = _parse_head(head)
            version, _, rest = start.partition(" ")
            status = int(rest.split(" ", 1)[0])
            if 100 <= status < 200 and status != 101:
                writer.write(head)  # 100 Continue: the client may now send its body
                await writer.drain()
                continue
            break

        def hdr(name: str) -> str | None:
            return next((v for k, v in headers if k.lower() == name), None)

        te, cl = hdr("transfer-encoding"), hdr("content-length")
        if req.method == "HEAD" or status in (204, 304):
            framing, length = "length", 0
        elif te is not None and "chunked" in te.lower():
            framing, length = "chunked", 0
        elif cl is not None:
            framing, length = "length", int(cl)
        else:
            framing, length = "eof", 0
        keep = framing != "eof" and req.keep_alive and _keep_alive(version, hdr("connection"))

        cut = flip_at = None
        flip_mask = 0
        if rule is not None and rule.kind in ("reset", "truncate"):
            cut = int(rule.params["after_bytes"])
        elif rule is not None and rule.kind == "flip":
            flip_at, flip_mask = int(rule.params["offset"]), 1 << int(rule.params["bit"])

        # Records change before the bytes they describe are written (see the module docstring):
        # "complete" goes with the last piece, or with the head when there is no body.
        no_body = framing == "length" and length == 0 and cut is None
        self._update(
            record,
            status=status,
            content_length=int(cl) if cl is not None else None,
            complete=no_body,
        )
        writer.write(head)
        sent = 0
        async for piece in _iter_body(up.reader, framing, length):
            data = piece
            if flip_at is not None and sent <= flip_at < sent + len(data):
                mutable = bytearray(data)
                mutable[flip_at - sent] ^= flip_mask
                data = bytes(mutable)
            if cut is not None and sent + len(data) >= cut:
                data = data[: cut - sent]
                self._update(record, body_bytes=sent + len(data))
                if data:
                    writer.write(_frame(framing, data))
                return await self._cut(writer, rule)
            sent += len(data)
            last = framing == "length" and sent == length
            self._update(record, body_bytes=sent, complete=last)
            writer.write(_frame(framing, data))
            await writer.drain()
        if cut is not None:
            return await self._cut(writer, rule)
        if not body_task.done():
            # The server answered without taking the whole request body; what the client still
            # sends would be read as the next request, so this connection ends here.
            keep = False
        self._update(record, complete=True)
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        if not keep:
            up.close()
        return keep

    async def _cut(self, writer: asyncio.StreamWriter, rule: Rule | None) -> bool:
        assert rule is not None
        await _flush(writer)
        if rule.kind == "reset":
            _abort_rst(writer)
        else:
            # A pause before the FIN: aiohttp raises a payload error as soon as it sees the
            # close, dropping body bytes it had buffered but not yet handed out, so without it
            # where a resume starts would depend on the client's scheduling (seen once in CI on
            # a loaded machine: a resume from 0 instead of from the cut).
            await asyncio.sleep(0.2)
            writer.close()
        raise ConnectionAbortedError(f"{rule.kind} injected")
