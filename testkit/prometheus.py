"""A real Prometheus server (and ``promtool``) for tests of datapin's metrics and dashboard.

Why a real server: the dashboard's queries are PromQL evaluated against scraped data; only
Prometheus itself can say that a query parses, that the labels the scrape adds line up with the
ones we export, and that ``rate()`` / ``increase()`` / ``histogram_quantile()`` return what the
panels claim. The Debian package (``apt-get install -y --no-install-recommends prometheus``,
done by scripts/setup) ships ``prometheus`` and ``promtool`` and does not start a service.

Design:

- :class:`PrometheusServer` is a context manager around one ``prometheus`` process listening on
  127.0.0.1 on a free port, with its TSDB, config and log under its own work directory. Starting,
  the retry of a start that lost its port to another process, the log and shutdown by PID are
  the kit's one launcher (:class:`testkit.launcher.ServerProcess`).
- Targets are added and removed while it runs: one scrape job reads a ``file_sd`` file
  (``targets.json``, re-read every second and on change) which :meth:`PrometheusServer.add_target`
  rewrites atomically (write a temporary file, rename it over). Prometheus's discovery manager
  passes target changes on at most every 5 s, so a new target is first scraped 5-6 s after
  :meth:`~PrometheusServer.add_target` (measured); a config reload would be no faster. Each
  target group carries its own ``job`` label (a target label takes precedence over the scrape
  job's name), so tests can tell their targets apart without reloading the configuration.
- The HTTP API is read with the standard library only (``urllib``); Prometheus's own error text
  is raised as :class:`PrometheusQueryError`. :meth:`PrometheusServer.wait_for` polls a query
  and, on timeout, fails with the last result and every target's health and last scrape error:
  "no data" is nearly always a target that is down, and the message says which.
- Shutdown: SIGTERM (Prometheus flushes its head block and exits in well under a second),
  SIGKILL after 10 s.
- A missing binary raises :class:`PrometheusUnavailable` whose reason names the fix; fixtures
  turn it into ``pytest.skip``. Any other start failure raises with the tail of its log.

:func:`serve_registry` exposes a ``prometheus_client`` registry over HTTP on 127.0.0.1, for
tests that scrape in-process metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from testkit.launcher import ServerProcess, free_ports, http_status
from testkit.procs import Unavailable, which

__all__ = [
    "PrometheusQueryError",
    "PrometheusServer",
    "PrometheusUnavailable",
    "find_prometheus",
    "find_promtool",
    "sample_value",
    "serve_registry",
]

_INSTALL_FIX = "run scripts/setup, or `apt-get install -y --no-install-recommends prometheus`"
_STOP_GRACE = 10.0
_POLL = 0.5


class PrometheusUnavailable(Unavailable):
    """``prometheus`` or ``promtool`` is missing or unusable; ``reason`` names the fix."""


class PrometheusQueryError(RuntimeError):
    """The HTTP API answered ``status: error``; the message is Prometheus's own error text."""

    def __init__(self, expr: str, error_type: str, error: str) -> None:
        super().__init__(f"Prometheus rejected {expr!r}: {error_type}: {error}")
        self.expr = expr
        self.error_type = error_type
        self.error = error


def _find(name: str, env: str) -> Path:
    configured = os.environ.get(env)
    if configured:
        exe = Path(configured)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise PrometheusUnavailable(
                f"${env}={configured} is not an executable file: fix or unset it, then "
                f"{_INSTALL_FIX}"
            )
        return exe
    found = which(name)
    if found is None:
        raise PrometheusUnavailable(f"`{name}` not found on PATH: {_INSTALL_FIX} (or set ${env})")
    return found


def find_prometheus() -> Path:
    """The ``prometheus`` executable: ``$DATAPIN_PROMETHEUS``, else PATH."""
    return _find("prometheus", "DATAPIN_PROMETHEUS")


def find_promtool() -> Path:
    """The ``promtool`` executable (same package): ``$DATAPIN_PROMTOOL``, else PATH."""
    return _find("promtool", "DATAPIN_PROMTOOL")


def sample_value(sample: dict[str, Any]) -> float:
    """The float value of one instant-vector sample (``{"metric": ..., "value": [t, "v"]}``)."""
    return float(sample["value"][1])


def _has_number(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(sample_value(s)) for s in result)


@contextlib.contextmanager
def serve_registry(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` at ``http://127.0.0.1:PORT/metrics``; yield ``"127.0.0.1:PORT"``.

    The port is chosen by the kernel at bind time (port 0), so there is no probe race. The
    server thread is shut down and its socket closed on exit.
    """
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class PrometheusServer(ServerProcess):
    """One ``prometheus`` on 127.0.0.1 scraping the targets given to :meth:`add_target`.

    Attributes (valid after :meth:`start`): ``url`` (``http://127.0.0.1:PORT``), ``port``,
    ``pid``, ``workdir``, ``log_path``, ``config_path``, ``targets_path``.
    """

    name = "prometheus"
    log_name = "prometheus.log"

    def __init__(
        self,
        workdir: Path,
        *,
        scrape_interval: str = "1s",
        binary: Path | None = None,
        startup_timeout: float = 60.0,
        stop_grace: float = _STOP_GRACE,
    ) -> None:
        super().__init__(workdir, startup_timeout=startup_timeout, stop_grace=stop_grace)
        self.scrape_interval = scrape_interval
        self.binary = binary
        self.port: int | None = None
        self._groups: list[dict[str, Any]] = []
        self._groups_lock = threading.Lock()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("PrometheusServer is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def targets_path(self) -> Path:
        return self.workdir / "targets.json"

    # -- the launcher's hooks ----------------------------------------------------------------

    def _prepare(self) -> None:
        """Find the binary and write the configuration (scraping the ``file_sd`` targets)."""
        if self.binary is None:
            self.binary = find_prometheus()
        (self.workdir / "data").mkdir(exist_ok=True)
        self._write_targets()
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {
                    "job_name": "datapin-tests",
                    "file_sd_configs": [
                        {"files": [str(self.targets_path)], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def _choose_ports(self) -> None:
        (self.port,) = free_ports(1)

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def _ready(self) -> bool:
        return http_status(f"{self.url}/-/ready") == 200

    def _not_ready(self) -> str:
        return f"/-/ready did not answer 200 on {self.url}"

    # -- targets -----------------------------------------------------------------------------

    def add_target(self, job: str, address: str, labels: dict[str, str] | None = None) -> None:
        """Scrape ``http://ADDRESS/metrics`` as job ``job`` with extra target ``labels``.

        The first scrape comes 5-6 s later (file_sd sees the file at once, Prometheus's
        discovery manager batches updates every 5 s). Use :meth:`wait_for` on a series of the
        target to know it arrived.
        """
        group_labels = {**(labels or {}), "job": job}
        with self._groups_lock:
            self._groups.append({"targets": [address], "labels": group_labels})
            self._write_targets()

    def remove_target(self, job: str, address: str | None = None) -> None:
        """Stop scraping ``job`` (only ``address`` of it, if given); its series go stale."""
        with self._groups_lock:
            self._groups = [
                g
                for g in self._groups
                if not (g["labels"]["job"] == job and address in (None, g["targets"][0]))
            ]
            self._write_targets()

    def _write_targets(self) -> None:
        tmp = self.targets_path.with_name(f".{self.targets_path.name}.tmp")
        tmp.write_text(json.dumps(self._groups, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.targets_path)

    # -- HTTP API ----------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, str], what: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=10.0) as resp:
                body: Any = json.load(resp)
        except urllib.error.HTTPError as exc:
            # 400/422/503 carry {"status": "error", "errorType": ..., "error": ...}.
            raw = exc.read().decode("utf-8", errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                raise PrometheusQueryError(what, f"HTTP {exc.code}", raw) from None
        if body.get("status") != "success":
            raise PrometheusQueryError(
                what, str(body.get("errorType", "?")), str(body.get("error", body))
            )
        return body["data"]

    def query(self, expr: str, *, time: float | None = None) -> list[dict[str, Any]]:
        """Evaluate ``expr`` as an instant query (at ``time``, Unix seconds, default now).

        Returns the samples of a vector result, ``[{"metric": {...}, "value": [t, "v"]}]``; a
        scalar or string result comes back as one sample with empty labels.
        """
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._api("/api/v1/query", params, expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        out: list[dict[str, Any]] = result
        return out

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (``/api/v1/targets``): labels, scrapeUrl, health, lastError."""
        data = self._api("/api/v1/targets", {"state": "active"}, "targets")
        out: list[dict[str, Any]] = data["activeTargets"]
        return out

    def target_health(self) -> str:
        """One line per active target: job, URL, health, last error; for failure messages."""
        try:
            targets = self.targets()
        except (OSError, PrometheusQueryError) as exc:
            return f"(targets unavailable: {exc})"
        if not targets:
            return "(no active targets)"
        lines = []
        for t in targets:
            error = t.get("lastError") or ""
            lines.append(
                f"{t['labels'].get('job')} {t.get('scrapeUrl')} health={t.get('health')} "
                f"lastScrape={t.get('lastScrape')}" + (f" error={error}" if error else "")
            )
        return "\n".join(lines)

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` every 0.5 s until ``predicate(result)`` holds; return that result.

        The default predicate is "non-empty". A query error is raised at once (it will not
        heal); on timeout an AssertionError shows the last result and the targets' health.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"after {timeout:.0f} s, {expr!r} still gives {result!r}\n"
                    f"targets:\n{self.target_health()}"
                )
            time.sleep(_POLL)

    def wait_for_number(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """:meth:`wait_for` a result with at least one sample that is not NaN."""
        return self.wait_for(expr, _has_number, timeout)
