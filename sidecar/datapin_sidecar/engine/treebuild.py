"""Building a tree: linking a manifest's entries into a build directory, and unlinking them.

The materialiser (`materialize`) decides what to build on which base; a `TreeBuilder` does the
filesystem work of one build: link every entry (or only the planned ones) from the cache,
hardlink unchanged ones from a base tree, unlink removed ones, and fetch what turns out to be
missing.

Every operation inside the destination goes through directory descriptors (`_Dirs`): each
directory of the tree is opened once, with `O_NOFOLLOW`, relative to its parent's descriptor,
and entries are made, linked and unlinked by name in it. A directory a pod swapped for a
symlink is refused, never followed.

Objects are linked optimistically: a warm start must cost metadata only, so there is no stat
per object up front. An object that turns out to be missing is collected, fetched from the
remote once (however many entries share it, `fetching`), and linked afterwards. The node
agent's GC may evict an object between its fetch and its link: such objects are fetched again,
up to `FETCH_ROUNDS` times.
"""

from __future__ import annotations

import binascii
import contextlib
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.fetching import Fetcher
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Linker, LinkMode
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.workspace import TreeInfo
from datapin_sidecar.errors import DestinationError

#: How often (in entries) the progress callback is called.
PROGRESS_EVERY = 2048
#: How many times objects evicted between their fetch and their link are fetched again.
FETCH_ROUNDS = 3


class TickFn(Protocol):
    """Progress of one phase: `done` None when the phase starts (or, for "done", ends)."""

    def __call__(self, phase: str, total: int, done: int | None = None) -> None: ...


@dataclass(slots=True, kw_only=True)
class TreeBuilder:
    """The filesystem work of one build, and its tally (see the module doc)."""

    cache: NodeCache
    layout: Layout
    linker: Linker
    modes: tuple[LinkMode, ...]
    fetcher: Fetcher
    #: Objects found corrupt in the cache this run (an object the remote then lacks is
    #: reported corrupt, not missing).
    quarantined: list[str]
    tick: TickFn
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    miss_bytes: int = 0
    removed_bytes: int = 0

    def remove_entries(self, old: Manifest, remove: array[int], build: int) -> None:
        """Drop entries of the recycled tree, then the directories they leave empty.

        DVC trees never contain empty directories, and neither may ours.
        """
        parents: set[bytes] = set()
        self.tick("remove", len(remove))
        dirs = _Dirs(build, create=False)
        try:
            for i in remove:
                rel = old.relpath_bytes(i)
                cut = rel.rfind(b"/")
                try:
                    fd = dirs.enter(rel[:cut] if cut > 0 else b"")
                except FileNotFoundError:
                    continue
                try:
                    os.unlink(rel[cut + 1 :], dir_fd=fd)
                except FileNotFoundError:
                    pass
                except IsADirectoryError:
                    safefs.remove_tree(rel[cut + 1 :], dir_fd=fd)
                while cut > 0:
                    parents.add(rel[:cut])
                    cut = rel.rfind(b"/", 0, cut)
        finally:
            dirs.close()
        # Deepest first, so a directory emptied of subdirectories goes too.
        for parent in sorted(parents, key=lambda p: p.count(b"/"), reverse=True):
            cut = parent.rfind(b"/")
            with contextlib.suppress(OSError):
                fd = safefs.open_dir_beneath(build, parent[:cut]) if cut > 0 else os.dup(build)
                try:
                    os.rmdir(parent[cut + 1 :], dir_fd=fd)
                finally:
                    os.close(fd)

    def link_entries(
        self,
        manifest: Manifest,
        build: int,
        *,
        only: array[int] | None = None,
        carry: tuple[array[int], int] | None = None,
    ) -> None:
        """The hot loop: link every entry (or those in `only`) of `manifest` into `build`.

        With `carry=(add, base)`, entries not in `add` are hardlinked from the tree `base` (a
        directory fd) instead of coming from the cache.
        """
        prefix = os.fsencode(self.cache.prefix(self.layout))
        link = self.linker.link
        modes = self.modes
        hexlify = binascii.b2a_hex
        missing = array("Q")
        total = len(only) if only is not None else len(manifest)
        self.tick("link", total)
        add_iter = iter(carry[0]) if carry is not None else None
        next_add = next(add_iter, -1) if add_iter is not None else -1
        dirs = _Dirs(build, create=True)
        base_dirs = _Dirs(carry[1], create=False) if carry is not None else None
        last_parent: bytes | None = None
        dir_fd = base_fd = -1
        # A recycled tree needs only the planned entries: visit those by index rather than
        # scanning the whole manifest for them.
        entries: Iterator[tuple[int, tuple[bytes, bytes]]] = (
            ((i, manifest.entry_raw(i)) for i in only)
            if only is not None
            else enumerate(manifest.iter_raw())
        )
        done = 0
        try:
            for index, (rel, raw) in entries:
                cut = rel.rfind(b"/")
                parent = rel[:cut] if cut > 0 else b""
                if parent != last_parent:
                    dir_fd = dirs.enter(parent)
                    if base_dirs is not None:
                        try:
                            base_fd = base_dirs.enter(parent)
                        except OSError:
                            base_fd = -1  # not in the base after all: from the cache
                    last_parent = parent
                name = rel[cut + 1 :]
                done += 1
                if done % PROGRESS_EVERY == 0:
                    self.tick("link", total, done)
                if add_iter is not None:
                    if index != next_add:
                        if base_fd >= 0:
                            try:
                                os.link(
                                    name,
                                    name,
                                    src_dir_fd=base_fd,
                                    dst_dir_fd=dir_fd,
                                    follow_symlinks=False,
                                )
                                continue
                            except OSError:
                                pass  # EMLINK on a popular object: use the cache
                    else:
                        next_add = next(add_iter, -1)
                h = hexlify(raw)
                try:
                    size = link(modes, prefix + h[:2] + b"/" + h[2:], dir_fd, name)
                except FileNotFoundError:
                    missing.append(index)
                else:
                    self.hits += 1
                    self.hit_bytes += size
        finally:
            dirs.close()
            if base_dirs is not None:
                base_dirs.close()
        if missing:
            self._fetch_and_link(manifest, missing, build, prefix)

    def _fetch_and_link(
        self, manifest: Manifest, missing: array[int], build: int, prefix: bytes
    ) -> None:
        for _ in range(FETCH_ROUNDS):
            oids = sorted({manifest.md5(i) for i in missing})
            if self.fetcher.remote is None:
                raise self.fetcher.missing(oids, [], self.layout, quarantined=self.quarantined)
            total = len(oids)
            self.tick("fetch", total)
            self.fetcher.fetch(
                oids, self.layout, self._fetch_ticker(total), quarantined=self.quarantined
            )
            # The node agent's GC may have evicted some again before they were linked.
            missing = self._link_fetched(manifest, missing, build, prefix)
            if not missing:
                return
        gone = sorted({manifest.md5(i) for i in missing})
        raise DestinationError(
            dest=str(self.cache.root),
            problem=f"{len(gone)} object(s) were fetched {FETCH_ROUNDS} times and removed "
            f"from the node cache each time before they could be linked ({', '.join(gone[:5])})"
            ": the node volume is short of space and its GC evicts them",
            fix="free space on the node volume (or raise the agent's GC watermarks); the "
            "next attempt fetches them again",
        )

    def _fetch_ticker(self, total: int) -> Callable[[int], None]:
        return lambda n: self.tick("fetch", total, n)

    def _link_fetched(
        self, manifest: Manifest, missing: array[int], build: int, prefix: bytes
    ) -> array[int]:
        """Link the fetched entries; those whose object is gone again."""
        again = array("Q")
        dirs = _Dirs(build, create=True)
        try:
            for i in missing:
                rel = manifest.relpath_bytes(i)
                cut = rel.rfind(b"/")
                fd = dirs.enter(rel[:cut] if cut > 0 else b"")
                h = manifest.md5(i).encode()
                try:
                    size = self.linker.link(
                        self.modes, prefix + h[:2] + b"/" + h[2:], fd, rel[cut + 1 :]
                    )
                except FileNotFoundError:
                    again.append(i)
                    continue
                self.misses += 1
                self.miss_bytes += size
        finally:
            dirs.close()
        return again

    def tree_bytes(self, base: TreeInfo | None) -> int:
        added = self.hit_bytes + self.miss_bytes
        return added if base is None else base.bytes - self.removed_bytes + added

    def count_removed_bytes(self, old: Manifest, remove: array[int], base: int) -> None:
        """Sizes of the entries leaving the base tree: O(changed) lstat calls."""
        dirs = _Dirs(base, create=False)
        try:
            for i in remove:
                rel = old.relpath_bytes(i)
                cut = rel.rfind(b"/")
                with contextlib.suppress(OSError):
                    fd = dirs.enter(rel[:cut] if cut > 0 else b"")
                    self.removed_bytes += os.lstat(rel[cut + 1 :], dir_fd=fd).st_size
        finally:
            dirs.close()


class _Dirs:
    """The open directories along one path of a tree, under the tree's root descriptor.

    Entries come in manifest order (sorted by relpath), so a directory's entries are
    contiguous: moving to the next parent closes the components it leaves and opens (with
    `create`, makes first) the ones it enters, one `openat` per directory visited. Every
    component is opened with `O_NOFOLLOW` relative to the one above, so a directory a pod
    swapped for a symlink raises `UnsafeFileError` instead of leading elsewhere.
    """

    __slots__ = ("create", "fds", "parts", "root")

    def __init__(self, root: int, *, create: bool) -> None:
        self.root = root
        self.create = create
        self.parts: list[bytes] = []
        self.fds: list[int] = []

    def enter(self, parent: bytes) -> int:
        """The descriptor of directory `parent` (relative to the root; b"" is the root)."""
        parts = parent.split(b"/") if parent else []
        keep = 0
        limit = min(len(parts), len(self.parts))
        while keep < limit and parts[keep] == self.parts[keep]:
            keep += 1
        while len(self.fds) > keep:
            os.close(self.fds.pop())
            self.parts.pop()
        fd = self.fds[-1] if self.fds else self.root
        for part in parts[keep:]:
            if self.create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            fd = safefs.open_dir(part, dir_fd=fd)
            self.fds.append(fd)
            self.parts.append(part)
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
        self.parts.clear()
