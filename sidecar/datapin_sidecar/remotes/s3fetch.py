"""One fetch of a batch of objects into the node cache: claims, workers, committer.

Shape (`Fetch.execute`): a claimer task claims each object's download slot in the cache
(`NodeCache.claim`, the node-wide lock that makes it download once however many processes want
it), `CLAIM_BATCH` per worker-thread call, and queues the claims for a fixed pool of worker
tasks, so a 100k-object revision costs a few dozen tasks, not 100k. A worker GETs the object
(`S3Client`), checks its DVC md5 and hands the slot to the committer, which installs verified
slots in batches (one `syncfs`, then a link each: `slotfiles.sync_and_install`).

Objects another process is downloading are set aside and waited for at the end: usually they
are in place by then, and if their downloader died we download them ourselves. Claims and
presence checks go through the I/O threads like every other file operation, and the wait is
on the holder's lock (`slotfiles.wait_unlocked`), not a polling loop: the fetch wakes when the
holder installs, releases or dies, within `wait_timeout` overall.

Requests: a GET of the first part tells the size (`Content-Range`) and brings a small object
whole, in one request; bodies up to `inline_bytes` are written and hashed in one thread call.
Larger objects stream into their slot in parts of `part_size` fetched in parallel by a bounded
pool of part fetchers (`parts_per_object`, taking parts in order). Every write is hashed from
the same buffers, in order however the parts land, by a drain job per object on the I/O threads
(`engine.streamhash`): verification overlaps the download, no byte is read back while the
memory budget (`hash_window`) lasts (writes ahead of the md5 wait for room, `_room`), and
several objects hash on several cores. A journal beside the slot records finished parts, so a
killed download resumes, and a connection broken mid-part resumes from its last byte. The md5
is the judge: bytes that fail it never enter the cache; the object is fetched again, whole,
`verify_attempts` times.

Claims: whatever ends a fetch (a full volume at a write, the sync or a link; an error; a
cancel), every slot it claimed is installed, released or discarded before `execute` returns;
it waits for its worker-thread calls first, and a call cancelled before it ran closes the slot
descriptor it was given (a duplicate shares the slot's flock). Otherwise the process would keep
the lock: it could never claim the object again, and every other process would wait for it.

The fetch is given what it uses (the client, the I/O threads, the cache); it knows nothing of
`S3Remote`, which owns those for the life of the remote.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

import aiohttp

from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport, Ticker, check_dir_size
from datapin_sidecar.engine.streamhash import ByteBudget, StreamHash
from datapin_sidecar.errors import (
    AbsentError,
    BadBodyError,
    DatapinError,
    GaveUpError,
    HTTPStatusError,
    Md5MismatchError,
    RemoteCause,
    RemoteError,
    TruncatedError,
    os_error,
)
from datapin_sidecar.remotes.s3client import (
    LAST_ERROR,
    S3Client,
    content_range,
    read_at_most,
    retry_label,
)
from datapin_sidecar.remotes.slotfiles import (
    MAX_OBJECT_BYTES,
    MiB,
    Present,
    SmallWrite,
    TiB,
    claim_many,
    close_all_if_cancelled,
    close_if_cancelled,
    mark_done,
    read_journal,
    release_all,
    release_claims,
    reset,
    start_parts,
    start_writeback,
    sync_and_install,
    wait_unlocked,
    with_dup,
    write_and_feed,
    write_small_many,
)

T = TypeVar("T")
#: Download slots claimed per worker-thread call.
CLAIM_BATCH: Final = 32
Claim = Slot | Present | None


#: The longest a write ahead of its object's md5 waits for room in the hash budget (`_room`).
HASH_WAIT: Final = 2.0


class Fetch:
    """The state of one fetch: workers, committer, report."""

    def __init__(
        self,
        *,
        client: S3Client,
        io: ThreadPoolExecutor,
        cache: NodeCache,
        layout: Layout,
        progress: Ticker | None,
    ) -> None:
        self.client = client
        self.opts = client.options
        self.cache = cache
        self.layout = layout
        self.progress = progress
        self.report = FetchReport()
        self.busy: list[str] = []
        self.gave_up: list[tuple[str, str]] = []
        self.done = 0
        self.loop = asyncio.get_running_loop()
        self.io = io
        self.committer = _Committer(cache, run=self._run)
        self.small = _SmallWrites(self)
        #: What parts that land ahead of their object's hash cursor may hold (streamhash).
        self.hash_budget = ByteBudget(self.opts.hash_window, on_give=self._gave_room)
        self._room_freed = asyncio.Event()
        self._room_waiters = 0
        #: Worker-thread calls not finished yet: a failed fetch waits for them before it
        #: returns, so no thread of it still holds a slot (or its lock) when the caller
        #: hears of the failure and, say, frees space and tries again.
        self.threads: set[asyncio.Future[Any]] = set()

    async def execute(self, oids: Iterable[str]) -> None:
        # Claims are made ahead, in batches (one thread hop per batch instead of per object),
        # and handed to the workers through a short queue.
        claimed: asyncio.Queue[tuple[str, Claim] | None] = asyncio.Queue(self.client.jobs)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._claimer(iter(oids), claimed))
                for _ in range(self.client.jobs):
                    tg.create_task(self._worker(claimed))
            await self.committer.flush()
            await self._wait_for_busy()
            await self.committer.flush()
        except BaseExceptionGroup as group:
            raise _first_error(group, self.cache, self.client.url) from None
        except (OSError, MemoryError) as exc:  # a flush: full volume, or memory
            raise _user_error(exc, self.cache, self.client.url) from None
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
            last = LAST_ERROR.get(last, last)
            raise RemoteError(
                remote=self.client.url,
                problem=f"objects could not be downloaded after {self.opts.attempts} attempts "
                f"each (last error: {last})",
                fix="retry later; if it persists, check the remote's status and the node's "
                "network (the objects already fetched are kept)",
                keys=keys,
                cause=RemoteCause.GAVE_UP,
            )

    async def _claimer(
        self,
        todo: Iterator[str],
        claimed: asyncio.Queue[tuple[str, Claim] | None],
    ) -> None:
        """Claim download slots ahead of the workers, `CLAIM_BATCH` per thread hop (creating
        a slot allocates an inode, which on the loop thread would hold up every connection)."""
        while batch := list(itertools.islice(todo, CLAIM_BATCH)):
            results = await self._claim(batch)
            for n, item in enumerate(zip(batch, results, strict=True)):
                try:
                    await claimed.put(item)
                except asyncio.CancelledError:
                    release_all(results[n:])
                    raise
        for _ in range(self.client.jobs):
            await claimed.put(None)

    async def _worker(self, claimed: asyncio.Queue[tuple[str, Claim] | None]) -> None:
        while (item := await claimed.get()) is not None:
            oid, slot = item
            if slot is None:
                self.busy.append(oid)
            elif isinstance(slot, Present):
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
        oid, key = slot.oid, self.client.key(slot.oid, self.layout)
        handed_over = False
        try:
            for attempt in range(self.opts.verify_attempts):
                try:
                    size = await self._download(slot, key, resume=attempt == 0)
                except Md5MismatchError:
                    self.report.retries["md5_mismatch"] += 1
                    continue
                # The committer owns the slot from the moment `add` is entered (it appends
                # before its first await): if the add is cancelled in a flush, the install
                # thread may be using the slot, and releasing it here too would close its
                # descriptor under that thread (a double close can leave another slot locked).
                handed_over = True
                await self.committer.add(slot, size)
                self.report.fetched += 1
                return
            self.report.corrupt.append(oid)
        except AbsentError:
            self.report.absent.append(oid)
        except GaveUpError as exc:
            self.gave_up.append((key, exc.last))
        finally:
            self._tick()
            if not handed_over:
                slot.release()  # keep partial bytes (and a journal) for a resume

    async def _download(self, slot: Slot, key: str, *, resume: bool) -> int:
        """Fill `slot` with the verified object; its size (or Md5MismatchError, AbsentError...)."""
        # Only a slot left with bytes in it can have a journal (a fresh one is empty).
        journal = await self._run(read_journal, slot.journal) if resume and slot.size else None
        stream = StreamHash(self.layout, budget=self.hash_budget, executor=self.io)
        try:
            if journal is not None:
                total, part_size, done = journal
                return await self._parts(slot, key, total, part_size, done, 0, stream)
            return await self._download_new(slot, key, stream)
        finally:
            stream.release()

    async def _download_new(self, slot: Slot, key: str, stream: StreamHash) -> int:
        """`_download` of an object with nothing on disk yet: the probe, then the parts."""
        opts = self.opts
        # What the probe learnt: a small body, or (size, bytes of part 0 on disk, part size).
        first: list[bytes | tuple[int, list[int], int]] = []

        async def probe() -> None:
            first.clear()
            try:
                async with self.client.get(key, 0, opts.part_size - 1) as resp:
                    answered = content_range(resp) if resp.status == 206 else None
                    total = resp.content_length if answered is None else answered[2]
                    if total is None:
                        raise TruncatedError  # no length: cannot tell a whole body from a cut one
                    self._check_size(slot, key, total)
                    # A server that ignores Range (200) sends it all: take it as one part.
                    part_size = opts.part_size if answered is not None else max(total, 1)
                    if total <= opts.inline_bytes and total <= part_size:
                        first.append(await read_at_most(resp, total))
                        return
                    # Large: streamed into the slot, never held in memory. Part 0 is arriving
                    # now; what streams in is kept even if the connection breaks (the part
                    # fetcher resumes it from there).
                    nparts = -(-total // part_size)
                    slot.journaled = True
                    await self._on(
                        slot,
                        start_parts,
                        slot.journal,
                        total,
                        part_size,
                        nparts,
                        key,
                        str(self.cache.root),
                    )
                    got = [0]
                    first.append((total, got, part_size))
                    await self._write_body(resp, slot, 0, min(total, part_size), got, stream)
            except HTTPStatusError as exc:
                if exc.status != 416:
                    raise
                first.append(b"")  # a Range on an empty object: it is empty
            except (
                TruncatedError,
                BadBodyError,
                TimeoutError,
                aiohttp.ClientError,
                ConnectionError,
            ) as exc:
                if not first:
                    raise
                # Part 0 broke after the slot was sized: the part fetcher resumes it.
                self.report.retries[retry_label(exc)] += 1

        await self.client.retrying(key, self.report.retries, probe)
        head = first[0]
        if isinstance(head, bytes):
            if not await self.small.write(slot, head):
                raise Md5MismatchError
            self.report.fetched_bytes += len(head)
            return len(head)
        total, got, part_size = head
        got0 = got[0]
        self.report.fetched_bytes += got0
        nparts = -(-total // part_size)
        return await self._parts(slot, key, total, part_size, bytearray(nparts), got0, stream)

    def _check_size(self, slot: Slot, key: str, total: int) -> None:
        """Refuse a size no real object has (S3's maximum) and a `.dir` above `MAX_DIR_BYTES`,
        before anything is sized on disk."""
        if total > MAX_OBJECT_BYTES:
            raise RemoteError(
                remote=self.client.url,
                problem=f"the server says {key} is {total} bytes, more than the "
                f"{MAX_OBJECT_BYTES // TiB} TiB an S3 object can be",
                fix="check that the endpoint is the S3 service (not a proxy or another server "
                "answering for it); datapin will not size a download by it",
                keys=[key],
                cause=RemoteCause.BAD_SIZE,
            )
        check_dir_size(remote=self.client.url, oid=slot.oid, key=key, size=total)

    async def _parts(  # noqa: PLR0917 - private, called in two places
        self,
        slot: Slot,
        key: str,
        total: int,
        part_size: int,
        done: bytearray,
        got0: int,
        stream: StreamHash,
    ) -> int:
        """Fetch the parts not `done` in parallel (part 0 from byte `got0`, already fed to
        `stream`), hashed as they are written, and verify. See the module doc."""
        nparts = len(done)
        for i in range(nparts):
            if done[i]:  # a journal's: written by an earlier process, read back to hash
                stream.on_disk(i * part_size, min(total, (i + 1) * part_size))
        self.report.resumed_bytes += sum(
            min(part_size, total - i * part_size) for i in range(nparts) if done[i]
        )
        # A bounded pool of part fetchers per object, not a task per part: a 5 TiB object
        # costs a byte per part (`done`), not a task and an event each. Parts are taken in
        # order and only `parts_per_object` are in flight, so the part at the hash cursor
        # is never far behind the ones parked ahead of it (streamhash's budget).
        todo = (i for i in range(nparts) if not done[i])
        fetchers = min(nparts - sum(done), self.client.jobs, self.opts.parts_per_object)

        async def part(i: int) -> None:
            start = i * part_size
            want = min(total, start + part_size) - start
            got = [got0 if i == 0 else 0]

            async def attempt() -> None:
                before = got[0]
                try:
                    async with self.client.get(key, start + got[0], start + want - 1) as resp:
                        if resp.status == 200:  # Range ignored: the body starts at byte 0
                            if start:
                                raise GaveUpError(key, "the server ignored Range", 1)
                            got[0] = before = 0
                        await self._write_body(resp, slot, start, want, got, stream)
                finally:
                    self.report.fetched_bytes += max(0, got[0] - before)

            if got[0] < want:
                await self.client.retrying(key, self.report.retries, attempt)
            await self._on(slot, start_writeback, start, want)
            await self._run(mark_done, slot.journal, i, nparts)
            done[i] = 1

        async def fetcher() -> None:
            for i in todo:  # shared: each fetcher takes the next part not done
                await part(i)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(fetchers):
                    tg.create_task(fetcher())
        except BaseExceptionGroup as group:
            # One part's failure stands for the object's: the caller handles plain errors.
            raise _first_error(group, self.cache, self.client.url) from None
        await asyncio.wrap_future(stream.idle())
        digest = await self._on(slot, stream.finish, total)
        self.report.reread_bytes += stream.reread_bytes
        if digest != slot.oid.removesuffix(".dir"):
            await self._on(slot, reset, slot.journal)  # torn resume or bad bytes: redo it whole
            raise Md5MismatchError
        return total

    async def _write_body(  # noqa: PLR0917 - private
        self,
        resp: aiohttp.ClientResponse,
        slot: Slot,
        start: int,
        want: int,
        got: list[int],
        stream: StreamHash,
    ) -> None:
        """Write the body to the slot at `start + got[0]` as it arrives, advancing `got[0]`, so a
        broken stream leaves `got[0]` where a retry resumes, and feed what is written to
        `stream`. Raises `TruncatedError` if short."""
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
                    raise BadBodyError("overlong")
                pieces.append(data)
                pending += len(data)
                if pending >= MiB or got[0] + pending >= want:
                    if start + got[0] != stream.cursor:
                        await self._room(pending)
                    await self._on(slot, write_and_feed, pieces, start + got[0], stream)
                    got[0] += pending
                    pieces, pending = [], 0
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            if pieces:  # keep what came before the break: the retry resumes after it
                await self._on(slot, write_and_feed, pieces, start + got[0], stream)
                got[0] += pending
            raise
        if pieces:
            await self._on(slot, write_and_feed, pieces, start + got[0], stream)
            got[0] += pending
        if got[0] < want:
            raise TruncatedError

    async def _room(self, size: int) -> None:
        """Back-pressure for a write that lands ahead of its object's md5: wait (a little)
        until parking it fits the hash budget. The md5 of one object is a single stream, so
        when it falls behind the network, slowing the parts ahead costs no time, while parking
        past the budget would cost a read-back. Bounded: a part at the cursor that is itself
        waiting (a retry queued behind parts that wait here) must not be held up for long,
        so after `HASH_WAIT` the write goes ahead and its bytes are read back instead."""
        deadline = self.loop.time() + HASH_WAIT
        self._room_waiters += 1
        try:
            while not self.hash_budget.fits(size):
                self._room_freed.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._room_freed.wait()
                except TimeoutError:
                    return
        finally:
            self._room_waiters -= 1

    def _gave_room(self) -> None:
        """`ByteBudget`'s callback, in an I/O thread: wake the writes waiting in `_room`."""
        if self._room_waiters:  # advisory read: a missed wake-up only costs a timeout
            self.loop.call_soon_threadsafe(self._room_freed.set)

    async def _wait_for_busy(self) -> None:
        """Wait for objects other processes were downloading; take over from dead ones.

        Each round claims what is still pending (in the I/O threads), then, if some slot is
        still held, waits on its holder's lock (see the module doc) until `wait_timeout`."""
        pending = self.busy
        self.busy = []
        deadline = self.loop.time() + self.opts.wait_timeout
        while pending:
            claims = await self._claim(pending)
            still: list[str] = []
            try:
                for n, (oid, claim) in enumerate(zip(pending, claims, strict=True)):
                    claims[n] = None  # handed on below: ours to finish, not to release
                    if claim is None:
                        still.append(oid)
                    elif isinstance(claim, Present):
                        self.report.waited += 1
                        self._tick()
                    else:  # its downloader died or failed: ours now
                        await self._fetch_claimed(claim)
            finally:
                release_all(claims)
            pending = still
            if not pending:
                break
            # Our own batch may hold one of them (an oid listed twice): install it first.
            await self.committer.flush()
            try:
                async with asyncio.timeout_at(deadline):
                    await wait_unlocked(self.cache.slot_path(pending[0], self.layout))
            except TimeoutError:
                raise RemoteError(
                    remote=self.client.url,
                    problem=f"another process on this node has held the download of "
                    f"{len(pending)} object(s) for over {self.opts.wait_timeout:.0f} s",
                    fix="check the other datapin processes on the node (a stuck "
                    "download); their slots are in .datapin/fetch/ of the node cache",
                    keys=[self.client.key(o, self.layout) for o in pending],
                    cause=RemoteCause.WAIT_TIMEOUT,
                ) from None

    async def _claim(self, oids: list[str]) -> list[Claim]:
        """Claim `oids` in an I/O thread; a cancelled wait releases what the thread claims."""
        future = self._run(claim_many, self.cache, oids, self.layout)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(release_claims)  # the thread may still be claiming
            raise

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
            job = self.io.submit(with_dup, fd, fn, args)
        except BaseException:
            os.close(fd)
            raise
        job.add_done_callback(functools.partial(close_if_cancelled, fd))
        return self._track(asyncio.wrap_future(job, loop=self.loop))

    def _track(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        self.threads.add(future)
        future.add_done_callback(self.threads.discard)
        return future

    def _run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return self._track(self.loop.run_in_executor(self.io, fn, *args))


class _SmallWrites:
    """Writes small objects to their slots in batches: one worker-thread call per batch.

    A small object costs the loop one GET. Handing its write to a thread on its own cost as
    much again: a submit, a wake-up of the loop through its self-pipe, a future copied across,
    and hand-offs of the GIL on each, which make the loop thread (the fetch's bottleneck) wait
    in every syscall of its own. Bodies that land while a batch is being written go into the
    next one (a group commit): under load the batches grow by themselves, and an idle fetch
    writes each body at once. At most `in_flight` batches run at a time, so several cores hash
    while few threads contend for the GIL.

    Each body's slot descriptor is duplicated when it is queued (as `Fetch._on` does): a worker
    cancelled while its batch runs releases its slot, and the batch must not write to a reused
    descriptor number. A body whose worker was cancelled before its batch started is dropped.
    """

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.in_flight = max(1, fetch.opts.io_threads // 2)
        self.running = 0
        self.pending: list[tuple[SmallWrite, asyncio.Future[bool]]] = []

    async def write(self, slot: Slot, body: bytes) -> bool:
        """Whether `body` passed its md5 and is in the slot (not yet durable: the committer's
        sync makes it so)."""
        done: asyncio.Future[bool] = self.fetch.loop.create_future()
        fd = os.dup(slot.fd)
        self.pending.append(((fd, slot.layout, slot.oid, body, slot.size), done))
        if self.running < self.in_flight:
            self._start()
        return await done

    def _start(self) -> None:
        batch = []
        for item, done in self.pending:
            if done.done():  # its worker was cancelled: nobody wants it written
                os.close(item[0])
            else:
                batch.append((item, done))
        self.pending = []
        if not batch:
            return
        items = [item for item, _ in batch]
        try:
            job = self.fetch.io.submit(write_small_many, items)
        except RuntimeError as exc:  # the pool is shut down: each writer hears it, none waits
            for item, done in batch:
                os.close(item[0])
                done.set_exception(exc)
            return
        job.add_done_callback(functools.partial(close_all_if_cancelled, items))
        self.running += 1
        future = self.fetch._track(asyncio.wrap_future(job, loop=self.fetch.loop))
        future.add_done_callback(functools.partial(self._finished, [d for _, d in batch]))

    def _finished(self, waiting: list[asyncio.Future[bool]], job: asyncio.Future[Any]) -> None:
        self.running -= 1
        results: list[bool | BaseException]
        if job.cancelled():
            results = [asyncio.CancelledError()] * len(waiting)
        elif (exc := job.exception()) is not None:
            results = [exc] * len(waiting)
        else:
            results = job.result()
        for done, result in zip(waiting, results, strict=True):
            if done.done():
                continue
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)
        if self.pending and self.running < self.in_flight:
            self._start()


class _Committer:
    """Installs verified slots in batches: one syncfs, then a link each (see module doc)."""

    #: Flush when this much is pending, or at the next tick.
    MAX_OBJECTS: Final = 1024
    MAX_BYTES: Final = 256 * MiB
    TICK: Final = 0.25

    def __init__(self, cache: NodeCache, *, run: Callable[..., asyncio.Future[None]]) -> None:
        self.cache = cache
        #: Runs a call in the fetch's I/O threads, tracked so the fetch waits for it.
        self.run = run
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
                job = self.run(sync_and_install, self.cache, batch)
                job.add_done_callback(_retrieved)
                await asyncio.shield(job)

    def abandon(self) -> None:
        """After a failure: release what was not installed (its bytes stay for a resume)."""
        for slot in self.pending:
            slot.release()
        self.pending = []


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
    for kinds in (DatapinError, AbsentError, GaveUpError, Md5MismatchError):
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
            cause=RemoteCause.MEMORY,
        )
    return os_error(str(cache.root), exc, volume="node cache")


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shielded call's outcome as seen: the awaiting side raises it, or was cancelled
    and `execute` reports the first error of the fetch instead."""
    if not future.cancelled():
        future.exception()
