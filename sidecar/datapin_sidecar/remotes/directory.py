"""A DVC directory remote: a plain path with the layout of a DVC cache.

What `dvc remote add local /some/dir` makes, and the embedded default: it needs no object
store, so the main job runs anywhere. Objects from it go through the cache's verified insert,
like every other object, so a bad copy on the remote is refused, not cached.

An object path is opened only if it is a regular file (`safefs.open_regular`: no FIFO to block
on, no device, no symlink at its name), a `.dir` above `MAX_DIR_BYTES` is refused, and a
remote datapin cannot read (missing, not a directory, permission denied) is a `RemoteError`
naming the path and the fix. Every call is synchronous and complete when it returns, so
`abort` has nothing to cancel.

`prove` (the CSI proof of access) hashes each object from the remote with its layout's hasher,
streaming, storing nothing: there is no server whose word (an ETag) could be taken, so
`trust_etags` changes nothing. It follows no symlink anywhere below the remote's root (each
directory is opened `O_NOFOLLOW` beneath the one before, `safefs.open_dir_beneath`): an object
reached through a link is `mismatched`, never read from wherever the link points.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher
from datapin_sidecar.engine.remote import FetchReport, ProofReport, Ticker, check_dir_size
from datapin_sidecar.errors import CorruptObjectError, RemoteCause, RemoteError, UnsafeFileError
from datapin_sidecar.safefs import open_dir_beneath, open_regular


class DirectoryRemote:
    """A DVC directory remote: the same layouts as a cache, rooted at a local path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
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
        """Nothing to cancel: every call is over when it returns (see the module doc)."""

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        report = FetchReport()
        for n, oid in enumerate(oids, 1):
            path = self.key(oid, layout)
            try:
                fd = open_regular(path)
            except (FileNotFoundError, NotADirectoryError):
                report.absent.append(oid)
            except UnsafeFileError:  # a FIFO, device, symlink or directory: not the object
                report.corrupt.append(oid)
            except OSError as exc:
                raise self._unreadable(path, exc) from None
            else:
                try:
                    report.fetched_bytes += self._insert(cache, fd, path, oid, layout)
                    report.fetched += 1
                except CorruptObjectError:
                    report.corrupt.append(oid)
                finally:
                    os.close(fd)
            if progress is not None and n % 256 == 0:
                progress(n)
        return report

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
