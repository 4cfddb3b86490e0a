"""The shared tree store: one read-only tree per (node, revision, layout, part), built once.

In CSI mode a pod's volume is a bind mount of a tree that every pod on the node using the same
revision shares (`publisher`), so a warm publish costs the same at 10 files and at 1,000,000.
This module builds and keeps those trees::

    ROOT/trees/<key>/                     one destination per tree key (`workspace.tree_key`:
                                          `<md5>[-legacy][-p<16 hex>]`, the last for a part)
    ROOT/trees/<key>/current -> .revs/<key>   published: the tree is complete
    ROOT/trees/<key>/.revs/<key>/         the tree itself (what `ensure` returns, what is bound)
    ROOT/trees/<key>/.revs/{.lock,.datapin,.meta/}   the workspace's records (`workspace`)
    ROOT/trees/.locks/<md5>               flock: builds and removal of `<md5>`'s trees
    ROOT/trees/.trash-<key>-<r>/          a tree being removed (debris if left: `sweep`)

**Built by the engine, not beside it.** A tree is `engine.materialize.materialize` into its own
destination, so everything that makes a sidecar's tree right makes this one right: reflinks from
the cache (hardlink or copy fallback), missing objects fetched from the request's remote once
per node and md5-verified, the build hidden under a `.build-` name and published by renaming
`current`, and a crash at any point leaving debris the next run's `recover` removes.

**A part is a tree of its own** (`engine.part`: some folders of the revision, keyed with the
part's `-p` suffix), built by the engine from the part's entries only, so only the part's
objects are fetched, and its entries keep their paths (`current/images/train/...`). It is
never cut out of the whole revision's tree, nor the whole from parts: each key is one
destination that holds exactly what its record (`TreeInfo.paths`) says. Objects are shared
through the cache, so a part and the whole of one revision on a node cost one download per
object: their builds take the same per-md5 lock, and whichever comes second finds the objects
cached. A folder the revision lacks is the engine's `PathNotInRevisionError` (the caller turns
it into a refusal; nothing is built).

**Warm is O(1).** `find` reads one symlink: `current` exists only once the tree is complete and
is never changed afterwards (a destination holds one revision), so no manifest is read and no
lock is taken. **Cold is once.** `ensure` takes the revision's flock, then resolves the layout
(the `.dir` may be fetched) and builds: concurrent callers, threads or processes, queue behind
one build and find it published when they get the lock, so every object (the `.dir` too) is
fetched once per node.

**Nobody but the agent writes here.** The agent runs as root; cache objects are 0444 and tree
files 0444 (directories 0755), owned by root. Pods only ever see a tree through a read-only
bind (or as the read-only lower layer of an overlay), so not even a root process in a pod can
write it; pods never see ROOT itself.

**Removal never pulls a tree from under a pod.** `remove(key)` takes the key's lock, moves the
destination aside (so `find` stops returning it), then looks for references: a mount showing
the tree (a bind's root, an overlay's lowerdir, from /proc/self/mountinfo) or a volume record
naming the key (`references`, the publisher's records, which are written before it mounts). A
referenced tree is moved back. Because the check follows the move, a publish racing removal
either is seen or fails to find the path (kubelet retries, and the tree is built again).

Blocking work runs in worker threads (`asyncio.to_thread`): the public coroutines are
`ensure`, `build` and `remove`; the rest is cheap and synchronous, for the GC's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.csi import mounts
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.fetching import Fetcher
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, Result, materialize
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import TreeInfo, Workspace, is_tree_key, tree_key

LINK: Final = "current"
_TRASH: Final = ".trash-"


@dataclass(frozen=True, slots=True, kw_only=True)
class Built:
    """What `build` found or did: the tree to bind, and the engine's result if it built."""

    key: str
    path: Path
    #: None: the tree was already there (warm, or built by a caller we waited for).
    result: Result | None
    #: Objects this call fetched (the `.dir` while resolving the layout included).
    fetched_objects: int
    fetched_bytes: int
    seconds: float


class TreeStore:
    """The trees under `root/trees` (see the module doc).

    `references`: the tree keys that volume records name (`Publisher.referenced_keys`); a
    tree they name is in use even before its mount exists.
    """

    def __init__(
        self,
        root: Path,
        cache: NodeCache,
        *,
        strategy: Strategy = Strategy.AUTO,
        references: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.root = Path(root).absolute()
        self.dir = self.root / "trees"
        self.cache = cache
        self.strategy = strategy
        self.references = references

    # -- paths --------------------------------------------------------------------------------

    def tree(self, key: str) -> Path:
        """Where `key`'s tree is (or would be)."""
        return self.dir / key / ".revs" / key

    def _locks(self) -> Path:
        return self.dir / ".locks"

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self._locks().mkdir(parents=True, exist_ok=True)
        fd = safefs.open_regular(self._locks() / key, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- warm ---------------------------------------------------------------------------------

    def find_key(self, key: str) -> Path | None:
        """`key`'s tree if it is complete: one readlink, nothing parsed, no lock."""
        try:
            target = os.readlink(self.dir / key / LINK)
        except OSError:
            return None
        return self.tree(key) if target == f".revs/{key}" else None

    def find(
        self, revision: Revision, layout: LayoutChoice, part: Part = Part.WHOLE
    ) -> Path | None:
        """The complete tree of `part` of `revision` in `layout` (auto: DVC 3, then legacy)."""
        for candidate in layout.candidates:
            found = self.find_key(tree_key(revision.md5, candidate, part))
            if found is not None:
                return found
        return None

    # -- cold ---------------------------------------------------------------------------------

    def build_sync(
        self,
        revision: Revision,
        layout: LayoutChoice,
        remote: Remote | None,
        part: Part = Part.WHOLE,
    ) -> Built:
        """`build`, in the calling thread."""
        started = time.monotonic()
        for candidate in layout.candidates:
            key = tree_key(revision.md5, candidate, part)
            found = self.find_key(key)
            if found is not None:
                return Built(
                    key=key,
                    path=found,
                    result=None,
                    fetched_objects=0,
                    fetched_bytes=0,
                    seconds=time.monotonic() - started,
                )
        fetcher = Fetcher(self.cache, remote)
        # Registered as a build before the first lookup, so the GC keeps the `.dir` this may
        # fetch until the materialiser registers its own run (see `cache.building`). The lock
        # is per md5 (both layouts' keys, every part's), taken before the layout is resolved,
        # so that waiters do not each fetch the `.dir` again, and a part and the whole of one
        # revision built at once fetch each object once: the second build finds it cached.
        with self.cache.building(revision.oid), self._locked(revision.md5):
            found = self.find(revision, layout, part)
            result = None
            if found is not None:
                key = found.name
            else:
                resolved = fetcher.resolve_layout(revision, layout.candidates)
                key = tree_key(revision.md5, resolved, part)
                found = self.find_key(key)
                if found is None:
                    result = materialize(self._request(revision, resolved, remote, key, part))
                    found = self.tree(key)
        return Built(
            key=key,
            path=found,
            result=result,
            fetched_objects=fetcher.fetched_objects + (result.fetched_objects if result else 0),
            fetched_bytes=fetcher.fetched_bytes + (result.fetched_bytes if result else 0),
            seconds=time.monotonic() - started,
        )

    def _request(
        self, revision: Revision, layout: Layout, remote: Remote | None, key: str, part: Part
    ) -> Request:
        return Request(
            cache=self.cache,
            revision=revision,
            dest=self.dir / key,
            strategy=self.strategy,
            remote=remote,
            link_name=LINK,
            layout=layout,
            # One revision per destination, never switched: nothing to recycle.
            keep_spare=False,
            part=part,
        )

    async def build(
        self,
        revision: Revision,
        layout: LayoutChoice,
        remote: Remote | None,
        part: Part = Part.WHOLE,
    ) -> Built:
        """The tree of `part` of `revision`, built now unless it exists (see the module doc)."""
        found = self.find(revision, layout, part)
        if found is not None:
            return Built(
                key=found.name,
                path=found,
                result=None,
                fetched_objects=0,
                fetched_bytes=0,
                seconds=0.0,
            )
        return await asyncio.to_thread(self.build_sync, revision, layout, remote, part)

    async def ensure(
        self,
        revision: Revision,
        layout: LayoutChoice,
        remote: Remote | None,
        part: Part = Part.WHOLE,
    ) -> Path:
        """The directory of `part` of `revision`'s shared tree, to bind into a pod (built if
        need be)."""
        return (await self.build(revision, layout, remote, part)).path

    # -- listing and GC -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        """The keys of every complete tree on the node."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        return [n for n in names if is_tree_key(n) and self.find_key(n) is not None]

    def info(self, key: str) -> TreeInfo | None:
        """What `key`'s tree is made of (files, bytes, link modes), from its record."""
        return Workspace(self.dir / key, link_name=LINK).info(key)

    def mounted(self, table: Collection[mounts.Mount] | None = None) -> dict[str, int]:
        """Tree key -> how many mounts show it (binds and overlays), from the mount table."""
        table = mounts.mountinfo() if table is None else list(table)
        base = mounts.fs_path(self.dir, table)
        found: dict[str, int] = {}
        for m in table:
            key = None
            below = mounts.shows(m, base) if base is not None else None
            if below:
                key = self._key_of(below)
            elif m.fstype == "overlay":
                lower = m.super_option("lowerdir") or ""
                prefix = f"{self.dir}/"
                if lower.startswith(prefix):
                    key = self._key_of(lower[len(prefix) :])
            if key is not None:
                found[key] = found.get(key, 0) + 1
        return found

    def in_use(self) -> set[str]:
        """Keys a pod may be using: shown by a mount, or named by a volume record."""
        return set(self.mounted()) | set(self.references())

    @staticmethod
    def _key_of(relative: str) -> str | None:
        """The key of `<key>/...` or `.trash-<key>-<r>/...` (a tree being removed)."""
        first = relative.split("/", 1)[0]
        if first.startswith(_TRASH):
            first = first[len(_TRASH) :].rsplit("-", 1)[0]
        return first if is_tree_key(first) else None

    def remove_sync(self, key: str) -> bool:
        """`remove`, in the calling thread."""
        if not is_tree_key(key):
            return False
        with self._locked(key[:32]):
            if key in self.in_use():
                return False
            trash = self.dir / f"{_TRASH}{key}-{secrets.token_hex(4)}"
            try:
                os.rename(self.dir / key, trash)
            except FileNotFoundError:
                return False
            # Checked again after the move (see the module doc): a bind made meanwhile shows
            # the tree under its new name, and a record written meanwhile names the key.
            if key in self.in_use():
                os.rename(trash, self.dir / key)
                return False
            safefs.remove_tree(trash)
        return True

    async def remove(self, key: str) -> bool:
        """Delete `key`'s tree unless something uses it; whether it was deleted."""
        return await asyncio.to_thread(self.remove_sync, key)

    def sweep(self) -> list[str]:
        """Delete the debris of removals that crashed (`.trash-` no mount shows); their names."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        table = mounts.mountinfo()
        done = []
        for name in names:
            if not name.startswith(_TRASH):
                continue
            key = self._key_of(name)
            if key is not None and key in self.mounted(table):
                continue  # a pod still sees it: left until unpublished
            if mounts.mounts_under(self.dir / name, table):
                continue
            safefs.remove_tree(self.dir / name)
            done.append(name)
        return done
