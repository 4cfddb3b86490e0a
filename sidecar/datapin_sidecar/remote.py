"""Where missing objects come from: the `Remote` protocol and DVC directory remotes.

The materialiser asks a remote two things: which layout holds a revision's `.dir`, and to put
an object into the node cache. It never sees how. A DVC *directory* remote (a plain path, what
`dvc remote add local /some/dir` makes) is the embedded default: it needs no object store, so
the main job runs anywhere. Objects from it go through the cache's verified insert, like every
other object, so a bad copy on the remote is refused, not cached. The S3/B2 remote of issue 3
implements the same protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from .cache import NodeCache
from .errors import RemoteError
from .hashing import Layout


class Remote(Protocol):
    """A source of DVC objects."""

    @property
    def url(self) -> str:
        """Where it is, for messages (never with credentials)."""
        ...

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        """The first of `layouts` holding `oid`, or None."""
        ...

    def fetch(self, cache: NodeCache, oid: str, layout: Layout) -> int:
        """Put `oid` into `cache` (verified); its size. FileNotFoundError if absent."""
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

    def fetch(self, cache: NodeCache, oid: str, layout: Layout) -> int:
        return cache.insert_file(self._paths.path(oid, layout), oid, layout)
