"""The file work of an S3 fetch, in worker threads: claims, part files, journals, durability.

Everything here runs in the fetch's I/O threads (or, for `wait_unlocked`, a thread of its
own), never on the event loop: creating a slot allocates an inode, a write or an fsync can
take milliseconds, and on the loop thread each would hold up every connection.

Claims (`claim_many`): a download slot is claimed through `NodeCache.claim`, and given back at
once when the object is already in place (`PRESENT`). Whatever a claiming call returns is
either handed on or released (`release_all`, `release_claims` for a call whose awaiter was
cancelled): a slot kept by mistake holds its lock for the life of the process.

Waiting (`wait_unlocked`): an object another process (or another fetch of this one) is
downloading is waited for on its slot's lock itself, a blocking shared `flock` in a daemon
thread, so the waiter wakes the moment the holder installs, releases or dies, with no
polling. The lock is dropped as soon as it is granted: it only says "look again".

Part files: a large object is written into its slot at any offset and hashed from the same
buffers (`write_and_feed`: `pwritev_all`, then `engine.streamhash.StreamHash.feed`), with a
journal of the parts on disk beside it (`start_parts`, `mark_done`, `read_journal`) so a killed
download resumes. Not fsynced per part: the md5 check catches a torn resume.

Durability: `sync_and_install` makes a batch of verified slots durable with one `syncfs(2)`
(fsync each where libc lacks it), then installs them; `start_writeback` starts each write's
writeback early so the sync waits only for the tail.

Small objects: `write_small` checks a whole body's md5, then writes it; `write_small_many` does
a batch of them in one thread call (see `s3fetch._SmallWrites`).

Slot descriptors: a call on a slot gets a duplicate of its descriptor (`with_dup`), closed when
the call ends, or by `close_if_cancelled` (`close_all_if_cancelled`) if the call never ran (see
`s3fetch.Fetch._on`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher
from datapin_sidecar.engine.streamhash import StreamHash
from datapin_sidecar.errors import DestinationError, Md5MismatchError
from datapin_sidecar.safefs import open_regular, read_regular

if TYPE_CHECKING:  # the directory remote's threads use this module without an event loop
    import asyncio

T = TypeVar("T")
MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB
#: S3's (and B2's) largest object: a remote that claims more is not telling the truth.
MAX_OBJECT_BYTES: Final = 5 * TiB
#: Our own journals are small (a byte per part); anything bigger is not one of ours.
_JOURNAL_LIMIT: Final = 64 + MAX_OBJECT_BYTES // MiB
_JOURNAL_MAGIC: Final = b"datapin-parts 1"


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


def syncfs(fd: int) -> bool:
    """`syncfs(2)` on the filesystem of `fd`; False where libc lacks it."""
    return _SYNCFS is not None and _SYNCFS(fd) == 0


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk now, without waiting (`sync_file_range(2)`, WRITE only).

    Every byte we download must reach the disk before its object is installed (the batch
    `syncfs`), and a reflink flushes its source anyway. Starting writeback as each part or
    object lands overlaps the disk with the network, so the final sync waits only for the tail.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Present:
    """Marks an object found in place when its slot was claimed."""


PRESENT: Final = Present()


def _claim(cache: NodeCache, oid: str, layout: Layout) -> Slot | Present | None:
    """`cache.claim`, and if the object is already in place, give the slot back at once."""
    slot = cache.claim(oid, layout)
    if slot is not None and cache.present(oid, layout):
        slot.discard()
        return PRESENT
    return slot


def claim_many(cache: NodeCache, oids: list[str], layout: Layout) -> list[Slot | Present | None]:
    claims: list[Slot | Present | None] = []
    try:
        for oid in oids:
            claims.append(_claim(cache, oid, layout))
    except BaseException:
        release_all(claims)
        raise
    return claims


def release_all(claims: Sequence[Slot | Present | None]) -> None:
    for claim in claims:
        if isinstance(claim, Slot):
            claim.release()


def release_claims(future: asyncio.Future[list[Slot | Present | None]]) -> None:
    if not future.cancelled() and future.exception() is None:
        release_all(future.result())


def close_if_cancelled(fd: int, job: concurrent.futures.Future[Any]) -> None:
    if job.cancelled():  # never ran, so `with_dup` did not close it
        os.close(fd)


def with_dup(fd: int, fn: Callable[..., T], args: tuple[object, ...]) -> T:
    try:
        return fn(fd, *args)
    finally:
        os.close(fd)


def write_small(
    fd: int, layout: Layout, oid: str, body: bytes, found: int, *, writeback: bool = True
) -> bool:
    """Write a whole small object to its slot (which held `found` bytes) if it passes its
    md5 check. `writeback=False` leaves the writeback to the batch's sync: for a local copy
    of a few KiB, starting it here costs more than the copy (it is the one thing to overlap
    with a network)."""
    hasher = ObjectHasher(layout)
    hasher.update(body)
    if hasher.hexdigest() != oid.removesuffix(".dir"):
        return False
    _pwrite_all(fd, body, 0)
    if found > len(body):
        os.ftruncate(fd, len(body))  # a dead downloader left more (an attempt at a big one?)
    if writeback:
        start_writeback(fd, 0, len(body))
    return True


#: One small object for `write_small_many`: (a duplicate of its slot's descriptor, which the
#: call closes; layout; oid; body; bytes the slot held when claimed).
SmallWrite = tuple[int, Layout, str, bytes, int]


def write_small_many(items: Sequence[SmallWrite]) -> list[bool | OSError]:
    """`write_small` for each item, in one worker-thread call; an item's OSError (a full volume)
    is its result, not the batch's. Every item's descriptor is closed, whatever happens."""
    results: list[bool | OSError] = []
    try:
        for fd, layout, oid, body, found in items:
            try:
                results.append(write_small(fd, layout, oid, body, found))
            except OSError as exc:
                results.append(exc)
    finally:
        for item in items:
            os.close(item[0])
    return results


def close_all_if_cancelled(
    items: Sequence[SmallWrite], job: concurrent.futures.Future[Any]
) -> None:
    """`close_if_cancelled` for a `write_small_many` call that never ran."""
    if job.cancelled():
        for item in items:
            os.close(item[0])


def read_journal(path: str) -> tuple[int, int, bytearray] | None:
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


def start_parts(  # noqa: PLR0917 - a worker-thread call
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


def pwritev_all(fd: int, pieces: list[bytes], offset: int) -> None:
    written = os.pwritev(fd, pieces, offset)
    total = sum(map(len, pieces))
    if written < total:  # rare (a signal, a full disk on the way): finish it plainly
        _pwrite_all(fd, b"".join(pieces)[written:], offset + written)


def write_and_feed(fd: int, pieces: list[bytes], offset: int, stream: StreamHash) -> None:
    """Write `pieces` at `offset`, then hand the bytes to the object's md5 (`StreamHash.feed`).

    The pieces (as the socket delivered them, often a few KiB) are joined into one buffer
    first: hashlib releases the GIL for each `update`, and a hashing thread that must take it
    back for every small piece while the event loop holds it runs at a fraction of md5's
    speed (the GIL's switch interval is 5 ms). One copy of a MiB costs far less than that.
    """
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    _pwrite_all(fd, data, offset)
    stream.feed(fd, offset, (data,))


def mark_done(journal: str, index: int, nparts: int) -> None:
    """Record part `index` as on disk. Not fsynced: the md5 check catches a torn resume."""
    if nparts <= 1:
        return
    with open(journal, "r+b") as f:
        header = f.readline()
        f.seek(len(header) + index)
        f.write(b"1")


def hash_range(fd: int, start: int, end: int, hasher: ObjectHasher) -> None:
    """Hash bytes `[start, end)` of a file already written (a reflinked clone)."""
    offset = start
    while offset < end:
        chunk = os.pread(fd, min(DVC2_CHUNK, end - offset), offset)
        if not chunk:
            raise Md5MismatchError  # shorter than its size: cannot be the object
        hasher.update(chunk)
        offset += len(chunk)


def reset(fd: int, journal: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    os.ftruncate(fd, 0)


def sync_and_install(cache: NodeCache, batch: list[Slot]) -> None:
    """Make the batch durable with one syncfs (fsync each where there is none), then install.

    Whatever fails (a full volume at the sync or at a link, anything else), every slot of the
    batch not installed is discarded, which also releases its claim: bytes that may not have
    reached the disk are not worth resuming, and a claim kept would make this process and every
    other one on the node wait for a download that is over.
    """
    try:
        if not syncfs(batch[0].fd):
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


def wait_unlocked(path: str) -> asyncio.Future[None]:
    """Resolve once the slot at `path` is not locked by anyone (see the module doc).

    A daemon thread blocks on a shared `flock` of the slot; it is not one of the fetch's I/O
    threads, which a wait of minutes would starve, and not cancellable, so a waiter given up
    on (the fetch timed out or was cancelled) just ends when the holder lets go, dropping the
    lock the moment it gets it. A slot that is gone, or not a plain file, resolves at once:
    the claim that follows sorts out what is there.
    """
    import asyncio  # noqa: PLC0415 - only the S3 fetch waits, and it runs in an event loop

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def wait() -> None:
        try:
            fd = open_regular(path)
        except OSError:
            pass
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                pass
            finally:
                os.close(fd)  # drops the lock at once: it only said "look again"
        with contextlib.suppress(RuntimeError):  # the loop closed: no one is waiting
            loop.call_soon_threadsafe(resolve)

    threading.Thread(target=wait, name="datapin-wait", daemon=True).start()
    return done
