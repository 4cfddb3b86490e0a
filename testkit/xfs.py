"""Throw-away XFS volumes on loop devices, for testing reflink (FICLONE) behaviour for real.

Why: the node cache materialises datasets with reflinks, which only a few filesystems support
(XFS with ``reflink=1``, btrfs). The root filesystem of a CI machine is usually ext4, so the tests
build a real XFS filesystem in a sparse image file, attach it to a loop device and mount it. The
same suite then runs on that volume and on the root filesystem to cover both the reflink path and
the copy fallback; a small volume gives real ENOSPC.

Design:

- :func:`xfs_volume` is a context manager that registers each teardown step *as soon as* the
  matching resource exists (``contextlib.ExitStack``), so a failure at any point - in ``mkfs``,
  in ``mount``, or in the test body - still unmounts, detaches the loop device and deletes the
  image. Unmount retries on EBUSY with short sleeps and falls back to a lazy unmount
  (``umount -l``); after a lazy unmount ``losetup -d`` only marks the device auto-clear, which the
  kernel honours when the last user goes away.
- Loop devices are shared with everything else on the machine, so we only ever use
  ``losetup -f --show`` (first free device, atomically) and only ever detach the device we got.
- Teardown never uses ``rmtree`` on the mountpoint: if the unmount failed, a recursive delete
  would walk into the still-mounted filesystem. It removes the image and the two directories it
  created, nothing else.
- Missing preconditions (not root, no xfsprogs, no loop devices, no XFS in the kernel) raise
  :class:`XfsUnavailable` with a reason that names the fix; fixtures turn it into ``pytest.skip``.
  Any other failure is a real error and propagates.

XFS facts that matter here: current xfsprogs refuse filesystems smaller than 300 MB, so a "small"
volume is 320M (about 250 MiB usable after the log and metadata). ``filefrag -v`` flags extents
that are shared with another file as ``shared`` (see :func:`shared_extents`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from testkit.procs import CommandError, Unavailable, run, which

__all__ = [
    "MIN_XFS_SIZE",
    "XfsUnavailable",
    "check_xfs_available",
    "free_bytes",
    "loop_devices",
    "mount_fstype",
    "shared_extents",
    "xfs_volume",
]

#: Smallest size ``mkfs.xfs`` (xfsprogs >= 5.19) accepts with some margin; use for ENOSPC tests.
MIN_XFS_SIZE = "320M"

_SETUP_HINT = "run the tests as root on a machine with xfsprogs and loop devices (scripts/setup)"


class XfsUnavailable(Unavailable):
    """This machine cannot provide an XFS loop volume; ``reason`` says why and how to fix it."""


def check_xfs_available() -> None:
    """Raise :class:`XfsUnavailable` unless root, the tools and loop support are all present."""
    if os.geteuid() != 0:
        raise XfsUnavailable(
            "XFS loop volumes need root (mkfs/losetup/mount): run as root, e.g. "
            "`sudo python -m pytest`"
        )
    for tool, package in (
        ("mkfs.xfs", "xfsprogs"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("truncate", "coreutils"),
        ("filefrag", "e2fsprogs"),
    ):
        if which(tool) is None:
            raise XfsUnavailable(
                f"`{tool}` not found: `apt-get install -y {package}` (or run scripts/setup)"
            )
    if not Path("/dev/loop-control").exists() and not any(Path("/dev").glob("loop[0-9]*")):
        raise XfsUnavailable(
            "no loop device support (/dev/loop-control missing): load the `loop` module "
            "(`modprobe loop`) or run the container with --privileged / access to /dev/loop*"
        )


def _unescape_mount_field(field: str) -> str:
    """Decode the octal escapes (``\\040`` = space, ...) used in /proc/self/mounts."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_fstype(path: Path) -> str | None:
    """Filesystem type mounted exactly at ``path`` per /proc/self/mounts, or None if not a mount.

    When several mounts are stacked on the same point, the last (visible) one wins.
    """
    target = os.path.realpath(path)
    fstype: str | None = None
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 3 and _unescape_mount_field(fields[1]) == target:
                fstype = fields[2]
    return fstype


def loop_devices(image: Path) -> list[str]:
    """Loop devices currently backed by ``image`` (``losetup -j``)."""
    out = run(["losetup", "-j", str(image)]).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def free_bytes(mountpoint: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``mountpoint``."""
    st = os.statvfs(mountpoint)
    return st.f_bavail * st.f_frsize


def shared_extents(path: Path) -> bool:
    """True if any extent of ``path`` is flagged ``shared`` by ``filefrag -v`` (a reflink).

    An empty file has no extents and is never shared. Raises :class:`CommandError` if filefrag
    fails (for instance on a filesystem without FIEMAP support).
    """
    out = run(["filefrag", "-v", str(path)]).stdout
    for line in out.splitlines():
        # Extent rows look like "   0:   0..  255:   24..  279:  256:   last,shared,eof".
        if re.match(r"\s*\d+:", line):
            flags = line.rsplit(None, 1)[-1].split(",")
            if "shared" in flags:
                return True
    return False


def _attach(image: Path) -> str:
    last: CommandError | None = None
    for attempt in range(4):
        try:
            return run(["losetup", "-f", "--show", str(image)]).stdout.strip()
        except CommandError as exc:  # racing another losetup for the same free device
            last = exc
            time.sleep(0.05 * (attempt + 1))
    assert last is not None
    raise XfsUnavailable(
        f"could not attach a loop device (all taken, or no permission): {last.stderr.strip()} "
        f"- free one with `losetup -D` if they are stale, or {_SETUP_HINT}"
    )


def _umount(mountpoint: Path) -> bool:
    """Unmount; returns True if it had to fall back to a lazy unmount."""
    last = ""
    for attempt in range(5):
        if mount_fstype(mountpoint) is None:
            return False
        proc = run(["umount", str(mountpoint)], check=False)
        if proc.returncode == 0:
            return False
        last = proc.stderr
        time.sleep(0.05 * 2**attempt)  # EBUSY: a straggling process or open fd; ~1.5 s in all
    if mount_fstype(mountpoint) is None:
        return False
    proc = run(["umount", "-l", str(mountpoint)], check=False)
    if proc.returncode != 0:
        raise CommandError(
            ["umount", "-l", str(mountpoint)],
            proc.returncode,
            proc.stdout,
            f"{proc.stderr}\n(after plain umount failed with: {last.strip()})",
        )
    return True


def _detach(device: str, image: Path, lazy: list[bool]) -> None:
    for attempt in range(5):
        proc = run(["losetup", "-d", device], check=False)
        if proc.returncode == 0 or device not in loop_devices(image):
            break
        time.sleep(0.05 * 2**attempt)
    else:
        raise CommandError(["losetup", "-d", device], proc.returncode, proc.stdout, proc.stderr)
    if lazy and lazy[0]:
        return  # the kernel detaches (auto-clear) once the lazily unmounted fs is released
    for _ in range(20):
        if not loop_devices(image):
            return
        time.sleep(0.05)
    raise RuntimeError(f"loop device(s) {loop_devices(image)} still attached to {image}")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # never recursive: see the module docstring
        else:
            path.unlink()


@contextlib.contextmanager
def xfs_volume(
    size: str = "4G", *, workdir: Path, reflink: bool = True, keep_image: bool = False
) -> Iterator[Path]:
    """Create, mount and yield a fresh XFS filesystem; always tear it down completely.

    With ``keep_image`` (the demo's ``--keep``) the teardown still unmounts and detaches, but
    leaves the image file and the empty mountpoint, ``mountpoint.parent / "volume.img"``, in
    place for ``mount -o loop``.

    ``size`` is passed to ``truncate -s`` (e.g. ``"4G"``, ``"320M"``); the image is sparse, so a
    4G volume costs only what is written. ``workdir`` holds the image and the mountpoint and must
    be on a filesystem that supports sparse files. Yields the mountpoint.

    Raises :class:`XfsUnavailable` when the machine cannot do this at all, :class:`ValueError`
    when ``size`` is below the XFS minimum, :class:`CommandError` for other tool failures.
    """
    check_xfs_available()
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="xfs-", dir=workdir))
        image = base / "volume.img"
        mountpoint = base / "mnt"
        if not keep_image:
            stack.callback(_remove_quietly, base)
            stack.callback(_remove_quietly, image)
        run(["truncate", "-s", size, str(image)])
        mkfs = run(
            ["mkfs.xfs", "-q", "-f", "-m", f"reflink={1 if reflink else 0}", str(image)],
            check=False,
        )
        if mkfs.returncode != 0:
            if "must be larger" in mkfs.stderr:
                raise ValueError(
                    f"XFS volume of {size} is too small: "
                    f"{mkfs.stderr.strip().splitlines()[0]} (use at least {MIN_XFS_SIZE})"
                )
            raise XfsUnavailable(
                f"mkfs.xfs -m reflink={int(reflink)} failed ({mkfs.stderr.strip()}): "
                "install a current xfsprogs (>= 5.x) or run scripts/setup"
            )
        device = _attach(image)
        lazy: list[bool] = []
        stack.callback(_detach, device, image, lazy)
        mountpoint.mkdir()
        if not keep_image:
            stack.callback(_remove_quietly, mountpoint)
        mount = run(["mount", "-t", "xfs", device, str(mountpoint)], check=False)
        if mount.returncode != 0:
            raise XfsUnavailable(
                f"mounting XFS failed ({mount.stderr.strip()}): the kernel needs XFS support "
                "(`modprobe xfs`) and the container needs mount privileges (--privileged)"
            )
        stack.callback(lambda: lazy.append(_umount(mountpoint)))
        yield mountpoint
