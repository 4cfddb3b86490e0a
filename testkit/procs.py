"""Running the real external tools the tests depend on (mkfs.xfs, losetup, git, dvc, ...).

Design: one small wrapper, :func:`run`, used by every support module. It always passes an
argument list (never a shell), always captures stdout and stderr as text, always has a timeout,
and on failure raises :class:`CommandError` whose message carries the exact command line, the
exit status and both output streams. A failing fixture therefore explains itself in the pytest
report instead of showing a bare ``CalledProcessError``.

:class:`Unavailable` is the base of the kit's "this machine cannot" exceptions.

:func:`which` also looks in the sbin directories: administration tools such as ``mkfs.xfs`` and
``losetup`` live in ``/usr/sbin``, which is missing from ``PATH`` in many non-login shells and CI
runners even when running as root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CommandError", "Unavailable", "run", "which"]

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class Unavailable(RuntimeError):  # noqa: N818 - a skip reason, not an error; name is API
    """This machine lacks something a helper needs (a tool, root, loop devices); ``reason``
    says what and names the fix. Fixtures turn it into ``pytest.skip(reason)``; each kit module
    has its own subclass (:class:`~testkit.xfs.XfsUnavailable`, ...), so a fixture skips on
    exactly what it depends on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommandError(RuntimeError):
    """An external command exited non-zero (or timed out); the message holds its output."""

    def __init__(
        self,
        args: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        *,
        cwd: Path | None = None,
    ) -> None:
        self.args_list = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        where = f" (cwd={cwd})" if cwd is not None else ""
        super().__init__(
            f"command {status}{where}: {shlex.join(self.args_list)}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


def which(name: str) -> Path | None:
    """Locate an executable on ``PATH`` or, failing that, in the usual sbin directories."""
    found = shutil.which(name)
    if found is None:
        extra = os.pathsep.join(_SBIN_DIRS)
        found = shutil.which(name, path=extra)
    return Path(found) if found is not None else None


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` and capture its output; raise :class:`CommandError` on failure if ``check``.

    ``env`` replaces the environment entirely when given (callers build it from ``os.environ``).
    """
    argv = [os.fspath(a) for a in args]
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandError(argv, None, out, err, cwd=cwd) from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr, cwd=cwd)
    return proc
