"""The S3 HTTP client: signed GETs with deadlines, retries, and S3 errors as user errors.

`S3Client` is one aiohttp session (one connection pool of `jobs` connections) to one bucket.
What it offers the fetch (`s3fetch`) and the remote (`s3`):

* `get(key, start, end)`: a signed (`sigv4`) ranged GET, as a context manager on the answer.
  Every request has an overall deadline, headers and body together: `request_timeout` plus the
  body's size at `min_rate`, so a server trickling a byte a second fails in about a minute,
  not never (`read_timeout` alone only bounds the gaps between bytes). A 206 must answer the
  range asked for with a matching Content-Length (`BadBodyError` otherwise); `read_at_most`
  never reads a byte past the size a small body must have.
* `retrying(key, retries, attempt)`: runs an attempt until it succeeds. 5xx, SlowDown
  (honouring Retry-After), timeouts, resets, truncated and overlong bodies are retried with
  exponential backoff and full jitter, `attempts` times; a 401/403 re-reads rotated
  credentials once. A 404 NoSuchKey is `AbsentError` (the fetch reports the object missing);
  what retrying cannot fix (bad keys, a missing bucket, a wrong region, an endpoint still
  unreachable) is a `RemoteError` naming the remote and the likely fix; a budget spent on
  retryable failures is `GaveUpError`, which the fetch collects per object.
* `exists(key)`: a one-byte GET (a HEAD's error answer has no body, so a missing bucket would
  look like a missing key); `stat(key)` is the same GET, answering the object's ETag and size
  (the proof of access of a few objects).
* `list_page(prefix, token)`: one signed ListObjectsV2 page, its body read to at most
  `s3list.MAX_LIST_BODY` bytes within the request's deadline, and parsed by `s3list` (which
  refuses what a hostile server may send). A body over the bound is refused at once, not
  retried: the server means it.

The client tells the fetch what happened with `RemoteSignal`s (errors.py), which never reach a
user: each ends as a retry, a `FetchReport` entry or a `RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import aiohttp
import yarl

from datapin_sidecar import __version__
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.errors import (
    AbsentError,
    BadBodyError,
    GaveUpError,
    HTTPStatusError,
    RemoteCause,
    RemoteError,
    TruncatedError,
)
from datapin_sidecar.limits import MAX_JOBS
from datapin_sidecar.remotes.s3list import MAX_KEYS, MAX_LIST_BODY, ListPage, parse_page
from datapin_sidecar.remotes.sigv4 import Signer, canonical_query
from datapin_sidecar.remotes.slotfiles import MiB

if TYPE_CHECKING:
    from datapin_sidecar.remotes.credentials import CredentialSource
    from datapin_sidecar.remotes.endpoint import RemoteConfig

T = TypeVar("T")
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,500})</Message>")
_RETRYABLE_CODES: Final = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
)
_AUTH_CODES: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
     "InvalidToken", "TokenRefreshRequired"}
)  # fmt: skip


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container's cpuset sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOptions:
    """How hard to pull. The defaults suit one node talking to B2 over the internet."""

    #: Requests in flight at once (objects and parts of objects together).
    jobs: int = 32
    #: Objects larger than this are fetched in ranged parts of this size, in parallel.
    part_size: int = 16 * MiB
    #: Bodies up to this size are read whole into memory; larger ones stream to disk.
    inline_bytes: int = 1 * MiB
    #: Parts of one object in flight at once (taken in order, so the part the md5 needs next
    #: is never far behind the ones that land ahead of it).
    parts_per_object: int = 8
    #: Memory that parts landing ahead of their object's md5 may hold, for the whole fetch;
    #: past it they are hashed by reading them back from disk (`engine.streamhash`).
    hash_window: int = 128 * MiB
    #: Attempts per request before an error counts (5xx, SlowDown, timeouts, resets).
    attempts: int = 6
    #: Whole-object attempts when the bytes fail their md5.
    verify_attempts: int = 3
    backoff_base: float = 0.2
    backoff_cap: float = 8.0
    #: The longest Retry-After honoured; a server asking for more gets this.
    retry_after_cap: float = 30.0
    connect_timeout: float = 10.0
    #: Seconds without a byte from the server before a request counts as timed out.
    read_timeout: float = 60.0
    #: The overall deadline of one request is `request_timeout` plus its body's size at
    #: `min_rate` bytes per second: a server trickling bytes cannot hold a request forever.
    request_timeout: float = 60.0
    min_rate: int = 32 * 1024
    #: Threads for file writes and hashing (both release the GIL): one per CPU, at most 4.
    #: More threads than cores hash no faster, and each thread wanting the GIL back after a
    #: syscall makes the loop thread wait in its own: on 2 cores, 4 threads cost a cold pull
    #: of small objects 15-20% more CPU per object than 2 (docs/benchmarks.md, issue 15).
    io_threads: int = field(default_factory=lambda: min(4, available_cpus()))
    #: How long to wait for an object another process on the node is downloading.
    wait_timeout: float = 900.0


#: What the retry labels mean, for the message of a fetch that gave up.
LAST_ERROR: Final = {
    "timeout": "timeout: no complete answer within the request's deadline",
    "overlong": "overlong: a body longer than its declared length or its range",
    "bad_range": "bad_range: the server answered a range other than the one asked for",
}


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


class S3Client:
    """Signed requests to one bucket; use as `async with S3Client(...) as client:`."""

    def __init__(
        self, config: RemoteConfig, credentials: CredentialSource, *, options: FetchOptions
    ) -> None:
        self.config = config
        self.options = options
        self._credentials = credentials
        self._signer = Signer(region=config.region)
        self._session: aiohttp.ClientSession | None = None
        self._requests: asyncio.Semaphore | None = None
        #: Requests in flight and worker tasks: `options.jobs`, capped at `MAX_JOBS`.
        self.jobs = max(1, min(options.jobs, MAX_JOBS))

    async def __aenter__(self) -> S3Client:
        opts = self.options
        tls: ssl.SSLContext | bool = False
        if self.config.resolved_endpoint.startswith("https:"):
            if self.config.verify_tls:
                tls = ssl.create_default_context(
                    cafile=str(self.config.ca_bundle) if self.config.ca_bundle else None
                )
            else:
                tls = False  # the user said so (DVC's `ssl_verify = false`)
        connector = aiohttp.TCPConnector(
            limit=self.jobs, ssl=tls, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=opts.connect_timeout, sock_read=opts.read_timeout
            ),
            headers={"User-Agent": f"datapin/{__version__}", "Accept-Encoding": "identity"},
            skip_auto_headers=("Accept",),
        )
        self._requests = asyncio.Semaphore(self.jobs)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = self._requests = None

    @property
    def url(self) -> str:
        """The remote, for messages (never with credentials)."""
        return self.config.describe()

    def key(self, oid: str, layout: Layout) -> str:
        """The object key of `oid` in `layout`."""
        return self.config.object_key(oid, layout)

    def _signed(self, method: str, key: str, query: str = "") -> tuple[yarl.URL, dict[str, str]]:
        creds = self._credentials.get()
        headers = self._signer.headers(
            method=method,
            host=self.config.signing_host,
            path=self.config.canonical_path(key),
            query=query,
            access_key_id=creds.access_key_id,
            secret_access_key=creds.secret_access_key,
            session_token=creds.session_token,
        )
        url = self.config.object_url(key) + (f"?{query}" if query else "")
        return yarl.URL(url, encoded=True), headers

    @contextlib.asynccontextmanager
    async def get(self, key: str, start: int, end: int) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET of bytes [start, end], raising `HTTPStatusError` on failure, `BadBodyError` for a
        206 that answers another range, `TimeoutError` past the request's deadline."""
        assert self._session is not None  # noqa: S101
        assert self._requests is not None  # noqa: S101
        opts = self.options
        url, headers = self._signed("GET", key)
        headers["Range"] = f"bytes={start}-{end}"
        async with self._requests:
            # The deadline covers the whole request, headers and body, not just the gaps
            # between reads (see FetchOptions.request_timeout).
            began = asyncio.get_running_loop().time()
            budget = opts.request_timeout + (end - start + 1) / opts.min_rate
            async with (
                asyncio.timeout_at(began + budget) as deadline,
                self._session.get(url, headers=headers, allow_redirects=False) as resp,
            ):
                if resp.status >= 300:
                    raise await _error_of(resp)
                if resp.status == 206:
                    _check_range(resp, start, end)
                # The body is often shorter than the range (a small object): its own size
                # sets the deadline, so a trickle is caught in seconds, not minutes.
                if resp.content_length is not None and resp.content_length < end - start + 1:
                    deadline.reschedule(
                        began + opts.request_timeout + resp.content_length / opts.min_rate
                    )
                yield resp

    async def exists(self, key: str) -> bool:
        """Whether `key` exists: a one-byte GET rather than a HEAD, because a HEAD's error
        answer has no body, so a missing bucket would look like a missing key."""
        try:
            async with self.get(key, 0, 0) as resp:
                if resp.status == 206:  # (a 200 ignored Range: the whole object is not read)
                    await read_at_most(resp, 1)
        except HTTPStatusError as exc:
            if exc.status != 416:  # a Range on an empty object: it exists
                raise
        return True

    async def stat(self, key: str) -> tuple[str, int | None]:
        """The ETag and size of `key` (size None if the server did not say): a one-byte GET,
        like `exists`. An empty object answers 416 with no reliable ETag: ("", 0)."""
        try:
            async with self.get(key, 0, 0) as resp:
                etag = resp.headers.get("ETag", "")
                answered = content_range(resp) if resp.status == 206 else None
                size = answered[2] if answered is not None else resp.content_length
                if resp.status == 206:
                    await read_at_most(resp, 1)
                return etag, size
        except HTTPStatusError as exc:
            if exc.status != 416:
                raise
        return "", 0

    async def list_page(self, prefix: str, token: str | None) -> ListPage:
        """One ListObjectsV2 page of the keys under `prefix` (see the module doc)."""
        assert self._session is not None  # noqa: S101
        assert self._requests is not None  # noqa: S101
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(MAX_KEYS)}
        if token is not None:
            params["continuation-token"] = token
        url, headers = self._signed("GET", "", canonical_query(params))
        opts = self.options
        async with self._requests:
            budget = opts.request_timeout + MAX_LIST_BODY / opts.min_rate
            async with (
                asyncio.timeout(budget),
                self._session.get(url, headers=headers, allow_redirects=False) as resp,
            ):
                if resp.status >= 300:
                    raise await _error_of(resp)
                # A longer body is cut at the bound (and refused by the parser), never read on.
                body = await _read_bounded(resp, MAX_LIST_BODY)
        # Parsing up to 2 MiB of XML takes milliseconds: not on the loop every request shares.
        return await asyncio.to_thread(parse_page, body, prefix=prefix, remote=self.url)

    async def retrying(
        self, key: str, retries: Counter[str], attempt: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `attempt` until it succeeds, retrying what retrying can fix; see module doc."""
        opts = self.options
        refreshed = False
        last = ""
        for n in range(opts.attempts):
            try:
                return await attempt()
            except HTTPStatusError as exc:
                if exc.status == 404 and exc.code in ("NoSuchKey", "", "NotFound"):
                    raise AbsentError from None
                if exc.status in (401, 403) and not refreshed and _auth_failure(exc):
                    # The Secret may have rotated since we read it: re-read once, then retry.
                    refreshed = True
                    before = self._credentials.get()
                    if self._credentials.refresh() != before:
                        retries["credentials_rotated"] += 1
                        continue
                if not _retryable(exc):
                    raise self._fatal(exc, key) from None
                last, retry_after = exc.reason, exc.retry_after
            except aiohttp.ClientConnectorCertificateError as exc:
                raise RemoteError(
                    remote=self.url,
                    problem=f"TLS certificate verification failed ({exc.certificate_error})",
                    fix="pass --ca-bundle with the CA that signed the endpoint's certificate "
                    "(DVC: `ssl_verify = /path/ca.pem`)",
                    cause=RemoteCause.TLS,
                ) from None
            except aiohttp.ClientConnectorError as exc:
                last, retry_after = f"connect: {exc.os_error.strerror or exc}", None
                if n == opts.attempts - 1:
                    raise RemoteError(
                        remote=self.url,
                        problem=f"cannot connect to {self.config.resolved_endpoint} after "
                        f"{opts.attempts} attempts ({exc.os_error.strerror or exc})",
                        fix="check --endpoint-url (DVC: `endpointurl`), DNS, and that the "
                        "node may reach it (proxies, NetworkPolicy)",
                        cause=RemoteCause.UNREACHABLE,
                    ) from None
            except (aiohttp.ClientPayloadError, TruncatedError):
                last, retry_after = "truncated", None
            except BadBodyError as exc:
                last, retry_after = exc.reason, None
            except TimeoutError:  # before ClientError: aiohttp's timeouts are both
                last, retry_after = "timeout", None
            except (aiohttp.ClientError, ConnectionError) as exc:
                last, retry_after = f"connection: {type(exc).__name__}", None
            retries[last.split(":")[0]] += 1
            if n < opts.attempts - 1:
                delay = random.uniform(0, min(opts.backoff_cap, opts.backoff_base * 2**n))  # noqa: S311 - jitter, not crypto
                if retry_after is not None:
                    delay = max(delay, min(retry_after, opts.retry_after_cap))
                await asyncio.sleep(delay)
        raise GaveUpError(key, last, opts.attempts)

    def _fatal(self, exc: HTTPStatusError, key: str) -> RemoteError:
        """The user-facing error for an answer retrying cannot change."""
        cfg = self.config
        creds = self._credentials.describe()
        code = exc.code or f"HTTP {exc.status}"
        if (known := _FATAL_CODES.get(exc.code)) is not None:
            problem, fix, cause = known
            values = {
                "bucket": cfg.bucket,
                "endpoint": cfg.resolved_endpoint,
                "region": cfg.region,
                "creds": creds,
            }
            return RemoteError(
                remote=self.url,
                problem=problem.format_map(values),
                fix=fix.format_map(values),
                cause=cause,
            )
        if exc.status in (401, 403):
            return RemoteError(
                remote=self.url,
                problem=f"access denied reading {key} ({code})",
                fix=f"give the key in {creds} read and list access to bucket {cfg.bucket!r} "
                "(B2: an application key restricted to another bucket or prefix is refused)",
                keys=[key],
                cause=RemoteCause.ACCESS_DENIED,
            )
        if exc.status in (301, 307) or exc.code in (
            "PermanentRedirect",
            "AuthorizationHeaderMalformed",
            "IllegalLocationConstraintException",
        ):
            return RemoteError(
                remote=self.url,
                problem=f"the server says the bucket is in another region ({code})",
                fix=f"set --region (now {cfg.region!r}) and --endpoint-url to the bucket's "
                "region (B2: s3.<region>.backblazeb2.com from the bucket's details)",
                cause=RemoteCause.REGION,
            )
        detail = f": {exc.message}" if exc.message else ""
        return RemoteError(
            remote=self.url,
            problem=f"the server refused the request ({code}{detail})",
            fix="check the remote URL, endpoint and region; report it if they are right",
            keys=[key],
            # An S3 code we have no cause for (it is in the message): the generic one.
            cause=RemoteCause.REMOTE,
        )


def retry_label(exc: BaseException) -> str:
    """The retry counter a failed body counts under (the labels `retrying` uses)."""
    if isinstance(exc, BadBodyError):
        return exc.reason
    if isinstance(exc, (TruncatedError, aiohttp.ClientPayloadError)):
        return "truncated"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "connection"


def _retryable(exc: HTTPStatusError) -> bool:
    return exc.status >= 500 or exc.status == 429 or exc.code in _RETRYABLE_CODES


def _auth_failure(exc: HTTPStatusError) -> bool:
    return exc.code in _AUTH_CODES or not exc.code  # HEAD answers carry no body


async def _error_of(resp: aiohttp.ClientResponse) -> HTTPStatusError:
    body = b""
    if resp.method != "HEAD":
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            body = await resp.content.read(64 * 1024)
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return HTTPStatusError(
        resp.status,
        code.group(1).decode("utf-8", "replace") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
        _retry_after(resp.headers.get("Retry-After")),
    )


#: S3 error codes that mean the same whatever the status, checked first: the problem and fix
#: `_fatal` reports for each (templates over the remote's `bucket`, `endpoint` and `region`, and
#: `creds`, where the keys come from) and its cause.
_FATAL_CODES: Final[dict[str, tuple[str, str, RemoteCause]]] = {
    "NoSuchBucket": (
        "bucket {bucket!r} does not exist at {endpoint}",
        "check the bucket in the remote URL and the endpoint (the bucket's region)",
        RemoteCause.NO_BUCKET,
    ),
    "InvalidAccessKeyId": (
        "the access key id is not known to the server (InvalidAccessKeyId)",
        "check the key id in {creds} (for B2: the application keyID; the master application key "
        "cannot use the S3 API)",
        RemoteCause.ACCESS_DENIED,
    ),
    "SignatureDoesNotMatch": (
        "the secret key does not match the key id (SignatureDoesNotMatch)",
        "check the secret in {creds} (for B2: the applicationKey shown once when the key was made) "
        "and that the region {region!r} matches the endpoint",
        RemoteCause.ACCESS_DENIED,
    ),
}

_CONTENT_RANGE: Final = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")


def content_range(resp: aiohttp.ClientResponse) -> tuple[int, int, int | None] | None:
    """(first, last, total) of a `Content-Range: bytes first-last/total` (total None for `*`)."""
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if match is None:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


def _check_range(resp: aiohttp.ClientResponse, start: int, end: int) -> None:
    """A 206 must answer bytes [start, at most end] of a consistent total, with a Content-Length
    (if any) that matches: otherwise the body would land at the wrong offset or run on."""
    answered = content_range(resp)
    if answered is None:
        raise BadBodyError("bad_range")
    first, last, total = answered
    if first != start or last < first or last > end or (total is not None and last >= total):
        raise BadBodyError("bad_range")
    length = resp.content_length
    if length is not None and length != last - first + 1:
        raise BadBodyError("overlong" if length > last - first + 1 else "bad_range")


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or `limit + 1` bytes of it if it is longer (the caller refuses that)."""
    pieces: list[bytes] = []
    got = 0
    async for data in resp.content.iter_any():
        pieces.append(data)
        got += len(data)
        if got > limit:
            break
    return b"".join(pieces)


async def read_at_most(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """The body, which must be exactly `size` bytes: `BadBodyError` as soon as more arrive
    (nothing further is read), `TruncatedError` if it ends short. Only for small bodies."""
    declared = resp.content_length
    if declared is not None:
        # aiohttp reads exactly the declared length (more bytes would be the next response
        # on the connection), so one bulk read is bounded: the common case, and the cheapest
        # per object (the chunk loop below cost about 0.1 ms of CPU an object).
        if declared > size:
            raise BadBodyError("overlong")
        body = await resp.read()
        if len(body) != size:
            raise TruncatedError
        return body
    pieces: list[bytes] = []
    got = 0
    async for data in resp.content.iter_any():
        got += len(data)
        if got > size:
            raise BadBodyError("overlong")
        pieces.append(data)
    if got != size:
        raise TruncatedError
    return b"".join(pieces)
