"""The cache's objects, what the roots protect, and the order in which the rest go.

**What is protected.** A root of a whole revision protects its `.dir` and every object its
manifest names; a root of a part (`roots`) its `.dir` and the objects the part selects
(`Part.select`): the revision's other objects are planned like those of a revision not in
use. A part a root names that the revision does not hold protects nothing more (reported).

**Which goes first.** Least recently used, by revision (`clock`): an object takes the newest
clock among the revisions and parts that name it and do not protect it, so an object shared by
an old and a new revision lives as long as the new one, and an object of a part used recently
lives as long as the part, while the rest of its revision keeps the revision's own clock; an
object no revision names (an orphan: a revision whose `.dir` went, a damaged `.dir`, a
single-file revision) takes its own mtime. A revision's `.dir` takes the newest clock of the
revision and its parts and goes right after its last object at that clock, so a revision is
never left with objects and no manifest to find them by. Ties are broken by layout, then path,
so a plan is reproducible.

Only names shaped like objects count, and a shard that is not a directory (a symlink someone
planted) is never followed. The inventory is kept lean (`Inventory`) for caches of millions of
objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import UnsafeFileError
from datapin_sidecar.node.housekeeping.clock import (
    part_clock_names,
    read_parts,
    used_clocks,
    used_name,
)
from datapin_sidecar.node.housekeeping.roots import Root, root_part
from datapin_sidecar.node.housekeeping.tasks import OnError, Task, log_item_error, sorted_names

log = logging.getLogger(__name__)

LAYOUTS: Final = (Layout.DVC3, Layout.LEGACY)
#: Part clocks read per revision, newest first (each is a small file; the rest of a planted
#: flood is ignored, its parts' objects keep the revision's clock).
MAX_PART_CLOCKS: Final = 64
_SHARD: Final = re.compile(r"[0-9a-f]{2}")
_OBJECT: Final = re.compile(r"[0-9a-f]{30}(\.dir)?")


def _open_prefix(cache: NodeCache, layout: Layout) -> int:
    """The directory holding `layout`'s shards, opened without following a symlink below the
    cache root (the root itself is the agent's configuration)."""
    rfd = os.open(cache.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return safefs.open_dir_beneath(rfd, layout.prefix())
    finally:
        os.close(rfd)


def _walk(
    cache: NodeCache, layout: Layout, report: OnError, *, task: Task, remove_planted: bool = False
) -> Iterator[tuple[str, os.stat_result]]:
    """`(oid, lstat)` of every object file in `layout`, in path order.

    Only names shaped like objects count: a DVC cache also holds `runs/`, `tmp/` and the like,
    and the legacy layout's prefix is the cache root itself (where `files/` and `.datapin/`
    are). A shard that is not a directory (a symlink someone planted) is never followed: it is
    reported, and with `remove_planted` unlinked (its target is left alone).
    """
    try:
        pfd = _open_prefix(cache, layout)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        report(task, cache.prefix(layout), exc)
        return
    try:
        for shard in sorted_names(pfd):
            if not _SHARD.fullmatch(shard):
                continue
            try:
                sfd = safefs.open_dir(shard, dir_fd=pfd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(task, cache.prefix(layout) + shard, exc)
                if remove_planted and isinstance(exc, UnsafeFileError):
                    with contextlib.suppress(OSError):
                        safefs.remove_tree(shard, dir_fd=pfd)
                continue
            try:
                with os.scandir(sfd) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for entry in entries:
                    if not _OBJECT.fullmatch(entry.name) or not entry.is_file(
                        follow_symlinks=False
                    ):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield shard + entry.name, st
            finally:
                os.close(sfd)
    finally:
        os.close(pfd)


def scan(cache: NodeCache, *, on_error: OnError | None = None) -> tuple[int, int]:
    """`(objects, bytes)` in the cache, both layouts, `.dir` objects included, `.datapin/` not."""
    report = on_error or log_item_error
    objects = size = 0
    for layout in LAYOUTS:
        for _, st in _walk(cache, layout, report, task=Task.SCAN):
            objects += 1
            size += st.st_size
    return objects, size


@dataclass(slots=True)
class Dir:
    """A `.dir` object; `clock` is its LRU time (the newest of its revision's and parts')."""

    layout: Layout
    md5: str
    size: int
    mtime: float
    clock: float = 0.0
    #: A root (or a build) needs it: the `.dir` stays, and its objects per `parts`.
    protected: bool = False
    #: With `protected`, the parts whose objects are protected; empty: every object.
    parts: tuple[Part, ...] = ()
    #: The used-files of parts of this revision (removed with the `.dir`).
    part_used: tuple[str, ...] = ()


class Inventory:
    """Every object in the cache, lean enough for caches of millions of objects.

    Plain objects are keyed by their 16 raw md5 bytes (what `Manifest.md5_raw` yields, with no
    hex conversion per manifest entry) and their numbers kept in flat arrays, not in a Python
    object each: what remains per object is essentially one dict entry.
    """

    def __init__(self) -> None:
        self.index: dict[Layout, dict[bytes, int]] = {layout: {} for layout in LAYOUTS}
        self.keys: list[bytes] = []
        self.layout_of = bytearray()  # index into LAYOUTS
        self.size = array("q")
        self.clock = array("d")  # own mtime until a revision names the object
        self.named = bytearray()  # some non-root revision names it
        self.protected = bytearray()
        self.dirs: list[Dir] = []

    @classmethod
    def take(cls, cache: NodeCache, report: OnError, *, remove_planted: bool) -> Inventory:
        inv = cls()
        for n, layout in enumerate(LAYOUTS):
            index = inv.index[layout]
            for oid, st in _walk(
                cache, layout, report, task=Task.COLLECT, remove_planted=remove_planted
            ):
                if oid.endswith(".dir"):
                    inv.dirs.append(
                        Dir(layout=layout, md5=oid[:32], size=st.st_size, mtime=st.st_mtime)
                    )
                    continue
                key = bytes.fromhex(oid)
                index[key] = len(inv.keys)
                inv.keys.append(key)
                inv.layout_of.append(n)
                inv.size.append(st.st_size)
                inv.clock.append(st.st_mtime)
        inv.named = bytearray(len(inv.keys))
        inv.protected = bytearray(len(inv.keys))
        return inv

    @property
    def objects(self) -> int:
        return len(self.keys) + len(self.dirs)

    @property
    def total_bytes(self) -> int:
        return sum(self.size) + sum(d.size for d in self.dirs)

    def protect(self, key: bytes, layout: Layout) -> None:
        i = self.index[layout].get(key)
        if i is not None:
            self.protected[i] = 1

    def name(self, key: bytes, layout: Layout, clock: float) -> None:
        i = self.index[layout].get(key)
        if i is None or self.protected[i]:
            return
        if not self.named[i] or clock > self.clock[i]:
            self.clock[i] = clock
        self.named[i] = 1


@dataclass(frozen=True, slots=True)
class Candidate:
    path: str
    layout: Layout
    oid: str
    is_dir: bool
    index: int = -1  # in the inventory's arrays (objects)
    dir: Dir | None = None  # (`.dir` objects)

    def protected(self, inv: Inventory) -> bool:
        """Protected now: a build may have registered since the plan was made."""
        if self.dir is not None:
            return self.dir.protected
        return bool(inv.protected[self.index])


def in_eviction_order(cache: NodeCache, inv: Inventory) -> Iterator[Candidate]:
    """Unprotected objects, oldest clock first; a `.dir` after the objects of its clock."""
    objects = sorted(
        (i for i in range(len(inv.keys)) if not inv.protected[i]), key=inv.clock.__getitem__
    )  # stable: equal clocks stay in layout, then path, order
    dirs = sorted(
        (d for d in inv.dirs if not d.protected),
        key=lambda d: (d.clock, LAYOUTS.index(d.layout), d.md5),
    )
    j = 0
    for i in objects:
        clock = inv.clock[i]
        while j < len(dirs) and dirs[j].clock < clock:
            yield _dir_candidate(cache, dirs[j])
            j += 1
        layout = LAYOUTS[inv.layout_of[i]]
        oid = inv.keys[i].hex()
        yield Candidate(cache.path(oid, layout), layout, oid, is_dir=False, index=i)
    for d in dirs[j:]:
        yield _dir_candidate(cache, d)


def _dir_candidate(cache: NodeCache, d: Dir) -> Candidate:
    oid = d.md5 + ".dir"
    return Candidate(cache.path(oid, d.layout), d.layout, oid, is_dir=True, dir=d)


def plan(
    cache: NodeCache,
    inv: Inventory,
    root_revisions: set[Root],
    *,
    on_error: OnError | None = None,
) -> None:
    """Mark what roots protect and give every other object its LRU clock (module doc)."""
    report = on_error or log_item_error
    used = used_clocks(cache)
    whole: set[tuple[str, Layout]] = set()
    parts: dict[tuple[str, Layout], set[Part]] = {}
    for r in root_revisions:
        oid, layout, part = r[0], r[1], root_part(r)
        if not oid.endswith(".dir"):
            with contextlib.suppress(ValueError):  # a single-file revision: the object itself
                inv.protect(bytes.fromhex(oid), layout)
        elif part.whole:
            whole.add((oid, layout))
        else:
            parts.setdefault((oid, layout), set()).add(part)
    by_revision = part_clock_names(used)
    part_names: dict[int, list[str]] = {}
    for d in inv.dirs:
        key = (d.md5 + ".dir", d.layout)
        d.protected = key in whole or key in parts
        d.parts = () if key in whole else tuple(sorted(parts.get(key, ()), key=str))
        names = sorted(by_revision.get(used_name(key[0], d.layout), ()), key=lambda n: -used[n])[
            :MAX_PART_CLOCKS
        ]
        part_names[id(d)] = names
        d.part_used = tuple(names)
    dated = read_parts(cache, (n for names in part_names.values() for n in names))
    # (part, clock) of the parts of each revision used on this node, newest first.
    part_clocks = {
        id(d): [(dated[n], used[n]) for n in part_names[id(d)] if n in dated] for d in inv.dirs
    }
    own_clock: dict[int, float] = {}
    for d in inv.dirs:
        own_clock[id(d)] = used.get(used_name(d.md5 + ".dir", d.layout), d.mtime)
        d.clock = max([own_clock[id(d)], *(c for _, c in part_clocks[id(d)])])
    gone: set[int] = set()
    # Roots first: `name` must know every protected object before it assigns clocks.
    for d in sorted(inv.dirs, key=lambda d: (not d.protected, bool(d.parts))):
        revision = Revision(md5=d.md5, is_dir=True)
        try:
            manifest = cache.load_manifest(revision, d.layout)
        except Exception as exc:
            # A bad `.dir` is quarantined by load_manifest or, if it parses badly but hashes
            # right, evicted like any object no revision names: at its own mtime.
            log.warning(
                "GC: cannot read manifest %s (%s layout): %s; %s",
                revision.oid,
                d.layout,
                exc,
                "the objects of this revision in use are not protected"
                if d.protected
                else "treating it as an unreferenced object",
                extra={"revision": revision.oid, "layout": str(d.layout)},
            )
            d.clock = d.mtime
            if not os.path.lexists(cache.path(revision.oid, d.layout)):
                gone.add(id(d))
            continue
        if d.protected and not d.parts:
            _protect_all(inv, manifest, d.layout)
            continue
        for part in d.parts:
            try:
                _protect_all(inv, part.select(manifest, revision=revision.oid), d.layout)
            except Exception as exc:
                # The record names a folder the revision lacks: there is nothing of it to keep.
                report(Task.ROOTS, f"{cache.path(revision.oid, d.layout)} ({part})", exc)
        _name_all(inv, manifest, d.layout, own_clock[id(d)])
        for part, clock in part_clocks[id(d)]:
            with contextlib.suppress(Exception):  # a part the revision lacks dates nothing
                _name_all(inv, part.select(manifest, revision=revision.oid), d.layout, clock)
    if gone:  # quarantined just now: no longer in the cache
        inv.dirs = [d for d in inv.dirs if id(d) not in gone]


def _protect_all(inv: Inventory, manifest: Manifest, layout: Layout) -> None:
    for i in range(len(manifest)):
        inv.protect(manifest.md5_raw(i), layout)


def _name_all(inv: Inventory, manifest: Manifest, layout: Layout, clock: float) -> None:
    for i in range(len(manifest)):
        inv.name(manifest.md5_raw(i), layout, clock)
