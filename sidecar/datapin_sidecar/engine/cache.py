"""The node cache: a directory laid out exactly like DVC's cache.

Objects live at `files/md5/ab/cdef...` (DVC 3) or `ab/cdef...` (legacy DVC 2), so a DVC cache
can serve as a node cache and the other way round (`dvc checkout` works from a cache datapin
filled). Everything datapin keeps for itself sits under `.datapin/`, which DVC never looks at:

    .datapin/tmp/         objects being written (one file per writer, flock-held while open)
    .datapin/fetch/       objects being downloaded: `<ab>/<layout>-<oid>` is both the partial
                          file and the node-wide lock that makes each object download once;
                          a large one has a `<layout>-<oid>.parts` journal so a crash resumes
    .datapin/quarantine/  objects that failed their md5, kept for inspection, never linked
    .datapin/manifests/   parsed `.dir` manifests (flat buffers + CRC), a pure speed-up: used
                          only while the `.dir` is in the cache, re-parsed if damaged
    .datapin/builds/      `<oid>.<random>.tmp`: one per build or prefetch of revision `<oid>`
                          in progress, flock-held by its builder (see `building`)

Contract, relied on by every reader and by the linker:

* An object at its final name is complete, verified and mode 0444. It got there only by
  writing a temp file in `.datapin/tmp/` while hashing, checking the md5, fsyncing, and then
  `link(tmp, final)`: `link` never replaces, so concurrent writers of one object are safe (the
  first wins, the rest drop their identical copy) and an object that a hardlinked tree shares
  is never swapped under it.
* A writer holds an exclusive `flock` on its temp file until it is done. A temp file whose lock
  can be taken belongs to a dead writer and is removed by `clean_temp` — this works across the
  PID namespaces of different pods on one node, where PIDs would not.
* A download slot (`.datapin/fetch/<ab>/<layout>-<oid>`) has a fixed name, so every process that
  wants the object opens the same file: the one that gets its flock downloads, the others see
  it busy and wait for the object instead of fetching it again. A slot whose lock is free
  belongs to nobody: the next claimant resumes it (with a journal) or starts it over. It is
  installed exactly like a temp file (`link`, then unlink the slot, then release the lock), so
  a waiter that gets the lock on an unlinked slot knows the object is in place.
* Objects are trusted once in place (a warm start must cost metadata only). `verify` re-hashes
  on request and moves a bad object to quarantine, so it is never linked again.
* **Builds register before they look.** Whoever builds a tree of, or prefetches, revision
  `<oid>` (`<md5>.dir`, or a single-file `<md5>`) wraps the whole run, from before its first
  lookup in the cache to after its last link, in `with cache.building(oid):`. That creates a
  flock-held registration in `.datapin/builds/`; the GC (`housekeeping.evict`) treats every held
  registration as a root (the revision's `.dir` and every object it names, in every layout,
  or the single object) and removes registrations whose lock is free (dead builders). A
  registration is created under a shared lock on `.datapin/builds.lock` which the GC holds
  exclusively while it reads registrations and evicts one batch: a build that registered
  before a batch is seen by it, and one that registers after finds that batch's objects gone
  and fetches them. Either way no object a build has looked at disappears under it. The
  materialiser does so around the whole run (`materialize`), the agent around a prefetch.
* The cache's private area may hold things a buggy or subverted writer planted (symlinked
  shard directories, FIFOs, directories where files belong): everything here opens such
  names without following symlinks and without blocking (`safefs`), and skips what is not
  a regular file of ours.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.hashing import DVC2_CHUNK, Layout, ObjectHasher, hash_file
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import CorruptObjectError, UnsafeFileError, os_error

OBJECT_MODE: Final = 0o444
log = logging.getLogger(__name__)

#: datapin's own area in the cache (see the module doc).
PRIVATE: Final = ".datapin"
_REVISION_OID: Final = re.compile(r"[0-9a-f]{32}(?:\.dir)?")
#: Times a slot's name is cleared of something planted before giving up.
_PLANTED_RETRIES: Final = 8


class NodeCache:
    """A DVC-compatible object cache rooted at `root`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._prefix = {layout: f"{self.root}/{layout.prefix()}" for layout in Layout}
        self.private_dir = self.root / PRIVATE
        self.tmp_dir = self.private_dir / "tmp"
        self.quarantine_dir = self.private_dir / "quarantine"
        self.manifests_dir = self.private_dir / "manifests"
        self.fetch_dir = self.private_dir / "fetch"
        self.builds_dir = self.private_dir / "builds"
        self.builds_lock = self.private_dir / "builds.lock"
        #: One empty file per revision, its mtime the LRU clock (`housekeeping.clock`).
        self.used_dir = self.private_dir / "used"
        self._shards_checked: set[str] = set()

    def __repr__(self) -> str:
        return f"NodeCache({str(self.root)!r})"

    # -- paths --------------------------------------------------------------------------------

    def path(self, oid: str, layout: Layout) -> str:
        """Where object `oid` (`<md5>` or `<md5>.dir`) lives in `layout`."""
        return f"{self._prefix[layout]}{oid[:2]}/{oid[2:]}"

    def prefix(self, layout: Layout) -> str:
        """`path(oid, layout) == prefix(layout) + oid[:2] + "/" + oid[2:]`, for hot loops."""
        return self._prefix[layout]

    def find(
        self, oid: str, layouts: tuple[Layout, ...] = (Layout.DVC3, Layout.LEGACY)
    ) -> Layout | None:
        """The first layout holding `oid`, or None."""
        for layout in layouts:
            if os.path.lexists(self.path(oid, layout)):
                return layout
        return None

    # -- manifests ----------------------------------------------------------------------------

    def load_manifest(self, revision: Revision, layout: Layout) -> Manifest:
        """Read, md5-check and parse the `.dir` of `revision`; a bad one is quarantined.

        The parsed form is kept in `.datapin/manifests/` and used while the `.dir` itself is
        still in the cache: a switch reads two manifests, and parsing JSON was most of its cost.
        """
        path = self.path(revision.oid, layout)
        source = f"{revision.oid} (at {path})"
        parsed = self.manifests_dir / f"{layout}-{revision.oid}"
        if os.path.lexists(path):
            try:
                with os.fdopen(safefs.open_regular(parsed), "rb") as f:
                    cached = Manifest.from_bytes(f.read(), source=source)
                if cached is not None:
                    return cached
            except (FileNotFoundError, UnsafeFileError):
                pass  # absent, or not a regular file of ours: parse the `.dir` again
        # Never a symlink or a FIFO under an object's name (see the module contract).
        with os.fdopen(safefs.open_regular(path), "rb") as f:
            data = f.read()
        hasher = ObjectHasher(layout)
        hasher.update(data)
        if hasher.hexdigest() != revision.md5:
            self.quarantine(revision.oid, layout)
            raise CorruptObjectError(
                oids=[revision.oid], cache=str(self.root), detail="manifest bytes fail their md5"
            )
        manifest = Manifest.parse(data, source=source)
        del data  # tens of MB for a large revision: not held while the parsed form is written
        self._keep_parsed(parsed, manifest)
        return manifest

    def _keep_parsed(self, target: Path, manifest: Manifest) -> None:
        """Best effort: a cache we cannot write to still materialises, just slower."""
        # Written through a locked temp file in tmp/, like objects: if we are killed, the
        # next clean_temp removes it, and a concurrent clean_temp cannot take it from us.
        tmp = ""
        try:
            fd, tmp = create_locked(self.tmp_dir, target.name)
            try:
                for part in manifest.blob_parts():
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, target)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                if tmp:
                    os.unlink(tmp)

    # -- inserting ----------------------------------------------------------------------------

    def insert_file(self, src: str | os.PathLike[str], oid: str, layout: Layout) -> int:
        """Copy `src` into the cache as `oid`, verifying its md5. Returns the bytes copied.

        Raises `CorruptObjectError` (and leaves the cache untouched) if the bytes do not hash
        to `oid`.
        """
        md5 = oid.removesuffix(".dir")
        with self.writer(oid, layout) as w, open(src, "rb", buffering=0) as f:
            while chunk := f.read(DVC2_CHUNK):
                w.write(chunk)
            if w.hexdigest() != md5:
                raise CorruptObjectError(
                    oids=[oid], cache=str(self.root), detail=f"{src} does not hash to its name"
                )
            return w.size

    def insert_bytes(self, data: bytes, oid: str, layout: Layout) -> None:
        """Insert in-memory bytes as `oid` (verified like any other insert)."""
        with self.writer(oid, layout) as w:
            w.write(data)
            if w.hexdigest() != oid.removesuffix(".dir"):
                raise CorruptObjectError(
                    oids=[oid], cache=str(self.root), detail="bytes do not hash to their name"
                )

    def writer(self, oid: str, layout: Layout) -> ObjectWriter:
        """A temp file that becomes object `oid` when the `with` block exits cleanly."""
        return ObjectWriter(self, oid, layout)

    # -- download slots -------------------------------------------------------------------------

    def claim(self, oid: str, layout: Layout) -> Slot | None:
        """The download slot of `oid`, locked for us; None while another process holds it.

        The caller must check `present()` after claiming: the object may have been installed
        by someone else between its own lookup and this claim.
        """
        path = self.slot_path(oid, layout)
        while True:
            try:
                fd = self._open_slot(path)
            except OSError as exc:
                raise os_error(str(self.root), exc, volume="node cache") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            st = os.fstat(fd)
            if st.st_nlink > 0:
                return Slot(cache=self, oid=oid, layout=layout, fd=fd, path=path, size=st.st_size)
            # We locked a slot its owner had just installed and unlinked: look again (the
            # object is most likely in place now; the caller's present() check will say).
            os.close(fd)

    def _open_slot(self, path: str) -> int:
        """Open (creating) the slot file at `path`, never through a symlink nor a FIFO.

        Nothing but regular files of ours belongs in the fetch area: a directory, symlink or
        FIFO found at a slot's name, or a symlink where its shard directory belongs, was
        planted; it is removed (not followed) and the slot made afresh. A shard is checked once
        per `NodeCache` (there are 256).
        """
        shard = os.path.dirname(path)
        for _ in range(_PLANTED_RETRIES):
            if shard not in self._shards_checked:
                try:
                    fd = safefs.open_dir(shard)
                except FileNotFoundError:
                    os.makedirs(shard, exist_ok=True)
                    continue
                except UnsafeFileError:
                    safefs.remove_tree(shard)  # a symlink: unlinked, its target left alone
                    continue
                os.close(fd)
                self._shards_checked.add(shard)
            try:
                return safefs.open_regular(path, os.O_RDWR | os.O_CREAT)
            except FileNotFoundError:
                self._shards_checked.discard(shard)
            except UnsafeFileError:
                safefs.remove_tree(path)
        raise UnsafeFileError(path, "keeps being replaced by something that is not a file")

    def share_directories(self, uid: int, gid: int) -> int:
        """Create the cache's fixed directories and give the ones root owns to `uid:gid`;
        how many were given.

        For an agent that runs as root (the CSI node plugin) on a node whose sidecars run as
        `uid`: every directory a sidecar must create entries in (the shards of both layouts,
        the download slots' shards, `tmp`, `builds`, `quarantine`, `manifests`, `used`) exists
        and is the sidecars', so a directory the root agent made first never locks them out.
        Objects stay read-only (0444) whoever wrote them. A name that is not a directory (a
        planted symlink) is left alone: `lchown` never follows one.
        """
        hexes = [f"{i:02x}" for i in range(256)]
        wanted = [self.root, self.private_dir, self.tmp_dir, self.quarantine_dir]
        wanted += [self.manifests_dir, self.fetch_dir, self.builds_dir, self.used_dir]
        wanted += [Path(self._prefix[layout] + h) for layout in Layout for h in hexes]
        wanted += [self.fetch_dir / h for h in hexes]
        given = 0
        for directory in wanted:
            directory.mkdir(parents=True, exist_ok=True)
            st = os.lstat(directory)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and uid != 0:
                os.chown(directory, uid, gid, follow_symlinks=False)
                given += 1
        inside = {d.parent for d in wanted if d.parent.is_relative_to(self.root)}
        for parent in sorted(inside - set(wanted)):
            st = os.lstat(parent)  # files/ and files/md5/
            if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and uid != 0:
                os.chown(parent, uid, gid, follow_symlinks=False)
                given += 1
        return given

    def slot_path(self, oid: str, layout: Layout) -> str:
        """Where `oid`'s download slot lives: sharded like the objects, because every slot is
        created and removed once per download and one directory would serialise them all on
        its lock."""
        return f"{self.fetch_dir}/{oid[:2]}/{layout}-{oid}"

    def present(self, oid: str, layout: Layout) -> bool:
        return os.path.lexists(self.path(oid, layout))

    # -- builds in progress -------------------------------------------------------------------

    @contextlib.contextmanager
    def building(self, oid: str) -> Iterator[None]:
        """Register a build or prefetch of revision `oid` for the whole `with` block.

        Enter it before the first lookup in the cache: while it is held, `evict.collect` keeps
        the revision's `.dir` and every object it names (or, for a single-file revision, the
        object), in every layout. See the module contract.
        """
        if not _REVISION_OID.fullmatch(oid):
            raise ValueError(f"not a revision oid: {oid!r}")
        try:
            registration = self._register(oid)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise os_error(str(self.root), exc, volume="node cache") from exc
            # A cache we cannot write to: nothing is fetched into it either, and the GC of
            # whoever can write it does not see this build. Said, not fatal.
            log.warning(
                "cannot register the build of %s in %s (%s): a GC may evict its objects meanwhile",
                oid,
                self.builds_dir,
                exc.strerror,
            )
            yield
            return
        fd, path = registration
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)  # the lock goes last, after the name (as a temp file's)

    def _register(self, oid: str) -> tuple[int, str]:
        self.builds_lock.parent.mkdir(parents=True, exist_ok=True)
        lock = safefs.open_regular(self.builds_lock, os.O_RDWR | os.O_CREAT)
        try:
            # Shared: builders never wait for each other, only for a GC batch in progress.
            fcntl.flock(lock, fcntl.LOCK_SH)
            return create_locked(self.builds_dir, oid)
        finally:
            os.close(lock)

    # -- verifying ----------------------------------------------------------------------------

    def verify(self, oid: str, layout: Layout) -> bool:
        """Re-hash `oid`; a mismatch moves it to quarantine and returns False."""
        try:
            actual = hash_file(self.path(oid, layout), layout)
        except FileNotFoundError:
            return False
        if actual == oid.removesuffix(".dir"):
            return True
        self.quarantine(oid, layout)
        return False

    def quarantine(self, oid: str, layout: Layout) -> Path | None:
        """Move `oid` out of the cache into `.datapin/quarantine/`; None if it was gone."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{layout}-{oid}-{int(time.time())}-{secrets.token_hex(4)}"
        try:
            os.rename(self.path(oid, layout), target)
        except FileNotFoundError:
            return None
        return target

    # -- recovery -----------------------------------------------------------------------------

    def clean_temp(self) -> int:
        """Remove temp files and build registrations of dead processes (their flock is free).
        Returns how many.

        Download slots of dead downloaders are left alone: the next claimant of the object
        resumes or restarts them, and the node agent's GC removes the rest.
        """
        return remove_dead_locked(self.tmp_dir) + remove_dead_locked(self.builds_dir)


def remove_dead_locked(directory: Path) -> int:
    """Remove the files in `directory` whose flock is free; returns how many.

    Anything there that is not a regular file (a planted directory, symlink or FIFO: nothing
    of ours) is removed without being followed or opened. A file we cannot open is skipped.
    """
    removed = 0
    try:
        dfd = safefs.open_dir(directory)
    except (FileNotFoundError, UnsafeFileError):
        return 0
    try:
        for name in os.listdir(dfd):
            try:
                fd = safefs.open_regular(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except UnsafeFileError:
                with contextlib.suppress(OSError):
                    safefs.remove_tree(name, dir_fd=dfd)
                continue
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.lstat(name, dir_fd=dfd).st_ino:
                    continue  # replaced since we opened it
            except (BlockingIOError, FileNotFoundError):
                continue  # a live writer holds it, or it went meanwhile
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return removed


def create_locked(directory: Path, stem: str) -> tuple[int, str]:
    """Create `directory/<stem>.<random>.tmp` and return it open and flock-held.

    Between creating a file and locking it, another process's `clean_temp` may take the free
    lock and unlink the file as a dead writer's. So after locking we check that the file still
    has a name, and start over with a new one if it lost it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        path = f"{directory}/{stem}.{secrets.token_hex(6)}.tmp"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd, path
        os.close(fd)


class ObjectWriter:
    """Writes one object through a locked temp file; see the module contract."""

    __slots__ = ("_cache", "_fd", "_hasher", "_layout", "_oid", "_tmp", "size")

    def __init__(self, cache: NodeCache, oid: str, layout: Layout) -> None:
        self._cache = cache
        self._oid = oid
        self._layout = layout
        self._hasher = ObjectHasher(layout)
        self._fd = -1
        self._tmp = ""
        self.size = 0

    def __enter__(self) -> ObjectWriter:
        try:
            self._fd, self._tmp = create_locked(self._cache.tmp_dir, self._oid)
        except OSError as exc:
            raise os_error(str(self._cache.root), exc, volume="node cache") from exc
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise os_error(str(self._cache.root), exc, volume="node cache") from exc
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self._install()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            os.close(self._fd)  # releases the flock last, after the temp name is gone

    def _install(self) -> None:
        try:
            os.fchmod(self._fd, OBJECT_MODE)
            # Durable before visible: a machine crash must not leave a short object under a
            # verified name.
            os.fsync(self._fd)
        except OSError as exc:  # ENOSPC surfaces here with delayed allocation
            raise os_error(str(self._cache.root), exc, volume="node cache") from exc
        install(self._cache, self._tmp, self._oid, self._layout)


def install(cache: NodeCache, src: str, oid: str, layout: Layout) -> None:
    """Give the verified, durable, 0444 file `src` its object name; never replaces one.

    The one way any object enters the cache (temp files and download slots alike).
    """
    final = cache.path(oid, layout)
    try:
        try:
            os.link(src, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.link(src, final)
    except FileExistsError:
        pass  # another writer installed the same bytes first
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            os.rename(src, final)  # filesystems without hardlinks
        else:
            raise os_error(str(cache.root), exc, volume="node cache") from exc


@dataclass(slots=True, eq=False, kw_only=True)
class Slot:
    """A claimed download slot: a locked, fixed-name partial file (see the module contract).

    The downloader writes at any offset (`fd`), then either `install`s it after checking the
    md5 and making it durable, or `release`s it: kept for a later resume, or `discard`ed.
    """

    cache: NodeCache
    oid: str
    layout: Layout
    fd: int
    path: str
    #: Bytes in the slot when claimed: > 0 means a dead downloader left some.
    size: int = 0
    #: Whether a journal may exist (left by a dead downloader, or written by us); saves
    #: a failing unlink per small object.
    journaled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.journaled = self.size > 0

    @property
    def journal(self) -> str:
        return self.path + ".parts"

    def install(self) -> None:
        """The slot's bytes become the object. The caller verified them and made them durable
        (one `syncfs` per batch of slots is much cheaper than an fsync each)."""
        try:
            os.fchmod(self.fd, OBJECT_MODE)
            install(self.cache, self.path, self.oid, self.layout)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the slot and its journal, then release the lock (in that order)."""
        for path in (self.journal, self.path) if self.journaled else (self.path,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.release()

    def release(self) -> None:
        """Unlock and keep what is on disk, for the next claimant to resume."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
