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
writable-safe: a base is reused only if its `read_only` is no worse than this run's.

Objects are linked optimistically: a warm start must cost metadata only, so there is no stat
per object up front. An object that turns out to be missing is collected, fetched from the
remote once (however many entries share it), and linked afterwards. Publishing happens only
after every entry is in place, so a failure at any point leaves the published tree as it was
and the build is removed.

Filesystem work is synchronous on purpose: it is syscall-bound, and an async service runs this
in a worker thread (`asyncio.to_thread`), which is what aiofiles would do per call anyway.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cache import NodeCache
from .errors import CorruptObjectError, ObjectsMissingError, os_error
from .hashing import Layout
from .linker import Linker, LinkMode, Strategy
from .manifest import Manifest, diff
from .remote import FetchReport, Remote
from .revision import Revision
from .workspace import TreeInfo, Workspace, tree_key

#: How often (in entries) the progress callback is called.
PROGRESS_EVERY = 2048


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """What a materialise did; every field is reported by the CLI and, later, as metrics."""

    revision: str
    path: str  # DEST/<link>, what consumers read
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
    started = time.monotonic()
    ws = Workspace(request.dest, link_name=request.link_name, grace=request.spare_grace)
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
        self.hits = self.hit_bytes = self.misses = self.miss_bytes = 0
        self.removed_bytes = 0
        self.fetched_objects = self.fetched_bytes = self.waited_objects = 0
        self.retries: Counter[str] = Counter()
        self.quarantined: list[str] = []
        self.layout = Layout.DVC3
        self.modes: tuple[LinkMode, ...] = ()

    # -- the steps ----------------------------------------------------------------------------

    def execute(self, recovered: tuple[str, ...]) -> Result:
        rev = self.req.revision
        noop = self._noop(recovered)
        if noop is not None:
            return noop
        self.layout = self._resolve_layout()
        key = tree_key(rev.md5, self.layout)
        manifest = self._manifest()
        if self.req.verify:
            self._verify(manifest)
        self.cache.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.modes = self.linker.modes_for(
            cache_tmp=str(self.cache.tmp_dir), dest_dir=str(self.ws.revs)
        )
        base, base_path, base_info = self._choose_base(self.modes[0].read_only)
        reused = removed = 0
        carried_read_only = False
        build: Path | None = None
        try:
            build = self.ws.take_spare(key) if base == "spare" else self.ws.new_build(key)
            if base_info is None or base_path is None:
                self._link_entries(manifest, build)
            else:
                old = self.cache.load_manifest(
                    Revision.parse(base_info.revision), Layout(base_info.layout)
                )
                plan = diff(old, manifest)
                reused, removed = plan.unchanged, len(plan.remove)
                carried_read_only = base_info.read_only and reused > 0
                self._count_removed_bytes(old, plan.remove, build if base == "spare" else base_path)
                if base == "spare":
                    self._remove_entries(old, plan.remove, build)
                    self._link_entries(manifest, build, only=plan.add)
                else:
                    self._link_entries(manifest, build, carry=(plan.add, base_path))
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
                bytes=self._tree_bytes(base_info),
                modes={m: n for m, n in total_modes.items() if n > 0},
                read_only=read_only,
            )
            self.ws.commit(build, key, info)
            build = None
        finally:
            if build is not None:
                self.ws.discard(build)
        self.ws.publish(key, keep_spare=self.req.keep_spare)
        self._tick("done", len(manifest))
        return Result(
            revision=rev.oid,
            path=str(self.ws.link),
            tree=str(self.ws.tree(key)),
            files=len(manifest),
            bytes=info.bytes,
            modes=run_modes,
            read_only=read_only,
            hits=self.hits,
            hit_bytes=self.hit_bytes,
            misses=self.misses,
            miss_bytes=self.miss_bytes,
            fetched_objects=self.fetched_objects,
            fetched_bytes=self.fetched_bytes,
            waited_objects=self.waited_objects,
            retries=dict(self.retries),
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
        if key not in {tree_key(md5, layout) for layout in self._layouts()}:
            return None
        assert key is not None  # noqa: S101 - for mypy: None is never a tree key
        if not self.ws.tree(key).is_dir():
            return None
        info = self.ws.info(key)
        return Result(
            revision=self.req.revision.oid,
            path=str(self.ws.link),
            tree=str(self.ws.tree(key)),
            files=info.files if info else 0,
            bytes=info.bytes if info else 0,
            # Without its record we cannot prove the tree has no hardlinks: say read-only.
            read_only=info.read_only if info else True,
            base="noop",
            recovered=recovered,
        )

    def _layouts(self) -> tuple[Layout, ...]:
        return (self.req.layout,) if self.req.layout else (Layout.DVC3, Layout.LEGACY)

    def _resolve_layout(self) -> Layout:
        oid = self.req.revision.oid
        layout = self.cache.find(oid, self._layouts())
        remote = self.req.remote
        if layout is None and remote is not None:
            layout = remote.find(oid, self._layouts())
            if layout is not None and self.req.revision.is_dir:
                report = remote.fetch(self.cache, [oid], layout)
                self._count(report)
                if report.absent or report.corrupt:
                    self._raise_missing(report.absent, report.corrupt, layout)
        if layout is None:
            raise ObjectsMissingError(
                oids=[oid],
                cache=str(self.cache.root),
                remote=remote.url if remote else None,
                keys=[remote.key(oid, lay) for lay in self._layouts()] if remote else (),
            )
        return layout

    def _count(self, report: FetchReport) -> None:
        self.fetched_objects += report.fetched
        self.fetched_bytes += report.fetched_bytes
        self.waited_objects += report.waited
        self.retries.update(report.retries)

    def _manifest(self) -> Manifest:
        rev = self.req.revision
        if rev.is_dir:
            return self.cache.load_manifest(rev, self.layout)
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

    def _choose_base(self, read_only: bool) -> tuple[str, Path | None, TreeInfo | None]:
        def usable(info: TreeInfo | None) -> bool:
            if info is None or (info.read_only and not read_only):
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
        target = tree_key(self.req.revision.md5, self.layout)
        if spare is not None and (spare[0] == target or self._spare_old_enough(spare[1])):
            info = self.ws.info(spare[0])
            if usable(info):
                return "spare", spare[1], info
        published = self.ws.published()
        if published is not None and self.ws.tree(published).is_dir():
            info = self.ws.info(published)
            if usable(info):
                return "published", self.ws.tree(published), info
        return "fresh", None, None

    def _spare_old_enough(self, path: Path) -> bool:
        if self.req.spare_grace <= 0:
            return True
        try:
            # rename(2) sets the ctime of the directory it moves, so ctime is when the tree
            # was retired to the spare.
            retired = os.stat(path).st_ctime
        except FileNotFoundError:
            return False
        return time.time() - retired >= self.req.spare_grace

    # -- building -----------------------------------------------------------------------------

    def _remove_entries(self, old: Manifest, remove: array[int], build: Path) -> None:
        """Drop entries of the recycled tree, then the directories they leave empty.

        DVC trees never contain empty directories, and neither may ours.
        """
        root = os.fsencode(build) + b"/"
        parents: set[bytes] = set()
        self._tick("remove", len(remove))
        for i in remove:
            rel = old.relpath_bytes(i)
            try:
                os.unlink(root + rel)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise os_error(str(build), exc) from exc
            cut = rel.rfind(b"/")
            while cut > 0:
                parents.add(rel[:cut])
                cut = rel.rfind(b"/", 0, cut)
        # Deepest first, so a directory emptied of subdirectories goes too.
        for parent in sorted(parents, key=lambda p: p.count(b"/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(root + parent)

    def _link_entries(
        self,
        manifest: Manifest,
        build: Path,
        *,
        only: array[int] | None = None,
        carry: tuple[array[int], Path] | None = None,
    ) -> None:
        """The hot loop: link every entry (or those in `only`) of `manifest` into `build`.

        With `carry=(add, base)`, entries not in `add` are hardlinked from the tree `base`
        instead of coming from the cache.
        """
        root = os.fsencode(build) + b"/"
        prefix = os.fsencode(self.cache.prefix(self.layout))
        link = self.linker.link
        modes = self.modes
        hexlify = binascii.b2a_hex
        made: set[bytes] = set()
        last_parent = b""
        missing = array("Q")
        total = len(only) if only is not None else len(manifest)
        self._tick("link", total)
        add_iter = iter(carry[0]) if carry is not None else None
        next_add = next(add_iter, -1) if add_iter is not None else -1
        base_root = os.fsencode(carry[1]) + b"/" if carry is not None else b""
        # A recycled tree needs only the planned entries: visit those by index rather than
        # scanning the whole manifest for them.
        entries: Iterator[tuple[int, tuple[bytes, bytes]]] = (
            ((i, manifest.entry_raw(i)) for i in only)
            if only is not None
            else enumerate(manifest.iter_raw())
        )
        done = 0
        for index, (rel, raw) in entries:
            cut = rel.rfind(b"/")
            if cut > 0:
                parent = rel[:cut]
                if parent != last_parent:
                    if parent not in made:
                        try:
                            os.makedirs(root + parent, mode=0o755, exist_ok=True)
                        except OSError as exc:
                            raise os_error(str(build), exc) from exc
                        made.add(parent)
                    last_parent = parent
            dst = root + rel
            done += 1
            if done % PROGRESS_EVERY == 0:
                self._tick("link", total, done)
            if add_iter is not None:
                if index != next_add:
                    try:
                        os.link(base_root + rel, dst)
                        continue
                    except OSError:
                        pass  # EMLINK on a popular object, or a tampered base: use the cache
                else:
                    next_add = next(add_iter, -1)
            h = hexlify(raw)
            try:
                size = link(modes, prefix + h[:2] + b"/" + h[2:], dst)
            except FileNotFoundError:
                missing.append(index)
            else:
                self.hits += 1
                self.hit_bytes += size
        if missing:
            self._fetch_and_link(manifest, missing, root, prefix)

    def _fetch_and_link(
        self, manifest: Manifest, missing: array[int], root: bytes, prefix: bytes
    ) -> None:
        oids = sorted({manifest.md5(i) for i in missing})
        remote = self.req.remote
        if remote is None:
            self._raise_missing(oids, [])
        assert remote is not None  # noqa: S101 - for mypy; _raise_missing raised otherwise
        self._tick("fetch", len(oids))
        report = remote.fetch(
            self.cache, oids, self.layout, lambda n: self._tick("fetch", len(oids), n)
        )
        self._count(report)
        if report.absent or report.corrupt:
            self._raise_missing(report.absent, report.corrupt, self.layout)
        for i in missing:
            h = manifest.md5(i).encode()
            size = self.linker.link(
                self.modes, prefix + h[:2] + b"/" + h[2:], root + manifest.relpath_bytes(i)
            )
            self.misses += 1
            self.miss_bytes += size

    def _raise_missing(
        self, absent: list[str], corrupt: list[str], layout: Layout | None = None
    ) -> None:
        remote = self.req.remote
        layout = layout or self.layout
        if corrupt and remote is not None:
            raise CorruptObjectError(
                oids=corrupt,
                cache=str(self.cache.root),
                remote=remote.url,
                keys=[remote.key(o, layout) for o in corrupt[:5]],
            )
        bad = [o for o in self.quarantined if o in set(absent)] + corrupt
        if bad:
            raise CorruptObjectError(
                oids=bad,
                cache=str(self.cache.root),
                detail="md5 mismatch"
                + (f"; remote {remote.url} has no good copy" if remote else ""),
            )
        raise ObjectsMissingError(
            oids=absent,
            cache=str(self.cache.root),
            remote=remote.url if remote else None,
            keys=[remote.key(o, layout) for o in absent[:5]] if remote else (),
        )

    def _tree_bytes(self, base: TreeInfo | None) -> int:
        added = self.hit_bytes + self.miss_bytes
        return added if base is None else base.bytes - self.removed_bytes + added

    def _count_removed_bytes(self, old: Manifest, remove: array[int], base: Path) -> None:
        """Sizes of the entries leaving the base tree: O(changed) lstat calls."""
        root = os.fsencode(base) + b"/"
        for i in remove:
            with contextlib.suppress(OSError):
                self.removed_bytes += os.lstat(root + old.relpath_bytes(i)).st_size

    def _tick(self, phase: str, total: int, done: int | None = None) -> None:
        if self.progress is None:
            return
        self.state.phase = phase
        self.state.total = total
        self.state.done = total if done is None and phase == "done" else (done or 0)
        self.progress(self.state)
