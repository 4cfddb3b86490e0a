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
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .cache import NodeCache
from .errors import CorruptObjectError, RemoteError
from .hashing import Layout


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
        if not self.root.is_dir():
            raise RemoteError(
                remote=str(self.root),
                problem="is not a directory",
                fix="pass the path of a DVC directory remote (`dvc remote add NAME /path`)",
            )
        self._paths = NodeCache(self.root)  # same layout; we only use its path arithmetic

    @property
    def url(self) -> str:
        return str(self.root)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self._paths.find(oid, layouts)

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
            try:
                report.fetched_bytes += cache.insert_file(self.key(oid, layout), oid, layout)
                report.fetched += 1
            except FileNotFoundError:
                report.absent.append(oid)
            except CorruptObjectError:
                report.corrupt.append(oid)
            if progress is not None and n % 256 == 0:
                progress(n)
        return report
