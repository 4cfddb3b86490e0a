"""An object's bytes from a peer into the node cache, verified: the one receive path.

Both ends receive: an asker GETs an object from its home, a home takes a leased object PUT by
its holder. Either way the receiver first claims the object's download slot (the node-wide
lock of `engine.cache`, so a peer transfer and a remote download of the same object on one node
never both happen), writes the bytes into it and checks the md5, exactly as a download from the
remote does; bytes that are not the object are discarded and never reach the cache.

Small bodies (at most `SMALL` bytes) are held in memory and handed to `Committer`, a group
commit: bodies landing while a batch is written go into the next one, and each batch is one
worker-thread call that writes, verifies, `syncfs`es once and installs. 20,000 small objects
from peers cost a few hundred thread hops and syncs, not 20,000 fsyncs. Larger bodies stream
into their slot in `PIECE`s, hashed as they are written, then commit the same way.

Bounds: the announced size must be one an object can have (`.dir` manifests at most
`MAX_DIR_BYTES`, anything at most S3's 5 TiB), checked before a byte is written; a body longer
or shorter than announced fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import Layout, ObjectHasher
from datapin_sidecar.engine.remote import MAX_DIR_BYTES
from datapin_sidecar.remotes.slotfiles import (
    MAX_OBJECT_BYTES,
    PRESENT,
    claim_many,
    pwritev_all,
    sync_and_install,
    write_small,
)

#: Bodies up to this size are held in memory and written in batches.
SMALL: Final = 1024 * 1024
#: Bytes handed to a worker thread at once when streaming a large body.
PIECE: Final = 4 * 1024 * 1024
#: Objects per commit batch.
_BATCH: Final = 512


class TransferError(Exception):
    """Bytes that cannot become the object; `reason` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def check_size(oid: str, size: int | None) -> int:
    """The announced size, if an object named `oid` can have it."""
    if size is None:
        raise TransferError("protocol", "no Content-Length: a peer body must announce its size")
    limit = MAX_DIR_BYTES if oid.endswith(".dir") else MAX_OBJECT_BYTES
    if not 0 <= size <= limit:
        raise TransferError("protocol", f"size {size} is not one object {oid} can have")
    return size


async def claim(cache: NodeCache, oid: str, layout: Layout) -> Slot | None:
    """The object's slot, claimed; None if it is in place or another process is fetching it."""
    (got,) = await asyncio.to_thread(claim_many, cache, [oid], layout)
    return got if isinstance(got, Slot) else None


async def claim_all(
    cache: NodeCache, oids: Sequence[str], layout: Layout
) -> tuple[dict[str, Slot], list[str], list[str]]:
    """(slots claimed, oids already in place, oids another process on the node is fetching)."""
    claims = await asyncio.to_thread(claim_many, cache, list(oids), layout)
    slots: dict[str, Slot] = {}
    present: list[str] = []
    busy: list[str] = []
    for oid, got in zip(oids, claims, strict=True):
        if isinstance(got, Slot):
            slots[oid] = got
        elif got is PRESENT:
            present.append(oid)
        else:
            busy.append(oid)
    return slots, present, busy


async def receive(
    committer: Committer, slot: Slot, size: int, chunks: AsyncIterator[bytes]
) -> None:
    """Fill `slot` with `size` bytes from `chunks` and install it, or raise TransferError
    (the slot is then discarded, which releases the claim)."""
    try:
        if size <= SMALL:
            body = bytearray()
            async for chunk in chunks:
                body += chunk
                if len(body) > size:
                    raise TransferError("overlong", f"more than the {size} bytes announced")
            if len(body) != size:
                raise TransferError("truncated", f"{len(body)} of {size} bytes arrived")
            ok = await committer.commit(slot, bytes(body))
        else:
            ok = await _stream(slot, size, chunks)
            if ok:
                await committer.commit(slot, None)
    except BaseException:
        if slot.fd >= 0:
            await asyncio.shield(asyncio.to_thread(slot.discard))
        raise
    if not ok:
        raise TransferError("corrupt", f"the bytes received for {slot.oid} are not that object")


async def _stream(slot: Slot, size: int, chunks: AsyncIterator[bytes]) -> bool:
    hasher = ObjectHasher(slot.layout)
    offset = 0
    pieces: list[bytes] = []
    held = 0

    def write(at: int, batch: list[bytes]) -> None:
        pwritev_all(slot.fd, batch, at)
        for piece in batch:
            hasher.update(piece)

    async for chunk in chunks:
        if offset + held + len(chunk) > size:
            raise TransferError("overlong", f"more than the {size} bytes announced")
        pieces.append(chunk)
        held += len(chunk)
        if held >= PIECE:
            await asyncio.to_thread(write, offset, pieces)
            offset, pieces, held = offset + held, [], 0
    if pieces:
        await asyncio.to_thread(write, offset, pieces)
        offset += held
    if offset != size:
        raise TransferError("truncated", f"{offset} of {size} bytes arrived")
    if slot.size > size:
        await asyncio.to_thread(os.ftruncate, slot.fd, size)
    return hasher.hexdigest() == slot.oid.removesuffix(".dir")


@dataclass(slots=True, eq=False)
class Committer:
    """Group commit of received objects (see the module doc). One per program's loop."""

    running: bool = False
    pending: list[tuple[Slot, bytes | None, asyncio.Future[bool]]] = field(default_factory=list)

    async def commit(self, slot: Slot, body: bytes | None) -> bool:
        """Write `body` (None: the slot is filled and verified already), verify, make durable
        and install; False if `body` is not the object (the slot is discarded)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending.append((slot, body, done))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await asyncio.shield(done)  # a cancelled receiver's batch still completes

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:_BATCH], self.pending[_BATCH:]
                try:
                    results = await asyncio.to_thread(_write_and_install, batch)
                except BaseException as exc:
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(exc if isinstance(exc, Exception) else OSError())
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, _, done), ok in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(ok)
        finally:
            self.running = False


def _write_and_install(batch: Sequence[tuple[Slot, bytes | None, object]]) -> list[bool]:
    """In a worker thread: write and verify the bodies, one syncfs, install the good ones."""
    results: list[bool] = []
    good: list[Slot] = []
    try:
        for slot, body, _ in batch:
            ok = body is None or write_small(
                slot.fd, slot.layout, slot.oid, body, slot.size, writeback=False
            )
            results.append(ok)
            if ok:
                good.append(slot)
            else:
                slot.discard()
        if good:
            sync_and_install(good[0].cache, good)
    except BaseException:
        for slot, _, _ in batch:
            if slot.fd >= 0:
                with contextlib.suppress(OSError):
                    slot.discard()
        raise
    return results
