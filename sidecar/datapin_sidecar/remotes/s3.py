"""The S3 / Backblaze B2 remote: fast, verified, once per node. `S3Remote` ties the parts.

The remote is split by job:

* `s3client` — the HTTP client: SigV4 signing (`sigv4`) over aiohttp, per-request deadlines,
  retries with backoff, and S3 error answers turned into `RemoteError`s with the likely fix.
* `s3fetch` — one fetch of a batch: claims (each object downloaded once per node), a fixed pool
  of workers, parallel ranged parts with in-order hashing, the batch committer, and the wait
  for objects other processes are downloading.
* `s3prove`, `s3list` — the proof of access (`prove`): ETags by LIST or one-byte GETs,
  downloads hashed where the ETag cannot be taken as the md5, hostile listings refused.
* `slotfiles` — the file work, in worker threads: claims, part files and their journal, the
  batched `syncfs` before install.

`S3Remote` owns what lives as long as the remote: the client (one connection pool), the I/O
threads, and the bridge from the sync `Remote` protocol (called by the materialiser from a
worker thread) to its event loop, with `abort()` to cancel what is in flight at SIGTERM.

Limits: a remote is untrusted, so nothing it says may cost unbounded time, memory or disk.
Every request has an overall deadline (`FetchOptions.request_timeout` plus the body's size at
`min_rate`); a body is never read past the size the request implies; only bodies up to
`inline_bytes` are held in memory. A size above S3's 5 TiB object maximum
(`slotfiles.MAX_OBJECT_BYTES`) and a `.dir` above `base.MAX_DIR_BYTES` (1 GiB) are refused as
RemoteErrors, and an object larger than the free space of the cache volume as "no space left
on the node cache volume", all before a slot or journal is sized. `jobs` is capped at
`MAX_JOBS` (1024): workers, the connection pool and each object's part fetchers are sized by
the capped number, and a large object costs a byte per part, not a task per part. A
MemoryError while fetching becomes a RemoteError like any other failure.

Errors: what retrying cannot fix stops the whole fetch with a `RemoteError` naming the remote,
the objects and the likely fix, its `cause` a `RemoteCause`; objects the remote does not have
are reported back (`FetchReport.absent`) for the materialiser's "missing" error.

Why not aiobotocore: its per-request CPU (model-driven serialisation, event hooks, response
parsing) is about 1 ms; this path is about 0.3 ms, and on a 2-core node the client's CPU per
request decides small-object throughput (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport, ProofReport, Ticker
from datapin_sidecar.errors import AbsentError, GaveUpError, RemoteCause, RemoteError
from datapin_sidecar.remotes.loopcalls import LoopCalls
from datapin_sidecar.remotes.s3client import LAST_ERROR, FetchOptions, S3Client
from datapin_sidecar.remotes.s3fetch import Fetch
from datapin_sidecar.remotes.s3prove import Proof

if TYPE_CHECKING:
    from datapin_sidecar.remotes.credentials import CredentialSource
    from datapin_sidecar.remotes.endpoint import RemoteConfig

__all__ = ["FetchOptions", "S3Remote"]

T = TypeVar("T")


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
        self._client = S3Client(config, credentials, options=self.options)
        self._calls = LoopCalls("S3Remote")
        self._io: ThreadPoolExecutor | None = None
        #: Retries of `find` requests, reported with the next fetch.
        self._find_retries: Counter[str] = Counter()
        #: Requests in flight and worker tasks: `options.jobs`, capped at `MAX_JOBS`.
        self.jobs = self._client.jobs

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> S3Remote:
        await self._client.__aenter__()
        self._calls.loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(self.options.io_threads, thread_name_prefix="datapin-io")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__()
        if self._io is not None:
            self._io.shutdown(wait=True)
        self._io = None
        self._calls.loop = None

    # -- the Remote protocol (sync, from a worker thread) -------------------------------------

    @property
    def url(self) -> str:
        return self._client.url

    def key(self, oid: str, layout: Layout) -> str:
        return self._client.key(oid, layout)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self._call(self.afind(oid, layouts))

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        return self._call(self.afetch(cache, oids, layout, progress=progress))

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        return self._call(self.aprove(oids, layout, trust_etags=trust_etags, sizes=sizes))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._calls.call(coro)

    def abort(self) -> None:
        """Cancel every sync call in flight and refuse new ones (thread-safe).

        The materialiser runs in a worker thread blocked in `fetch`; cancelling the submitted
        coroutine makes `fetch` raise `CancelledError` there, so the build unwinds (claims
        released, the partial tree discarded) instead of the thread outliving the program.
        """
        self._calls.abort()

    # -- async API ----------------------------------------------------------------------------

    async def afind(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        """The first layout in which the remote has `oid` (a request per layout tried)."""
        for layout in layouts:
            key = self.key(oid, layout)
            try:
                await self._client.retrying(
                    key, self._find_retries, functools.partial(self._client.exists, key)
                )
            except AbsentError:
                continue
            except GaveUpError as exc:
                raise RemoteError(
                    remote=self.url,
                    problem=f"cannot tell whether it holds the object after "
                    f"{self.options.attempts} attempts (last error: "
                    f"{LAST_ERROR.get(exc.last, exc.last)})",
                    fix="retry later; if it persists, check the remote's status and the node's "
                    "network",
                    keys=[key],
                    cause=RemoteCause.GAVE_UP,
                ) from None
            return layout
        return None

    async def afetch(
        self,
        cache: NodeCache,
        oids: Iterable[str],
        layout: Layout,
        *,
        progress: Ticker | None = None,
    ) -> FetchReport:
        """Put `oids` into `cache` (each downloaded at most once on the node); see `s3fetch`."""
        if self._io is None:
            raise RuntimeError("S3Remote used outside `async with`")
        run = Fetch(client=self._client, io=self._io, cache=cache, layout=layout, progress=progress)
        run.report.retries.update(self._find_retries)
        self._find_retries.clear()
        await run.execute(oids)
        return run.report

    async def aprove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        """Whether the remote holds exactly `oids` (see `s3prove`); touches no cache."""
        if self._io is None:
            raise RuntimeError("S3Remote used outside `async with`")
        proof = Proof(
            client=self._client,
            io=self._io,
            layout=layout,
            trust_etags=trust_etags,
            sizes=sizes or {},
            retries=self._find_retries,
        )
        return await proof.execute(oids)
