"""Fetch DVC objects from S3 / Backblaze B2 into the node cache: fast, verified, once per node.

Shape of a fetch (`S3Remote.afetch`): a claimer task claims each object's download slot in
the cache (`NodeCache.claim`, the node-wide lock that makes it download once however many
processes want it), 32 per worker-thread call, and queues the claims for a fixed pool of
worker tasks, so a 100k-object revision costs a few dozen tasks, not 100k. A worker GETs the
object, checks its DVC md5 and hands the slot to a committer that installs it. Objects
another process is downloading are set aside and waited for at the end: usually they are in
place by then, and if their downloader died we download them ourselves.

Requests: a GET with `Range: bytes=0-<part-1>` tells the size (`Content-Range`) and brings a
small object whole, in one request. Bodies up to `inline_bytes` stay in memory and are written
and hashed in one worker-thread call. Larger objects are written to their slot as they stream
(never held in memory) in parts of `part_size` fetched in parallel; a hashing task follows the
parts in order, so verification overlaps the download. A multi-part object keeps a journal of
finished parts beside its slot: a killed download resumes from what is on disk, and a
connection broken mid-part resumes from the last byte received. The md5 is the judge: bytes that
fail it (a flipped bit in transit, a torn resume) never enter the cache; the object is fetched
again, whole, a bounded number of times.

Durability: an object must be on disk before its name is, or a machine crash could leave a
short file under a verified name. An fsync per object costs more than the download of a small
one, so verified slots are committed in batches: one `syncfs(2)` of the cache filesystem, then
a `link` each (the cache's own install path).

Limits: a remote is untrusted, so nothing it says may cost unbounded time, memory or disk.
Every request has an overall deadline, headers and body together: `request_timeout` (60 s) plus
the body's size at `min_rate` (32 KiB/s), so a server trickling a byte a second fails in about
a minute, not never (`read_timeout` alone only bounds the gaps between bytes). A body is never
read past the size the request implies: a 206 must answer the range asked for with a matching
Content-Length; a byte beyond the declared length or the range ends the request as `overlong`
(the part starts over), however long the server would go on. Only bodies up to `inline_bytes`
are held in memory; anything larger streams into its slot. A size above S3's 5 TiB object
maximum (`MAX_OBJECT_BYTES`) and a `.dir` above `remote.MAX_DIR_BYTES` (1 GiB) are refused as
RemoteErrors, and an object larger than the free space of the cache volume (`fstatvfs`) as
"no space left on the node cache volume", all before a slot or journal is sized. `jobs` is
capped at `MAX_JOBS` (1024): workers, the connection pool and each object's part fetchers are
sized by the capped number, and a large object costs a byte per part, not a task per part.
A MemoryError while fetching becomes a RemoteError like any other failure.

Claims: whatever ends a fetch (a full volume at a write, the sync or a link; an error; a
cancel), every slot it claimed is installed, released or discarded before `afetch` returns; it
waits for its worker-thread calls first, and a call cancelled before it ran closes the slot
descriptor it was given (a duplicate shares the slot's flock). Otherwise the process would keep
the lock: it could never claim the object again, and every other process would wait for it.

Errors: 5xx, SlowDown (honouring Retry-After), timeouts, resets, truncated and overlong bodies
are retried with exponential backoff and full jitter, `attempts` times per request. What retrying
cannot fix stops the whole fetch with a `RemoteError` naming the remote, the objects and the
likely fix: bad keys (after re-reading rotated credentials once), a missing bucket, a wrong
region, an endpoint still unreachable after the retry budget. Objects the remote does not have
are reported back (`FetchReport.absent`) for the materialiser's "missing" error.

Why not aiobotocore: its per-request CPU (model-driven serialisation, event hooks, response
parsing) is about 1 ms; this path, SigV4 (`sigv4`) over aiohttp, is about 0.3 ms, and on a
2-core node the client's CPU per request decides small-object throughput (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import email.utils
import functools
import itertools
import os
import random
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp
import yarl

from datapin_sidecar import __version__
from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher
from datapin_sidecar.errors import DatapinError, DestinationError, RemoteError, os_error
from datapin_sidecar.limits import MAX_JOBS
from datapin_sidecar.remotes.base import MAX_DIR_BYTES, FetchReport
from datapin_sidecar.remotes.sigv4 import Signer
from datapin_sidecar.safefs import read_regular

if TYPE_CHECKING:
    from datapin_sidecar.remotes.s3config import CredentialSource, RemoteConfig

T = TypeVar("T")
MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB
#: Download slots claimed per worker-thread call.
CLAIM_BATCH: Final = 32
#: S3's (and B2's) largest object: a remote that claims more is not telling the truth.
MAX_OBJECT_BYTES: Final = 5 * TiB
#: Our own journals are small (a byte per part); anything bigger is not one of ours.
_JOURNAL_LIMIT: Final = 64 + MAX_OBJECT_BYTES // MiB
_JOURNAL_MAGIC: Final = b"datapin-parts 1"
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,500})</Message>")
_RETRYABLE_CODES: Final = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
)
_AUTH_CODES: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
     "InvalidToken", "TokenRefreshRequired"}
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOptions:
    """How hard to pull. The defaults suit one node talking to B2 over the internet."""

    #: Requests in flight at once (objects and parts of objects together).
    jobs: int = 32
    #: Objects larger than this are fetched in ranged parts of this size, in parallel.
    part_size: int = 16 * MiB
    #: Bodies up to this size are read whole into memory; larger ones stream to disk.
    inline_bytes: int = 1 * MiB
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
    #: Threads for file writes and hashing (both release the GIL).
    io_threads: int = 4
    #: How long to wait for an object another process on the node is downloading.
    wait_timeout: float = 900.0


class _HTTPError(Exception):
    """A non-success answer: its status, S3 error code and Retry-After."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{status} {code}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status == 429 or self.code in _RETRYABLE_CODES

    @property
    def reason(self) -> str:
        return self.code or f"http_{self.status}"


class _TruncatedError(Exception):
    """The body ended before the length the server announced."""


class _BadBodyError(Exception):
    """The answer does not frame the bytes asked for: a body longer than its declared length
    or than the range, or a different range. Nothing past the expected end is read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        #: A short label (`overlong`, `bad_range`) for the retry counters.
        self.reason = reason


#: What the retry labels mean, for the message of a fetch that gave up.
_LAST_ERROR: Final = {
    "timeout": "timeout: no complete answer within the request's deadline",
    "overlong": "overlong: a body longer than its declared length or its range",
    "bad_range": "bad_range: the server answered a range other than the one asked for",
}


class _CorruptError(Exception):
    """The bytes fail their md5."""


class _AbsentError(Exception):
    """The remote does not have the object."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _libc_function("syncfs", ctypes.c_int)
_SYNC_FILE_RANGE = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint
)
_SYNC_FILE_RANGE_WRITE: Final = 2


def _syncfs(fd: int) -> bool:
    """`syncfs(2)` on the filesystem of `fd`; False where libc lacks it."""
    return _SYNCFS is not None and _SYNCFS(fd) == 0


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk now, without waiting (`sync_file_range(2)`, WRITE only).

    Every byte we download must reach the disk before its object is installed (the batch
    `syncfs`), and a reflink flushes its source anyway. Starting writeback as each part or
    object lands overlaps the disk with the network, so the final sync waits only for the tail.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class S3Remote:
    """A DVC remote on S3 or B2. Use as `async with S3Remote(...) as remote:`.

    The async API (`afind`, `afetch`) runs on the loop that entered the context; the sync
    `Remote` protocol (`find`, `fetch`), which the materialiser calls from a worker thread,
    submits to that loop and waits.
    """

    def __init__(
        self,
        config: RemoteConfig,
        credentials: CredentialSource,
        *,
        options: FetchOptions | None = None,
    ) -> None:
        self.config = config
        self.options = options or FetchOptions()
        self._credentials = credentials
        self._signer = Signer(region=config.region)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: ThreadPoolExecutor | None = None
        self._requests: asyncio.Semaphore | None = None
        #: Retries of `find` requests, reported with the next fetch.
        self._find_retries: Counter[str] = Counter()
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._calls_lock = threading.Lock()
        self._aborted = False
        #: Requests in flight and worker tasks: `options.jobs`, capped at `MAX_JOBS`.
        self.jobs = max(1, min(self.options.jobs, MAX_JOBS))

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> S3Remote:
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
        self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(opts.io_threads, thread_name_prefix="datapin-io")
        self._requests = asyncio.Semaphore(self.jobs)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._io is not None:
            self._io.shutdown(wait=True)
        self._session = self._io = self._loop = self._requests = None

    # -- the Remote protocol (sync, from a worker thread) -------------------------------------

    @property
    def url(self) -> str:
        return self.config.describe()

    def key(self, oid: str, layout: Layout) -> str:
        return self.config.key(f"{layout.prefix()}{oid[:2]}/{oid[2:]}")

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self._call(self.afind(oid, layouts))

    def fetch(
        self,
        cache: NodeCache,
        oids: Sequence[str],
        layout: Layout,
        progress: Callable[[int], None] | None = None,
    ) -> FetchReport:
        return self._call(self.afetch(cache, oids, layout, progress=progress))

    def _call(self, coro: Awaitable[T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("S3Remote used outside `async with`")
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                raise RuntimeError("sync S3Remote call on its own loop: use asyncio.to_thread")
        if self._aborted:
            close = getattr(coro, "close", None)
            if close is not None:
                close()  # never awaited: say so to the coroutine, not to the warnings filter
            raise asyncio.CancelledError("S3Remote aborted")
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            coro,  # type: ignore[arg-type]
            loop,
        )
        with self._calls_lock:
            self._calls.add(future)
        try:
            return future.result()
        finally:
            with self._calls_lock:
                self._calls.discard(future)

    def abort(self) -> None:
        """Cancel every sync call in flight and refuse new ones (thread-safe).

        The materialiser runs in a worker thread blocked in `fetch`; cancelling the submitted
        coroutine makes `fetch` raise `CancelledError` there, so the build unwinds (claims
        released, the partial tree discarded) instead of the thread outliving the program.
        """
        self._aborted = True
        with self._calls_lock:
            calls = list(self._calls)
        for future in calls:
            future.cancel()

    # -- async API ----------------------------------------------------------------------------

    async def afind(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        """The first layout in which the remote has `oid` (a request per layout tried)."""
        for layout in layouts:
            key = self.key(oid, layout)
            try:
                await self._retrying(key, self._find_retries, functools.partial(self._exists, key))
            except _AbsentError:
                continue
            except _GaveUpError as exc:
                raise RemoteError(
                    remote=self.url,
                    problem=f"cannot tell whether it holds the object after "
                    f"{self.options.attempts} attempts (last error: "
                    f"{_LAST_ERROR.get(exc.last, exc.last)})",
                    fix="retry later; if it persists, check the remote's status and the node's "
                    "network",
                    keys=[key],
                    cause="gave_up",
                ) from None
            return layout
        return None

    async def afetch(
        self,
        cache: NodeCache,
        oids: Iterable[str],
        layout: Layout,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> FetchReport:
        """Put `oids` into `cache` (each downloaded at most once on the node); see module doc."""
        run = _Fetch(self, cache, layout, progress)
        run.report.retries.update(self._find_retries)
        self._find_retries.clear()
        await run.execute(oids)
        return run.report

    # -- requests -----------------------------------------------------------------------------

    def _signed(self, method: str, key: str) -> tuple[yarl.URL, dict[str, str]]:
        creds = self._credentials.get()
        headers = self._signer.headers(
            method=method,
            host=self.config.signing_host,
            path=self.config.canonical_path(key),
            access_key_id=creds.access_key_id,
            secret_access_key=creds.secret_access_key,
            session_token=creds.session_token,
        )
        return yarl.URL(self.config.object_url(key), encoded=True), headers

    @contextlib.asynccontextmanager
    async def _get(self, key: str, start: int, end: int) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET of bytes [start, end], raising `_HTTPError` on failure, `_BadBodyError` for a
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

    async def _exists(self, key: str) -> bool:
        """Whether `key` exists: a one-byte GET rather than a HEAD, because a HEAD's error
        answer has no body, so a missing bucket would look like a missing key."""
        try:
            async with self._get(key, 0, 0) as resp:
                if resp.status == 206:  # (a 200 ignored Range: the whole object is not read)
                    await _read_at_most(resp, 1)
        except _HTTPError as exc:
            if exc.status != 416:  # a Range on an empty object: it exists
                raise
        return True

    async def _retrying(
        self, key: str, retries: Counter[str], attempt: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `attempt` until it succeeds, retrying what retrying can fix; see module doc."""
        opts = self.options
        refreshed = False
        last = ""
        for n in range(opts.attempts):
            try:
                return await attempt()
            except _HTTPError as exc:
                if exc.status == 404 and exc.code in ("NoSuchKey", "", "NotFound"):
                    raise _AbsentError from None
                if exc.status in (401, 403) and not refreshed and _auth_failure(exc):
                    # The Secret may have rotated since we read it: re-read once, then retry.
                    refreshed = True
                    before = self._credentials.get()
                    if self._credentials.refresh() != before:
                        retries["credentials_rotated"] += 1
                        continue
                if not exc.retryable:
                    raise self._fatal(exc, key) from None
                last, retry_after = exc.reason, exc.retry_after
            except aiohttp.ClientConnectorCertificateError as exc:
                raise RemoteError(
                    remote=self.url,
                    problem=f"TLS certificate verification failed ({exc.certificate_error})",
                    fix="pass --ca-bundle with the CA that signed the endpoint's certificate "
                    "(DVC: `ssl_verify = /path/ca.pem`)",
                    cause="tls",
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
                        cause="unreachable",
                    ) from None
            except (aiohttp.ClientPayloadError, _TruncatedError):
                last, retry_after = "truncated", None
            except _BadBodyError as exc:
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
        raise _GaveUpError(key, last, opts.attempts)

    def _fatal(self, exc: _HTTPError, key: str) -> RemoteError:
        """The user-facing error for an answer retrying cannot change."""
        cfg = self.config
        creds = self._credentials.describe()
        code = exc.code or f"HTTP {exc.status}"
        if exc.code == "NoSuchBucket" or (exc.status == 404 and exc.code == "NoSuchBucket"):
            return RemoteError(
                remote=self.url,
                problem=f"bucket {cfg.bucket!r} does not exist at {cfg.resolved_endpoint}",
                fix="check the bucket in the remote URL and the endpoint (the bucket's region)",
                cause="no_bucket",
            )
        if exc.code == "InvalidAccessKeyId":
            return RemoteError(
                remote=self.url,
                problem="the access key id is not known to the server (InvalidAccessKeyId)",
                fix=f"check the key id in {creds} (for B2: the application keyID; the master "
                "application key cannot use the S3 API)",
                cause="access_denied",
            )
        if exc.code == "SignatureDoesNotMatch":
            return RemoteError(
                remote=self.url,
                problem="the secret key does not match the key id (SignatureDoesNotMatch)",
                fix=f"check the secret in {creds} (for B2: the applicationKey shown once when "
                f"the key was made) and that the region {cfg.region!r} matches the endpoint",
                cause="access_denied",
            )
        if exc.status in (401, 403):
            return RemoteError(
                remote=self.url,
                problem=f"access denied reading {key} ({code})",
                fix=f"give the key in {creds} read and list access to bucket {cfg.bucket!r} "
                "(B2: an application key restricted to another bucket or prefix is refused)",
                keys=[key],
                cause="access_denied",
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
                cause="region",
            )
        detail = f": {exc.message}" if exc.message else ""
        return RemoteError(
            remote=self.url,
            problem=f"the server refused the request ({code}{detail})",
            fix="check the remote URL, endpoint and region; report it if they are right",
            keys=[key],
            cause=exc.reason,
        )


class _GaveUpError(Exception):
    """A request still failed after every attempt."""

    def __init__(self, key: str, last: str, attempts: int) -> None:
        super().__init__(f"{key}: {last} after {attempts} attempts")
        self.key = key
        self.last = last


def _first_error(
    group: BaseExceptionGroup[BaseException], cache: NodeCache, remote: str
) -> BaseException:
    """The error a TaskGroup failure stands for: ours first, then anything else."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    # The most telling first: ours, then what ends the object (absent, gave up, corrupt).
    for kinds in (DatapinError, _AbsentError, _GaveUpError, _CorruptError):
        for exc in leaves:
            if isinstance(exc, kinds):
                return exc
    for exc in leaves:
        if isinstance(exc, (OSError, MemoryError)):
            return _user_error(exc, cache, remote)
    return leaves[0]


def _user_error(exc: OSError | MemoryError, cache: NodeCache, remote: str) -> Exception:
    """What a user is told about a filesystem or memory failure while fetching."""
    if isinstance(exc, MemoryError):
        return RemoteError(
            remote=remote,
            problem="the fetch ran out of memory (the objects fetched so far are kept)",
            fix="give the container more memory or lower --jobs (DATAPIN_JOBS), then retry",
            cause="memory",
        )
    return os_error(str(cache.root), exc, volume="node cache")


def _retry_label(exc: BaseException) -> str:
    """The retry counter a failed body counts under (the labels `_retrying` uses)."""
    if isinstance(exc, _BadBodyError):
        return exc.reason
    if isinstance(exc, (_TruncatedError, aiohttp.ClientPayloadError)):
        return "truncated"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "connection"


def _auth_failure(exc: _HTTPError) -> bool:
    return exc.code in _AUTH_CODES or not exc.code  # HEAD answers carry no body


async def _error_of(resp: aiohttp.ClientResponse) -> _HTTPError:
    body = b""
    if resp.method != "HEAD":
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            body = await resp.content.read(64 * 1024)
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return _HTTPError(
        resp.status,
        code.group(1).decode("utf-8", "replace") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
        _retry_after(resp.headers.get("Retry-After")),
    )


_CONTENT_RANGE: Final = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")


def _content_range(resp: aiohttp.ClientResponse) -> tuple[int, int, int | None] | None:
    """(first, last, total) of a `Content-Range: bytes first-last/total` (total None for `*`)."""
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if match is None:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


def _check_range(resp: aiohttp.ClientResponse, start: int, end: int) -> None:
    """A 206 must answer bytes [start, at most end] of a consistent total, with a Content-Length
    (if any) that matches: otherwise the body would land at the wrong offset or run on."""
    answered = _content_range(resp)
    if answered is None:
        raise _BadBodyError("bad_range")
    first, last, total = answered
    if first != start or last < first or last > end or (total is not None and last >= total):
        raise _BadBodyError("bad_range")
    length = resp.content_length
    if length is not None and length != last - first + 1:
        raise _BadBodyError("overlong" if length > last - first + 1 else "bad_range")


async def _read_at_most(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """The body, which must be exactly `size` bytes: `_BadBodyError` as soon as more arrive
    (nothing further is read), `_TruncatedError` if it ends short. Only for small bodies."""
    declared = resp.content_length
    if declared is not None:
        # aiohttp reads exactly the declared length (more bytes would be the next response
        # on the connection), so one bulk read is bounded: the common case, and the cheapest
        # per object (the chunk loop below cost about 0.1 ms of CPU an object).
        if declared > size:
            raise _BadBodyError("overlong")
        body = await resp.read()
        if len(body) != size:
            raise _TruncatedError
        return body
    pieces: list[bytes] = []
    got = 0
    async for data in resp.content.iter_any():
        got += len(data)
        if got > size:
            raise _BadBodyError("overlong")
        pieces.append(data)
    if got != size:
        raise _TruncatedError
    return b"".join(pieces)


# -- one fetch --------------------------------------------------------------------------------


class _Fetch:
    """The state of one `afetch`: workers, committer, report."""

    def __init__(
        self,
        remote: S3Remote,
        cache: NodeCache,
        layout: Layout,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.remote = remote
        self.opts = remote.options
        self.cache = cache
        self.layout = layout
        self.progress = progress
        self.report = FetchReport()
        self.busy: list[str] = []
        self.gave_up: list[tuple[str, str]] = []
        self.done = 0
        self.loop = asyncio.get_running_loop()
        assert remote._io is not None  # noqa: S101
        self.io = remote._io
        self.committer = _Committer(self)
        #: Worker-thread calls not finished yet: a failed fetch waits for them before it
        #: returns, so no thread of it still holds a slot (or its lock) when the caller
        #: hears of the failure and, say, frees space and tries again.
        self.threads: set[asyncio.Future[Any]] = set()

    async def execute(self, oids: Iterable[str]) -> None:
        # Claims are made ahead, in batches (one thread hop per batch instead of per object),
        # and handed to the workers through a short queue.
        claimed: asyncio.Queue[tuple[str, Slot | _Present | None] | None] = asyncio.Queue(
            self.remote.jobs
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._claimer(iter(oids), claimed))
                for _ in range(self.remote.jobs):
                    tg.create_task(self._worker(claimed))
            await self.committer.flush()
            await self._wait_for_busy()
            await self.committer.flush()
        except BaseExceptionGroup as group:
            raise _first_error(group, self.cache, self.remote.url) from None
        except (OSError, MemoryError) as exc:  # a flush: full volume, or memory
            raise _user_error(exc, self.cache, self.remote.url) from None
        finally:
            while not claimed.empty():  # claimed but never reached: give them back
                item = claimed.get_nowait()
                if item is not None and isinstance(item[1], Slot):
                    item[1].release()
            self.committer.abandon()
            if self.threads:
                await asyncio.wait(set(self.threads))
        if self.gave_up:
            keys = [k for k, _ in self.gave_up]
            last = Counter(why for _, why in self.gave_up).most_common(1)[0][0]
            last = _LAST_ERROR.get(last, last)
            raise RemoteError(
                remote=self.remote.url,
                problem=f"objects could not be downloaded after {self.opts.attempts} attempts "
                f"each (last error: {last})",
                fix="retry later; if it persists, check the remote's status and the node's "
                "network (the objects already fetched are kept)",
                keys=keys,
                cause="gave_up",
            )

    async def _claimer(
        self,
        todo: Iterator[str],
        claimed: asyncio.Queue[tuple[str, Slot | _Present | None] | None],
    ) -> None:
        """Claim download slots ahead of the workers, `CLAIM_BATCH` per thread hop (creating
        a slot allocates an inode, which on the loop thread would hold up every connection)."""
        while batch := list(itertools.islice(todo, CLAIM_BATCH)):
            future = self._run(_claim_many, self.cache, batch, self.layout)
            try:
                results = await asyncio.shield(future)
            except asyncio.CancelledError:
                future.add_done_callback(_release_claims)  # the thread may still be claiming
                raise
            for n, item in enumerate(zip(batch, results, strict=True)):
                try:
                    await claimed.put(item)
                except asyncio.CancelledError:
                    _release(results[n:])
                    raise
        for _ in range(self.remote.jobs):
            await claimed.put(None)

    async def _worker(
        self, claimed: asyncio.Queue[tuple[str, Slot | _Present | None] | None]
    ) -> None:
        while (item := await claimed.get()) is not None:
            oid, slot = item
            if slot is None:
                self.busy.append(oid)
            elif isinstance(slot, _Present):
                self.report.present += 1
                self._tick()
            else:
                await self._fetch_claimed(slot)

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None and self.done % 256 == 0:
            self.progress(self.done)

    async def _fetch_claimed(self, slot: Slot) -> None:
        """Download the object of a slot we hold (the caller saw the object absent after
        claiming); the slot ends installed or released."""
        oid, key = slot.oid, self.remote.key(slot.oid, self.layout)
        handed_over = False
        try:
            for attempt in range(self.opts.verify_attempts):
                try:
                    size = await self._download(slot, key, resume=attempt == 0)
                except _CorruptError:
                    self.report.retries["md5_mismatch"] += 1
                    continue
                await self.committer.add(slot, size)
                handed_over = True
                self.report.fetched += 1
                return
            self.report.corrupt.append(oid)
        except _AbsentError:
            self.report.absent.append(oid)
        except _GaveUpError as exc:
            self.gave_up.append((key, exc.last))
        finally:
            self._tick()
            if not handed_over:
                slot.release()  # keep partial bytes (and a journal) for a resume

    async def _download(self, slot: Slot, key: str, *, resume: bool) -> int:
        """Fill `slot` with the verified object; its size (or _CorruptError, _AbsentError...)."""
        # Only a slot left with bytes in it can have a journal (a fresh one is empty).
        journal = await self._run(_read_journal, slot.journal) if resume and slot.size else None
        if journal is not None:
            total, part_size, done = journal
            return await self._parts(slot, key, total, part_size, done, 0)
        opts = self.opts
        # What the probe learnt: a small body, or (size, bytes of part 0 on disk, part size).
        first: list[bytes | tuple[int, list[int], int]] = []

        async def probe() -> None:
            first.clear()
            try:
                async with self.remote._get(key, 0, opts.part_size - 1) as resp:
                    answered = _content_range(resp) if resp.status == 206 else None
                    total = resp.content_length if answered is None else answered[2]
                    if total is None:
                        raise _TruncatedError  # no length: cannot tell a whole body from a cut one
                    self._check_size(slot, key, total)
                    # A server that ignores Range (200) sends it all: take it as one part.
                    part_size = opts.part_size if answered is not None else max(total, 1)
                    if total <= opts.inline_bytes and total <= part_size:
                        first.append(await _read_at_most(resp, total))
                        return
                    # Large: streamed into the slot, never held in memory. Part 0 is arriving
                    # now; what streams in is kept even if the connection breaks (the part
                    # fetcher resumes it from there).
                    nparts = -(-total // part_size)
                    slot.journaled = True
                    await self._on(
                        slot,
                        _start_parts,
                        slot.journal,
                        total,
                        part_size,
                        nparts,
                        key,
                        str(self.cache.root),
                    )
                    got = [0]
                    first.append((total, got, part_size))
                    await self._write_body(resp, slot, 0, min(total, part_size), got)
            except _HTTPError as exc:
                if exc.status != 416:
                    raise
                first.append(b"")  # a Range on an empty object: it is empty
            except (
                _TruncatedError,
                _BadBodyError,
                TimeoutError,
                aiohttp.ClientError,
                ConnectionError,
            ) as exc:
                if not first:
                    raise
                # Part 0 broke after the slot was sized: the part fetcher resumes it.
                self.report.retries[_retry_label(exc)] += 1

        await self.remote._retrying(key, self.report.retries, probe)
        head = first[0]
        if isinstance(head, bytes):
            if not await self._on(slot, _write_small, slot.layout, slot.oid, head, slot.size):
                raise _CorruptError
            self.report.fetched_bytes += len(head)
            return len(head)
        total, got, part_size = head
        got0 = got[0]
        self.report.fetched_bytes += got0
        nparts = -(-total // part_size)
        return await self._parts(slot, key, total, part_size, bytearray(nparts), got0)

    def _check_size(self, slot: Slot, key: str, total: int) -> None:
        """Refuse a size no real object has (S3's maximum) and a `.dir` above `MAX_DIR_BYTES`,
        before anything is sized on disk."""
        if total > MAX_OBJECT_BYTES:
            raise RemoteError(
                remote=self.remote.url,
                problem=f"the server says {key} is {total} bytes, more than the "
                f"{MAX_OBJECT_BYTES // TiB} TiB an S3 object can be",
                fix="check that the endpoint is the S3 service (not a proxy or another server "
                "answering for it); datapin will not size a download by it",
                keys=[key],
                cause="bad_size",
            )
        if slot.oid.endswith(".dir") and total > MAX_DIR_BYTES:
            raise RemoteError(
                remote=self.remote.url,
                problem=f"the .dir manifest {key} is {total} bytes, more than the "
                f"{MAX_DIR_BYTES // GiB} GiB datapin reads for a manifest",
                fix="check what was pushed under this key (a DVC manifest of even millions "
                "of files is far smaller); `dvc push` the revision again from a clean cache",
                keys=[key],
                cause="too_large",
            )

    async def _parts(  # noqa: PLR0917 - private, called in two places
        self, slot: Slot, key: str, total: int, part_size: int, done: bytearray, got0: int
    ) -> int:
        """Fetch the parts not `done` in parallel (part 0 from byte `got0`), hash in order,
        verify. See the module doc."""
        nparts = len(done)
        self.report.resumed_bytes += sum(
            min(part_size, total - i * part_size) for i in range(nparts) if done[i]
        )
        # A bounded pool of part fetchers per object, not a task per part: a 5 TiB object
        # costs a byte per part (`done`), not a task and an event each.
        todo = (i for i in range(nparts) if not done[i])
        fetchers = min(nparts - sum(done), self.remote.jobs)
        landed = asyncio.Event()
        hasher = ObjectHasher(self.layout)

        async def part(i: int) -> None:
            start = i * part_size
            want = min(total, start + part_size) - start
            got = [got0 if i == 0 else 0]

            async def attempt() -> None:
                before = got[0]
                try:
                    async with self.remote._get(key, start + got[0], start + want - 1) as resp:
                        if resp.status == 200:  # Range ignored: the body starts at byte 0
                            if start:
                                raise _GaveUpError(key, "the server ignored Range", 1)
                            got[0] = before = 0
                        await self._write_body(resp, slot, start, want, got)
                finally:
                    self.report.fetched_bytes += max(0, got[0] - before)

            if got[0] < want:
                await self.remote._retrying(key, self.report.retries, attempt)
            await self._on(slot, _start_writeback, start, want)
            await self._run(_mark_done, slot.journal, i, nparts)
            done[i] = 1
            landed.set()

        async def fetcher() -> None:
            for i in todo:  # shared: each fetcher takes the next part not done
                await part(i)

        async def hash_in_order() -> None:
            for i in range(nparts):
                while not done[i]:
                    landed.clear()
                    await landed.wait()
                start = i * part_size
                end = min(total, start + part_size)
                await self._on(slot, _hash_range, start, end, hasher)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(hash_in_order())
                for _ in range(fetchers):
                    tg.create_task(fetcher())
        except BaseExceptionGroup as group:
            # One part's failure stands for the object's: the caller handles plain errors.
            raise _first_error(group, self.cache, self.remote.url) from None
        if hasher.hexdigest() != slot.oid.removesuffix(".dir"):
            await self._on(slot, _reset, slot.journal)  # torn resume or bad bytes: redo it whole
            raise _CorruptError
        return total

    async def _write_body(
        self, resp: aiohttp.ClientResponse, slot: Slot, start: int, want: int, got: list[int]
    ) -> None:
        """Write the body to the slot at `start + got[0]` as it arrives, advancing `got[0]`, so a
        broken stream leaves `got[0]` where a retry resumes. Raises `_TruncatedError` if short."""
        # Pieces as the socket delivers them, written with one pwritev per MiB: joining them
        # into chunks first (iter_chunked) would copy every byte once more.
        pieces: list[bytes] = []
        pending = 0
        try:
            # Read to the end of the body once `want` bytes are in (a response left unfinished
            # makes aiohttp close its connection instead of reusing it), but not a byte past
            # it: a body longer than its range is an error, however long it would go on.
            async for data in resp.content.iter_any():
                if len(data) > want - got[0] - pending:
                    # A server that sends more than it said cannot be trusted for what it
                    # sent before either: the part starts over.
                    got[0] = 0
                    raise _BadBodyError("overlong")
                pieces.append(data)
                pending += len(data)
                if pending >= MiB or got[0] + pending >= want:
                    await self._on(slot, _pwritev_all, pieces, start + got[0])
                    got[0] += pending
                    pieces, pending = [], 0
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            if pieces:  # keep what came before the break: the retry resumes after it
                await self._on(slot, _pwritev_all, pieces, start + got[0])
                got[0] += pending
            raise
        if pieces:
            await self._on(slot, _pwritev_all, pieces, start + got[0])
            got[0] += pending
        if got[0] < want:
            raise _TruncatedError

    async def _wait_for_busy(self) -> None:
        """Wait for objects other processes were downloading; take over from dead ones."""
        pending = self.busy
        self.busy = []
        deadline = time.monotonic() + self.opts.wait_timeout
        while pending:
            still: list[str] = []
            for oid in pending:
                slot = self.cache.claim(oid, self.layout)
                if slot is None:
                    still.append(oid)
                elif self.cache.present(oid, self.layout):
                    slot.discard()
                    self.report.waited += 1
                    self._tick()
                else:  # its downloader died or failed: ours now
                    await self._fetch_claimed(slot)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise RemoteError(
                        remote=self.remote.url,
                        problem=f"another process on this node has held the download of "
                        f"{len(pending)} object(s) for over {self.opts.wait_timeout:.0f} s",
                        fix="check the other datapin processes on the node (a stuck "
                        "download); their slots are in .datapin/fetch/ of the node cache",
                        keys=[self.remote.key(o, self.layout) for o in pending],
                        cause="wait_timeout",
                    )
                await asyncio.sleep(0.05)
                await self.committer.flush()

    def _on(self, slot: Slot, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run `fn(fd, *args)` in a worker thread on a duplicate of the slot's descriptor.

        A cancelled await does not stop the thread: if the slot were released meanwhile and
        its descriptor number reused by another open, a write or truncate meant for the slot
        would hit that file. The duplicate stays valid (the same open file) until the thread
        is done with it. A call cancelled before its thread started closes the duplicate
        itself: left open, it would hold the slot's lock (a flock belongs to the open file, dups
        included) for the life of the process, and the object could never be claimed again.
        """
        fd = os.dup(slot.fd)
        try:
            job = self.io.submit(_with_dup, fd, fn, args)
        except BaseException:
            os.close(fd)
            raise
        job.add_done_callback(functools.partial(_close_if_cancelled, fd))
        return self._track(asyncio.wrap_future(job, loop=self.loop))

    def _track(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        self.threads.add(future)
        future.add_done_callback(self.threads.discard)
        return future

    def _run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return self._track(self.loop.run_in_executor(self.io, fn, *args))


class _Committer:
    """Installs verified slots in batches: one syncfs, then a link each (see module doc)."""

    #: Flush when this much is pending, or at the next tick.
    MAX_OBJECTS: Final = 1024
    MAX_BYTES: Final = 256 * MiB
    TICK: Final = 0.25

    def __init__(self, fetch: _Fetch) -> None:
        self.fetch = fetch
        self.pending: list[Slot] = []
        self.bytes = 0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def add(self, slot: Slot, size: int) -> None:
        self.pending.append(slot)
        self.bytes += size
        if (
            len(self.pending) >= self.MAX_OBJECTS
            or self.bytes >= self.MAX_BYTES
            or time.monotonic() - self.last > self.TICK
        ):
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            batch, self.pending, self.bytes = self.pending, [], 0
            self.last = time.monotonic()
            if batch:
                # Shielded: cancelling the flush (another worker failed) must not cancel the
                # thread call before it starts, or the batch, no longer pending, would never
                # be installed nor released and its claims would leak; `execute` waits for it.
                job = self.fetch._run(_sync_and_install, self.fetch.cache, batch)
                job.add_done_callback(_retrieved)
                await asyncio.shield(job)

    def abandon(self) -> None:
        """After a failure: release what was not installed (its bytes stay for a resume)."""
        for slot in self.pending:
            slot.release()
        self.pending = []


# -- file work, in worker threads ---------------------------------------------------------------


class _Present:
    """Marks an object found in place when its slot was claimed."""


_PRESENT: Final = _Present()


def _claim(cache: NodeCache, oid: str, layout: Layout) -> Slot | _Present | None:
    """`cache.claim`, and if the object is already in place, give the slot back at once."""
    slot = cache.claim(oid, layout)
    if slot is not None and cache.present(oid, layout):
        slot.discard()
        return _PRESENT
    return slot


def _claim_many(cache: NodeCache, oids: list[str], layout: Layout) -> list[Slot | _Present | None]:
    claims: list[Slot | _Present | None] = []
    try:
        for oid in oids:
            claims.append(_claim(cache, oid, layout))
    except BaseException:
        _release(claims)
        raise
    return claims


def _release(claims: Sequence[Slot | _Present | None]) -> None:
    for claim in claims:
        if isinstance(claim, Slot):
            claim.release()


def _release_claims(future: asyncio.Future[list[Slot | _Present | None]]) -> None:
    if not future.cancelled() and future.exception() is None:
        _release(future.result())


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shielded call's outcome as seen: the awaiting side raises it, or was cancelled
    and `execute` reports the first error of the fetch instead."""
    if not future.cancelled():
        future.exception()


def _close_if_cancelled(fd: int, job: concurrent.futures.Future[Any]) -> None:
    if job.cancelled():  # never ran, so `_with_dup` did not close it
        os.close(fd)


def _with_dup(fd: int, fn: Callable[..., T], args: tuple[object, ...]) -> T:
    try:
        return fn(fd, *args)
    finally:
        os.close(fd)


def _write_small(fd: int, layout: Layout, oid: str, body: bytes, found: int) -> bool:
    """Write a whole small object to its slot (which held `found` bytes) if it passes its
    md5 check."""
    hasher = ObjectHasher(layout)
    hasher.update(body)
    if hasher.hexdigest() != oid.removesuffix(".dir"):
        return False
    _pwrite_all(fd, body, 0)
    if found > len(body):
        os.ftruncate(fd, len(body))  # a dead downloader left more (an attempt at a big one?)
    _start_writeback(fd, 0, len(body))
    return True


def _read_journal(path: str) -> tuple[int, int, bytearray] | None:
    """(total, part size, done flags) of a resumable download, or None."""
    try:
        data = read_regular(path, limit=_JOURNAL_LIMIT)
    except OSError:  # none, or not one of ours (UnsafeFileError): start over
        return None
    header, _, flags = data.partition(b"\n")
    fields = header.split()
    if len(fields) != 4 or b" ".join(fields[:2]) != _JOURNAL_MAGIC:
        return None
    try:
        total, part_size = int(fields[2]), int(fields[3])
    except ValueError:
        return None
    if not 0 < total <= MAX_OBJECT_BYTES:
        return None
    nparts = max(1, -(-total // part_size)) if part_size > 0 else 0
    if nparts == 0 or len(flags) != nparts:
        return None
    return total, part_size, bytearray(b == ord("1") for b in flags)


def _start_parts(  # noqa: PLR0917 - a worker-thread call
    fd: int, journal: str, total: int, part_size: int, nparts: int, key: str, cache: str
) -> None:
    """Size the slot and (for more than one part) write a journal with no part done; refuse,
    before creating either, an object the cache volume has no room for."""
    volume = os.fstatvfs(fd)
    room = volume.f_bavail * volume.f_frsize + os.fstat(fd).st_blocks * 512
    if total > room:
        raise DestinationError(
            dest=cache,
            problem=f"no space left on the node cache volume for {key} ({total} bytes, "
            f"{room} free)",
            fix="free space (the node agent's GC evicts unused objects) or use a larger volume",
        )
    os.ftruncate(fd, 0)  # bytes of an abandoned earlier attempt must not survive
    os.ftruncate(fd, total)
    if nparts > 1:
        header = b"%s %d %d\n" % (_JOURNAL_MAGIC, total, part_size)
        tmp = journal + ".new"
        with open(tmp, "wb") as f:
            f.write(header + b"0" * nparts)
        os.rename(tmp, journal)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, pieces: list[bytes], offset: int) -> None:
    written = os.pwritev(fd, pieces, offset)
    total = sum(map(len, pieces))
    if written < total:  # rare (a signal, a full disk on the way): finish it plainly
        _pwrite_all(fd, b"".join(pieces)[written:], offset + written)


def _mark_done(journal: str, index: int, nparts: int) -> None:
    """Record part `index` as on disk. Not fsynced: the md5 check catches a torn resume."""
    if nparts <= 1:
        return
    with open(journal, "r+b") as f:
        header = f.readline()
        f.seek(len(header) + index)
        f.write(b"1")


def _hash_range(fd: int, start: int, end: int, hasher: ObjectHasher) -> None:
    offset = start
    while offset < end:
        chunk = os.pread(fd, min(DVC2_CHUNK, end - offset), offset)
        if not chunk:
            raise _CorruptError  # shorter than its size: cannot be the object
        hasher.update(chunk)
        offset += len(chunk)


def _reset(fd: int, journal: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    os.ftruncate(fd, 0)


def _sync_and_install(cache: NodeCache, batch: list[Slot]) -> None:
    """Make the batch durable with one syncfs (fsync each where there is none), then install.

    Whatever fails (a full volume at the sync or at a link, anything else), every slot of the
    batch not installed is discarded, which also releases its claim: bytes that may not have
    reached the disk are not worth resuming, and a claim kept would make this process and every
    other one on the node wait for a download that is over.
    """
    try:
        if not _syncfs(batch[0].fd):
            for slot in batch:
                os.fsync(slot.fd)
        for slot in batch:
            slot.install()
    except BaseException:
        for slot in batch:
            if slot.fd >= 0:
                with contextlib.suppress(OSError):
                    slot.discard()
                slot.release()
        raise
