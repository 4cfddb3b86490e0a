"""engine.streamhash: an object's md5 from its writes, in whatever order the parts land.

Real files and a real thread pool: each test writes pieces into a file the way the S3 fetch
does (pwrite, then feed from the same buffer, from several threads) and checks the digest
against hashlib over the whole object, what was read back, and that the memory budget is
whole again afterwards.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from datapin_sidecar.engine.hashing import Layout, ObjectHasher
from datapin_sidecar.engine.streamhash import ByteBudget, StreamHash

KiB = 1024
LIMIT = 10 * 1024 * KiB


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def _object(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _pieces(data: bytes, piece: int) -> list[tuple[int, bytes]]:
    return [(o, data[o : o + piece]) for o in range(0, len(data), piece)]


def _write_and_feed(
    path: Path, stream: StreamHash, pieces: list[tuple[int, bytes]], pool: ThreadPoolExecutor
) -> None:
    """pwrite + feed each piece in the pool's threads, in the order given (all at once)."""

    def one(offset: int, data: bytes) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, data, offset)
            stream.feed(fd, offset, (data,))
        finally:
            os.close(fd)

    for future in [pool.submit(one, offset, data) for offset, data in pieces]:
        future.result()


def _finish(path: Path, stream: StreamHash, size: int) -> str | None:
    stream.idle().result(timeout=30)
    fd = os.open(path, os.O_RDONLY)
    try:
        return stream.finish(fd, size)
    finally:
        os.close(fd)


def _file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "slot"
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def test_parts_landing_out_of_order_hash_to_the_objects_md5_without_reading_back(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _object(3 * 1024 * KiB + 17)
    pieces = _pieces(data, 64 * KiB)
    random.Random(2).shuffle(pieces)
    path = _file(tmp_path, len(data))
    budget = ByteBudget(LIMIT)
    stream = StreamHash(Layout.DVC3, budget=budget, executor=pool)
    _write_and_feed(path, stream, pieces, pool)
    assert _finish(path, stream, len(data)) == hashlib.md5(data).hexdigest()
    assert stream.reread_bytes == 0
    assert budget.fits(LIMIT)  # every parked byte given back


def test_past_the_budget_pieces_are_read_back_and_the_md5_is_still_right(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _object(1024 * KiB, seed=3)
    pieces = _pieces(data, 32 * KiB)
    pieces.reverse()  # everything lands ahead of the cursor until the very last piece
    path = _file(tmp_path, len(data))
    budget = ByteBudget(128 * KiB)
    stream = StreamHash(Layout.DVC3, budget=budget, executor=pool)
    _write_and_feed(path, stream, pieces, pool)
    assert _finish(path, stream, len(data)) == hashlib.md5(data).hexdigest()
    assert 0 < stream.reread_bytes < len(data)
    assert budget.fits(128 * KiB)


def test_bytes_an_earlier_process_wrote_are_read_back_in_their_place(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _object(512 * KiB, seed=4)
    path = _file(tmp_path, len(data))
    with path.open("r+b") as f:  # a journal's parts 1 and 3 of 4 are on disk already
        for start in (128 * KiB, 384 * KiB):
            f.seek(start)
            f.write(data[start : start + 128 * KiB])
    stream = StreamHash(Layout.DVC3, budget=ByteBudget(LIMIT), executor=pool)
    for start in (128 * KiB, 384 * KiB):
        stream.on_disk(start, start + 128 * KiB)
    rest = [p for p in _pieces(data, 128 * KiB) if p[0] in (0, 256 * KiB)]
    _write_and_feed(path, stream, rest, pool)
    assert _finish(path, stream, len(data)) == hashlib.md5(data).hexdigest()
    assert stream.reread_bytes == 256 * KiB


def test_a_range_written_twice_is_judged_by_what_the_file_holds(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """A part that starts over (an overlong body) rewrites bytes the md5 may have seen: the
    stream is tainted and the digest is of the file, so the md5 judges what is on disk."""
    data = _object(256 * KiB, seed=5)
    bad = bytes(64 * KiB)
    path = _file(tmp_path, len(data))
    budget = ByteBudget(LIMIT)
    stream = StreamHash(Layout.DVC3, budget=budget, executor=pool)
    first = [(0, data[: 64 * KiB]), (64 * KiB, bad)]
    _write_and_feed(path, stream, first, pool)
    again = [(64 * KiB, data[64 * KiB : 128 * KiB]), (128 * KiB, data[128 * KiB :])]
    _write_and_feed(path, stream, again, pool)
    assert stream.tainted
    assert _finish(path, stream, len(data)) == hashlib.md5(data).hexdigest()
    assert stream.reread_bytes == len(data)
    assert budget.fits(LIMIT)


def test_a_gap_is_no_digest_and_the_budget_comes_back(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _object(256 * KiB, seed=6)
    path = _file(tmp_path, len(data))
    budget = ByteBudget(LIMIT)
    stream = StreamHash(Layout.DVC3, budget=budget, executor=pool)
    pieces = [p for p in _pieces(data, 64 * KiB) if p[0] != 64 * KiB]
    _write_and_feed(path, stream, pieces, pool)
    assert _finish(path, stream, len(data)) is None
    assert budget.fits(LIMIT)


def test_an_abandoned_download_gives_its_parked_bytes_back(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _object(256 * KiB, seed=7)
    path = _file(tmp_path, len(data))
    budget = ByteBudget(256 * KiB)
    stream = StreamHash(Layout.DVC3, budget=budget, executor=pool)
    _write_and_feed(path, stream, _pieces(data, 64 * KiB)[1:], pool)  # part 0 never comes
    assert not budget.fits(256 * KiB)
    stream.release()
    assert budget.fits(256 * KiB)


def test_the_legacy_layout_is_hashed_as_dvc_2_names_a_text_object(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """DVC 2 folds CRLF in text objects, per 1 MiB read: the stream must cut the same way."""
    line = b"a line of text\r\n"
    data = line * (3 * 1024 * KiB // len(line))
    expected = ObjectHasher(Layout.LEGACY)
    expected.update(data)
    pieces = _pieces(data, 96 * KiB)
    random.Random(8).shuffle(pieces)
    path = _file(tmp_path, len(data))
    stream = StreamHash(Layout.LEGACY, budget=ByteBudget(LIMIT), executor=pool)
    _write_and_feed(path, stream, pieces, pool)
    digest = _finish(path, stream, len(data))
    assert digest == expected.hexdigest()
    assert digest != hashlib.md5(data).hexdigest()  # the folding happened
