"""A destination directory and its publish contract (git-sync's, written down).

Layout of a destination `DEST` managed by datapin, and of its *state* directory `STATE`, where
datapin keeps its records (the sidecar: `<pod workspace>/.state/<dataset>/`, which no pod
mounts; the CLI: `DEST/.revs`, the historical layout)::

    DEST/<link>                   -> .revs/<key>   relative symlink: a published tree
    DEST/.revs/<key>/             a complete tree of revision <key> (normally only published ones)
    DEST/.revs/.spare-<key>/      the previously published tree, kept for recycling
    DEST/.revs/.build-<key>-<r>/  a tree being built (debris if no one holds the lock)
    DEST/.revs/.retired-<r>/      a tree no longer needed, deleted once `grace` has passed
    DEST/.<link>.tmp-<r>          a symlink about to replace <link> (debris if left)
    STATE/.datapin                marker: this destination is managed by datapin (format version)
    STATE/.lock                   flock: one materialiser per destination at a time
    STATE/.meta/<key>.json        what is known about the tree of <key> (`TreeInfo`)

Rules:

* A tree is built under a `.build-` name and renamed to `.revs/<key>` only when complete, and
  `<link>` is only ever replaced by `rename(2)` of a fully formed temp symlink. A reader that
  resolves `<link>` therefore sees all of one revision or all of another, never a mix.
* After a swap the previous tree leaves `.revs/<key>` (the old revision is gone, as with
  git-sync) but is kept as `.spare-<key>`. The next switch renames the spare to its `.build-`
  name and edits it in place, touching only the entries that differ: a switch costs O(changed)
  filesystem operations instead of O(files) links plus O(files) unlinks. Readers must
  re-resolve `<link>` after a switch, exactly as with git-sync, which deletes the old tree.
* **DEST is hostile.** A pod with a writable mount can do anything to DEST's contents: edit,
  rename, chmod, replace any directory (`.revs` itself) with a symlink to another pod's
  workspace or outside the volume, plant FIFOs. So every operation inside DEST is relative to
  directory descriptors opened with `O_NOFOLLOW` (`safefs`), never by path; a name of ours
  holding something else is removed (a symlink is unlinked, never followed) and rebuilt. The
  worst a pod can do is break its own tree, which the next switch replaces.
* **Trust lives in STATE only.** A tree is used (noop, spare, carry-over base, shared by a
  second link) only if its record says so and the directory is the inode the record names
  (`TreeInfo.ino`), so a renamed or forged tree is never taken for ours. A tree a pod could
  write (`TreeInfo.writable`) is never a base and never kept as the spare: it is retired and
  deleted.
* **Every link name counts.** A tree behind any symlink of DEST (`--link-name a` and `b`) is
  never recycled, retired or deleted; only the tree a link leaves is.
* Nothing under `.revs` is written without the lock, so whoever takes it may treat every
  `.build-` directory and temp link as debris of a crashed run and remove it (`recover`). A
  complete tree that is not published (a crash between rename and swap) becomes the spare.
* Meta files are keyed by tree key, not by directory name, so retiring a tree to the spare
  renames one directory and nothing else; a meta file with no tree of its key is removed.
* A destination that is not empty and has no marker is not ours: we refuse to touch it. A
  sidecar finding a destination of an older version (marker, lock and meta in `DEST/.revs`)
  adopts it: the old records, which the pod could write, are deleted unread, so its trees are
  untrusted and replaced by the next materialise.
* With a `grace` (the sidecar's `spare_grace_seconds`), no tree is modified or deleted within
  `grace` seconds of leaving `<link>`: a tree to delete is renamed to `.retired-<r>` (rename
  sets its ctime) and removed by a later `recover`/`purge_retired` once its ctime is older than
  `grace`; the materialiser does not recycle a younger spare. A reader that opened the tree
  (a directory fd, `os.fwalk`) before a switch keeps seeing all of its revision for `grace`.

Trees are named by a *key*: the revision's md5 for the DVC 3 layout, `<md5>-legacy` for the
legacy one. The key carries the layout because one `.dir` md5 can name two different trees:
legacy names a CRLF text file by the md5 of its LF form, so a legacy manifest and a DVC 3
manifest of the LF-converted files are byte-identical. A tree of a part of the revision (some
of its folders, `engine.part`) adds `-p<16 hex>` (`Part.suffix`), so a part and the whole
never share a tree; its record lists the folders (`TreeInfo.paths`). (`<key>` in the layout
above.) The rule is written once: `tree_key` makes a key, `tree_layout` and `tree_md5` read
the layout and the md5 back from one.

Opening and claiming the destination (its descriptors, the marker, the lock file, the errors)
is the base class's, `destination.Destination`; here are the trees, their records and the
publish contract above.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.destination import LINK_NAME, Destination
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import UnsafeFileError, UsageError

#: Records are small; anything bigger is damaged or planted and read as absent.
META_LIMIT: Final = 64 * 1024
#: The key of a legacy-layout tree is its md5 with this suffix (see the module doc).
_LEGACY_SUFFIX: Final = "-legacy"
_KEY: Final = re.compile(rf"([0-9a-f]{{32}})({_LEGACY_SUFFIX})?(-p[0-9a-f]{{16}})?")
_TMP_LINK: Final = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*\.tmp-[0-9a-f]+")
#: Names of the records in the state directory (also in `.revs` in the historical layout).
_RECORDS: Final = frozenset({".datapin", ".lock", ".meta"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeInfo:
    """What the published (or spare) tree of one revision is made of."""

    revision: str  # `<md5>.dir` or `<md5>`
    layout: str  # the cache layout its objects came from
    files: int
    bytes: int
    # Link mode -> files linked, summed over every build this tree was recycled through
    # (so entries since removed still count): informational, never used for decisions.
    modes: dict[str, int] = field(default_factory=dict)
    read_only: bool = False  # some files are hardlinks to the cache: mount it readOnly
    #: A pod could write the tree (a writable mount): never a base, never the spare.
    writable: bool = False
    #: Inode of the tree's directory: a tree at another inode (renamed, forged) is not this one.
    ino: int = 0
    #: The folders of the revision the tree holds (`engine.part`); empty: all of it.
    paths: list[str] = field(default_factory=list)

    @property
    def part(self) -> Part:
        return Part.from_list(self.paths or None, what=f"record of {self.revision}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | builtins.bytes) -> TreeInfo:
        raw = json.loads(text)
        return cls(
            revision=str(raw["revision"]),
            layout=str(raw["layout"]),
            files=int(raw["files"]),
            bytes=int(raw["bytes"]),
            modes={str(k): int(v) for k, v in raw.get("modes", {}).items()},
            read_only=bool(raw.get("read_only", False)),
            writable=bool(raw.get("writable", False)),
            ino=int(raw.get("ino", 0)),
            paths=_record_paths(raw.get("paths")),
        )


def _record_paths(value: object) -> list[str]:
    """A record's `paths`, checked like any part: a record that fails is damaged (ValueError,
    so `Workspace.info` reads it as absent and the tree is rebuilt, never trusted)."""
    try:
        part = Part.from_list(value, what="a record's paths")
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    if list(part.paths) != value and value is not None:
        raise ValueError("a record's paths are not in their normal form")
    return part.to_list()


class Workspace(Destination):
    """One destination directory. Use `with ws.locked():` around every change.

    `state` is the directory of datapin's records (see the module doc); None means
    `DEST/.revs`, the CLI's layout.
    """

    # -- locking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[Workspace]:
        """Claim the destination (creating it if new), lock it, and clear crash debris."""
        fds: list[int] = []
        try:
            if self.separate:
                self._os(lambda: self.state.mkdir(parents=True, exist_ok=True))
                self._state_fd = self._os(lambda: safefs.open_dir(self.state))
                fds.append(self._state_fd)
                self._lock(fds)
                self._dest_fd = self._open_dest()
                fds.append(self._dest_fd)
                self._claim_separate()
                self._revs_fd = self._os(lambda: self._own_dir(".revs", self._dest_fd))
                fds.append(self._revs_fd)
            else:
                self._dest_fd = self._open_dest()
                fds.append(self._dest_fd)
                self._claim_inline()
                self._revs_fd = self._os(lambda: safefs.open_dir(".revs", dir_fd=self._dest_fd))
                fds.append(self._revs_fd)
                self._state_fd = self._revs_fd
                self._lock(fds)
            self._meta_fd = self._os(lambda: self._own_dir(".meta", self._state_fd))
            fds.append(self._meta_fd)
            self.recovered = self._os(self.recover)
            yield self
        finally:
            self._dest_fd = self._revs_fd = self._state_fd = self._meta_fd = -1
            for fd in reversed(fds):
                os.close(fd)

    # -- reading state ------------------------------------------------------------------------

    @property
    def is_locked(self) -> bool:
        return self._revs_fd >= 0

    def published(self) -> str | None:
        """The tree key `<link>` points at, or None."""
        return self._link_key(self.link_name)

    def _link_key(self, name: str) -> str | None:
        try:
            if self.is_locked:
                target = os.readlink(name, dir_fd=self._dest_fd)
            else:
                target = os.readlink(self.dest / name)
        except OSError:
            return None
        key = target.removeprefix(".revs/")
        return key if _KEY.fullmatch(key) and key != target else None

    def links(self) -> dict[str, str]:
        """Every link of DEST that names a tree: link name -> tree key.

        Without the lock (the GC's scan) DEST is opened without following a symlink; a
        destination that is gone or not a directory has none.
        """
        if self.is_locked:
            return self._links(self._dest_fd)
        try:
            fd = safefs.open_dir(self.dest)
        except OSError:
            return {}
        try:
            return self._links(fd)
        finally:
            os.close(fd)

    def _links(self, dest_fd: int) -> dict[str, str]:
        found: dict[str, str] = {}
        with os.scandir(dest_fd) as it:
            for entry in it:
                if not entry.is_symlink() or not LINK_NAME.fullmatch(entry.name):
                    continue
                try:
                    target = os.readlink(entry.name, dir_fd=dest_fd)
                except OSError:
                    continue
                key = target.removeprefix(".revs/")
                if _KEY.fullmatch(key) and key != target:
                    found[entry.name] = key
        return found

    def live_keys(self, *, besides: str | None = None) -> set[str]:
        """Keys of the trees behind any link (but `besides`), which must not be touched."""
        return {key for name, key in self.links().items() if name != besides}

    def tree(self, key: str) -> Path:
        return self.revs / key

    def info(self, key: str) -> TreeInfo | None:
        """The record of `key`'s tree; None if missing, damaged, not a small regular file, or
        naming another part than the key does."""
        m = _KEY.fullmatch(key)
        if m is None:
            return None
        try:
            if self.is_locked:
                raw = safefs.read_regular(f"{key}.json", limit=META_LIMIT, dir_fd=self._meta_fd)
            else:
                with self._unlocked_dir(".meta") as meta:
                    raw = safefs.read_regular(f"{key}.json", limit=META_LIMIT, dir_fd=meta)
            info = TreeInfo.from_json(raw)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return info if info.part.suffix == (m.group(3) or "") else None

    @contextlib.contextmanager
    def _unlocked_dir(self, name: str) -> Iterator[int]:
        """A state subdirectory opened without following a symlink under DEST (no lock)."""
        if self.separate:
            fd = safefs.open_dir(self.state / name)
        else:
            dest = safefs.open_dir(self.dest)
            try:
                fd = safefs.open_dir_beneath(dest, f".revs/{name}")
            finally:
                os.close(dest)
        try:
            yield fd
        finally:
            os.close(fd)

    def trusted(self, key: str, name: str | None = None) -> TreeInfo | None:
        """`key`'s record if the directory `name` (default `key`) in `.revs` is its tree."""
        info = self.info(key)
        if info is None or info.ino == 0:
            return None
        try:
            st = os.lstat(name or key, dir_fd=self._revs_fd)
        except OSError:
            return None
        return info if stat.S_ISDIR(st.st_mode) and st.st_ino == info.ino else None

    def spare(self) -> tuple[str, Path] | None:
        """The spare's key and path, if there is one (a real directory)."""
        try:
            if self.is_locked:
                names = os.listdir(self._revs_fd)
                revs = self._revs_fd
                for name in names:
                    if name.startswith(".spare-") and safefs.is_dir(name, dir_fd=revs):
                        return name.removeprefix(".spare-"), self.revs / name
                return None
            dest = safefs.open_dir(self.dest)
            try:
                revs = safefs.open_dir(".revs", dir_fd=dest)
            finally:
                os.close(dest)
            try:
                for name in os.listdir(revs):
                    if name.startswith(".spare-") and safefs.is_dir(name, dir_fd=revs):
                        return name.removeprefix(".spare-"), self.revs / name
            finally:
                os.close(revs)
        except OSError:
            return None
        return None

    @property
    def dest_fd(self) -> int:
        return self._dest_fd

    @property
    def revs_fd(self) -> int:
        """`.revs`, opened without following a symlink (lock held)."""
        return self._revs_fd

    def open_tree(self, name: str) -> int:
        """A directory fd of `.revs/<name>` (a build, the spare, a tree); never a symlink."""
        return self._os(lambda: safefs.open_dir(name, dir_fd=self._revs_fd))

    # -- changing state (lock held) -----------------------------------------------------------

    def new_build(self, key: str) -> str:
        """Make an empty build directory for `key`; its name in `.revs`."""
        name = f".build-{key}-{secrets.token_hex(4)}"
        self._os(lambda: os.mkdir(name, 0o755, dir_fd=self._revs_fd))
        return name

    def take_spare(self, key: str) -> str:
        """Rename the spare to a build directory for `key` (it is edited in place)."""
        spare = self.spare()
        assert spare is not None  # noqa: S101 - callers check
        name = f".build-{key}-{secrets.token_hex(4)}"
        self._os(lambda: self._rename(f".spare-{spare[0]}", name))
        self._unlink_meta(spare[0])
        return name

    def _rename(self, src: str, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=self._revs_fd, dst_dir_fd=self._revs_fd)

    def commit(self, build: str, key: str, info: TreeInfo) -> None:
        """Record `info` and move the finished `build` to `.revs/<key>`."""

        def write() -> None:
            # A spare of the same revision that could not be reused (say a hardlink tree when
            # this run wants reflinks) would share the record keyed by the same name: drop it.
            with contextlib.suppress(FileNotFoundError):
                os.lstat(f".spare-{key}", dir_fd=self._revs_fd)
                self._remove_tree(f".spare-{key}", None)
            ino = os.lstat(build, dir_fd=self._revs_fd).st_ino
            self._write_meta(key, dataclasses.replace(info, ino=ino))
            for _ in range(3):
                try:
                    self._rename(build, key)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise
                # Something a pod put at the name (never a live tree of ours: the caller
                # checked), moved away and deleted.
                self._remove_tree(key, None)
            raise UnsafeFileError(str(self.tree(key)), "keeps being replaced")

        self._os(write)

    def _write_meta(self, key: str, info: TreeInfo) -> None:
        tmp = f".{key}.json.tmp-{secrets.token_hex(4)}"
        fd = safefs.open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=self._meta_fd)
        try:
            os.write(fd, info.to_json().encode())
        finally:
            os.close(fd)
        os.rename(tmp, f"{key}.json", src_dir_fd=self._meta_fd, dst_dir_fd=self._meta_fd)

    def _unlink_meta(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            safefs.remove_tree(f"{key}.json", dir_fd=self._meta_fd)

    def publish(self, key: str, *, keep_spare: bool = True) -> str | None:
        """Swap `<link>` to `.revs/<key>` atomically; retire the old tree. Returns the old key."""
        old = self.published()
        tmp = f".{self.link_name}.tmp-{secrets.token_hex(4)}"

        # No fsync: trees are not made durable either (that would cost a log flush per
        # materialise), and a rebooted node starts new pods with new workspaces anyway.
        def swap() -> None:
            os.symlink(f".revs/{key}", tmp, dir_fd=self._dest_fd)
            for _ in range(3):
                try:
                    os.rename(
                        tmp, self.link_name, src_dir_fd=self._dest_fd, dst_dir_fd=self._dest_fd
                    )
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if not self.separate:
                    raise self._not_ours(f"{self.link_name} exists and is not datapin's symlink")
                # A pod replaced its link with a directory: move it out of the way, delete it.
                trash = f".build-trash-{secrets.token_hex(4)}"
                os.rename(self.link_name, trash, src_dir_fd=self._dest_fd, dst_dir_fd=self._revs_fd)
                safefs.remove_tree(trash, dir_fd=self._revs_fd)
            raise UnsafeFileError(str(self.link), "keeps being replaced")

        self._os(swap)
        if old and old != key and old not in self.live_keys():
            self._os(lambda: self._retire(old, keep_spare=keep_spare))
        return old

    def _retire(self, key: str, *, keep_spare: bool) -> None:
        try:
            st = os.lstat(key, dir_fd=self._revs_fd)
        except FileNotFoundError:
            return
        info = self.trusted(key) if keep_spare and stat.S_ISDIR(st.st_mode) else None
        live = self.live_keys()
        for name in os.listdir(self._revs_fd):
            if name.startswith(".spare-"):
                spare_key = name.removeprefix(".spare-")
                # A record shared with a tree still in use stays.
                self._remove_tree(name, None if spare_key in live | {key} else spare_key)
        if info is not None and not info.writable:
            self._rename(key, f".spare-{key}")
        else:
            self._remove_tree(key, key)

    def discard(self, build: str) -> None:
        """Remove a failed build; the published tree is untouched."""
        self._os(lambda: safefs.remove_tree(build, dir_fd=self._revs_fd))

    def _remove_tree(self, name: str, key: str | None) -> None:
        """Delete `.revs/<name>` so that a crash at any point cannot leave a trusted partial tree.

        The record of `key` goes first (a tree without one is never reused), then the tree is
        renamed to a `.build-` name (debris by definition) before the slow removal.
        """
        if key is not None:
            self._unlink_meta(key)
        if self.grace > 0:
            with contextlib.suppress(FileNotFoundError):
                self._rename(name, f".retired-{secrets.token_hex(4)}")
            return
        trash = f".build-trash-{secrets.token_hex(4)}"
        try:
            self._rename(name, trash)
        except FileNotFoundError:
            return
        safefs.remove_tree(trash, dir_fd=self._revs_fd)

    def purge_retired(self, *, now: float | None = None) -> list[str]:
        """Delete `.retired-` trees older than `grace` (lock held). Returns their names."""
        now = time.time() if now is None else now
        removed = []
        for name in sorted(os.listdir(self._revs_fd)):
            if not name.startswith(".retired-"):
                continue
            try:
                retired = os.lstat(name, dir_fd=self._revs_fd).st_ctime
            except FileNotFoundError:
                continue
            if now - retired >= self.grace:
                safefs.remove_tree(name, dir_fd=self._revs_fd)
                removed.append(name)
        return removed

    def recover(self) -> list[str]:
        """Remove what crashed runs left; keep every linked tree and one spare.

        Returns what it removed or converted, for the log.
        """
        revs = self._revs_fd
        actions: list[str] = [f"removed {n}" for n in self.purge_retired()]
        live = self.live_keys()
        spare_key: str | None = None
        for name in sorted(os.listdir(revs)):
            if name.startswith((".build-", ".datapin.tmp-")):
                safefs.remove_tree(name, dir_fd=revs)
                actions.append(f"removed {name}")
            elif name.startswith(".retired-"):
                continue  # young: purge_retired keeps it for its grace period
            elif self.separate and (name in _RECORDS or name.startswith(".datapin")):
                # An older version's records, in the pod's view: never read, deleted.
                safefs.remove_tree(name, dir_fd=revs)
                actions.append(f"removed {name} (records of an older version)")
            elif name.startswith(".spare-"):
                key = name.removeprefix(".spare-")
                info = self.trusted(key, name) if _KEY.fullmatch(key) else None
                if spare_key is not None or key in live or info is None or info.writable:
                    safefs.remove_tree(name, dir_fd=revs)
                    actions.append(f"removed {name}")
                else:
                    spare_key = key
            elif _KEY.fullmatch(name) and name not in live:
                info = self.trusted(name)
                if spare_key is None and info is not None and not info.writable:
                    self._rename(name, f".spare-{name}")
                    spare_key = name
                    actions.append(f"kept unpublished {name} as spare")
                else:
                    safefs.remove_tree(name, dir_fd=revs)
                    actions.append(f"removed unpublished {name}")
        keep = live | ({spare_key} if spare_key else set())
        for meta in os.listdir(self._meta_fd):
            if meta.removesuffix(".json") not in keep or not meta.endswith(".json"):
                safefs.remove_tree(meta, dir_fd=self._meta_fd)
        if self.separate:
            for name in os.listdir(self._state_fd):
                if name.startswith(".datapin.tmp-"):
                    safefs.remove_tree(name, dir_fd=self._state_fd)
        for name in os.listdir(self._dest_fd):
            if _TMP_LINK.fullmatch(name):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    if not safefs.is_dir(name, dir_fd=self._dest_fd):
                        os.unlink(name, dir_fd=self._dest_fd)
                        actions.append(f"removed {name}")
        return actions


def tree_key(md5: str, layout: str, part: Part = Part.WHOLE) -> str:
    """The directory name of a revision's (or a part's) tree under `.revs` (module doc)."""
    return (md5 if layout == "dvc3" else f"{md5}{_LEGACY_SUFFIX}") + part.suffix


def is_tree_key(name: str) -> bool:
    """Whether `name` is a tree key (what `tree_key` makes), so a plain, safe file name."""
    return _KEY.fullmatch(name) is not None


def tree_layout(key: str) -> Layout:
    """The layout of the tree named `key`: the inverse of `tree_key`."""
    m = _KEY.fullmatch(key)
    return Layout.LEGACY if m is not None and m.group(2) else Layout.DVC3


def tree_md5(key: str) -> str:
    """The md5 of the revision of the tree named `key`: the other half of the inverse."""
    return key[:32]


def is_part_key(key: str) -> bool:
    """Whether the tree named `key` holds a part of its revision (its record lists which)."""
    m = _KEY.fullmatch(key)
    return m is not None and m.group(3) is not None


def remove_tree(path: Path) -> None:
    """Delete `path` and everything under it, never following a symlink (`safefs`)."""
    safefs.remove_tree(path)
