"""A DVC directory remote: a plain path with the layout of a DVC cache.

What `dvc remote add local /some/dir` makes, and the embedded default: it needs no object
store, so the main job runs anywhere.

Fetch (`fetch`): the objects are cut into batches (up to `BATCH`, and at least one per job) run
on `jobs` threads; the copies wait on the disk more than on the CPU, and md5 and the syscalls
release the GIL. A batch claims the objects' download slots in the node cache
(`slotfiles.claim_many`: the node-wide lock the S3 fetch uses too, so an object is copied once
however many processes want it), copies each object into its slot and checks its md5 there,
then makes the whole batch durable with one `syncfs` and names its objects
(`slotfiles.sync_and_install`). How an object is copied, cheapest first:

* a large object (`CLONE_MIN_BYTES` and up) on the cache's own filesystem is reflinked
  (`FICLONE`) and then hashed *from the clone*: what is checked is exactly what is installed,
  whatever happens to the remote's file meanwhile, and no byte is written;
* a small one (up to `SMALL_BYTES`) is read whole, hashed and written in one call
  (`slotfiles.write_small`);
* a larger one is streamed, hashed as it is copied (one read of the remote, no second pass).

The md5 is the judge: bytes that do not hash to their name (or a file longer than it said, one
still being written) never enter the cache; the slot is discarded and the object reported
corrupt. An object whose slot another process holds is copied through a temp file of our own
(`NodeCache.writer`) rather than waited for: the holder may be stuck, and a writer that loses
the race drops its identical copy.

Durability, and how it compares with `dvc pull`: an object's bytes and its mode are on disk
before its name exists in the cache. Each batch of up to `BATCH` copied objects is flushed
with one `syncfs(2)` of the cache's filesystem (an `fsync` of each slot where libc has no
`syncfs`), and only then linked to its final name; the names themselves (the directory
entries) are not fsynced, so after a power cut an object may be missing, and is fetched again,
but never short or wrong under its name. A reflink is no weaker: XFS writes the source's dirty
pages before it shares their extents, and the `syncfs` commits the clone. The tree built from
the cache and the published link are not fsynced. `dvc pull` fsyncs nothing:
`dvc_objects.fs.local.FsspecLocalFileSystem.copy` (dvc-objects 5.2) copies to a temp name with
`dvc_objects.fs.utils.copyfile` (a reflink, else `shutil.copyfile`) and renames it into place,
and no function in dvc, dvc-data or dvc-objects calls `fsync`: the rename can reach the disk
before the data, so after a power cut its cache may hold a short or empty file under an
object's name, and a later pull, which looks for names, not hashes, keeps it. Nor does it hash
what it copies unless the remote sets `verify` (default false: `HashFileDB.add` in dvc-data).

Safety: an object path is opened only if it is a regular file (`safefs.open_regular`: no FIFO
to block on, no device, no symlink at its name), a `.dir` above `MAX_DIR_BYTES` is refused,
and a remote datapin cannot read (missing, not a directory, permission denied) is a
`RemoteError` naming the path and the fix. Whatever ends a fetch (an error, a full volume,
`abort`), every slot it claimed is installed, discarded or released before `fetch` returns.
`abort` (SIGTERM) stops the fetch at its next batch with `asyncio.CancelledError`, as an
`S3Remote`'s does, and refuses new ones.

`prove` (the CSI proof of access) hashes each object from the remote with its layout's hasher,
streaming, storing nothing: there is no server whose word (an ETag) could be taken, so
`trust_etags` changes nothing. It follows no symlink anywhere below the remote's root (each
directory is opened `O_NOFOLLOW` beneath the one before, `safefs.open_dir_beneath`): an object
reached through a link is `mismatched`, never read from wherever the link points.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Final

from datapin_sidecar.engine.cache import NodeCache, Slot
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher
from datapin_sidecar.engine.remote import FetchReport, ProofReport, Ticker, check_dir_size
from datapin_sidecar.errors import (
    CorruptObjectError,
    Md5MismatchError,
    RemoteCause,
    RemoteError,
    UnsafeFileError,
    os_error,
)
from datapin_sidecar.limits import MAX_JOBS
from datapin_sidecar.remotes.slotfiles import (
    MiB,
    Present,
    claim_many,
    hash_range,
    start_writeback,
    sync_and_install,
    write_small,
)
from datapin_sidecar.safefs import open_dir_beneath, open_regular


def _cancelled() -> BaseException:
    """What `abort` raises: asyncio's CancelledError, as the S3 remote's fetch does. Imported
    here, not at the top: a no-op (the CLI without an S3 remote) runs with no event loop, and
    loading asyncio would cost it ~25 ms (tests/test_startup.py)."""
    import asyncio  # noqa: PLC0415

    return asyncio.CancelledError()


#: Threads copying objects, by default: the copies wait on the disk more than on the CPU
#: (md5 and the syscalls release the GIL), and DVC's own default for a local remote on a
#: 2-core node is 8 (`4 * cpu_count()`).
DEFAULT_JOBS: Final = 8
#: Objects per batch at most (a claim, copy and check each, then one syncfs for all of them).
BATCH: Final = 128
#: Objects up to this size are read whole and written in one call.
SMALL_BYTES: Final = 4 * MiB
#: Objects from this size up are reflinked when the remote shares the cache's filesystem;
#: below it, reading back a clone costs more than writing the bytes.
CLONE_MIN_BYTES: Final = 1 * MiB
#: Read size when streaming a large object.
STREAM_CHUNK: Final = 8 * MiB
#: `ioctl_ficlone(2)`: `_IOW(0x94, 9, int)`.
FICLONE: Final = 0x40049409
#: What FICLONE answers where there can be no reflink (another filesystem, or none on this one).
_NO_CLONE: Final = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS})


class DirectoryRemote:
    """A DVC directory remote: the same layouts as a cache, rooted at a local path."""

    def __init__(self, path: str | os.PathLike[str], *, jobs: int = DEFAULT_JOBS) -> None:
        self.root = Path(path).absolute()
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise self._unreadable(str(self.root), exc) from None
        if not stat.S_ISDIR(st.st_mode):
            raise RemoteError(
                remote=str(self.root),
                problem="is not a directory",
                fix="pass the path of a DVC directory remote (`dvc remote add NAME /path`)",
                cause=RemoteCause.UNREADABLE,
            )
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise self._unreadable(str(self.root), PermissionError(errno.EACCES, "denied"))
        self._paths = NodeCache(self.root)  # same layout; we only use its path arithmetic
        if not 1 <= jobs <= MAX_JOBS:
            raise ValueError(f"jobs must be between 1 and {MAX_JOBS}, not {jobs}")
        self.jobs = jobs
        self._aborted = threading.Event()
        #: Whether FICLONE works from a filesystem to another (by st_dev), once asked.
        self._clones: dict[tuple[int, int], bool] = {}

    def _unreadable(self, path: str, exc: OSError) -> RemoteError:
        """The error for a remote path that cannot be read: what, where, and how to fix it."""
        if isinstance(exc, FileNotFoundError) and path == str(self.root):
            problem, fix = (
                "does not exist",
                "pass the path of a DVC directory remote (`dvc remote add NAME /path`) that "
                "is mounted in this container",
            )
        else:
            problem = f"cannot read {path} ({os.strerror(exc.errno or errno.EIO)})"
            fix = (
                f"make the remote readable by datapin (uid {os.geteuid()}): its directories "
                "need r and x, its objects r (`chmod -R a+rX` on the remote)"
            )
        return RemoteError(
            remote=str(self.root), problem=problem, fix=fix, cause=RemoteCause.UNREADABLE
        )

    @property
    def url(self) -> str:
        return str(self.root)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        for layout in layouts:
            path = self._paths.path(oid, layout)
            try:
                os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise self._unreadable(path, exc) from None
            return layout
        return None

    def key(self, oid: str, layout: Layout) -> str:
        return self._paths.path(oid, layout)

    def abort(self) -> None:
        """Stop the fetch in flight at its next batch, and refuse new ones (thread-safe; see
        the module doc)."""
        self._aborted.set()

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        """Copy `oids` into `cache`, verified, in batches on `jobs` threads (see the module doc)."""
        if self._aborted.is_set():
            raise _cancelled()
        report = FetchReport()
        todo = list(oids)
        if not todo:
            return report
        size = max(1, min(BATCH, -(-len(todo) // self.jobs)))
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        done = 0
        if len(batches) == 1:
            self._merge(report, self._batch(cache, batches[0], layout))
            return report
        with ThreadPoolExecutor(
            max_workers=min(self.jobs, len(batches)), thread_name_prefix="datapin-dir"
        ) as pool:
            futures = [pool.submit(self._batch, cache, batch, layout) for batch in batches]
            try:
                for future in as_completed(futures):
                    part = future.result()
                    self._merge(report, part)
                    done += part.fetched + part.present + part.waited
                    if progress is not None:
                        progress(done)
                    if self._aborted.is_set():
                        raise _cancelled()
            except BaseException:
                # A batch not started yet claims nothing; one running finishes (and installs
                # or gives back every slot it claimed) before the pool's exit returns.
                for future in futures:
                    future.cancel()
                raise
        return report

    @staticmethod
    def _merge(report: FetchReport, part: FetchReport) -> None:
        report.fetched += part.fetched
        report.fetched_bytes += part.fetched_bytes
        report.present += part.present
        report.waited += part.waited
        report.absent += part.absent
        report.corrupt += part.corrupt

    def _batch(self, cache: NodeCache, oids: list[str], layout: Layout) -> FetchReport:
        """One batch, in a worker thread: claim, copy and verify each object into its slot,
        make them all durable with one syncfs, then install (`slotfiles.sync_and_install`).

        Every slot claimed here is installed, discarded or released before it returns,
        whatever is raised: a slot kept would hold its lock for the life of the process.
        """
        report = FetchReport()
        if self._aborted.is_set():
            raise _cancelled()
        try:
            claims = claim_many(cache, oids, layout)
        except OSError as exc:
            raise os_error(str(cache.root), exc, volume="node cache") from exc
        verified: list[Slot] = []
        busy: list[str] = []
        try:
            for oid, claim in zip(oids, claims, strict=True):
                if claim is None:
                    busy.append(oid)  # another process is downloading it
                elif isinstance(claim, Present):
                    report.present += 1
                else:
                    self._fill_slot(cache, claim, report, verified)
            if verified:
                try:
                    sync_and_install(cache, verified)
                except OSError as exc:
                    raise os_error(str(cache.root), exc, volume="node cache") from exc
        except BaseException:
            for claim in claims:
                if isinstance(claim, Slot) and claim.fd >= 0:
                    with contextlib.suppress(OSError):
                        claim.discard()
            raise
        for oid in busy:
            # Rare (two processes fetching one object at once): copy it through a temp file
            # of our own, as a writer that loses the race drops its identical copy.
            self._fetch_one(cache, oid, layout, report)
        return report

    def _fill_slot(
        self, cache: NodeCache, slot: Slot, report: FetchReport, verified: list[Slot]
    ) -> None:
        """Copy the object of `slot` from the remote into it; verified slots join `verified`,
        others are discarded and reported absent or corrupt."""
        oid, path = slot.oid, self.key(slot.oid, slot.layout)
        try:
            src = open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            report.absent.append(oid)
            slot.discard()
            return
        except UnsafeFileError:  # a FIFO, device, symlink or directory: not the object
            report.corrupt.append(oid)
            slot.discard()
            return
        except OSError as exc:
            raise self._unreadable(path, exc) from None
        try:
            size = os.fstat(src).st_size
            check_dir_size(remote=str(self.root), oid=oid, key=path, size=size)
            if self._copy(cache, src, slot, size, path):
                verified.append(slot)
                report.fetched += 1
                report.fetched_bytes += size
            else:
                report.corrupt.append(oid)
                slot.discard()
        finally:
            os.close(src)

    def _copy(self, cache: NodeCache, src: int, slot: Slot, size: int, path: str) -> bool:
        """Put the `size`-byte object open at `src` into `slot`; whether it hashes to its name.

        Three ways, cheapest first: a reflink of a large object on the cache's own filesystem,
        then hashed from the clone (what is hashed is exactly what gets installed, whatever the
        remote's file does meanwhile); a small object in one read, hashed and written by
        `slotfiles.write_small`; a large one streamed, hashed as it is copied. A file that
        turns out longer than its size (it grew while read) is not a stable object: refused.
        """
        fd = slot.fd
        try:
            if size >= CLONE_MIN_BYTES and self._clone(src, fd):
                hasher = ObjectHasher(slot.layout)
                hash_range(fd, 0, size, hasher)
                return hasher.hexdigest() == slot.oid.removesuffix(".dir")
            if size <= SMALL_BYTES:
                body = self._read_at_most(src, size + 1, path)
                if len(body) != size:
                    return False
                return write_small(fd, slot.layout, slot.oid, body, slot.size, writeback=False)
            return self._stream(src, slot, size, path)
        except Md5MismatchError:  # the clone was shorter than its size
            return False
        except OSError as exc:
            raise os_error(str(cache.root), exc, volume="node cache") from exc

    def _clone(self, src: int, dst: int) -> bool:
        """Reflink all of `src` into `dst` (`FICLONE`); False where the filesystems cannot
        (another filesystem, or one without reflinks): the caller copies instead."""
        devices = (os.fstat(src).st_dev, os.fstat(dst).st_dev)
        if devices[0] != devices[1] or self._clones.get(devices) is False:
            return False
        try:
            os.ftruncate(dst, 0)  # a dead downloader's bytes must not outlive the clone
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as exc:
            if exc.errno in _NO_CLONE:
                self._clones[devices] = False
                return False
            if exc.errno in (errno.EINVAL, errno.EPERM):
                return False  # this file (immutable, say), not the filesystem: copy it
            raise
        self._clones[devices] = True
        return True

    def _stream(self, src: int, slot: Slot, size: int, path: str) -> bool:
        """Copy a large object chunk by chunk, hashing each chunk as it is written."""
        fd = slot.fd
        if slot.size:
            os.ftruncate(fd, 0)  # an abandoned attempt's bytes must not survive
        hasher = ObjectHasher(slot.layout)
        buf = bytearray(STREAM_CHUNK)
        view = memoryview(buf)
        offset = 0
        while True:
            try:
                n = os.readv(src, [buf])
            except OSError as exc:
                raise self._unreadable(path, exc) from None
            if not n:
                break
            if offset + n > size:
                return False  # it grew while read: not a stable object
            hasher.update(view[:n])
            written = 0
            while written < n:
                written += os.pwrite(fd, view[written:n], offset + written)
            start_writeback(fd, offset, n)
            offset += n
        return offset == size and hasher.hexdigest() == slot.oid.removesuffix(".dir")

    def _read_at_most(self, fd: int, limit: int, path: str) -> bytes:
        """Up to `limit` bytes of the open object (fewer at its end)."""
        parts: list[bytes] = []
        left = limit
        while left > 0:
            try:
                chunk = os.read(fd, left)
            except OSError as exc:
                raise self._unreadable(path, exc) from None
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch_one(self, cache: NodeCache, oid: str, layout: Layout, report: FetchReport) -> None:
        """Copy one object through the cache's own verified insert (a temp file, fsynced)."""
        path = self.key(oid, layout)
        try:
            fd = open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            report.absent.append(oid)
            return
        except UnsafeFileError:  # a FIFO, device, symlink or directory: not the object
            report.corrupt.append(oid)
            return
        except OSError as exc:
            raise self._unreadable(path, exc) from None
        try:
            report.fetched_bytes += self._insert(cache, fd, path, oid, layout)
            report.fetched += 1
        except CorruptObjectError:
            report.corrupt.append(oid)
        finally:
            os.close(fd)

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        """Hash every object from the remote (see the module doc)."""
        del trust_etags  # no server to trust: the bytes are always hashed
        sizes = sizes or {}
        proven: list[str] = []
        absent: list[str] = []
        mismatched: list[str] = []
        try:
            # The root is the operator's own setting (a link there is theirs to make); below
            # it, the names are whoever wrote the remote's.
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._unreadable(str(self.root), exc) from None
        shards: dict[str, int | None] = {}
        try:
            for oid in oids:
                verdict = self._prove_one(root, shards, oid, layout, sizes.get(oid))
                (proven if verdict is True else absent if verdict is None else mismatched).append(
                    oid
                )
        finally:
            for fd in shards.values():
                if fd is not None and fd >= 0:
                    os.close(fd)
            os.close(root)
        return ProofReport(proven=tuple(proven), absent=tuple(absent), mismatched=tuple(mismatched))

    def _prove_one(
        self, root: int, shards: dict[str, int | None], oid: str, layout: Layout, size: int | None
    ) -> bool | None:
        """True: the object is there and hashes to its name; False: something else is under
        its name (other bytes, a symlink, a FIFO); None: nothing is."""
        shard = f"{layout.prefix()}{oid[:2]}"
        if shard not in shards:
            try:
                shards[shard] = open_dir_beneath(root, shard)
            except (FileNotFoundError, NotADirectoryError):
                shards[shard] = None
            except UnsafeFileError:
                shards[shard] = -1  # a symlink or file where a shard directory belongs
            except OSError as exc:
                raise self._unreadable(f"{self.root}/{shard}", exc) from None
        fd_dir = shards[shard]
        if fd_dir is None:
            return None
        if fd_dir == -1:
            return False
        path = self.key(oid, layout)
        try:
            fd = open_regular(oid[2:], dir_fd=fd_dir)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UnsafeFileError:
            return False
        except OSError as exc:
            raise self._unreadable(path, exc) from None
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual != size:
                return False
            check_dir_size(remote=str(self.root), oid=oid, key=path, size=actual)
            hasher = ObjectHasher(layout)
            for chunk in self._chunks(fd, path):
                hasher.update(chunk)
            return hasher.hexdigest() == oid.removesuffix(".dir")
        finally:
            os.close(fd)

    def _chunks(self, fd: int, path: str) -> Iterator[bytes]:
        """The open object's bytes, a read at a time (a read error names the object)."""
        while True:
            try:
                chunk = os.read(fd, DVC2_CHUNK)
            except OSError as exc:
                raise self._unreadable(path, exc) from None
            if not chunk:
                return
            yield chunk

    def _insert(self, cache: NodeCache, fd: int, path: str, oid: str, layout: Layout) -> int:
        """Copy the open object into the cache through its verified insert; bytes copied."""
        check_dir_size(remote=str(self.root), oid=oid, key=path, size=os.fstat(fd).st_size)
        with cache.writer(oid, layout) as writer:
            for chunk in self._chunks(fd, path):
                writer.write(chunk)
            if writer.hexdigest() != oid.removesuffix(".dir"):
                raise CorruptObjectError(
                    oids=[oid], cache=str(cache.root), detail=f"{path} does not hash to its name"
                )
            return writer.size
