"""How full the volume is, and how full it may get: statvfs readings and watermarks.

GC runs when the volume is above the high watermark (bytes or inodes) and evicts until both are
at or below the low one. Progress is *estimated* per object (`minus`), because statvfs is a
volume-wide figure: an object frees `st_blocks * 512` bytes and one inode only if the cache
holds its last link (`st_nlink == 1`); a hardlinked object frees nothing while a tree still
links it. The estimate can be wrong both ways: another writer on the volume, or extents a
reflinked tree outside the roots still shares (a dead pod's workspace not reaped yet), make
unlinks free less than `st_blocks`; so the GC reads statvfs again every so often and takes its
figure when it is lower (`lower`), and once more when the estimate says "done".

That needs statvfs to be current after unlink. Measured on this project's test XFS (kernel
6.18, reflink=1): it is not quite. Unlinking 40 1 MiB files then a 64 MiB one and calling
statvfs at once showed 34 MiB / 34 inodes freed, not 104 MiB / 41: XFS frees an unlinked
inode's blocks in a background worker (inodegc), which statfs kicks but does not wait for. One
more statvfs about a millisecond later showed everything freed, and unlinking 3000 files of
40 KiB settled within 10 ms. Hence `settled`: re-read statvfs every 10 ms until two readings
agree (at most one second, since other writers may never let it settle). A lagging reading is
harmless at the periodic checks, where only a lower figure is taken.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from datapin_sidecar.errors import UsageError

_SETTLE_POLL: Final = 0.01
_SETTLE_MAX: Final = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Watermarks:
    """GC starts above a high watermark (bytes or inodes) and evicts down to the low ones."""

    high_percent: float = 85.0
    low_percent: float = 70.0
    inodes_high_percent: float = 85.0
    inodes_low_percent: float = 70.0

    def __post_init__(self) -> None:
        for low_name, high_name in (
            ("low_percent", "high_percent"),
            ("inodes_low_percent", "inodes_high_percent"),
        ):
            low: float = getattr(self, low_name)
            high: float = getattr(self, high_name)
            # Written as negations so that NaN fails every check.
            if not 0 < high <= 100:
                raise UsageError(
                    f"watermark {high_name}={high} is not a percentage of the volume. "
                    f"Fix: set {high_name} above 0 and at most 100 (default 85)"
                )
            if not low > 0:
                raise UsageError(
                    f"watermark {low_name}={low} must be above 0 (GC would have to empty the "
                    f"volume). Fix: set {low_name} between 0 and {high_name} (default 70)"
                )
            if not low < high:
                raise UsageError(
                    f"watermark {low_name}={low} must be below {high_name}={high}: GC starts "
                    f"above {high_name} and evicts down to {low_name}. Fix: lower {low_name} "
                    f"or raise {high_name} (defaults 70 and 85)"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeUsage:
    """One statvfs reading. `free_bytes` is what an unprivileged writer can use (f_bavail)."""

    size_bytes: int
    used_bytes: int
    free_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int

    @classmethod
    def measure(cls, path: str | os.PathLike[str]) -> VolumeUsage:
        st = os.statvfs(path)
        return cls(
            size_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            free_bytes=st.f_bavail * st.f_frsize,
            inodes=st.f_files,
            inodes_used=st.f_files - st.f_ffree,
            inodes_free=st.f_favail,
        )

    @property
    def used_percent(self) -> float:
        """As `df` computes Use%: used / (used + available), so reserved blocks count as full."""
        usable = self.used_bytes + self.free_bytes
        return 100.0 * self.used_bytes / usable if usable > 0 else 0.0

    @property
    def inodes_used_percent(self) -> float:
        # Filesystems with dynamic inodes (btrfs) report no inode total: never the limit there.
        return 100.0 * self.inodes_used / self.inodes if self.inodes > 0 else 0.0


def above(usage: VolumeUsage, bytes_percent: float, inodes_percent: float) -> bool:
    return usage.used_percent > bytes_percent or usage.inodes_used_percent > inodes_percent


def minus(usage: VolumeUsage, freed_bytes: int, freed_inodes: int) -> VolumeUsage:
    freed_bytes = min(freed_bytes, usage.used_bytes)
    freed_inodes = min(freed_inodes, usage.inodes_used)
    return dataclasses.replace(
        usage,
        used_bytes=usage.used_bytes - freed_bytes,
        free_bytes=usage.free_bytes + freed_bytes,
        inodes_used=usage.inodes_used - freed_inodes,
        inodes_free=usage.inodes_free + freed_inodes,
    )


def lower(estimate: VolumeUsage, real: VolumeUsage) -> VolumeUsage:
    """Per dimension, whichever of the two says less is used."""
    b = real if real.used_percent < estimate.used_percent else estimate
    i = real if real.inodes_used_percent < estimate.inodes_used_percent else estimate
    return dataclasses.replace(
        b, inodes=i.inodes, inodes_used=i.inodes_used, inodes_free=i.inodes_free
    )


def settled(path: Path) -> VolumeUsage:
    """Statvfs once XFS's background inode reclaim has caught up (see the module doc)."""
    deadline = time.monotonic() + _SETTLE_MAX
    last = VolumeUsage.measure(path)
    while time.monotonic() < deadline:
        time.sleep(_SETTLE_POLL)
        now = VolumeUsage.measure(path)
        if (now.used_bytes, now.inodes_used) == (last.used_bytes, last.inodes_used):
            return now
        last = now
    return last
