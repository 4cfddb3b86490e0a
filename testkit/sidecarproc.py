"""Run the real `datapin-sidecar` program as a subprocess, the way a pod runs it.

The service tests need what only a process has: signals, exit codes, a termination-message file,
JSON logs on a non-TTY stdout, and an HTTP port that kubelet (here: the test) probes. Settings
go in as `DATAPIN_*` environment variables, exactly as the webhook sets them, and nothing else
of the test's environment leaks in (no AWS keys: the credentials come from a mounted-Secret
directory the test writes the way kubelet does).

Processes are stopped by PID on exit (SIGTERM, then SIGKILL after a timeout), even when the test
failed; their combined output stays in a log file the assertion messages quote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from datapin_sidecar.pins import ANNOTATION, format_downward_annotations
from prometheus_client.parser import text_string_to_metric_families

from testkit.dvcremote import S3DvcFixture
from testkit.k8svolume import kubelet_update
from testkit.seaweed import free_ports

__all__ = ["Pod", "SidecarProcess", "serving"]


class SidecarProcess:
    """`datapin-sidecar MODE` with `settings` (without the prefix) as its environment."""

    def __init__(
        self,
        mode: str,
        workdir: Path,
        settings: Mapping[str, Any],
        *,
        wrapper: Sequence[str] = (),
    ) -> None:
        """`wrapper`: a command that execs the program (its PID stays the program's), e.g.
        `unshare --mount` to run it in a mount namespace of its own, as a container."""
        self.mode = mode
        self.wrapper = tuple(wrapper)
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.log_path = workdir / f"{mode}-{self.port}.log"
        self.termination_path = workdir / f"{mode}-{self.port}.termination"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            # Whatever made `datapin_sidecar` importable for the tests must for the program too.
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
            "DATAPIN_HTTP_HOST": "127.0.0.1",
            "DATAPIN_HTTP_PORT": str(self.port),
            "DATAPIN_TERMINATION_MESSAGE_PATH": str(self.termination_path),
            "DATAPIN_WATCH_INTERVAL_SECONDS": "0.2",
        }
        for key, value in settings.items():
            env[f"DATAPIN_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SidecarProcess:
        workdir_log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "datapin_sidecar.node.main", self.mode],
            env=self.env,
            stdout=workdir_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        workdir_log.close()
        # Like kubelet's probes, the test talks to the program only once it listens; a program
        # that exits first (bad settings) is left for the test to examine.
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and self.get("/healthz", timeout=1)[0] == 0:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"datapin-sidecar {self.mode} never listened:\n{self.output()[-3000:]}"
                )
            time.sleep(0.05)
        return self

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- looking at it -----------------------------------------------------------------------

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (every line must be one)."""
        lines = []
        for raw in self.output().splitlines():
            lines.append(json.loads(raw))
        return lines

    def termination_message(self) -> str:
        return self.termination_path.read_text() if self.termination_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of GET path; (0, error) when nothing answers yet."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            return 0, str(exc)

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, f"/status answered {code}: {body}\n{self.output()[-3000:]}"
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        code, body = self.get("/metrics")
        assert code == 200, f"/metrics answered {code}: {body}"
        samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 if the series does not exist)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_until(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        """Poll `check()` until truthy; fail with the log when the process died or time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"datapin-sidecar {self.mode} exited with {self.proc.returncode} while "
                    f"waiting for {what}:\n{self.output()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}:\n{self.output()[-4000:]}"
                )
            time.sleep(0.05)


class Pod:
    """What kubelet gives one pod's sidecar: a uid, a Secret volume, an annotations volume."""

    def __init__(self, root: Path, work: Path, fx: S3DvcFixture, endpoint: str) -> None:
        self.uid = str(uuid.uuid4())
        self.root = root
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.secret = work / f"secret-{self.uid[:8]}"
        kubelet_update(
            self.secret,
            {"AWS_ACCESS_KEY_ID": fx.access_key, "AWS_SECRET_ACCESS_KEY": fx.secret_key},
            "2026_11_22_00_00_00.1",
        )
        self.podinfo = work / f"podinfo-{self.uid[:8]}"
        self.stamp = 0
        self.dataset = {
            "name": "images",
            "remote": fx.remote_url,
            "endpoint_url": endpoint,
            "credentials_dir": str(self.secret),
        }

    def pin(self, rev: str, ref: str, *, paths: list[str] | None = None) -> None:
        """Change the pod's annotations as kubelet does (atomic `..data` swap); `paths`: the
        part of the revision the pins name (issue 18)."""
        self.stamp += 1
        pin: dict[str, object] = {"pin": rev, "ref": ref}
        if paths:
            pin["paths"] = paths
        pins = json.dumps({"images": pin})
        text = format_downward_annotations({ANNOTATION: pins, "team": "vision"})
        kubelet_update(self.podinfo, {"annotations": text}, f"2026_11_22_00_00_{self.stamp:02d}.1")

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "pod_uid": self.uid,
            "pod_name": f"train-{self.uid[:5]}",
            "pod_namespace": "ml",
            "node_name": "node-a",
            "datasets": [self.dataset],
            "annotations_file": str(self.podinfo / "annotations"),
            "log_format": "json",
            **extra,
        }

    @property
    def current(self) -> Path:
        return self.root / "workspaces" / self.uid / "images" / "current"


def serving(proc: SidecarProcess, rev: str) -> bool:
    serving = proc.status()["datasets"]["images"]["serving"]
    return serving is not None and serving["pin"] == rev
