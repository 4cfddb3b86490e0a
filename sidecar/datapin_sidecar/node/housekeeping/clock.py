"""The LRU clock: when each revision was last materialised or prefetched on this node.

A revision's clock is the mtime of its used-file, `.datapin/used/<layout>-<oid>` (`touch_used`,
written whenever it is materialised or prefetched), or of its `.dir` object when it has none.
The GC (`inventory.plan`) reads them all (`used_clocks`) to order eviction: least recently used
first.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.revision import Revision

log = logging.getLogger(__name__)


def used_dir(cache: NodeCache) -> Path:
    return cache.used_dir


def touch_used(
    cache: NodeCache, revision: Revision, layout: Layout, *, now: float | None = None
) -> None:
    """Record that `revision` was just materialised or prefetched on this node (best effort).

    A failure is swallowed: the used-file is only an LRU hint, and a materialise must never
    fail because the hint could not be written (without it the `.dir`'s mtime is the clock).
    """
    path = used_dir(cache) / f"{layout}-{revision.oid}"
    times = None if now is None else (now, now)
    try:
        try:
            # Never through a symlink someone planted: that would touch a file elsewhere.
            os.utime(path, times, follow_symlinks=False)  # the usual case: one syscall
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(safefs.open_regular(path, os.O_WRONLY | os.O_CREAT))
            os.utime(path, times, follow_symlinks=False)
    except OSError as exc:
        log.debug(
            "could not mark revision %s as used: %s",
            revision.oid,
            exc,
            extra={"revision": revision.oid, "layout": str(layout)},
        )


def used_clocks(cache: NodeCache) -> dict[str, float]:
    """`{"<layout>-<oid>": mtime}` of every used-file; empty if there are none."""
    used: dict[str, float] = {}
    with contextlib.suppress(OSError):  # no used-files (or not a directory of ours): no hints
        ufd = safefs.open_dir(used_dir(cache))
        try:
            with os.scandir(ufd) as it:
                for entry in it:
                    with contextlib.suppress(FileNotFoundError):
                        used[entry.name] = entry.stat(follow_symlinks=False).st_mtime
        finally:
            os.close(ufd)
    return used
