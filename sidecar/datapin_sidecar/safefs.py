"""Filesystem access for paths that someone else controls.

A pod with a writable tree, a tenant's bucket (through the names in a manifest) and a manifest
author all decide names that datapin later opens, links, reads or deletes, on a node volume
shared by every pod of the node. Any of them may have put a symlink, a FIFO, a device, a huge
file or a 100,000-deep directory chain there. The rules, applied by every module that touches
such a path:

* **Never follow a symlink.** Directories are opened with `O_NOFOLLOW | O_DIRECTORY` one
  component at a time (`open_dir`, `open_dir_beneath`), and work inside them is done relative
  to the directory's descriptor (`dir_fd=`), so swapping a directory for a symlink after we
  looked cannot redirect us: we keep operating on the inode we opened.
* **Open only what is ours to open.** Files are opened with `O_NOFOLLOW | O_NONBLOCK` and
  `fstat`-checked to be regular files before a byte is read (`open_regular`): opening a FIFO
  that way returns at once instead of blocking forever, and a device is refused.
* **Bounded reads.** Our own metadata is small; `read_regular` refuses anything above the
  limit the caller states, whatever the file claims or is (a link to `/dev/zero` is refused
  before any read, a growing file after `limit + 1` bytes).
* **Deletion that cannot escape.** `remove_tree` walks by descriptors, unlinks symlinks
  rather than following them, restores permissions a tenant removed (through the opened
  directory, never by path), and holds at most `MAX_OPEN_DEPTH` directories open: a deeper
  chain is moved up to the top of the tree being removed and finished from there, so neither
  the recursion limit nor the descriptor limit can stop it.

The violations are `UnsafeFileError`, an `OSError`, so existing `except OSError` paths treat a
planted object like a damaged one; callers that must say more catch it by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from datapin_sidecar.errors import UnsafeFileError

#: Flags that open a directory without following a symlink in its last component.
O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Flags that open a file without following a symlink and without blocking on a FIFO.
O_SAFE: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
#: `O_PATH` (Linux): a handle on an inode without read permission, for `fix_mode`.
_O_PATH: Final = getattr(os, "O_PATH", 0)
#: Directories `remove_tree` keeps open at once (see the module doc).
MAX_OPEN_DEPTH: Final = 64

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def open_dir(path: PathLike, *, dir_fd: int | None = None) -> int:
    """Open directory `path` (relative to `dir_fd` if given) without following a symlink at
    its last component. Raises `UnsafeFileError` if that is a symlink or not a directory."""
    try:
        return os.open(path, O_DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(_name(path), "is not a directory (a symlink or a file)") from None
        raise


def open_dir_beneath(root_fd: int, relpath: str | bytes, *, create: bool = False) -> int:
    """Open `root_fd/relpath`, a directory, following no symlink on the way.

    `relpath` must be relative and free of `..`; every component is opened with `O_NOFOLLOW`
    relative to the one before, so the result is beneath `root_fd` whatever a tenant did to
    the names in between. With `create`, missing components are made (mode 0755).
    """
    parts = _components(relpath)
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            nxt = open_dir(part, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(
    path: PathLike, flags: int = os.O_RDONLY, *, dir_fd: int | None = None, mode: int = 0o644
) -> int:
    """Open `path` only if it is a regular file, without following a symlink or blocking.

    `flags` may add `O_RDWR`, `O_CREAT`, `O_EXCL`... Raises `UnsafeFileError` for a symlink, a
    FIFO, a socket, a device or a directory.
    """
    try:
        fd = os.open(path, flags | O_SAFE, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise UnsafeFileError(_name(path), "is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(_name(path), "is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: PathLike, *, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them (see `open_regular`).

    Raises `UnsafeFileError` if the file is not regular or holds more than `limit` bytes.
    """
    fd = open_regular(path, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_size > limit:
            raise UnsafeFileError(_name(path), f"is larger than {limit} bytes")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise UnsafeFileError(_name(path), f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_dir(path: PathLike, *, dir_fd: int | None = None) -> bool:
    """`path` is a directory itself (not a symlink to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path, dir_fd=dir_fd).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def fix_mode(name: str | bytes, mode: int, *, dir_fd: int) -> None:
    """chmod the directory `name` in `dir_fd` to `mode` without following a symlink there.

    Goes through an `O_PATH` handle and `/proc/self/fd`, which names the inode we opened, so
    a name swapped for a symlink in between changes nothing outside.
    """
    handle = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{handle}", mode)
    finally:
        os.close(handle)


def remove_tree(path: PathLike, *, dir_fd: int | None = None) -> None:
    """Delete `path` and everything under it without ever following a symlink.

    A missing path is fine; a symlink or file at `path` is unlinked (its target is left
    alone). Directories whose modes a consumer removed are opened up first, through their
    descriptors. See the module doc for how deep chains are handled.
    """
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(path, dir_fd)
        return
    parent, name = _split(path)
    pfd = open_dir(parent, dir_fd=dir_fd) if parent else _dup_or_cwd(dir_fd)
    try:
        try:
            top = _open_for_removal(name, pfd)
        except (FileNotFoundError, UnsafeFileError):
            _unlink(name, pfd)  # swapped for a symlink or file since the lstat
            return
        try:
            _empty(top)
        finally:
            os.close(top)
        _rmdir(name, pfd)
    finally:
        os.close(pfd)


@dataclass(slots=True)
class _Frame:
    """A directory being emptied: its descriptor, its name in the frame below, and the
    subdirectories still to visit."""

    fd: int
    name: str
    pending: list[str]


def _empty(top: int) -> None:
    """Remove everything inside the open directory `top` (iterative, bounded descriptors)."""
    stack = [_Frame(os.dup(top), "", [])]
    try:
        stack[0].pending = _clear_files(top)
        while stack:
            frame = stack[-1]
            if not frame.pending:
                stack.pop()
                os.close(frame.fd)
                if stack:
                    _rmdir(frame.name, stack[-1].fd)
                continue
            name = frame.pending.pop()
            if len(stack) >= MAX_OPEN_DEPTH:
                # Too deep to keep descending with open descriptors: move this subtree to the
                # top and empty it from there later (rename keeps it ours and beneath `top`).
                hoisted = f".rm-{secrets.token_hex(6)}"
                os.rename(name, hoisted, src_dir_fd=frame.fd, dst_dir_fd=top)
                stack[0].pending.append(hoisted)
                continue
            try:
                sub = _open_for_removal(name, frame.fd)
            except FileNotFoundError:
                continue
            except UnsafeFileError:
                _unlink(name, frame.fd)  # swapped for a symlink or file since we listed it
                continue
            stack.append(_Frame(sub, name, []))
            stack[-1].pending = _clear_files(sub)
    finally:
        for frame in stack:
            os.close(frame.fd)


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in `fd`; return the names of its subdirectories."""
    subdirs: list[str] = []
    for entry in _scan(fd):
        try:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
                continue
        except FileNotFoundError:
            continue
        _unlink(entry.name, fd)
    return subdirs


def _scan(fd: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        yield from it


def _open_for_removal(name: str | bytes, dir_fd: int) -> int:
    try:
        return open_dir(name, dir_fd=dir_fd)
    except PermissionError:
        fix_mode(name, 0o700, dir_fd=dir_fd)
        return open_dir(name, dir_fd=dir_fd)


def _unlink(name: PathLike, dir_fd: int | None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        remove_tree(name, dir_fd=dir_fd)  # swapped for a directory since we looked
    except PermissionError:
        _open_parent_up(name, dir_fd)
        os.unlink(name, dir_fd=dir_fd)


def _rmdir(name: str | bytes, dir_fd: int) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _open_parent_up(name, dir_fd)
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        # Something was added behind our back (a tenant racing us): empty it once more.
        remove_tree(name, dir_fd=dir_fd)


def _open_parent_up(name: PathLike, dir_fd: int | None) -> None:
    """Give the directory holding `name` write and search permission for us."""
    if dir_fd is None:
        parent = os.path.dirname(os.fsdecode(name)) or "."
        fd = open_dir(parent)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    else:
        os.fchmod(dir_fd, 0o700)


def _dup_or_cwd(dir_fd: int | None) -> int:
    return os.dup(dir_fd) if dir_fd is not None else open_dir(".")


def _split(path: PathLike) -> tuple[str, str]:
    text = os.fsdecode(path).rstrip("/") or "/"
    parent, name = os.path.split(text)
    return parent, name


def _components(relpath: str | bytes) -> list[str]:
    text = os.fsdecode(relpath)
    if text.startswith("/"):
        raise UnsafeFileError(text, "must be a relative path")
    parts = [p for p in text.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise UnsafeFileError(text, "must not contain '..'")
    return parts


def _name(path: PathLike) -> str:
    return os.fsdecode(path) if not isinstance(path, int) else f"fd {path}"
