"""Mounts for the node plugin: mount(2) and umount2(2) through ctypes, and the mount table.

Why syscalls and not `mount(8)`: a publish is a handful of mounts, and forking a `mount`
binary per call would cost more than the whole O(1) warm publish (and tie the image to
util-linux). libc is loaded with `use_errno`, so every failure becomes a `MountError` naming
the call, the paths, the errno and a fix, never an `OSError` with a bare number.

What the plugin needs, and nothing else:

* `bind` (optionally recursive), `bind_read_only`, and `remount_read_only` for a mount made
  some other way.
* **Read-only before it is attached.** A mount made below a shared mount propagates to its
  peers at once, as a copy of the mount *as it is then*; a later `MS_REMOUNT|MS_RDONLY` changes
  only the one mount it names (flags never propagate). So bind-then-remount under the plugin's
  shared view, or onto kubelet's Bidirectional target, leaves writable copies where the pod
  and the host look (the agent's own namespace alone sees read-only). `bind_read_only`
  therefore clones the source detached (`open_tree(OPEN_TREE_CLONE)`), makes the clone
  read-only, nosuid, nodev (`mount_setattr`, its top mount only: a writable overlay below
  stays writable) and only then attaches it (`move_mount`), so every copy is read-only. On a
  kernel without that API (before 5.12) it falls back to bind-then-remount.
* `set_propagation` (`shared`, `private`, `slave`), optionally recursive.
* `overlay`: lowerdir/upperdir/workdir. The option string is comma-separated and `lowerdir`
  colon-separated, so a path holding `,` `:` `\\` or a newline cannot be said safely: it is
  refused with the path and the fix (choose another node directory), never escaped.
* `unmount` (always `UMOUNT_NOFOLLOW`: a symlink planted at a mount point is not followed;
  `detach` for `MNT_DETACH`), `unmount_under` (everything at or below a path, deepest first).
* `mountinfo()`: `/proc/self/mountinfo` parsed (octal escapes such as `\\040` decoded), and
  `mounts_at`/`mounts_under` to ask what is mounted at or below a path, so the plugin's state
  after a restart comes from the kernel, not from memory.

Remounting read-only keeps the flags a mount already has that an unprivileged remount could not
drop (`noexec`, the atime flags), read with statvfs, so the call works even where the kernel
locks them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from pathlib import Path
from typing import Final

from datapin_sidecar.errors import MountError


class Flag(IntFlag):
    """mount(2) flags (linux/mount.h)."""

    RDONLY = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    REMOUNT = 32
    NOATIME = 1024
    NODIRATIME = 2048
    BIND = 4096
    REC = 16384
    PRIVATE = 1 << 18
    SLAVE = 1 << 19
    SHARED = 1 << 20
    RELATIME = 1 << 21
    STRICTATIME = 1 << 24


class Propagation(StrEnum):
    """A mount's propagation type (mount_namespaces(7))."""

    SHARED = "shared"
    PRIVATE = "private"
    SLAVE = "slave"


_PROPAGATION_FLAG: Final = {
    Propagation.SHARED: Flag.SHARED,
    Propagation.PRIVATE: Flag.PRIVATE,
    Propagation.SLAVE: Flag.SLAVE,
}
#: umount2(2) flags.
MNT_DETACH: Final = 2
UMOUNT_NOFOLLOW: Final = 8
#: statvfs f_flag bits (ST_*) -> the mount flag a read-only remount must keep.
_KEEP: Final = ((8, Flag.NOEXEC), (1024, Flag.NOATIME), (2048, Flag.NODIRATIME))
#: Characters the overlay option string cannot carry in a path.
_OVERLAY_UNSAFE: Final = re.compile(r"[,:\\\n\x00]")
#: mount(2)'s data is one page.
_DATA_LIMIT: Final = 4095
_ESCAPE: Final = re.compile(r"\\([0-7]{3})")
MOUNTINFO: Final = Path("/proc/self/mountinfo")

_PRIVILEGE_FIX: Final = (
    "the datapin agent must run as root in a privileged container (CAP_SYS_ADMIN) with "
    "kubelet's directory mounted with Bidirectional propagation (the chart does)"
)


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mount.argtypes = (
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    )
    lib.mount.restype = ctypes.c_int
    lib.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    lib.umount2.restype = ctypes.c_int
    return lib


_LIBC: Final = _libc()

#: The new mount API's syscalls (numbered alike on every architecture since 5.0).
_SYS_OPEN_TREE: Final = 428
_SYS_MOVE_MOUNT: Final = 429
_SYS_MOUNT_SETATTR: Final = 442
_AT_FDCWD: Final = -100
_OPEN_TREE_CLONE: Final = 1
_AT_EMPTY_PATH: Final = 0x1000
_AT_RECURSIVE: Final = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
#: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
_READ_ONLY_ATTRS: Final = 0x1 | 0x2 | 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _fix(code: int, call: str) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return _PRIVILEGE_FIX
    if code == errno.ENOENT:
        return "a path of the call is missing: the node directory or kubelet's directory moved"
    if code == errno.EBUSY:
        return "something still uses the mount; it is retried (or lazily detached) later"
    if code == errno.EINVAL and call.startswith("mount -t overlay"):
        return (
            "the kernel refused the overlay (lower, upper and work must be directories, upper "
            "and work on one filesystem that supports overlay upper layers, such as XFS with "
            "ftype=1)"
        )
    return "see the kernel log (dmesg) for the cause; the request is retried"


def _mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int,
    data: str | None,
    *,
    call: str,
) -> None:
    rc = _LIBC.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        code = ctypes.get_errno()
        raise MountError(call=call, path=os.fspath(target), code=code, fix=_fix(code, call))


def bind(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, recursive: bool = False
) -> None:
    """Bind `source` onto `target` (with its submounts if `recursive`)."""
    flags = Flag.BIND | (Flag.REC if recursive else 0)
    call = f"mount --{'r' if recursive else ''}bind {os.fspath(source)}"
    _mount(source, target, None, flags, None, call=call)


def remount_read_only(target: str | os.PathLike[str]) -> None:
    """Make the mount at `target` read-only, nosuid, nodev (that mount only, not submounts)."""
    try:
        current = os.statvfs(target).f_flag
    except OSError as exc:
        raise MountError(
            call="statvfs before a read-only remount",
            path=os.fspath(target),
            code=exc.errno or errno.EIO,
            fix=_fix(exc.errno or errno.EIO, "statvfs"),
        ) from exc
    flags = Flag.REMOUNT | Flag.BIND | Flag.RDONLY | Flag.NOSUID | Flag.NODEV
    for st_bit, keep in _KEEP:
        if current & st_bit:
            flags |= keep
    _mount(None, target, None, flags, None, call="mount -o remount,bind,ro,nosuid,nodev")


def bind_read_only(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, recursive: bool = False
) -> None:
    """Bind `source` onto `target` read-only (nosuid, nodev): the top mount; submounts of a
    `recursive` bind keep their own flags. Read-only before it is attached, so the copies
    propagation makes are read-only too (see the module doc).

    Without the new mount API: bind, then remount; if the remount fails the bind is undone,
    so no writable bind is left behind.
    """
    if _bind_detached_read_only(source, target, recursive=recursive):
        return
    bind(source, target, recursive=recursive)
    try:
        remount_read_only(target)
    except MountError:
        unmount(target, detach=True)
        raise


def _bind_detached_read_only(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, recursive: bool
) -> bool:
    """open_tree clone, mount_setattr read-only, move_mount; False if the kernel lacks it."""
    call = f"mount --{'r' if recursive else ''}bind -o ro {os.fspath(source)}"
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    fd = _LIBC.syscall(
        ctypes.c_long(_SYS_OPEN_TREE),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(source)),
        ctypes.c_uint(flags),
    )
    if fd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOSYS:
            return False
        raise MountError(call=call, path=os.fspath(source), code=code, fix=_fix(code, call))
    try:
        attr = _MountAttr(attr_set=_READ_ONLY_ATTRS)
        rc = _LIBC.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(_AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc != 0:
            code = ctypes.get_errno()
            if code == errno.ENOSYS:
                return False
            raise MountError(call=call, path=os.fspath(target), code=code, fix=_fix(code, call))
        rc = _LIBC.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(os.fsencode(target)),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
        if rc != 0:
            code = ctypes.get_errno()
            raise MountError(call=call, path=os.fspath(target), code=code, fix=_fix(code, call))
    finally:
        os.close(fd)  # a clone never attached is freed with its last reference
    return True


def set_propagation(
    target: str | os.PathLike[str], propagation: Propagation, *, recursive: bool = False
) -> None:
    """`mount --make-[r]shared|private|slave target` (it must already be a mount point)."""
    flags = _PROPAGATION_FLAG[propagation] | (Flag.REC if recursive else 0)
    call = f"mount --make-{'r' if recursive else ''}{propagation.value}"
    _mount(None, target, None, flags, None, call=call)


def overlay_options(*, lower: Path, upper: Path, work: Path) -> str:
    """The overlay's option string; a path it cannot carry is refused (see the module doc)."""
    for role, path in (("lower", lower), ("upper", upper), ("work", work)):
        text = os.fspath(path)
        if not os.path.isabs(text) or _OVERLAY_UNSAFE.search(text):
            raise MountError(
                call=f"mount -t overlay ({role}dir)",
                path=text,
                code=errno.EINVAL,
                fix="overlay paths must be absolute and free of ',', ':', '\\' and newlines: "
                "choose a node directory (DATAPIN_ROOT) whose path has none",
            )
    data = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(data.encode()) > _DATA_LIMIT:
        raise MountError(
            call="mount -t overlay",
            path=os.fspath(lower),
            code=errno.ENAMETOOLONG,
            fix="the overlay's options exceed one page: use a shorter node directory path",
        )
    return data


def overlay(*, lower: Path, upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay at `target` (nosuid, nodev): reads from `lower`, writes to `upper`."""
    data = overlay_options(lower=lower, upper=upper, work=work)
    _mount(
        "overlay",
        target,
        "overlay",
        Flag.NOSUID | Flag.NODEV,
        data,
        call=f"mount -t overlay (lowerdir {lower})",
    )


def unmount(target: str | os.PathLike[str], *, detach: bool = False) -> bool:
    """Unmount `target` (never following a symlink there). False if nothing was mounted."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    if _LIBC.umount2(os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return False  # not a mount point (any more), or gone
    call = f"umount{' --lazy' if detach else ''}"
    raise MountError(call=call, path=os.fspath(target), code=code, fix=_fix(code, call))


# -- the mount table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    #: The directory of the filesystem this mount shows (a bind's source, as the fs sees it).
    root: str
    mount_point: str
    options: frozenset[str]
    #: Optional fields: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    tags: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.tags)

    def super_option(self, name: str) -> str | None:
        """The value of a filesystem option (`lowerdir` of an overlay), or None."""
        prefix = f"{name}="
        for option in self.super_options:
            if option.startswith(prefix):
                return option[len(prefix) :]
        return None


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; a malformed line is skipped (the kernel writes none)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    tags=tuple(fields[6:sep]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(_unescape(fields[sep + 3]).split(","))
                    if len(fields) > sep + 3
                    else (),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def mountinfo(path: Path = MOUNTINFO) -> list[Mount]:
    """This process's mount table, in mount order (the last of a stack is the visible one)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


def canonical(path: str | os.PathLike[str]) -> str:
    """`path` as mountinfo spells it: its parent's real path, its own name not followed."""
    text = os.path.abspath(os.fspath(path))
    if text == "/":
        return text
    parent, name = os.path.split(text)
    return os.path.join(os.path.realpath(parent), name)


def mounts_at(path: str | os.PathLike[str], table: Sequence[Mount] | None = None) -> list[Mount]:
    """The mounts stacked exactly at `path`, bottom first."""
    where = canonical(path)
    return [m for m in (mountinfo() if table is None else table) if m.mount_point == where]


def is_mount(path: str | os.PathLike[str], table: Sequence[Mount] | None = None) -> bool:
    return bool(mounts_at(path, table))


def mounts_under(
    path: str | os.PathLike[str], table: Sequence[Mount] | None = None, *, include_self: bool = True
) -> list[Mount]:
    """The mounts at (with `include_self`) or below `path`, in mount order."""
    where = canonical(path)
    prefix = where.rstrip("/") + "/"
    found = []
    for m in mountinfo() if table is None else table:
        if m.mount_point.startswith(prefix) or (include_self and m.mount_point == where):
            found.append(m)
    return found


def fs_path(path: str | os.PathLike[str], table: Sequence[Mount]) -> tuple[str, str] | None:
    """(device, `path` inside its filesystem): what the `root` of a bind of `path` shows.

    Binds name their source by its path inside the filesystem, not by where it is mounted,
    so this is how a bind of `path` (or of something below it) is recognised in the table.
    """
    where = canonical(path)
    best: Mount | None = None
    for m in table:
        point = m.mount_point.rstrip("/") + "/"
        if (where.rstrip("/") + "/").startswith(point) and (
            best is None or len(m.mount_point) >= len(best.mount_point)
        ):
            best = m
    if best is None:
        return None
    inside = where[len(best.mount_point.rstrip("/")) :]
    return best.device, (best.root.rstrip("/") + inside) or "/"


def shows(m: Mount, base: tuple[str, str]) -> str | None:
    """If mount `m` shows `base` (a `fs_path`) or something below it: the path below it
    ("" for `base` itself); else None."""
    device, inside = base
    if m.device != device:
        return None
    if m.root == inside:
        return ""
    prefix = inside.rstrip("/") + "/"
    return m.root[len(prefix) :] if m.root.startswith(prefix) else None


def unmount_under(
    path: str | os.PathLike[str], *, detach: bool = False, rounds: int = 8
) -> list[str]:
    """Unmount everything at or below `path`, deepest (and newest) first; the points unmounted.

    Re-reads the table between rounds because an unmount can propagate to peers. A busy mount
    (EBUSY) is detached lazily (`MNT_DETACH`) rather than left: its users keep what they have
    open, and nothing new can reach it. Raises `MountError` if mounts remain after `rounds`.
    """
    done: list[str] = []
    for _ in range(rounds):
        mounts = mounts_under(path)
        if not mounts:
            return done
        for point in _deepest_first(mounts):
            try:
                removed = unmount(point, detach=detach)
            except MountError as exc:
                if exc.code != errno.EBUSY:
                    raise
                removed = unmount(point, detach=True)
            if removed:
                done.append(point)
    left = mounts_under(path)
    if left:
        raise MountError(
            call="umount (everything below)",
            path=left[-1].mount_point,
            code=errno.EBUSY,
            fix="something keeps mounting there; it is retried",
        )
    return done


def _deepest_first(mounts: Iterable[Mount]) -> list[str]:
    ordered = list(enumerate(mounts))
    ordered.sort(key=lambda im: (im[1].mount_point.count("/"), im[0]), reverse=True)
    return [m.mount_point for _, m in ordered]
