"""A destination directory, and whether it is datapin's: claiming it, opening it, its errors.

`Destination` is the base of `workspace.Workspace`, which holds the layout of a destination and
its publish contract (see that module's docstring, the one place it is written down). Here is
what comes before any tree is touched: the paths of DEST and of its state directory, the
directory descriptors every operation inside DEST goes through (opened with `O_NOFOLLOW`:
`safefs`), the lock, and the claim: a destination that is not empty and has no marker is not
ours and is refused; one of an older version (records in `DEST/.revs`) is adopted; the marker
goes in last, so a run killed half-way is recognised and simply claims again.

Every OSError met inside DEST is turned into a `DestinationError` that says what happened
(`dest_error`): space and permissions as such, anything else as something other than datapin
changing the destination while it worked (a pod racing us).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from datapin_sidecar import safefs
from datapin_sidecar.errors import DestinationError, UnsafeFileError, UsageError, os_error

MARKER_TEXT: Final = "datapin workspace 1\n"
#: A link name (`--link-name`): a plain file name.
LINK_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_T = TypeVar("_T")


class Destination:
    """One destination directory: its paths, descriptors and claim (see the module doc).

    `state` is the directory of datapin's records; None means `DEST/.revs`, the CLI's layout.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        link_name: str = "current",
        grace: float = 0.0,
        state: str | os.PathLike[str] | None = None,
    ) -> None:
        if not LINK_NAME.fullmatch(link_name) or link_name == ".revs" or len(link_name) > 200:
            raise UsageError(
                f"link name {link_name!r} must be a plain file name (letters, digits, '._-', "
                "at most 200 bytes)"
            )
        self.dest = Path(dest).absolute()
        self.link_name = link_name
        self.link = self.dest / link_name
        self.revs = self.dest / ".revs"
        self.state = Path(state).absolute() if state is not None else self.revs
        #: The records live outside DEST (the sidecar's layout).
        self.separate = self.state != self.revs
        self.meta_dir = self.state / ".meta"
        self.marker = self.state / ".datapin"
        self.lock_path = self.state / ".lock"
        self.grace = grace
        self._dest_fd = self._revs_fd = self._state_fd = self._meta_fd = -1
        #: What `locked()` cleaned up on entry (debris of crashed runs), for the result.
        self.recovered: list[str] = []

    # -- ownership and locking ----------------------------------------------------------------

    def _lock(self, fds: list[int]) -> None:
        fd = self._os(
            lambda: safefs.open_regular(".lock", os.O_RDWR | os.O_CREAT, dir_fd=self._state_fd)
        )
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _open_dest(self) -> int:
        def opened() -> int:
            try:
                return safefs.open_dir(self.dest)
            except FileNotFoundError:
                self.dest.mkdir(parents=True, exist_ok=True)
                return safefs.open_dir(self.dest)

        try:
            return opened()
        except UnsafeFileError:
            raise self._not_ours("it is not a directory (a file or a symlink)") from None
        except OSError as exc:
            raise os_error(str(self.dest), exc) from exc

    def _claim_separate(self) -> None:
        """Make STATE's marker; adopt a destination of an older version (records in `.revs`).

        The old records were in the pod's view: `recover` deletes them unread (after the
        marker is written, so a crash in between leaves a destination that is still ours),
        and the trees they described, having no record here, are rebuilt.
        """
        if self._is_marker(".datapin", self._state_fd):
            return
        if not self._old_layout():
            entries = sorted(os.listdir(self._dest_fd))
            if entries and not (entries == [".revs"] and self._empty_dir(".revs")):
                shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
                raise self._not_ours(f"it holds files datapin did not create ({shown})")
        self._write_marker()

    def _empty_dir(self, name: str) -> bool:
        try:
            fd = safefs.open_dir(name, dir_fd=self._dest_fd)
        except OSError:
            return False
        try:
            return not os.listdir(fd)
        finally:
            os.close(fd)

    def _old_layout(self) -> bool:
        try:
            os.lstat(".revs/.datapin", dir_fd=self._dest_fd)
        except OSError:
            return False
        return safefs.is_dir(".revs", dir_fd=self._dest_fd)

    def _claim_inline(self) -> None:
        """The CLI's layout: the marker is `DEST/.revs/.datapin`."""
        try:
            revs = safefs.open_dir(".revs", dir_fd=self._dest_fd)
        except FileNotFoundError:
            revs = -1
        except UnsafeFileError:
            raise self._not_ours(".revs is not a directory") from None
        try:
            if revs >= 0 and self._is_marker(".datapin", revs):
                self._check_link()
                return
            entries = sorted(os.listdir(self._dest_fd))
            if entries and not self._half_claimed(entries, revs):
                shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
                raise self._not_ours(f"it holds files datapin did not create ({shown})")
        finally:
            if revs >= 0:
                os.close(revs)
        # The marker goes in last: until it is there, only our own names exist in DEST, and a
        # run killed half-way is recognised by `_half_claimed` and simply claims again.
        self._os(self._make_dirs_inline)
        state = self._os(lambda: safefs.open_dir(".revs", dir_fd=self._dest_fd))
        old, self._state_fd = self._state_fd, state
        try:
            self._write_marker()
        finally:
            self._state_fd = old
            os.close(state)

    def _make_dirs_inline(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(".revs", 0o755, dir_fd=self._dest_fd)
        revs = safefs.open_dir(".revs", dir_fd=self._dest_fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(".meta", 0o755, dir_fd=revs)
        finally:
            os.close(revs)

    def _write_marker(self) -> None:
        def write() -> None:
            tmp = f".datapin.tmp-{secrets.token_hex(4)}"
            fd = safefs.open_regular(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=self._state_fd
            )
            try:
                os.write(fd, MARKER_TEXT.encode())
            finally:
                os.close(fd)
            os.rename(tmp, ".datapin", src_dir_fd=self._state_fd, dst_dir_fd=self._state_fd)

        self._os(write)

    @staticmethod
    def _is_marker(name: str, dir_fd: int) -> bool:
        try:
            safefs.read_regular(name, limit=1024, dir_fd=dir_fd)
        except OSError:
            return False
        return True

    def _half_claimed(self, entries: list[str], revs: int) -> bool:
        """DEST holds nothing but what an interrupted `_claim_inline` creates."""
        if entries != [".revs"] or revs < 0:
            return False
        for name in os.listdir(revs):
            if name.startswith(".datapin.tmp-"):
                continue
            if name != ".meta" or not safefs.is_dir(name, dir_fd=revs):
                return False
            meta = safefs.open_dir(name, dir_fd=revs)
            try:
                if os.listdir(meta):
                    return False
            finally:
                os.close(meta)
        return True

    def _check_link(self) -> None:
        try:
            st = os.lstat(self.link_name, dir_fd=self._dest_fd)
        except FileNotFoundError:
            return
        if not stat.S_ISLNK(st.st_mode):
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
            raise self.dest_error(exc) from exc

    def dest_error(self, exc: OSError) -> DestinationError | OSError:
        """The `DestinationError` for an OSError met inside the destination.

        Space and permissions say so (`os_error`); anything else there means something other
        than datapin changed a name of ours while we worked (a pod racing us), said plainly
        instead of a traceback.
        """
        err = os_error(str(self.dest), exc)
        if isinstance(err, DestinationError):
            return err
        return DestinationError(
            dest=str(self.dest),
            problem=f"{exc.strerror or exc} at {os.fsdecode(exc.filename or '?')} (something "
            "other than datapin changed the destination while it worked)",
            fix="let datapin manage this directory alone (a pod may write its own files "
            "only); the next switch rebuilds the tree",
        )

    @staticmethod
    def _own_dir(name: str, parent: int) -> int:
        """Open directory `name` of ours in `parent`, replacing whatever else is there."""
        for _ in range(3):
            try:
                return safefs.open_dir(name, dir_fd=parent)
            except FileNotFoundError:
                pass
            except UnsafeFileError:
                safefs.remove_tree(name, dir_fd=parent)  # a symlink is unlinked, not followed
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
        raise UnsafeFileError(name, "keeps being replaced")
