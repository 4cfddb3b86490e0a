"""One launcher for the real servers the kit runs (SeaweedFS, Prometheus): start, wait, stop.

Why one: every server the tests, the benchmarks and the demo start needs the same care, and it
is easy to get subtly wrong in one copy. :class:`ServerProcess` is that care, once; a server
module says only what is its own (its command line, its files, what "ready" means).

Design:

- A subclass implements :meth:`~ServerProcess._prepare` (write config files, once per start),
  :meth:`~ServerProcess._choose_ports` (fresh free ports, per attempt),
  :meth:`~ServerProcess._argv` (the command line) and :meth:`~ServerProcess._ready` (one
  readiness probe, polled every 0.1 s), plus :meth:`~ServerProcess._not_ready` for the timeout
  message.
- :meth:`~ServerProcess.spawn` starts the process and returns at once (the demo builds its
  repository meanwhile); :meth:`~ServerProcess.wait_ready` waits for it. :meth:`start` is both.
  A process that dies with "address already in use" in its log lost a port race between our
  probe and its bind: it is spawned again on new ports, up to three attempts.
- The process runs in its own session (``start_new_session``, so a Ctrl-C meant for the caller
  does not reach it) with stdout and stderr appended to one log file in its work directory;
  every error carries the log's tail. With ``setpriv`` available it also gets ``PDEATHSIG=KILL``,
  so it dies with the Python process even if that is SIGKILLed and no finaliser runs; an
  ``atexit`` hook stops what is still running at interpreter exit.
- Shutdown is by PID and process group: SIGTERM, SIGKILL after ``stop_grace``. The leader is
  waited for *without* being reaped (``waitid(WNOWAIT)``), so while the group is swept with a last
  SIGKILL its id cannot have been reused: the sweep only hits processes the server started.
  :meth:`~ServerProcess._after_stop` lets a server remove what it leaves behind (sockets).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from testkit.procs import which

__all__ = ["ServerProcess", "free_ports", "http_status"]

_START_ATTEMPTS = 3
_POLL = 0.1

_live: set[ServerProcess] = set()
_live_lock = threading.Lock()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    with contextlib.ExitStack() as socks:
        ports = []
        for _ in range(n):
            sock = socks.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET to ``url`` (any HTTP answer, error statuses included); None if no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own http URL
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


class ServerProcess(abc.ABC):
    """One server process on 127.0.0.1, logged to ``workdir / log_name``; a context manager.

    Attributes: ``workdir``, ``proc`` (None until spawned), ``pid``, ``log_path``,
    ``startup_timeout`` and ``stop_grace`` (seconds).
    """

    #: What the server is called in messages ("weed", "prometheus").
    name: ClassVar[str]
    #: The log file's name inside the work directory.
    log_name: ClassVar[str]

    def __init__(self, workdir: Path, *, startup_timeout: float, stop_grace: float) -> None:
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen[bytes] | None = None
        self._attempt = 0

    # -- what a server says about itself -----------------------------------------------------

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Find the binary and write the configuration; runs once per :meth:`spawn`."""

    @abc.abstractmethod
    def _choose_ports(self) -> None:
        """Pick fresh free ports; runs before every attempt."""

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The server's command line (run in ``workdir``)."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """One readiness probe; polled until it holds or the startup timeout passes."""

    @abc.abstractmethod
    def _not_ready(self) -> str:
        """What was still missing at the timeout, for the error message."""

    def _after_stop(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Remove what the stopped server leaves behind (sockets); nothing by default."""

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / self.log_name

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the server and wait until it is ready (:meth:`spawn`, :meth:`wait_ready`)."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the server in the background and return at once; :meth:`wait_ready` waits."""
        if self.proc is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._attempt = 1
        self._launch()

    def _launch(self) -> None:
        self._choose_ports()
        argv = self._argv()
        setpriv = which("setpriv")
        if setpriv is not None:
            # Dies with us even when the caller is SIGKILLed (no finaliser would run then).
            argv = [str(setpriv), "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with _live_lock:
            _live.add(self)

    def wait_ready(self) -> None:
        """Wait until :meth:`_ready` holds; respawn on new ports after a lost port race.

        Any failure stops the server and raises :class:`RuntimeError` with the log's tail.
        """
        try:
            while not self._wait_once():
                self._halt()
                if self._attempt == _START_ATTEMPTS:
                    raise RuntimeError(
                        f"{self.name} could not bind its ports in {_START_ATTEMPTS} attempts; "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                self._attempt += 1
                self._launch()
        except BaseException:
            self.stop()
            raise

    def _wait_once(self) -> bool:
        """True once ready, False if the process lost a port race; raises on anything else."""
        proc = self.proc
        if proc is None:
            raise RuntimeError(f"{type(self).__name__} is not spawned")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    return False
                raise RuntimeError(
                    f"{self.name} exited with status {proc.returncode} during startup; "
                    f"log tail ({self.log_path}):\n{tail}"
                )
            if self._ready():
                return True
            time.sleep(_POLL)
        raise RuntimeError(
            f"{self.name} was not ready within {self.startup_timeout:.0f} s ({self._not_ready()}); "
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server by PID and process group: SIGTERM, SIGKILL after ``stop_grace``.

        Idempotent; the process is forgotten, so the object can be started again.
        """
        self._halt()
        self.proc = None

    def _halt(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            if not _exited(proc.pid, self.stop_grace):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _exited(proc.pid, 30.0)
            # The leader is a zombie now, not yet reaped, so its PID (= the group id) cannot
            # have been reused: sweeping the group here can only hit processes it started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self._after_stop()
        with _live_lock:
            _live.discard(self)


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for child ``pid`` to exit, *without* reaping it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()
