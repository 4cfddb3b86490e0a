"""Workspaces of pods that are gone: `reap_workspaces` removes them.

It takes every workspace lock of the pod first (a lock that is not a regular file cannot be
held by any sidecar and does not keep a gone pod's workspace). The agent reaps before it
collects, so that reflinked trees of dead pods stop holding extents the GC would otherwise try
to free. Which pods are gone is kubelet's word (`kubelet_pods_liveness`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from datapin_sidecar import safefs
from datapin_sidecar.errors import UnsafeFileError, UsageError
from datapin_sidecar.node.housekeeping.tasks import (
    STATE,
    OnError,
    Task,
    log_item_error,
    sorted_names,
)

log = logging.getLogger(__name__)

_POD_UID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TRASH: Final = ".trash-"


def _listdir(path: str | os.PathLike[str]) -> list[str]:
    """Names in `path`; empty if it is gone or not a directory (things vanish under a scan)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def reap_workspaces(
    root: Path,
    *,
    live: Callable[[str], bool],
    grace: float = 300.0,
    clock: Callable[[], float] = time.time,
    warned: set[str] | None = None,
    on_error: OnError | None = None,
) -> list[str]:
    """Remove `root/workspaces/<uid>/` of pods that are gone; returns the uids removed.

    A pod is gone when `live(uid)` is False and both the directory and its `.pod.json` are
    older than `grace` seconds (a pod just scheduled may not be visible to `live` yet). A
    workspace some sidecar is materialising into (a `.state/<dataset>/.lock`, or an older
    sidecar's `<dataset>/.revs/.lock`, is held) is skipped. A lock that is not a regular file
    (a FIFO, a symlink: only the pod could have put it there) is never opened or followed; no
    sidecar can hold it, so it does not keep the workspace: it is reported and the workspace
    reaped. Removal renames the directory to `.trash-<uid>-<random>` first, so a crash never
    leaves a half-deleted tree under a pod's uid, and leftover `.trash-*` directories go
    first; deletion never follows a symlink (`safefs.remove_tree`).

    Names that are not pod UIDs are left alone and logged once per call, or once per name
    for the lifetime of `warned` if the caller keeps that set across calls.
    """
    report = on_error or log_item_error
    workspaces = Path(root) / "workspaces"
    names = sorted(_listdir(workspaces))
    for name in names:
        if name.startswith(_TRASH):
            _remove(workspaces / name, uid=None, report=report)
    now = clock()
    removed: list[str] = []
    odd = [n for n in names if not n.startswith(_TRASH) and not _POD_UID.fullmatch(n)]
    new_odd = [n for n in odd if warned is None or n not in warned]
    if new_odd:
        log.warning(
            "%s holds %d entries that are not pod UIDs (%s); left alone. Fix: remove them by "
            "hand if nothing uses them",
            workspaces,
            len(new_odd),
            ", ".join(new_odd[:5]) + (" ..." if len(new_odd) > 5 else ""),
            extra={"entries": new_odd},
        )
        if warned is not None:
            warned.update(new_odd)
    for uid in names:
        if not _POD_UID.fullmatch(uid) or live(uid):
            continue
        pod_dir = workspaces / uid
        try:
            if not _older_than(pod_dir, now - grace):
                continue
            trash = workspaces / f"{_TRASH}{uid}-{secrets.token_hex(4)}"
            with contextlib.ExitStack() as locks:
                if not _lock_all(pod_dir, locks, report):
                    log.info(
                        "workspace of gone pod %s is being materialised into; reaping it later",
                        uid,
                        extra={"pod_uid": uid},
                    )
                    continue
                os.rename(pod_dir, trash)
        except OSError as exc:
            report(Task.REAP, str(pod_dir), exc)
            continue
        _remove(trash, uid=uid, report=report)
        removed.append(uid)
    if removed:
        log.info(
            "removed workspaces of %d pods that are gone",
            len(removed),
            extra={"pod_uids": removed},
        )
    return removed


def _older_than(pod_dir: Path, cutoff: float) -> bool:
    try:
        st = os.lstat(pod_dir)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
        return False
    try:
        return os.lstat(pod_dir / ".pod.json").st_mtime < cutoff
    except FileNotFoundError:
        return True  # a sidecar that never wrote one: the directory's age decides


def _lock_dirs(pfd: int) -> Iterator[str]:
    """Relative paths of the directories holding a pod's workspace locks (both layouts)."""
    for name in sorted_names(pfd):
        if name == STATE:
            try:
                sfd = safefs.open_dir(name, dir_fd=pfd)
            except (FileNotFoundError, UnsafeFileError):
                continue
            try:
                datasets = sorted_names(sfd)
            finally:
                os.close(sfd)
            yield from (f"{STATE}/{d}" for d in datasets)
        elif not name.startswith("."):
            yield f"{name}/.revs"


def _lock_all(pod_dir: Path, locks: contextlib.ExitStack, report: OnError) -> bool:
    """Take every dataset's workspace lock without waiting; False if one is held.

    The locks stay held (in `locks`) until the directory is renamed away, so no sidecar can
    start a materialise in between. See `reap_workspaces` for locks that are not files.
    """
    pfd = safefs.open_dir(pod_dir)
    try:
        for rel in _lock_dirs(pfd):
            where = f"{pod_dir}/{rel}/.lock"
            try:
                dfd = safefs.open_dir_beneath(pfd, rel)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except UnsafeFileError as exc:
                report(Task.REAP, where, exc)  # a symlinked `.revs`: nothing to lock there
                continue
            try:
                fd = safefs.open_regular(".lock", dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except UnsafeFileError as exc:
                report(Task.REAP, where, exc)
                continue
            finally:
                os.close(dfd)
            locks.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
    finally:
        os.close(pfd)
    return True


def _remove(path: Path, *, uid: str | None, report: OnError) -> None:
    try:
        safefs.remove_tree(path)
    except OSError as exc:
        # It keeps its `.trash-` name, so the next reap tries again.
        report(Task.REAP, str(path), exc)


def kubelet_pods_liveness(pods_dir: Path) -> Callable[[str], bool]:
    """`live(uid)` from kubelet's own records: `pods_dir/<uid>` exists while the pod does.

    Kubelet keeps `/var/lib/kubelet/pods/<uid>` until a deleted pod's volumes are torn down,
    which is exactly when its workspace stops being needed. Should `pods_dir` itself
    disappear later (an unmounted volume), every pod counts as live: an empty view of the
    node must never read as "every pod is gone".
    """
    pods = Path(pods_dir)
    if not pods.is_dir():
        raise UsageError(
            f"kubelet pods directory {pods} does not exist, so the node agent cannot tell "
            "which pods are gone. Fix: mount the kubelet pods directory "
            "(/var/lib/kubelet/pods) read-only into the node agent at this path, or disable "
            "workspace reaping"
        )

    def live(uid: str) -> bool:
        return (pods / uid).is_dir() or not pods.is_dir()

    return live
