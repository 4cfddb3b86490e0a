"""Materialise a revision into a destination: resolve, plan, build, publish.

The shape is dvc-data's: first a plan (`manifest.diff(current, target)`), then an apply that
touches only what the plan names. The build always happens out of sight, in a `.build-`
directory; the workspace publishes it with one atomic rename (see `workspace`).

Three ways to build, cheapest first, chosen per run:

1. **Recycle the spare** — the previously published tree, edited in place: unlink removed and
   changed entries, link added and changed ones. O(changed).
2. **Carry over from the published tree** — a new directory where unchanged entries are
   hardlinked from the published tree (one `link(2)` each, ~5x cheaper than a FICLONE) and the
   rest come from the cache. The published tree stays intact until the swap.
3. **Fresh** — every entry from the cache.

A tree made of hardlinks (read-only) is never carried into a tree that would otherwise be
writable-safe: a base is reused only if its `read_only` is no worse than this run's. A tree a
pod could write (`Request.writable`: the webhook mounts it read-write) is never a base at all,
and a writable run builds fresh: the pod may have edited anything in it, and hardlinking or
recycling would carry its edits (or, through a planted symlink, another pod's files) into the
next revision. Writable trees cost O(files) per switch; read-only ones keep O(changed).

The filesystem work of a build (linking through directory descriptors, never following a
symlink a pod planted; fetching what turns out to be missing) is `treebuild`'s. Publishing
happens only after every entry is in place, so a failure at any point leaves the published
tree as it was and the build is removed.

Filesystem work is synchronous on purpose: it is syscall-bound, and an async service runs this
in a worker thread (`asyncio.to_thread`), which is what aiofiles would do per call anyway.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.fetching import Fetcher, layouts_to_try
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Linker, LinkMode, Strategy
from datapin_sidecar.engine.manifest import Manifest, diff
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.treebuild import TreeBuilder
from datapin_sidecar.engine.workspace import TreeInfo, Workspace, tree_key
from datapin_sidecar.errors import DestinationError, UsageError


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What to materialise where."""

    cache: NodeCache
    revision: Revision
    dest: Path
    strategy: Strategy = Strategy.AUTO
    remote: Remote | None = None
    link_name: str = "current"
    verify: bool = False
    keep_spare: bool = True
    #: Seconds a retired tree must have been the spare before it is edited in place. A reader
    #: that resolved `<link>` before a switch (an open directory, a walk in progress) keeps
    #: seeing all of its old revision for at least this long; a younger spare is left alone
    #: and the build carries over from the published tree instead (which is never modified).
    spare_grace: float = 0.0
    #: The file name of a single-file revision (a `.dvc` out's path); default: the md5.
    file_name: str | None = None
    #: The layout the revision was pushed in (a `.dvc` out says: `hash: md5` means DVC 3).
    #: None = auto: DVC 3 if the cache or remote has it there, else legacy. The same `.dir`
    #: md5 can exist in both layouts naming different bytes, so callers that know, say.
    layout: Layout | None = None
    #: A pod mounts the destination read-write: its trees are never recycled or carried over.
    writable: bool = False
    #: Directory of the destination's records (see `workspace`); None: `dest/.revs`.
    state: Path | None = None
    #: Which folders of the revision to publish (`engine.part`); `Part.WHOLE`: all of it.
    #: Only their objects are fetched; the tree keeps the revision's paths.
    part: Part = Part.WHOLE


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """What a materialise did; every field is reported by the CLI and, later, as metrics."""

    revision: str
    path: str  # DEST/<link>, what consumers read
    paths: tuple[str, ...] = ()  # the part's folders (`engine.part`); empty: the whole revision
    tree: str  # the directory the link points at
    files: int
    bytes: int
    modes: dict[str, int] = field(default_factory=dict)  # files linked this run, by mode
    read_only: bool = False  # the tree has hardlinks into the cache: mount it readOnly
    hits: int = 0  # entries linked from objects already in the cache
    hit_bytes: int = 0
    misses: int = 0  # entries whose object had to be fetched
    miss_bytes: int = 0
    fetched_objects: int = 0
    fetched_bytes: int = 0
    waited_objects: int = 0  # fetched by another process on the node while this one waited
    retries: dict[str, int] = field(default_factory=dict)  # remote requests retried, by reason
    reused: int = 0  # entries kept from the previous tree
    removed: int = 0  # entries of the previous tree dropped
    base: str = "fresh"  # fresh | published | spare | noop
    quarantined: tuple[str, ...] = ()
    recovered: tuple[str, ...] = ()  # debris of crashed runs cleaned up
    seconds: float = 0.0

    @property
    def noop(self) -> bool:
        return self.base == "noop"

    @property
    def mode(self) -> str:
        """The main link mode of the tree (most files), for the one-word summary."""
        if not self.modes:
            return "none"
        return max(self.modes.items(), key=lambda kv: (kv[1], kv[0] != LinkMode.COPY))[0]


@dataclass(slots=True)
class Progress:
    """Mutable counters the progress callback sees."""

    phase: str = "plan"
    done: int = 0
    total: int = 0


ProgressFn = Callable[[Progress], None]


def materialize(
    request: Request, *, linker: Linker | None = None, progress: ProgressFn | None = None
) -> Result:
    """Make `request.revision` the published tree of `request.dest`. See the module doc."""
    if not request.part.whole and not request.revision.is_dir:
        raise UsageError(
            f"revision {request.revision.oid} is a single file, so it has no folders to pick "
            f"({request.part}). Fix: leave the path out"
        )
    started = time.monotonic()
    ws = Workspace(
        request.dest, link_name=request.link_name, grace=request.spare_grace, state=request.state
    )
    old_umask = os.umask(0o022)  # consumers of any uid must be able to read the tree
    try:
        with ws.locked():
            recovered = tuple(ws.recovered)
            request.cache.clean_temp()
            run = _Run(request, ws, linker or Linker(request.strategy), progress)
            result = run.execute(recovered)
    finally:
        os.umask(old_umask)
    return _with_seconds(result, time.monotonic() - started)


def _with_seconds(result: Result, seconds: float) -> Result:
    return dataclasses.replace(result, seconds=seconds)


class _Run:
    """One materialise, lock held. Split into steps only for readability."""

    def __init__(
        self, req: Request, ws: Workspace, linker: Linker, progress: ProgressFn | None
    ) -> None:
        self.req = req
        self.ws = ws
        self.cache = req.cache
        self.linker = linker
        self.progress = progress
        self.state = Progress()
        self.counts_before = Counter(linker.counts)
        self.fetcher = Fetcher(req.cache, req.remote)
        self.quarantined: list[str] = []
        self.layout = Layout.DVC3
        self.modes: tuple[LinkMode, ...] = ()

    # -- the steps ----------------------------------------------------------------------------

    def execute(self, recovered: tuple[str, ...]) -> Result:
        noop = self._noop(recovered)
        if noop is not None:
            return noop
        # Registered before the first cache lookup and held until the tree is published: the
        # node agent's GC keeps every object of a revision being built (cache.building).
        with self.cache.building(self.req.revision.oid):
            return self._build(recovered)

    def _build(self, recovered: tuple[str, ...]) -> Result:
        rev = self.req.revision
        self.layout = self._resolve_layout()
        key = tree_key(rev.md5, self.layout, self.req.part)
        manifest = self._manifest()
        if self.req.verify:
            self._verify(manifest)
        self.cache.tmp_dir.mkdir(parents=True, exist_ok=True)
        shared = self._shared(key, len(manifest), recovered)
        if shared is not None:
            return shared
        try:
            self.modes = self.linker.modes_for(
                cache_tmp=str(self.cache.tmp_dir), dest_fd=self.ws.revs_fd
            )
        except OSError as exc:
            raise self.ws.dest_error(exc) from exc
        base, base_name, base_info = self._choose_base(self.modes[0].read_only)
        builder = TreeBuilder(
            cache=self.cache,
            layout=self.layout,
            linker=self.linker,
            modes=self.modes,
            fetcher=self.fetcher,
            quarantined=self.quarantined,
            tick=self._tick,
        )
        reused = removed = 0
        carried_read_only = False
        build: str | None = None
        try:
            build = self.ws.take_spare(key) if base == "spare" else self.ws.new_build(key)
            build_fd = self.ws.open_tree(build)
            try:
                if base_info is None or base_name is None:
                    builder.link_entries(manifest, build_fd)
                else:
                    old = base_info.part.select(
                        self.cache.load_manifest(
                            Revision.parse(base_info.revision), Layout(base_info.layout)
                        ),
                        revision=base_info.revision,
                    )
                    plan = diff(old, manifest)
                    reused, removed = plan.unchanged, len(plan.remove)
                    carried_read_only = base_info.read_only and reused > 0
                    if base == "spare":
                        builder.count_removed_bytes(old, plan.remove, build_fd)
                        builder.remove_entries(old, plan.remove, build_fd)
                        builder.link_entries(manifest, build_fd, only=plan.add)
                    else:
                        base_fd = self.ws.open_tree(base_name)
                        try:
                            builder.count_removed_bytes(old, plan.remove, base_fd)
                            builder.link_entries(manifest, build_fd, carry=(plan.add, base_fd))
                        finally:
                            os.close(base_fd)
            except OSError as exc:
                raise self.ws.dest_error(exc) from exc
            finally:
                os.close(build_fd)
            counts = Counter(self.linker.counts)
            counts.subtract(self.counts_before)
            run_modes = {str(m): n for m, n in counts.items() if n > 0}
            read_only = carried_read_only or counts[LinkMode.HARDLINK] > 0
            total_modes = Counter(run_modes)
            if base_info is not None:
                total_modes.update(base_info.modes)
            info = TreeInfo(
                revision=rev.oid,
                layout=str(self.layout),
                files=len(manifest),
                bytes=builder.tree_bytes(base_info),
                modes={m: n for m, n in total_modes.items() if n > 0},
                read_only=read_only,
                writable=self.req.writable,
                paths=self.req.part.to_list(),
            )
            self.ws.commit(build, key, info)
            build = None
        finally:
            if build is not None:
                self.ws.discard(build)
        self.ws.publish(key, keep_spare=self.req.keep_spare and not self.req.writable)
        self._tick("done", len(manifest))
        return Result(
            revision=rev.oid,
            path=str(self.ws.link),
            paths=self.req.part.paths,
            tree=str(self.ws.tree(key)),
            files=len(manifest),
            bytes=info.bytes,
            modes=run_modes,
            read_only=read_only,
            hits=builder.hits,
            hit_bytes=builder.hit_bytes,
            misses=builder.misses,
            miss_bytes=builder.miss_bytes,
            fetched_objects=self.fetcher.fetched_objects,
            fetched_bytes=self.fetcher.fetched_bytes,
            waited_objects=self.fetcher.waited_objects,
            retries=dict(self.fetcher.retries),
            reused=reused,
            removed=removed,
            base=base,
            quarantined=tuple(self.quarantined),
            recovered=recovered,
        )

    def _noop(self, recovered: tuple[str, ...]) -> Result | None:
        """The revision is already published: O(1), no manifest read."""
        md5 = self.req.revision.md5
        key = self.ws.published()
        if key not in {tree_key(md5, layout, self.req.part) for layout in self._layouts()}:
            return None
        assert key is not None  # noqa: S101 - for mypy: None is never a tree key
        # Only a tree the records vouch for (the inode they name): a pod that renamed or
        # forged `.revs/<key>` gets a rebuild, not its own tree back.
        info = self.ws.trusted(key)
        if info is None:
            return None
        return self._unchanged(key, info, recovered)

    def _unchanged(self, key: str, info: TreeInfo, recovered: tuple[str, ...]) -> Result:
        return Result(
            revision=self.req.revision.oid,
            path=str(self.ws.link),
            paths=self.req.part.paths,
            tree=str(self.ws.tree(key)),
            files=info.files,
            bytes=info.bytes,
            read_only=info.read_only,
            base="noop",
            recovered=recovered,
        )

    def _shared(self, key: str, files: int, recovered: tuple[str, ...]) -> Result | None:
        """Publish a tree another link name of this destination already serves, if it may be.

        A tree behind any link is never rebuilt, recycled or retired. A read-only tree of ours
        is shared (both links name it); one a pod could write is not (it may no longer be the
        revision), and it cannot be replaced either, so that is an error.
        """
        links = self.ws.links()
        others = sorted(n for n, k in links.items() if k == key and n != self.ws.link_name)
        if not others:
            return None
        info = self.ws.trusted(key)
        if info is None or info.writable or self.req.writable:
            raise DestinationError(
                dest=str(self.ws.dest),
                problem=f"revision {self.req.revision.oid} is already published there under "
                f"link {others[0]!r} as a tree a pod could write (or one datapin cannot vouch "
                f"for), so it cannot also be published as {self.ws.link_name!r}",
                fix="publish a revision under one link name only in a writable destination, "
                "or use another destination",
            )
        self.ws.publish(key, keep_spare=self.req.keep_spare)
        self._tick("done", files)
        return dataclasses.replace(self._unchanged(key, info, recovered), files=info.files)

    def _layouts(self) -> tuple[Layout, ...]:
        return layouts_to_try(self.req.layout)

    def _resolve_layout(self) -> Layout:
        return self.fetcher.resolve_layout(self.req.revision, self._layouts())

    def _manifest(self) -> Manifest:
        rev = self.req.revision
        if rev.is_dir:
            return self.req.part.select(
                self.cache.load_manifest(rev, self.layout), revision=rev.oid
            )
        name = self.req.file_name or rev.md5
        return Manifest.from_entries([(name, rev.md5)], source=f"single-file revision {rev.md5}")

    def _verify(self, manifest: Manifest) -> None:
        layout = self.layout
        seen: set[bytes] = set()
        for _, raw in manifest.iter_raw():
            if raw in seen:
                continue
            seen.add(raw)
            oid = raw.hex()
            if os.path.lexists(self.cache.path(oid, layout)) and not self.cache.verify(oid, layout):
                self.quarantined.append(oid)

    def _choose_base(self, read_only: bool) -> tuple[str, str | None, TreeInfo | None]:
        """The cheapest base: the spare, the published tree, or none; with its record."""
        if self.req.writable:
            return "fresh", None, None

        def usable(info: TreeInfo | None) -> bool:
            if info is None or info.writable or (info.read_only and not read_only):
                return False
            # One md5 names different bytes in the two layouts (a legacy CRLF text object is
            # named by its LF form), so entries are only comparable within one layout.
            if info.layout != self.layout:
                return False
            old = Revision.parse(info.revision)
            return (
                old.is_dir
                and self.req.revision.is_dir
                and self.cache.find(old.oid, (Layout(info.layout),)) is not None
            )

        spare = self.ws.spare()
        # A young spare is off limits (readers may still be in it), except when it already is
        # the target: then the recycle renames it and edits nothing (a rollback).
        target = tree_key(self.req.revision.md5, self.layout, self.req.part)
        if spare is not None and (spare[0] == target or self._spare_old_enough(spare[1].name)):
            info = self.ws.trusted(spare[0], spare[1].name)
            if usable(info):
                return "spare", spare[1].name, info
        published = self.ws.published()
        if published is not None:
            info = self.ws.trusted(published)
            if usable(info):
                return "published", published, info
        return "fresh", None, None

    def _spare_old_enough(self, name: str) -> bool:
        if self.req.spare_grace <= 0:
            return True
        try:
            # rename(2) sets the ctime of the directory it moves, so ctime is when the tree
            # was retired to the spare.
            retired = os.lstat(name, dir_fd=self.ws.revs_fd).st_ctime
        except FileNotFoundError:
            return False
        return time.time() - retired >= self.req.spare_grace

    def _tick(self, phase: str, total: int, done: int | None = None) -> None:
        if self.progress is None:
            return
        self.state.phase = phase
        self.state.total = total
        self.state.done = total if done is None and phase == "done" else (done or 0)
        self.progress(self.state)
