"""Where missing objects come from: the `Remote` protocol and DVC directory remotes.

The materialiser asks a remote two things: which layout holds a revision's `.dir`, and to put
a batch of objects into the node cache. It never sees how. Batches, because a remote over a
network needs the whole list to keep many requests in flight (`s3.S3Remote`); the report says
what was fetched and what the remote lacks or serves corrupt, and the materialiser turns that
into its errors. A DVC *directory* remote (a plain path, what
`dvc remote add local /some/dir` makes) is the embedded default: it needs no object store, so
the main job runs anywhere. Objects from it go through the cache's verified insert, like every
other object, so a bad copy on the remote is refused, not cached. The S3/B2 remote of issue 3
implements the same protocol.

A remote is as untrusted as a bucket: an object path on a directory remote is opened only if it
is a regular file (`safefs.open_regular`: no FIFO to block on, no device, no symlink at its
name), a `.dir` above `MAX_DIR_BYTES` is refused by every remote, and a remote datapin cannot
read (missing, not a directory, permission denied) is a `RemoteError` naming the path and the
fix, never a traceback or a misleading "objects missing".
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout
from datapin_sidecar.errors import CorruptObjectError, RemoteError, UnsafeFileError
from datapin_sidecar.safefs import open_regular

#: The largest `.dir` manifest datapin fetches from any remote (a manifest of millions of files
#: is a few hundred MB); a remote offering a bigger one is refused before it is read.
MAX_DIR_BYTES: Final = 1024 * 1024 * 1024


@dataclass(slots=True)
class FetchReport:
    """What a fetch did (the materialiser's counters and, later, metrics)."""

    fetched: int = 0  # objects downloaded by this process
    fetched_bytes: int = 0
    resumed_bytes: int = 0  # bytes of partial downloads found on disk and kept
    waited: int = 0  # objects another process on the node downloaded while we waited
    present: int = 0  # objects that were already in place when claimed
    absent: list[str] = field(default_factory=list)  # the remote does not have them
    corrupt: list[str] = field(default_factory=list)  # failed their md5 every time
    retries: Counter[str] = field(default_factory=Counter)  # by reason


class Remote(Protocol):
    """A source of DVC objects."""

    @property
    def url(self) -> str:
        """Where it is, for messages (never with credentials)."""
        ...

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        """The first of `layouts` holding `oid`, or None."""
        ...

    def key(self, oid: str, layout: Layout) -> str:
        """Where `oid` is on the remote, for messages."""
        ...

    def fetch(
        self,
        cache: NodeCache,
        oids: Sequence[str],
        layout: Layout,
        progress: Callable[[int], None] | None = None,
    ) -> FetchReport:
        """Put `oids` into `cache`, verified; `progress(done)` now and then. Objects the
        remote lacks or serves corrupt are reported, not raised; a remote that cannot be read
        at all raises `RemoteError`."""
        ...


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
                cause="unreadable",
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
        return RemoteError(remote=str(self.root), problem=problem, fix=fix, cause="unreadable")

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

    def fetch(
        self,
        cache: NodeCache,
        oids: Sequence[str],
        layout: Layout,
        progress: Callable[[int], None] | None = None,
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

    def _insert(self, cache: NodeCache, fd: int, path: str, oid: str, layout: Layout) -> int:
        """Copy the open object into the cache through its verified insert; bytes copied."""
        if oid.endswith(".dir") and os.fstat(fd).st_size > MAX_DIR_BYTES:
            raise RemoteError(
                remote=str(self.root),
                problem=f"the .dir manifest {path} is larger than the "
                f"{MAX_DIR_BYTES // (1024 * 1024 * 1024)} GiB datapin reads for a manifest",
                fix="check what was pushed under this name; `dvc push` the revision again "
                "from a clean cache",
                keys=[path],
                cause="too_large",
            )
        with cache.writer(oid, layout) as writer:
            while True:
                try:
                    chunk = os.read(fd, DVC2_CHUNK)
                except OSError as exc:
                    raise self._unreadable(path, exc) from None
                if not chunk:
                    break
                writer.write(chunk)
            if writer.hexdigest() != oid.removesuffix(".dir"):
                raise CorruptObjectError(
                    oids=[oid], cache=str(cache.root), detail=f"{path} does not hash to its name"
                )
            return writer.size
