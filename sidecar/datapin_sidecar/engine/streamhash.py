"""An object's md5, computed from its bytes as they are written, whatever order they land in.

A large object arrives as ranged parts fetched in parallel, so its bytes land out of order,
while md5 must see them in order. Reading the file back once every part is in would cost a
second pass over every byte (page cache copies) and serialise the hash after the download.
`StreamHash` hashes each piece right after it is written, from the same buffer:

- **Parked, then drained by one job per object.** `feed(fd, offset, pieces)` is called in the
  I/O thread that has just written `pieces` at `offset`; it parks them (keeps the buffers)
  and returns. When the piece at the hash cursor is parked and no drain runs, it submits a
  drain job to the I/O threads, which hashes parked pieces in order until the next one is
  missing. The writer never waits for the md5, so a part's download goes on while its bytes
  are hashed; one drain per object at a time (the `busy` flag) keeps the md5 in order; and
  the drains of several objects run on several cores (hashlib releases the GIL).
- **Memory is bounded.** Parked bytes are charged to a `ByteBudget` shared by the whole fetch
  (the piece at the cursor always, it is hashed next; the caller holds back writes ahead of
  the cursor while the budget is spent: `s3fetch.Fetch._room`). When it is spent anyway, a
  feed parks only the range (offset, length): the bytes are on disk already, and the drain
  reads them back from the file when the cursor gets there. That is
  the only read-back, and it is counted (`reread_bytes`), so a benchmark shows whether the
  budget and the number of parts in flight fit.
- **Bytes from before this process** (parts a journal says are done, a first part resumed from
  its last byte) are registered with `on_disk` and read back the same way.
- **A rewrite taints.** A range fed twice (a part that started over after an overlong body)
  may differ from what was hashed: the stream is then `tainted`, and `finish` hashes the whole
  file from disk instead. The md5 stays the judge either way; this only decides which bytes
  it reads.

`idle()` is a future that resolves when no drain runs; after the last feed the caller awaits
it, then `finish(fd, total)` drains the rest and returns the digest as the layout names the
object, or None when the stream does not cover `[0, total)` exactly (the caller redoes the
object). A download that ends any other way calls `release`, so parked bytes go back to the
budget.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher

Pieces = Sequence[bytes | bytearray | memoryview]


class ByteBudget:
    """Bytes that parked pieces may hold, across every object of a fetch (thread-safe)."""

    __slots__ = ("_free", "_lock", "_on_give")

    def __init__(self, limit: int, *, on_give: Callable[[], None] | None = None) -> None:
        self._free = limit
        self._lock = threading.Lock()
        #: Called (in the giving thread) after bytes come back: wakes whoever waits for room.
        self._on_give = on_give

    def take(self, n: int, *, force: bool = False) -> bool:
        """Charge `n` bytes if they fit (or anyway, with `force`); whether they were."""
        with self._lock:
            if n > self._free and not force:
                return False
            self._free -= n
            return True

    def fits(self, n: int) -> bool:
        """Whether `n` bytes would fit now (advisory: another thread may take them first)."""
        return n <= self._free

    def give(self, n: int) -> None:
        with self._lock:
            self._free += n
        if self._on_give is not None:
            self._on_give()


class StreamHash:
    """The md5 of one object fed from its writes (see the module doc)."""

    __slots__ = (
        "_budget",
        "_busy",
        "_cursor",
        "_executor",
        "_hasher",
        "_idle",
        "_layout",
        "_lock",
        "_parked",
        "reread_bytes",
        "tainted",
    )

    def __init__(self, layout: Layout, *, budget: ByteBudget, executor: Executor) -> None:
        self._layout = layout
        self._hasher = ObjectHasher(layout)
        self._budget = budget
        self._executor = executor
        self._lock = threading.Lock()
        self._cursor = 0
        self._busy = False
        self._idle: list[concurrent.futures.Future[None]] = []
        #: offset -> (length, pieces, or None when the bytes are to be read from the file).
        self._parked: dict[int, tuple[int, Pieces | None]] = {}
        self.reread_bytes = 0
        self.tainted = False

    @property
    def cursor(self) -> int:
        """The end of what the md5 has taken (advisory, read without the lock)."""
        return self._cursor

    def on_disk(self, start: int, end: int) -> None:
        """Bytes `[start, end)` are in the file already (written before this stream)."""
        if end > start:
            with self._lock:
                self._park(start, end - start, None)

    def feed(self, fd: int, offset: int, pieces: Pieces) -> None:
        """`pieces` were just written at `offset` of the file `fd` (see the module doc)."""
        length = sum(map(len, pieces))
        if not length:
            return
        with self._lock:
            if self.tainted:
                return
            held = pieces if self._budget.take(length, force=offset == self._cursor) else None
            if not self._park(offset, length, held) and held is not None:
                self._budget.give(length)
            if self._busy or self._cursor not in self._parked:
                return
            self._busy = True
            dup = os.dup(fd)  # the caller's descriptor is closed when its call returns
        try:
            self._executor.submit(self._drain_job, dup)
        except BaseException:
            os.close(dup)
            self._done()
            raise

    def idle(self) -> concurrent.futures.Future[None]:
        """A future that resolves when no drain is running."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._busy:
                self._idle.append(future)
                return future
        future.set_result(None)
        return future

    def finish(self, fd: int, total: int) -> str | None:
        """Hash what is left; the digest, or None if the stream is not `[0, total)` exactly.
        Call it once the last feed has returned and `idle()` has resolved."""
        with self._lock:
            if self._busy:
                raise RuntimeError("finish while a drain runs")  # the caller's bug
            self._busy = True
        try:
            self._drain(fd)
        finally:
            self._done()
        if self.tainted:
            self.release()
            hasher = ObjectHasher(self._layout)
            offset = 0
            while offset < total:
                chunk = os.pread(fd, min(DVC2_CHUNK, total - offset), offset)
                if not chunk:
                    return None
                hasher.update(chunk)
                offset += len(chunk)
            self.reread_bytes += total
            return hasher.hexdigest()
        if self._cursor != total or self._parked:
            self.release()
            return None
        return self._hasher.hexdigest()

    def release(self) -> None:
        """Give back what parked pieces hold (an abandoned download must call it)."""
        with self._lock:
            for length, pieces in self._parked.values():
                if pieces is not None:
                    self._budget.give(length)
            self._parked.clear()

    def _park(self, offset: int, length: int, pieces: Pieces | None) -> bool:
        """Park a range (under the lock); False (and tainted) if it overlaps what was fed."""
        end = offset + length
        if offset < self._cursor or any(
            offset < o + n and o < end for o, (n, _) in self._parked.items()
        ):
            self.tainted = True
            return False
        self._parked[offset] = (length, pieces)
        return True

    def _drain_job(self, fd: int) -> None:
        try:
            self._drain(fd)
        except BaseException:
            with self._lock:
                self.tainted = True  # finish reads the whole file back, and says what fails
        finally:
            os.close(fd)
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._busy = False
            waiters, self._idle = self._idle, []
        for future in waiters:
            future.set_result(None)

    def _drain(self, fd: int) -> None:
        """Hash parked ranges in order from the cursor until one is missing; we are busy."""
        while True:
            with self._lock:
                if self.tainted:
                    return
                offset = self._cursor
                entry = self._parked.pop(offset, None)
                if entry is None:
                    return
                # Claimed now, under the lock: a feed of these bytes again while they are
                # being hashed must see them as already fed (and taint), not as new.
                self._cursor += entry[0]
            length, pieces = entry
            try:
                if pieces is None:
                    self._reread(fd, offset, length)
                else:
                    for piece in pieces:
                        self._hasher.update(piece)
            finally:
                if pieces is not None:
                    self._budget.give(length)

    def _reread(self, fd: int, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = os.pread(fd, min(DVC2_CHUNK, end - offset), offset)
            if not chunk:
                with self._lock:
                    self.tainted = True  # shorter than written: cannot be the object
                return
            self._hasher.update(chunk)
            offset += len(chunk)
        self.reread_bytes += length
