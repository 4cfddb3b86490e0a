"""Real git servers and a git argv recorder, for the operator's git resolution tests.

- :class:`GitHttpServer` serves the repositories under a directory over smart HTTP with git's
  own CGI program, ``git http-backend`` (what Apache/nginx deployments and many self-hosted
  forges run), behind HTTP basic authentication that this server checks itself. It records
  every ``Authorization`` header it receives, so a test can prove credentials travelled in the
  request while asserting they never appeared anywhere else. It runs in a thread of the test
  process on 127.0.0.1 and a free port; :meth:`GitHttpServer.close` stops it.
- :func:`git_recorder` makes a ``git`` (or ``ssh``) wrapper that appends each invocation's
  argv to a log and execs the real one: put its directory first on ``PATH`` and the log shows
  exactly which commands the code under test ran and with which arguments (what
  ``/proc/<pid>/cmdline`` exposes to every user on the machine).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

__all__ = ["GitHttpServer", "git_recorder"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    project_root: Path
    expected: str
    seen: list[str | None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        """Quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        auth = self.headers.get("Authorization")
        self.server.seen.append(auth)
        if auth != self.server.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "GIT_PROJECT_ROOT": str(self.server.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "tester",
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class GitHttpServer:
    """Smart-HTTP git server for the repositories under ``project_root``, requiring basic auth
    with ``username``/``password``. ``url(name)`` is a repository's URL (no credentials)."""

    def __init__(self, project_root: Path, *, username: str, password: str) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.project_root = project_root
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._server.expected = f"Basic {token}"
        self._server.seen = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def seen(self) -> list[str | None]:
        """Every request's ``Authorization`` header (None when absent), in order."""
        return self._server.seen

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> GitHttpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def git_recorder(directory: Path, tool: str = "git") -> tuple[Path, Path]:
    """A ``tool`` wrapper (``git`` or ``ssh``) in ``directory/bin`` that logs each call's argv
    (one line, arguments separated by spaces) to ``directory/<tool>-argv.log`` and then runs the
    real executable.

    Returns ``(bin_dir, log)``; prepend ``bin_dir`` to ``PATH`` to record.
    """
    real = shutil.which(tool)
    if real is None:
        raise RuntimeError(f"`{tool}` not found: `apt-get install -y git openssh-client`")
    bin_dir, log = directory / "bin", directory / f"{tool}-argv.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log.touch()
    wrapper = bin_dir / tool
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    return bin_dir, log
