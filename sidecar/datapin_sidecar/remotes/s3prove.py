"""One proof that an S3 remote holds a batch of objects (`S3Remote.prove`, for `csi.access`).

What counts as proof: the remote, read with the request's own keys, has an object under the
object's key whose bytes are the object's. Two ways to learn that:

* **The server's word (ETag).** A single-part upload's ETag is the md5 of its bytes, which is
  the DVC 3 object id (and the legacy id of every binary object). S3 computes it from the
  bytes it stored; a tenant cannot set it. So when `trust_etags` is on, an object whose ETag is
  the md5 its id names is proven by one LIST entry. This trusts the *endpoint*: a server the
  tenant runs can answer any ETag, which is why the caller turns it off for endpoints it does
  not trust (see `csi.access`).
* **The bytes.** Anything else (a multipart ETag `<md5>-N`, an SSE-KMS/SSE-C ETag, a legacy
  text object whose id is the md5 of its LF form, an ETag that is simply another md5, or any
  object at all when ETags are not trusted) is downloaded from this remote and hashed with the
  layout's own hasher (`engine.hashing.ObjectHasher`), in pieces of `PIECE` bytes, stored
  nowhere; `DOWNLOADS` objects at once. Bytes that do not hash to the id are `mismatched`.
  When the caller knows an object's size (the node cache's copy), an entry of another size is
  `mismatched` at once: a hostile server cannot make us download a size it made up.

How the entries are found: up to `STAT_MAX` objects get one one-byte GET each (`S3Client.stat`:
ETag and size; a GET, not a HEAD, because a HEAD's error has no body to tell a missing bucket
from a missing key); more are grouped by their key's shard directory (`.../files/md5/ab/`) and
each needed shard is listed (`S3Client.list_page`, paged, `LISTS` shards at once): a revision
of 100k objects costs a few hundred LISTs, not 100k requests. Listing whole shards pays while
the remote holds fewer than about 1000 times the objects wanted (a page brings 1000 keys); a
pin alone (step (a) of the proof) never lists. Listings are parsed by `s3list`, which refuses
hostile XML and keys outside the prefix asked for.

Failures: a remote that refuses the keys, lacks the bucket, or keeps failing is a `RemoteError`
(from `S3Client.retrying`; `GAVE_UP` when the attempts run out), never a verdict on objects.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Literal, TypeVar

from datapin_sidecar.engine.hashing import Layout, ObjectHasher
from datapin_sidecar.engine.remote import ProofReport, check_dir_size
from datapin_sidecar.errors import (
    AbsentError,
    BadBodyError,
    DatapinError,
    GaveUpError,
    RemoteCause,
    RemoteError,
)
from datapin_sidecar.remotes.s3client import LAST_ERROR, S3Client, read_at_most
from datapin_sidecar.remotes.s3list import MAX_PAGES, Listed, ListPage
from datapin_sidecar.remotes.slotfiles import MAX_OBJECT_BYTES, MiB

T = TypeVar("T")
#: Up to this many objects are looked up one by one; more are listed by shard.
STAT_MAX: Final = 8
#: Shards listed at once.
LISTS: Final = 8
#: Objects downloaded and hashed at once, and the piece each request brings.
DOWNLOADS: Final = 4
PIECE: Final = 4 * MiB


class Proof:
    """One `prove` of a batch (see the module doc)."""

    def __init__(
        self,
        *,
        client: S3Client,
        io: ThreadPoolExecutor,
        layout: Layout,
        trust_etags: bool,
        sizes: Mapping[str, int],
        retries: Counter[str],
    ) -> None:
        self.client = client
        self.io = io
        self.layout = layout
        self.trust_etags = trust_etags
        self.sizes = sizes
        self.retries = retries
        self.downloads = asyncio.Semaphore(DOWNLOADS)

    async def execute(self, oids: Sequence[str]) -> ProofReport:
        wanted = list(dict.fromkeys(oids))
        keys = {oid: self.client.key(oid, self.layout) for oid in wanted}
        if len(wanted) <= STAT_MAX:
            found = dict(zip(wanted, await _all(self._stat(keys[o]) for o in wanted), strict=True))
        else:
            listed = await self._list_shards(set(keys.values()))
            found = {o: listed.get(keys[o]) for o in wanted}
        # Most verdicts need no download: decided here, without a task per object.
        by: dict[bool | None, list[str]] = {True: [], False: [], None: []}
        to_hash: list[tuple[str, Listed]] = []
        for oid in wanted:
            entry = found[oid]
            if entry is None:
                by[None].append(oid)
                continue
            verdict = self._judge(oid, entry)
            if isinstance(verdict, bool):
                by[verdict].append(oid)
            else:
                to_hash.append((oid, entry))
        hashed = await _all(self._judge_bytes(oid, entry) for oid, entry in to_hash)
        for (oid, _), by_bytes in zip(to_hash, hashed, strict=True):
            by[by_bytes].append(oid)
        return ProofReport(
            proven=tuple(by[True]), absent=tuple(by[None]), mismatched=tuple(by[False])
        )

    async def _retrying(self, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.client.retrying(key, self.retries, attempt)
        except GaveUpError as exc:
            raise RemoteError(
                remote=self.client.url,
                problem=f"cannot tell whether it holds the objects after "
                f"{self.client.options.attempts} attempts (last error: "
                f"{LAST_ERROR.get(exc.last, exc.last)})",
                fix="retry later; if it persists, check the remote's status and the node's network",
                keys=[key],
                cause=RemoteCause.GAVE_UP,
            ) from None

    async def _stat(self, key: str) -> Listed | None:
        try:
            etag, size = await self._retrying(key, functools.partial(self.client.stat, key))
        except AbsentError:
            return None
        return Listed(key=key, etag=etag, size=-1 if size is None else size)

    async def _list_shards(self, wanted: set[str]) -> dict[str, Listed]:
        """The entries of the `wanted` keys, from listings of their shards (only those kept:
        a shard of a large bucket may hold millions of other keys)."""
        listed: dict[str, Listed] = {}
        gate = asyncio.Semaphore(LISTS)

        async def one(prefix: str) -> None:
            async with gate:
                token: str | None = None
                seen: set[str] = set()
                for _ in range(MAX_PAGES):
                    page = await self._list_page(prefix, token)
                    listed.update((o.key, o) for o in page.objects if o.key in wanted)
                    token = page.next_token
                    if token is None:
                        return
                    if token in seen:
                        raise self._refused(prefix, "it hands out a continuation token twice")
                    seen.add(token)
                raise self._refused(prefix, f"it goes on past {MAX_PAGES} pages")

        await _all(one(p) for p in sorted({_shard(k) for k in wanted}))
        return listed

    async def _list_page(self, prefix: str, token: str | None) -> ListPage:
        try:
            return await self._retrying(
                prefix, functools.partial(self.client.list_page, prefix, token)
            )
        except AbsentError:  # a 404 without a code: the bucket, not a key, is missing
            raise self._refused(prefix, "it answers 404 to a listing") from None

    def _refused(self, prefix: str, problem: str) -> RemoteError:
        return RemoteError(
            remote=self.client.url,
            problem=f"the listing of {prefix!r} cannot be believed: {problem}",
            fix="check that the endpoint is the S3 service that holds the remote",
            cause=RemoteCause.REMOTE,
        )

    def _judge(self, oid: str, entry: Listed) -> bool | Literal["hash"]:
        """True: proven; False: other bytes under its key; "hash": only the bytes can tell."""
        if self.sizes.get(oid, entry.size) != entry.size:
            return False  # not the size of the object we know: not it, and nothing to read
        if self.trust_etags and entry.md5 == oid.removesuffix(".dir"):
            return True
        if entry.size < 0 or entry.size > MAX_OBJECT_BYTES:
            return False  # a size no object has: nothing to hash, not the object
        check_dir_size(remote=self.client.url, oid=oid, key=entry.key, size=entry.size)
        return "hash"

    async def _judge_bytes(self, oid: str, entry: Listed) -> bool | None:
        """Download and hash: True if the bytes are the object, None if it went meanwhile."""
        md5 = oid.removesuffix(".dir")
        async with self.downloads:
            try:
                return await self._hash(entry.key, entry.size) == md5
            except AbsentError:
                return None  # gone between the listing and the download

    async def _hash(self, key: str, size: int) -> str:
        """The layout's name for the `size` bytes at `key`, downloaded piece by piece."""
        hasher = ObjectHasher(self.layout)
        loop = asyncio.get_running_loop()
        for start in range(0, size, PIECE):
            end = min(size, start + PIECE) - 1
            data = await self._retrying(key, functools.partial(self._piece, key, start, end))
            await loop.run_in_executor(self.io, hasher.update, data)
        return hasher.hexdigest()

    async def _piece(self, key: str, start: int, end: int) -> bytes:
        async with self.client.get(key, start, end) as resp:
            if resp.status == 200 and (start or resp.content_length != end + 1):
                # Range ignored, and the object is more than this piece: not read whole here.
                raise BadBodyError("bad_range")
            return await read_at_most(resp, end - start + 1)


def _shard(key: str) -> str:
    """The shard directory of an object key: `.../ab/` of `.../ab/cdef...`."""
    return key[: key.rindex("/") + 1]


async def _all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run them all; on a failure cancel the rest and raise the most telling error."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks.extend(tg.create_task(coro) for coro in coros)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        raise next((e for e in leaves if isinstance(e, DatapinError)), leaves[0]) from None
    return [t.result() for t in tasks]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
