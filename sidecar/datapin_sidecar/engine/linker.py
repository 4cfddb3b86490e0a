"""Putting one cache object at one path: reflink, hardlink or copy.

Strategies, in the order `auto` tries them:

* **reflink** — `ioctl(dst, FICLONE, src)`: a copy-on-write clone. The file shares the cache
  object's extents (no data written, no space used) yet is its own inode, so nothing a consumer
  does to it can reach the cache. The default on XFS made with `reflink=1`.
* **hardlink** — `link(src, dst)`: cheapest, but the file *is* the cache object. Safe only if
  consumers cannot write, so the tree is served read-only (objects are 0444 and
  `LinkResult.read_only` tells the caller to mount it `readOnly`).
* **copy** — `sendfile` of the bytes: always works, costs the data.

The choice is probed once per (cache filesystem, destination filesystem) pair with a real
one-byte object and remembered for the process, because the answer depends on the pair
(reflink needs both on one reflink-capable filesystem; hardlink needs one filesystem). Later a
single file can still fail in a way the probe could not foresee (EMLINK on a popular object,
EINVAL from an odd file): on the errno list DVC uses, that file alone falls to the next
strategy. Cross-device (EXDEV) means copy. Zero-byte files are always created fresh: linking
them all to one inode would hit per-inode link limits and gains nothing.

Per-file work is a few syscalls in a tight loop; the functions here take `bytes` names so the
hot path never encodes a str. The destination is a directory descriptor and a name in it: a
destination may be a tree a pod could write, so nothing is ever resolved through its path (a
directory swapped for a symlink cannot redirect a link), and files are created with
`O_CREAT | O_EXCL`, which never follows a symlink either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import create_locked
from datapin_sidecar.errors import LinkError, os_error

FICLONE: Final = 0x40049409
FILE_MODE: Final = 0o444
# DVC's list: the strategy cannot work here, try the next one (REFERENCE.md).
FALLBACK_ERRNOS: Final = frozenset(
    {
        errno.EPERM,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.EXDEV,
        errno.ENOTTY,
        errno.ENOSYS,
        errno.EINVAL,
        errno.EAGAIN,
        errno.EMLINK,
    }
)
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_CLOEXEC


class LinkMode(StrEnum):
    """How a file of a tree was made from its cache object."""

    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"

    @property
    def read_only(self) -> bool:
        """Whether writes to such a file would reach the cache (so the mount must be ro)."""
        return self is LinkMode.HARDLINK


class Strategy(StrEnum):
    """What the user asked for: one mode, or `auto` (the best one that works)."""

    AUTO = "auto"
    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"

    def ladder(self) -> tuple[LinkMode, ...]:
        if self is Strategy.AUTO:
            return (LinkMode.REFLINK, LinkMode.HARDLINK, LinkMode.COPY)
        return (LinkMode(self.value),)


class Linker:
    """Links cache objects into trees, counting what it did by mode."""

    def __init__(self, strategy: Strategy = Strategy.AUTO) -> None:
        self.strategy = strategy
        self._probed: dict[tuple[int, int], tuple[LinkMode, ...]] = {}
        self.counts: Counter[LinkMode] = Counter()

    # -- probing ------------------------------------------------------------------------------

    def modes_for(
        self, *, cache_tmp: str, dest_dir: str | None = None, dest_fd: int | None = None
    ) -> tuple[LinkMode, ...]:
        """The ladder that works from the cache's filesystem to the destination's, best first.

        `cache_tmp` is a writable directory on the cache's filesystem; the destination is the
        directory `dest_fd` (or the path `dest_dir`, opened without following a symlink).
        Raises `LinkError` if the strategy asked for cannot work there.
        """
        if dest_fd is None:
            assert dest_dir is not None  # noqa: S101 - one of the two is required
            fd = safefs.open_dir(dest_dir)
            try:
                return self.modes_for(cache_tmp=cache_tmp, dest_fd=fd)
            finally:
                os.close(fd)
        key = (os.stat(cache_tmp).st_dev, os.fstat(dest_fd).st_dev)
        if key not in self._probed:
            self._probed[key] = self._probe(cache_tmp, dest_fd, dest_dir or f"fd {dest_fd}")
        return self._probed[key]

    def _probe(self, cache_tmp: str, dest_fd: int, dest_dir: str) -> tuple[LinkMode, ...]:
        token = secrets.token_hex(6)
        # Named like a build, so a destination's recovery removes a probe a killed run left.
        dst = f".build-probe-{token}".encode()
        # Held under flock like any cache temp file, so a concurrent clean_temp leaves it be.
        fd, src = create_locked(Path(cache_tmp), "probe")
        os.write(fd, b"x")
        failures: list[str] = []
        try:
            working = []
            for mode in self.strategy.ladder():
                try:
                    _link_one(mode, src.encode(), dest_fd, dst, 1)
                except OSError as exc:
                    if exc.errno not in FALLBACK_ERRNOS:
                        raise os_error(dest_dir, exc) from exc
                    failures.append(f"{mode}: {os.strerror(exc.errno or 0)}")
                else:
                    working.append(mode)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dst, dir_fd=dest_fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)
            os.close(fd)
        if not working:
            raise LinkError(
                strategy=self.strategy.value,
                cache=cache_tmp,
                dest=dest_dir,
                detail="; ".join(failures),
            )
        return tuple(working)

    # -- linking ------------------------------------------------------------------------------

    def link(self, modes: tuple[LinkMode, ...], src: bytes, dir_fd: int, name: bytes) -> int:
        """Make `name` in directory `dir_fd` from cache object `src` with the first mode that
        works; its size.

        Raises `FileNotFoundError` if `src` is not in the cache (the caller fetches it and
        retries), and `DestinationError` for failures no strategy can get around.
        """
        for i, mode in enumerate(modes):
            try:
                size = _link_one(mode, src, dir_fd, name, -1)
            except OSError as exc:
                if exc.errno == errno.ENOENT and not os.path.lexists(src):
                    raise FileNotFoundError(errno.ENOENT, "not in cache", src) from None
                if exc.errno in FALLBACK_ERRNOS and i + 1 < len(modes):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
                    continue
                raise os_error(os.fsdecode(name), exc) from exc
            self.counts[LinkMode.COPY if size == 0 else mode] += 1
            return size
        raise AssertionError("unreachable: modes is never empty")


def _link_one(mode: LinkMode, src: bytes, dir_fd: int, name: bytes, size_hint: int) -> int:
    """One attempt at one mode, making `name` in `dir_fd`. Returns the file's size."""
    if mode is LinkMode.HARDLINK:
        st = os.stat(src)
        if st.st_size == 0:
            os.close(os.open(name, _CREATE, FILE_MODE, dir_fd=dir_fd))
            return 0
        os.link(src, name, dst_dir_fd=dir_fd)
        return st.st_size
    s = os.open(src, _READ)
    try:
        size = os.fstat(s).st_size if size_hint < 0 else size_hint
        d = os.open(name, _CREATE, FILE_MODE, dir_fd=dir_fd)
        try:
            if size == 0:
                return 0
            if mode is LinkMode.REFLINK:
                fcntl.ioctl(d, FICLONE, s)
            else:
                offset = 0
                while offset < size:
                    sent = os.sendfile(d, s, offset, size - offset)
                    if sent == 0:
                        break
                    offset += sent
        finally:
            os.close(d)
        return size
    finally:
        os.close(s)
