"""The datapin test kit: real filesystems, DVC repositories and servers, for tests, benchmarks,
the demo and the developer scripts.

A top-level package beside tests/ and bench/ (not part of the installed distribution, which is
only ``datapin_sidecar`` and ``datapin_operator``) so that everything that needs a real XFS volume
or a real S3 server imports one kit, and nothing outside tests/ imports ``tests``. pytest
fixtures stay in tests/conftest.py; they call the kit.

Layout:

- :mod:`testkit.procs` runs external tools and turns failures into readable errors; its
  :class:`~testkit.procs.Unavailable` is the base of the "this machine cannot" exceptions.
- :mod:`testkit.launcher` is the one launcher of long-running servers (start, wait for ready,
  retry a lost port race, log, stop by PID and process group), used by seaweed and prometheus.
- :mod:`testkit.xfs` builds throw-away reflink-capable XFS volumes on loop devices.
- :mod:`testkit.dvcrepo` builds real git + DVC 2/3 repositories with a directory remote.
- :mod:`testkit.trees` puts revisions straight into a cache (for tests that need no DVC).
- :mod:`testkit.seaweed` runs a real SeaweedFS S3 server on free ports, stopped by PID.
- :mod:`testkit.faultproxy` is a fault-injecting HTTP proxy in front of it (SlowDown,
  resets, truncated bodies, flipped bits, latency, B2's refusal of checksum headers) that
  counts every byte it hands out.
- :mod:`testkit.dvcremote` pushes a real DVC 3 / DVC 2.58 repository to it with `dvc push`,
  configured as the Backblaze B2 tutorial does.
- :mod:`testkit.k8svolume` writes Secret volumes the way kubelet does (rotation).
- :mod:`testkit.prometheus` runs a real Prometheus; :mod:`testkit.docscheck` checks the admin
  docs against the code; the rest (chart, dashboard, gitrepo, hostiles3, image, kind, kubeapi,
  operatorrun, sidecarproc) serve one group of tests each, named in their docstrings.

Nothing here is a mock: the point of these helpers is that the code under test meets the same
kernel, filesystems and DVC on-disk formats it meets in production. Preconditions that a machine
may lack (root, xfsprogs, loop devices, the pinned DVC executables) are reported by dedicated
exception types (:class:`~testkit.xfs.XfsUnavailable`,
:class:`~testkit.dvcrepo.DvcUnavailable`) so that fixtures turn them into explicit
``pytest.skip`` reasons naming the fix, never into silent passes.

This module itself holds :func:`rmtree_robust`, because the trees the materialiser produces are
deliberately read-only (0444 files in 0555 directories) and plain :func:`shutil.rmtree` fails on
them for non-root users.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "rmtree_robust"]

#: The repository checkout the kit lives in (for .tools, charts/, docs/).
REPO_ROOT = Path(__file__).resolve().parents[1]


def _make_writable(path: Path) -> None:
    """Give the owner rwx on every directory under ``path`` (top-down, no symlink following)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
    with os.scandir(path) as it:
        subdirs = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    for sub in subdirs:
        _make_writable(sub)


def _retry_after_chmod(func: Callable[..., Any], path: str, exc: BaseException) -> None:
    if not isinstance(exc, PermissionError):
        raise exc
    parent = os.path.dirname(path) or "."
    os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
    func(path)


def rmtree_robust(path: Path) -> None:
    """Remove ``path`` recursively even when it contains read-only files and directories.

    Missing paths are fine (idempotent teardown). Symlinks are removed, never followed. A file or
    symlink at ``path`` is simply unlinked.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    _make_writable(path)
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_retry_after_chmod)
    else:

        def onerror(func: Callable[..., Any], p: str, exc_info: Any) -> None:
            _retry_after_chmod(func, p, exc_info[1])

        shutil.rmtree(path, onerror=onerror)
