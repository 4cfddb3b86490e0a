"""Abandoned download slots: partial downloads whose downloader died long ago.

A download slot (`.datapin/fetch/<ab>/<layout>-<oid>`, see `engine.cache`) is flock-held by its
live downloader and never touched then. A free one may still be resumed by the next claimant of
its object, which is why only old ones go. Journals (`.parts`) go with their slot, or alone
when their slot is gone and they are old.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.errors import UnsafeFileError
from datapin_sidecar.node.housekeeping.tasks import OnError, Task, log_item_error, sorted_names

log = logging.getLogger(__name__)

_JOURNAL: Final = ".parts"


def clean_slots(
    cache: NodeCache,
    *,
    max_age: float = 3600.0,
    clock: Callable[[], float] = time.time,
    on_error: OnError | None = None,
) -> int:
    """Remove download slots abandoned longer than `max_age` seconds. Returns how many.

    A slot whose flock is held belongs to a live downloader and is never touched. A free one
    may still be resumed by the next claimant of its object, which is why only old ones go.
    Journals (`.parts`) go with their slot, or alone when their slot is gone and they are old.
    Anything in the fetch area that is not a regular file (a directory or symlink planted
    there, a symlinked shard) is not ours: it is reported and removed without being followed.
    """
    report = on_error or log_item_error
    now = clock()
    removed = 0
    try:
        ffd = safefs.open_dir(cache.fetch_dir)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        report(Task.SLOTS, str(cache.fetch_dir), exc)
        return 0
    try:
        for shard in sorted_names(ffd):
            where = f"{cache.fetch_dir}/{shard}"
            try:
                sfd = safefs.open_dir(shard, dir_fd=ffd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report(Task.SLOTS, where, exc)
                if isinstance(exc, UnsafeFileError):
                    _remove_planted(shard, ffd, where, report)
                continue
            try:
                removed += _clean_shard(sfd, where, now, max_age, report)
            except Exception as exc:
                report(Task.SLOTS, where, exc)
            finally:
                os.close(sfd)
    finally:
        os.close(ffd)
    if removed:
        log.info("removed %d abandoned download slots", removed, extra={"slots": removed})
    return removed


def _remove_planted(name: str, dir_fd: int, where: str, report: OnError) -> None:
    try:
        safefs.remove_tree(name, dir_fd=dir_fd)
    except OSError as exc:
        report(Task.SLOTS, where, exc)


def _clean_shard(sfd: int, where: str, now: float, max_age: float, report: OnError) -> int:
    removed = 0
    names = sorted_names(sfd)
    regular: list[str] = []
    for name in names:
        try:
            mode = os.lstat(name, dir_fd=sfd).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            regular.append(name)
            continue
        report(Task.SLOTS, f"{where}/{name}", UnsafeFileError(name, "is not a regular file"))
        _remove_planted(name, sfd, f"{where}/{name}", report)
    slots = {n for n in regular if _JOURNAL not in n}
    for name in sorted(slots):
        journals = [n for n in regular if n.startswith(name + _JOURNAL)]
        try:
            if _remove_slot(name, journals, sfd, now, max_age):
                removed += 1
        except OSError as exc:
            report(Task.SLOTS, f"{where}/{name}", exc)
    for name in regular:
        if _JOURNAL in name and name[: name.rindex(_JOURNAL)] not in slots:
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(name, dir_fd=sfd).st_mtime > max_age:
                    os.unlink(name, dir_fd=sfd)
    return removed


def _remove_slot(name: str, journals: list[str], sfd: int, now: float, max_age: float) -> bool:
    try:
        fd = safefs.open_regular(name, dir_fd=sfd)
    except FileNotFoundError:
        return False
    try:
        if not _abandoned(fd, name, sfd, now, max_age):
            return False
        # Journals first, the slot last, the lock released after both (as `Slot.discard`).
        for journal in journals:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(journal, dir_fd=sfd)
        try:
            os.unlink(name, dir_fd=sfd)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def _abandoned(fd: int, name: str, sfd: int, now: float, max_age: float) -> bool:
    """Take the slot's lock (kept until `fd` closes) and say whether it is old and ours."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        # Installing a slot links it to its object name before unlinking the slot, so a
        # lock on an installed slot's inode (nlink 1: the object) says nothing about the
        # file now at `name`, which may be a new claimant's.
        current = os.lstat(name, dir_fd=sfd)
    except (BlockingIOError, FileNotFoundError):
        return False  # a live downloader, or finished meanwhile
    if (current.st_ino, current.st_dev) != (st.st_ino, st.st_dev):
        return False
    return now - st.st_mtime > max_age  # a younger one may be resumed by its downloader
