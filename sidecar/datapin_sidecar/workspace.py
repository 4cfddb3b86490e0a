"""A destination directory and its publish contract (git-sync's, written down).

Layout of a destination `DEST` managed by datapin::

    DEST/<link>                   -> .revs/<md5>   relative symlink: the published tree
    DEST/.revs/.datapin           marker: this directory is managed by datapin (format version)
    DEST/.revs/.lock              flock: one materialiser per destination at a time
    DEST/.revs/<md5>/             a complete tree of revision <md5> (normally only the published)
    DEST/.revs/.spare-<md5>/      the previously published tree, kept for recycling
    DEST/.revs/.build-<md5>-<r>/  a tree being built (debris if no one holds the lock)
    DEST/.revs/.retired-<r>/      a tree no longer needed, deleted once `grace` has passed
    DEST/.revs/.meta/<md5>.json   what is known about the tree(s) of <md5>: link modes, files
    DEST/.<link>.tmp-<r>          a symlink about to replace <link> (debris if left)

Rules:

* A tree is built under a `.build-` name and renamed to `.revs/<md5>` only when complete, and
  `<link>` is only ever replaced by `rename(2)` of a fully formed temp symlink. A reader that
  resolves `<link>` therefore sees all of one revision or all of another, never a mix.
* After a swap the previous tree leaves `.revs/<md5>` (the old revision is gone, as with
  git-sync) but is kept as `.spare-<md5>`. The next switch renames the spare to its `.build-`
  name and edits it in place, touching only the entries that differ: a switch costs O(changed)
  filesystem operations instead of O(files) links plus O(files) unlinks. Readers must
  re-resolve `<link>` after a switch, exactly as with git-sync, which deletes the old tree.
* Nothing under `.revs` is written without the lock, so whoever takes it may treat every
  `.build-` directory and temp link as debris of a crashed run and remove it (`recover`). A
  complete tree that is not published (a crash between rename and swap) becomes the spare.
* Meta files are keyed by md5, not by directory name, so retiring a tree to the spare renames
  one directory and nothing else; a meta file with no tree of its md5 is removed.
* A destination that is not empty and has no marker is not ours: we refuse to touch it.
* With a `grace` (the sidecar's `spare_grace_seconds`), no tree is modified or deleted within
  `grace` seconds of leaving `<link>`: a tree to delete is renamed to `.retired-<r>` (rename
  sets its ctime) and removed by a later `recover`/`purge_retired` once its ctime is older than
  `grace`; the materialiser does not recycle a younger spare. A reader that opened the tree
  (a directory fd, `os.fwalk`) before a switch keeps seeing all of its revision for `grace`.

Trees are named by a *key*: the revision's md5 for the DVC 3 layout, `<md5>-legacy` for the
legacy one. The key carries the layout because one `.dir` md5 can name two different trees:
legacy names a CRLF text file by the md5 of its LF form, so a legacy manifest and a DVC 3
manifest of the LF-converted files are byte-identical. (`<md5>` in the layout above is the key.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from .errors import DestinationError, UsageError, os_error

MARKER_TEXT: Final = "datapin workspace 1\n"
_KEY: Final = re.compile(r"[0-9a-f]{32}(?:-legacy)?")
_LINK_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_T = TypeVar("_T")


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TreeInfo:
        raw = json.loads(text)
        return cls(
            revision=str(raw["revision"]),
            layout=str(raw["layout"]),
            files=int(raw["files"]),
            bytes=int(raw["bytes"]),
            modes={str(k): int(v) for k, v in raw.get("modes", {}).items()},
            read_only=bool(raw.get("read_only", False)),
        )


class Workspace:
    """One destination directory. Use `with ws.locked():` around every change."""

    def __init__(
        self, dest: str | os.PathLike[str], *, link_name: str = "current", grace: float = 0.0
    ) -> None:
        if not _LINK_NAME.fullmatch(link_name) or link_name == ".revs":
            raise UsageError(
                f"link name {link_name!r} must be a plain file name (letters, digits, '._-')"
            )
        self.dest = Path(dest).absolute()
        self.link_name = link_name
        self.link = self.dest / link_name
        self.revs = self.dest / ".revs"
        self.meta_dir = self.revs / ".meta"
        self.grace = grace
        self._lock_fd = -1
        #: What `locked()` cleaned up on entry (debris of crashed runs), for the result.
        self.recovered: list[str] = []

    # -- ownership and locking ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[Workspace]:
        """Claim the destination (creating it if new), lock it, and clear crash debris."""
        self._claim()
        fd = self._os(lambda: os.open(self.revs / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            self.recovered = self.recover()
            yield self
        finally:
            self._lock_fd = -1
            os.close(fd)

    def _claim(self) -> None:
        marker = self.revs / ".datapin"
        if marker.is_file():
            self._check_link()
            return
        try:
            entries = sorted(os.listdir(self.dest))
        except FileNotFoundError:
            entries = []
        except NotADirectoryError:
            raise self._not_ours("it is a file, not a directory") from None
        if entries and not self._half_claimed(entries):
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise self._not_ours(f"it holds files datapin did not create ({shown})")
        # The marker goes in last: until it is there, only our own names exist in DEST, and a
        # run killed half-way is recognised by `_half_claimed` and simply claims again.
        self._os(lambda: self.meta_dir.mkdir(parents=True, exist_ok=True))
        tmp = self.revs / f".datapin.tmp-{secrets.token_hex(4)}"
        self._os(lambda: tmp.write_text(MARKER_TEXT))
        os.rename(tmp, marker)

    def _half_claimed(self, entries: list[str]) -> bool:
        """DEST holds nothing but what an interrupted `_claim` creates."""
        if entries != [".revs"]:
            return False
        try:
            inside = os.listdir(self.revs)
        except OSError:
            return False
        return all(
            (n == ".meta" and not os.listdir(self.meta_dir)) or n.startswith(".datapin.tmp-")
            for n in inside
        )

    def _check_link(self) -> None:
        if self.link.is_symlink() or not os.path.lexists(self.link):
            return
        raise self._not_ours(f"{self.link_name} exists and is not datapin's symlink")

    def _not_ours(self, problem: str) -> DestinationError:
        return DestinationError(
            dest=str(self.dest),
            problem=f"not a datapin destination: {problem}",
            fix="choose an empty or new directory for --dest; datapin never writes over "
            "files it does not manage",
        )

    def _os(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except OSError as exc:
            raise os_error(str(self.dest), exc) from exc

    # -- reading state ------------------------------------------------------------------------

    def published(self) -> str | None:
        """The tree key `<link>` points at, or None."""
        try:
            target = os.readlink(self.link)
        except (FileNotFoundError, OSError):
            return None
        name = target.removeprefix(".revs/")
        return name if _KEY.fullmatch(name) and name != target else None

    def tree(self, md5: str) -> Path:
        return self.revs / md5

    def info(self, md5: str) -> TreeInfo | None:
        try:
            return TreeInfo.from_json((self.meta_dir / f"{md5}.json").read_text())
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def spare(self) -> tuple[str, Path] | None:
        for name in os.listdir(self.revs):
            if name.startswith(".spare-"):
                return name.removeprefix(".spare-"), self.revs / name
        return None

    # -- changing state (lock held) -----------------------------------------------------------

    def new_build(self, md5: str) -> Path:
        path = self.revs / f".build-{md5}-{secrets.token_hex(4)}"
        self._os(path.mkdir)
        return path

    def take_spare(self, md5: str) -> Path:
        """Rename the spare to a build directory for `md5` (it is edited in place)."""
        spare = self.spare()
        assert spare is not None  # noqa: S101 - callers check
        path = self.revs / f".build-{md5}-{secrets.token_hex(4)}"
        self._os(lambda: os.rename(spare[1], path))
        with contextlib.suppress(FileNotFoundError):
            (self.meta_dir / f"{spare[0]}.json").unlink()
        return path

    def commit(self, build: Path, md5: str, info: TreeInfo) -> None:
        """Record `info` and move the finished `build` to `.revs/<md5>`."""
        # A spare of the same revision that could not be reused (say a hardlink tree when this
        # run wants reflinks) would share the meta file keyed by the same name: drop it first.
        if (self.revs / f".spare-{md5}").exists():
            self._remove_tree(self.revs / f".spare-{md5}", md5)
        meta = self.meta_dir / f"{md5}.json"
        tmp = self.meta_dir / f".{md5}.json.tmp-{secrets.token_hex(4)}"

        def write() -> None:
            self.meta_dir.mkdir(exist_ok=True)
            tmp.write_text(info.to_json())
            os.rename(tmp, meta)
            os.rename(build, self.tree(md5))

        self._os(write)

    def publish(self, md5: str, *, keep_spare: bool = True) -> str | None:
        """Swap `<link>` to `.revs/<md5>` atomically; retire the old tree. Returns the old md5."""
        old = self.published()
        tmp = self.dest / f".{self.link_name}.tmp-{secrets.token_hex(4)}"

        # No fsync: trees are not made durable either (that would cost a log flush per
        # materialise), and a rebooted node starts new pods with new workspaces anyway.
        def swap() -> None:
            os.symlink(f".revs/{md5}", tmp)
            os.rename(tmp, self.link)

        self._os(swap)
        if old and old != md5 and self.tree(old).is_dir():
            self._retire(old, keep_spare=keep_spare)
        return old

    def _retire(self, md5: str, *, keep_spare: bool) -> None:
        for name in os.listdir(self.revs):
            if name.startswith(".spare-"):
                self._remove_tree(self.revs / name, name.removeprefix(".spare-"))
        if keep_spare:
            os.rename(self.tree(md5), self.revs / f".spare-{md5}")
        else:
            self._remove_tree(self.tree(md5), md5)

    def discard(self, build: Path) -> None:
        """Remove a failed build; the published tree is untouched."""
        remove_tree(build)

    def _remove_tree(self, path: Path, key: str) -> None:
        """Delete a tree so that a crash at any point cannot leave a trusted partial tree.

        The meta goes first (a tree without meta is never reused), then the tree is renamed
        to a `.build-` name (debris by definition) before the slow rmtree.
        """
        with contextlib.suppress(FileNotFoundError):
            (self.meta_dir / f"{key}.json").unlink()
        if self.grace > 0:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, self.revs / f".retired-{secrets.token_hex(4)}")
            return
        trash = self.revs / f".build-trash-{secrets.token_hex(4)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        remove_tree(trash)

    def purge_retired(self, *, now: float | None = None) -> list[str]:
        """Delete `.retired-` trees older than `grace` (lock held). Returns their names."""
        now = time.time() if now is None else now
        removed = []
        for name in sorted(os.listdir(self.revs)):
            if not name.startswith(".retired-"):
                continue
            path = self.revs / name
            try:
                retired = os.lstat(path).st_ctime
            except FileNotFoundError:
                continue
            if now - retired >= self.grace:
                remove_tree(path)
                removed.append(name)
        return removed

    def recover(self) -> list[str]:
        """Remove what crashed runs left; keep the published tree and one spare.

        Returns what it removed or converted, for the log.
        """
        actions: list[str] = [f"removed {n}" for n in self.purge_retired()]
        published = self.published()
        have_spare = False
        for name in sorted(os.listdir(self.revs)):
            path = self.revs / name
            if name.startswith((".build-", ".datapin.tmp-")):
                remove_tree(path)
                actions.append(f"removed {name}")
            elif name.startswith(".retired-"):
                continue  # young: purge_retired keeps it for its grace period
            elif name.startswith(".spare-"):
                if have_spare or self.info(name.removeprefix(".spare-")) is None:
                    remove_tree(path)
                    actions.append(f"removed {name}")
                else:
                    have_spare = True
            elif _KEY.fullmatch(name) and name != published:
                if not have_spare and self.info(name) is not None:
                    os.rename(path, self.revs / f".spare-{name}")
                    have_spare = True
                    actions.append(f"kept unpublished {name} as spare")
                else:
                    remove_tree(path)
                    actions.append(f"removed unpublished {name}")
        live = {published} | {n.removeprefix(".spare-") for n in os.listdir(self.revs)}
        for meta in os.listdir(self.meta_dir) if self.meta_dir.is_dir() else []:
            if meta.removesuffix(".json") not in live:
                (self.meta_dir / meta).unlink()
        for name in os.listdir(self.dest):
            if name.startswith(f".{self.link_name}.tmp-"):
                (self.dest / name).unlink()
                actions.append(f"removed {name}")
        return actions


def tree_key(md5: str, layout: str) -> str:
    """The directory name of a revision's tree under `.revs` (see the module doc)."""
    return md5 if layout == "dvc3" else f"{md5}-legacy"


def remove_tree(path: Path) -> None:
    """rmtree that copes with our read-only files and directories (and a missing path)."""

    def onerror(
        func: object, p: str, exc_info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            # Our directories are 0755 and files 0444; only odd modes (a consumer's chmod, a
            # non-root run) land here. Open the parent up and try once more.
            os.chmod(os.path.dirname(p), 0o755)  # noqa: S103 - ours, being deleted
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o755)  # noqa: S103 - ours, being deleted
                shutil.rmtree(p, onerror=onerror)
            else:
                os.unlink(p)
            return
        raise exc

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)
