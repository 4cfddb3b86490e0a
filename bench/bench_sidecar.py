"""Issue 4 benchmark: the sidecar as a service, beside the CLI, `cp --reflink` and `dvc checkout`.

    python -m bench.bench_sidecar [--quick] [--only imports,ready,switch,gc] [--runs N]
                                  [--switches K] [--at COMMIT] [--no-dvc]

Run it from the repository root, as root for an XFS loop volume (else everything runs in a
temporary directory under --workdir, and the report says so). It prints a markdown report
(measurements, then ratios) and writes it to bench/results/<UTC>-sidecar.md. Nothing here is
pass/fail: the exit code is 0 unless something broke.

Cases (`--only`):

* `imports`: `python -X importtime -m datapin_sidecar.node.main settings` (3 runs, median per
  module): what the program imports before it can do anything, biggest first.
* `ready`: time to ready, warm. A pod starts on a node whose cache holds its revision (objects
  and parsed manifest). `datapin-sidecar run` is spawned (`python -m datapin_sidecar.node.main run`,
  settings in `DATAPIN_*` as `testkit.sidecarproc.SidecarProcess` builds them, the pin in
  a downward-API annotations file written by `testkit.k8svolume.kubelet_update`, the
  dataset's remote an empty DVC directory remote that a warm start never reads) and timed from
  fork until `/readyz` answers 200. Peers in the same rounds: `datapin-sidecar once` to exit,
  the one-shot CLI (`python -m datapin_sidecar.cli materialize`) to exit, `materialize()` in
  this process, `cp -a --reflink=always` of the same tree, `dvc checkout` (DVC 3, reflink,
  whose cache is the node cache), and the interpreter alone (`python -c pass`, and `-c 'import
  datapin_sidecar.node.main'`), so the ready time can be split into start-up, imports, settings and
  server, and the materialise.
* `switch`: live switch latency. `run` serves revision A (N files) and the annotations file is
  swapped (kubelet's atomic `..data` rename) to B (1% of the files changed), then back, K times
  (12; quick 4), with `DATAPIN_WATCH_INTERVAL_SECONDS=0.2`. Timed from just before the swap
  until `/status` reports B served; nothing is subtracted (the watch interval is in the figure:
  a swap waits 0-0.2 s to be noticed). Two settings: the default `spare_grace_seconds` (60 s: a
  tree retired less than a minute ago is not edited, so every switch carries the published tree
  over with hardlinks) and 0 (the spare is recycled; in an A->B->A alternation the spare *is*
  the target, so the switch changes no file). Each is compared with `materialize()` in this
  process doing the same alternation with the same grace, interleaved switch by switch.
* `gc`: `datapin_sidecar.node.housekeeping.evict.collect` evicting N unreferenced objects (a
  revision nobody uses, plus its `.dir`) from a cache that also holds a revision in use (N/10
  objects, protected), in objects/s; `gc.scan` of the same cache; peers `rm -rf` of an equivalent
  tree (N objects in the same 256 shard directories) and `du -s` of the cache. Caches are written
  fresh for every run (untimed). `collect` runs in this process with watermarks of 0.002%/0.001% so
  it evicts everything not in use; its phases (inventory walk, manifest plan, unlinks, the final
  wait for XFS's background inode freeing in `settled`) are timed by wrapping the module's functions
  in this process.

Design (the shape is bench_materialize's; the shared helpers are bench/harness.py's):

* **Peers side by side.** Every case runs on one fresh reflink XFS volume; within each round
  the peers take turns and the peer that starts rotates, so this shared 2-core machine's noise
  hits all alike. Medians with min-max; ratios of medians.
* **Processes against processes**, timed from fork: `cp`, `dvc`, the CLI and `once` to exit
  (`wait4`), `run` until `/readyz` says 200. The readiness poller costs the sidecar nothing
  while it works: it polls `/readyz` (a refused connect) every 2 ms until the server listens,
  then the workspace's `current` symlink (no request to the sidecar) every 1 ms until it
  appears, then `/readyz` every 0.5 ms until 200. Kubelet's own probes run at most once a
  second, so in a cluster readiness is also quantised by `periodSeconds`; this measures the
  program. CPU of `run` is its utime+stime from /proc at the moment it is ready.
* **Same environment for every Python process**: the `DATAPIN_*` settings (sidecar only), and
  PATH, HOME (a scratch directory), LANG and PYTHONPATH. `sync` before every timed run.
* **Warm means warm**: an untimed first run of each peer puts the objects in the page cache,
  the parsed manifest in `cache/.datapin/manifests`, and byte code in `__pycache__` of the
  private copy of the package (see next).
* **One version of datapin**: the benchmark re-executes itself against a private copy of the
  package (`harness.pin_sources`), first on PYTHONPATH for every process.
* **Checked**: the first tree of each peer has the right file count and shares extents with
  the cache; every switch is confirmed by `/status`; GC must evict exactly the unreferenced
  objects and keep every protected one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.node.housekeeping import evict, inventory
from datapin_sidecar.node.housekeeping.volume import Watermarks
from datapin_sidecar.pins import ANNOTATION, format_downward_annotations

from bench.harness import (
    KIB,
    SOURCE_ENV,
    BenchError,
    Corpus,
    DvcRepo,
    Peer,
    Sample,
    add_at_option,
    check_pinned,
    chosen_cases,
    count_files,
    dvc_version,
    find_dvc,
    interleave,
    machine,
    main_pinned,
    median,
    proc_cpu,
    relpath,
    rm,
    run_timed,
    secs,
    settle,
    write_report,
)
from testkit.k8svolume import kubelet_update
from testkit.sidecarproc import SidecarProcess
from testkit.xfs import (
    XfsUnavailable,
    check_xfs_available,
    shared_extents,
    xfs_volume,
)

CASES = ("imports", "ready", "switch", "gc")
DATASET = "ds"
WATCH_INTERVAL = 0.2
DEFAULT_GRACE = 60.0  # Settings.spare_grace_seconds' default


@dataclass(frozen=True, slots=True)
class Sizes:
    files: int  # files in revision A (and B)
    file_bytes: int
    gc_objects: int  # unreferenced objects GC evicts
    gc_roots: int  # objects of the revision in use, which GC keeps
    switches: int  # per grace setting
    volume: str


FULL = Sizes(
    files=20_000, file_bytes=4 * KIB, gc_objects=50_000, gc_roots=5_000, switches=12, volume="4G"
)
QUICK = Sizes(
    files=2_000, file_bytes=4 * KIB, gc_objects=5_000, gc_roots=500, switches=4, volume="2G"
)


# -- talking to the sidecar ---------------------------------------------------------------------


def probe(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of `GET path` over a bare HTTP/1.0 socket; (0, b"") if nothing listens.

    Cheaper than urllib on both sides, which matters while we poll a process that is working.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except (ConnectionRefusedError, ConnectionResetError):
        return 0, b""
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 else 0), body


def logged_seconds(lines: Sequence[dict[str, Any]]) -> list[tuple[float, str]]:
    """(materialise seconds, base) of every `published` line of a sidecar's JSON log."""
    found = []
    for line in lines:
        if line.get("msg", "").startswith("published"):
            m = re.search(r"([0-9.]+) s$", line["msg"])
            if m:
                found.append((float(m.group(1)), str(line.get("base", "?"))))
    return found


def log_epoch(ts: str) -> float:
    """The epoch seconds of a JSON log line's `ts` (RFC 3339, milliseconds, UTC)."""
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(raw))
    return out


class Pod:
    """One pod's sidecar: its uid, annotations volume and `SidecarProcess` settings."""

    def __init__(self, bench: Bench, mode: str, **extra: str) -> None:
        self.uid = str(uuid.uuid4())
        self.bench = bench
        self.podinfo = bench.scratch / f"podinfo-{self.uid[:8]}"
        self.stamp = 0
        settings = {
            "root": str(bench.vol),
            "pod_uid": self.uid,
            "pod_name": f"bench-{self.uid[:5]}",
            "pod_namespace": "bench",
            "datasets": [{"name": DATASET, "remote": str(bench.remote)}],
            "annotations_file": str(self.podinfo / "annotations"),
            "log_format": "json",
            **extra,
        }
        self.sp = SidecarProcess(mode, bench.home, settings)
        self.sp.env.update(bench.py_env)  # HOME and PYTHONPATH: the same for every peer
        self.argv = [sys.executable, "-m", "datapin_sidecar.node.main", mode]

    @property
    def workspace(self) -> Path:
        return self.bench.vol / "workspaces" / self.uid

    @property
    def current(self) -> Path:
        return self.workspace / DATASET / "current"

    def pin(self, rev: str, ref: str) -> None:
        self.stamp += 1
        pins = json.dumps({DATASET: {"pin": rev, "ref": ref}})
        kubelet_update(
            self.podinfo,
            {"annotations": format_downward_annotations({ANNOTATION: pins, "team": "bench"})},
            f"2026_11_22_00_00_{self.stamp:02d}.1",
        )

    def spawn(self) -> float:
        """Start the program (output to its log file); returns the start time."""
        settle()
        with self.sp.log_path.open("ab") as log:
            started = time.perf_counter()
            self.sp.proc = subprocess.Popen(
                self.argv,
                env=self.sp.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return started

    def alive(self, what: str) -> None:
        assert self.sp.proc is not None
        if self.sp.proc.poll() is not None:
            raise BenchError(
                f"datapin-sidecar {self.sp.mode} exited {self.sp.proc.returncode} while "
                f"waiting for {what}:\n{self.sp.output()[-3000:]}"
            )

    def wait_ready(self, started: float) -> dict[str, float]:
        """Poll as the module doc says; times since `started` of listening, published, ready."""
        port = self.sp.port
        deadline = started + 120
        while True:
            code, _ = probe(port, "/readyz")
            if code:
                break
            self.alive("the HTTP server")
            if time.perf_counter() > deadline:
                raise BenchError(f"never listened:\n{self.sp.output()[-3000:]}")
            time.sleep(0.002)
        listening = time.perf_counter() - started
        published = listening
        if code != 200:
            while not os.path.islink(self.current):
                self.alive("the first publish")
                if time.perf_counter() > deadline:
                    raise BenchError(f"never published:\n{self.sp.output()[-3000:]}")
                time.sleep(0.001)
            published = time.perf_counter() - started
            while probe(port, "/readyz")[0] != 200:
                self.alive("/readyz 200")
                time.sleep(0.0005)
        ready = time.perf_counter() - started
        return {"listening": listening, "published": published, "ready": ready}

    def serving(self) -> str | None:
        code, body = probe(self.sp.port, "/status")
        if code != 200:
            raise BenchError(f"/status answered {code}: {body[:500]!r}")
        serving = json.loads(body)["datasets"][DATASET]["serving"]
        return None if serving is None else str(serving["pin"])

    def stop(self) -> float:
        """SIGTERM; the seconds it took to exit (which must be 0)."""
        started = time.perf_counter()
        code = self.sp.stop()
        took = time.perf_counter() - started
        if code != 0:
            raise BenchError(f"sidecar exited {code} on SIGTERM:\n{self.sp.output()[-3000:]}")
        return took


# -- the report -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    case: str
    tool: str
    values: list[float]  # seconds
    cpu: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def med(self) -> float:
        return median(self.values)


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    ratios: list[tuple[str, str, str]] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def ratio(self, name: str, value: str, note: str = "") -> None:
        self.ratios.append((name, value, note))

    def render(self, header: str) -> str:
        lines = [header, "", "### Measurements", ""]
        lines += [
            "| case | tool | n | median | min-max | CPU (median) | notes |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            spread = f"{secs(min(r.values))}-{secs(max(r.values))}" if r.values else "-"
            cpu = secs(median(r.cpu)) if r.cpu else "-"
            lines.append(
                f"| {r.case} | {r.tool} | {len(r.values)} | {secs(r.med)} | {spread} | {cpu} "
                f"| {r.note} |"
            )
        lines += ["", "### Ratios and differences", "", "| what | value | how |", "|---|---:|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.ratios]
        for section in self.sections:
            lines += ["", section]
        return "\n".join(lines) + "\n"


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def quantile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


# -- the benchmark ------------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    vol: Path
    xfs: bool
    sizes: Sizes
    runs: int
    dvc: Path | None
    dvc_timeout: float
    seed: int
    report: Report = field(default_factory=Report)
    started: float = field(default_factory=time.monotonic)
    cache: Path = field(init=False)
    scratch: Path = field(init=False)
    home: Path = field(init=False)
    remote: Path = field(init=False)
    py_env: dict[str, str] = field(init=False)
    corpus: Corpus = field(init=False)
    revs: list[str] = field(default_factory=list)
    last_epoch: float = 0.0  # wall-clock time of the last timed_python fork
    _n: int = 0

    def __post_init__(self) -> None:
        self.cache = self.vol / "cache"  # the sidecar's ROOT/cache
        self.scratch = self.vol / "runs"
        self.home = self.vol / "home"
        self.remote = self.vol / "remote"  # an empty DVC directory remote: warm never reads it
        for d in (self.scratch, self.home, self.remote):
            d.mkdir(parents=True)
        self.py_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
        self.corpus = Corpus(self.cache, self.seed)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.scratch / f"{name}-{self._n}"

    @property
    def reflink_flag(self) -> str:
        return "--reflink=always" if self.xfs else "--reflink=auto"

    def revisions(self) -> list[str]:
        """A and B (B: every 100th file of A changed), written straight into the cache."""
        if not self.revs:
            t = time.monotonic()
            self.corpus.grow(self.sizes.files, self.sizes.file_bytes)
            self.revs = self.corpus.chain(self.sizes.files, 1, self.sizes.file_bytes, "b")
            settle()
            self.log(f"wrote {self.corpus.written:,} objects in {time.monotonic() - t:.1f}s")
        return self.revs

    def check_tree(self, who: str, root: Path) -> None:
        found = count_files(root)
        if found != self.sizes.files:
            raise BenchError(f"{who}: {found} files under {root}, expected {self.sizes.files}")
        if self.xfs and not shared_extents(root / relpath(0)):
            raise BenchError(f"{who}: {root / relpath(0)} shares no extents: not a reflink")

    def timed_python(self, args: Sequence[str], env: dict[str, str], log: Path) -> Sample:
        """A Python process from fork to exit, stdout+stderr to `log`."""
        settle()
        with log.open("wb") as out:
            self.last_epoch = time.time()
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            raise BenchError(f"{shlex.join(args)} exited {code}:\n{log.read_text()[-3000:]}")
        return Sample(wall=wall, cpu=usage.ru_utime + usage.ru_stime)

    # -- imports ----------------------------------------------------------------------------------

    def bench_imports(self) -> None:
        """`-X importtime` of the program: the biggest imports, median of 3 runs."""
        self.log("imports: python -X importtime -m datapin_sidecar.node.main settings, 3 runs")
        runs: list[dict[tuple[int, str], tuple[int, int]]] = []
        totals = []
        for _ in range(3):
            proc = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "datapin_sidecar.node.main", "settings"],
                env=self.py_env,
                capture_output=True,
                text=True,
                check=True,
            )
            seen: dict[tuple[int, str], tuple[int, int]] = {}
            total = 0
            for line in proc.stderr.splitlines():
                m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
                if m is None:
                    continue
                depth = len(m.group(3)) // 2
                seen[(depth, m.group(4))] = (int(m.group(1)), int(m.group(2)))
                if depth == 0:
                    total += int(m.group(2))
            runs.append(seen)
            totals.append(total)
        keys = set.intersection(*(set(r) for r in runs))
        med = {k: (median([r[k][0] for r in runs]), median([r[k][1] for r in runs])) for k in keys}
        by_cum = sorted(med.items(), key=lambda kv: -kv[1][1])[:16]
        by_self = sorted(med.items(), key=lambda kv: -kv[1][0])[:8]
        lines = [
            "### Imports of `datapin-sidecar` (`python -X importtime -m datapin_sidecar.node.main "
            "settings`, median of 3)",
            "",
            f"Sum of top-level imports: {median(totals) / 1e6 * 1000:.0f} ms (importtime's own "
            "overhead included). Biggest by cumulative time; depth is the nesting level in "
            "the import tree (0: imported by the program's own module or by runpy), so a "
            "row's time is also in the rows of its importers:",
            "",
            "| cumulative | self | depth | module |",
            "|---:|---:|---:|---|",
        ]
        lines += [
            f"| {c / 1000:.1f} ms | {s / 1000:.1f} ms | {d} | `{name}` |"
            for (d, name), (s, c) in by_cum
        ]
        lines += ["", "Biggest by own (self) time:", "", "| self | module |", "|---:|---|"]
        lines += [f"| {s / 1000:.1f} ms | `{name}` |" for (_, name), (s, _c) in by_self]
        self.report.sections.append("\n".join(lines))

    # -- time to ready ----------------------------------------------------------------------------

    def bench_ready(self) -> None:
        a = self.revisions()[0]
        n = self.sizes.files
        case = f"1. time to ready, warm ({n:,} x {self.sizes.file_bytes // KIB} KiB)"
        self.log(f"{case}: preparing (untimed first runs)")
        # The tree cp copies, and the warm-up: page cache, parsed manifest, byte code.
        src_dest = self.vol / "src-A"
        warm = materialize(self._request(a, src_dest))
        src = Path(warm.tree)
        self.check_tree("datapin (in-process)", src)
        self.timed_python(
            ["-c", "import datapin_sidecar.node.main, datapin_sidecar.cli"],
            self.py_env,
            self.fresh("log"),
        )
        repo = None
        if self.dvc is not None:
            repo = DvcRepo(self.vol / "dvc-ready", self.dvc, self.cache).create()
            repo.point(a, n, n * self.sizes.file_bytes)
        extra: dict[str, list[dict[str, Any]]] = {"run": [], "once": [], "cli": []}

        def run_service(r: int) -> Sample:
            pod = Pod(self, "run")
            pod.pin(a, "A")
            try:
                started = pod.spawn()
                times = pod.wait_ready(started)
                cpu = proc_cpu(pod.sp.pid)
                times["stop"] = pod.stop()
            finally:
                pod.sp.stop()
            logged = logged_seconds(read_log(pod.sp.log_path))
            if not logged or logged[0][1] != "fresh":
                raise BenchError(f"expected one fresh publish, got {logged}")
            times["inproc"] = logged[0][0]
            extra["run"].append(times)
            if r == 0:
                self.check_tree("sidecar run", pod.current.resolve())
            rm(pod.workspace)
            return Sample(wall=times["ready"], cpu=cpu)

        def run_once(r: int) -> Sample:
            pod = Pod(self, "once")
            pod.pin(a, "A")
            sample = self.timed_python(pod.argv[1:], pod.sp.env, pod.sp.log_path)
            lines = read_log(pod.sp.log_path)
            logged = logged_seconds(lines)
            if not logged or logged[0][1] != "fresh":
                raise BenchError(f"expected one fresh publish, got {logged}")
            done = next(x for x in lines if x["msg"].startswith("all datasets published"))
            done_at = log_epoch(done["ts"]) - self.last_epoch
            extra["once"].append({"inproc": logged[0][0], "done": done_at})
            if r == 0:
                self.check_tree("sidecar once", pod.current.resolve())
            rm(pod.workspace)
            return sample

        def run_cli(r: int) -> Sample:
            dest = self.fresh("cli")
            args = [sys.executable, "-m", "datapin_sidecar.cli", "materialize"]
            args += ["--cache", str(self.cache), "--rev", a, "--dest", str(dest)]
            sample = run_timed([*args, "--json", "--quiet"], env=self.py_env)
            if sample.result["base"] != "fresh":
                raise BenchError(f"CLI: expected a fresh build, got {sample.result}")
            extra["cli"].append({"inproc": float(sample.result["seconds"])})
            if r == 0:
                self.check_tree("CLI", Path(sample.result["tree"]))
            rm(dest)
            return sample

        def run_inproc(_r: int) -> Sample:
            dest = self.fresh("inproc")
            settle()
            cpu0 = time.thread_time()
            started = time.perf_counter()
            result = materialize(self._request(a, dest))
            wall = time.perf_counter() - started
            cpu = time.thread_time() - cpu0
            if result.base != "fresh":
                raise BenchError(f"in-process: expected fresh, got {result.base}")
            rm(dest)
            return Sample(wall=wall, cpu=cpu)

        def run_cp(r: int) -> Sample:
            dest = self.fresh("cp")
            sample = run_timed(["cp", "-a", self.reflink_flag, src, dest])
            if r == 0:
                self.check_tree("cp", dest)
            rm(dest)
            return sample

        def run_dvc(r: int) -> Sample:
            assert repo is not None
            repo.clear()
            sample = repo.checkout(self.dvc_timeout)
            if r == 0 and not sample.timed_out:
                self.check_tree("dvc", repo.data)
            return sample

        def run_python(args: list[str]) -> Callable[[int], Sample]:
            def run(_r: int) -> Sample:
                log = self.fresh("py-log")
                sample = self.timed_python(args, self.py_env, log)
                rm(log)
                return sample

            return run

        peers: list[Peer] = [
            ("sidecar run -> /readyz 200", self.runs, run_service),
            ("sidecar once -> exit", self.runs, run_once),
            ("CLI materialize -> exit", self.runs, run_cli),
            ("materialize() in-process", self.runs, run_inproc),
            (f"cp -a {self.reflink_flag}", self.runs, run_cp),
            ("python -c pass", self.runs, run_python(["-c", "pass"])),
            (
                "python -c 'import datapin_sidecar.node.main'",
                self.runs,
                run_python(["-c", "import datapin_sidecar.node.main"]),
            ),
            (
                "python -c 'import datapin_sidecar.cli'",
                self.runs,
                run_python(["-c", "import datapin_sidecar.cli"]),
            ),
            (
                "import main, os._exit",
                self.runs,
                run_python(["-c", "import datapin_sidecar.node.main, os; os._exit(0)"]),
            ),
        ]
        if repo is not None:
            peers.append(("dvc checkout", self.runs, run_dvc))
        self.log(f"{case}: {len(peers)} peers x {self.runs} rounds")
        res = interleave(peers, self.log)

        def walls(name: str) -> list[float]:
            return [s.wall for s in res[name]]

        def cpus(name: str) -> list[float]:
            return [s.cpu for s in res[name] if s.cpu == s.cpu]  # drop NaN

        rep = self.report
        run_x = extra["run"]
        svc = rep.add(Row(case, "`datapin-sidecar run`: spawn -> /readyz 200", walls(peers[0][0])))
        svc.cpu = cpus(peers[0][0])
        listening = median([x["listening"] for x in run_x])
        published = median([x["published"] for x in run_x])
        svc_inproc = median([x["inproc"] for x in run_x])
        svc.note = (
            f"HTTP server listening at {ms(listening)}; `current` published at "
            f"{ms(published)}; its own materialise (log) {ms(svc_inproc)}; SIGTERM -> exit "
            f"{ms(median([x['stop'] for x in run_x]))}; CPU: until ready, from /proc"
        )
        once = rep.add(Row(case, "`datapin-sidecar once`: spawn -> exit 0", walls(peers[1][0])))
        once.cpu = cpus(peers[1][0])
        once_inproc = median([x["inproc"] for x in extra["once"]])
        once_done = median([x["done"] for x in extra["once"]])
        once.note = (
            f"its own materialise (log) {ms(once_inproc)}; last log line ('all datasets "
            f"published', ms timestamps) {ms(once_done)} after fork, so ~"
            f"{ms(once.med - once_done)} from there to exit (event loop and interpreter "
            "teardown)"
        )
        cli = rep.add(
            Row(case, "`python -m datapin_sidecar.cli materialize` -> exit", walls(peers[2][0]))
        )
        cli.cpu = cpus(peers[2][0])
        cli_inproc = median([x["inproc"] for x in extra["cli"]])
        cli.note = f"its own `seconds` {ms(cli_inproc)}"
        inproc = rep.add(
            Row(case, "`materialize()` in this process", walls(peers[3][0]), cpus(peers[3][0]))
        )
        inproc.note = "no start-up at all: the floor for a fresh tree"
        cp = rep.add(Row(case, f"`cp -a {self.reflink_flag}` of the same tree", walls(peers[4][0])))
        cp.cpu = cpus(peers[4][0])
        bare = rep.add(Row(case, "`python -c pass`", walls(peers[5][0]), cpus(peers[5][0])))
        bare.note = "the interpreter alone, with this machine's site-packages"
        imp_main = rep.add(
            Row(
                case,
                "`python -c 'import datapin_sidecar.node.main'`",
                walls(peers[6][0]),
                cpus(peers[6][0]),
            )
        )
        imp_main.note = "interpreter + every import of the program + interpreter teardown"
        imp_exit = rep.add(
            Row(
                case,
                "`python -c 'import datapin_sidecar.node.main, os; os._exit(0)'`",
                walls("import main, os._exit"),
                cpus("import main, os._exit"),
            )
        )
        imp_exit.note = (
            f"the same without teardown: finalising the modules costs ~"
            f"{ms(imp_main.med - imp_exit.med)}"
        )
        imp_cli = rep.add(
            Row(
                case,
                "`python -c 'import datapin_sidecar.cli'`",
                walls(peers[7][0]),
                cpus(peers[7][0]),
            )
        )
        dvc_row = None
        if repo is not None:
            dvc_row = rep.add(
                Row(case, "`dvc checkout` (reflink, cache = node cache)", walls("dvc checkout"))
            )
            dvc_row.cpu = cpus("dvc checkout")
            rm(repo.root)
        rm(src_dest)

        rep.ratio(
            "ready: sidecar run / materialize() in-process",
            f"{svc.med / inproc.med:.2f}x",
            f"{secs(svc.med)} / {secs(inproc.med)}",
        )
        rep.ratio(
            "ready: service overhead = sidecar run - materialize() in-process",
            ms(svc.med - inproc.med),
            "start-up, imports, settings, HTTP server, event loop and thread hop",
        )
        rep.ratio(
            "of which: until the HTTP server listens",
            ms(listening),
            "fork -> first HTTP answer (interpreter, imports, settings, server)",
        )
        rep.ratio(
            "of which: interpreter + imports alone",
            ms(imp_exit.med),
            "`python -c 'import datapin_sidecar.node.main, os; os._exit(0)'`",
        )
        rep.ratio(
            "of which: listening -> ready",
            ms(svc.med - listening),
            f"the materialise ({ms(svc_inproc)} by the sidecar's log) and the rest",
        )
        rep.ratio(
            "python -c 'import ...': datapin_sidecar.node.main - datapin_sidecar.cli",
            ms(imp_main.med - imp_cli.med),
            "what the service imports beyond the one-shot CLI (aiohttp, pydantic, "
            "prometheus_client), and tears down at exit",
        )
        rep.ratio(
            "ready: sidecar run / CLI materialize", f"{svc.med / cli.med:.2f}x", "both processes"
        )
        rep.ratio(
            "ready: sidecar once / CLI materialize",
            f"{once.med / cli.med:.2f}x",
            "init-container mode against the one-shot CLI",
        )
        rep.ratio(
            "CLI overhead = CLI - its own seconds", ms(cli.med - cli_inproc), "start-up + imports"
        )
        rep.ratio(
            "ready: sidecar run / cp",
            f"{svc.med / cp.med:.2f}x",
            f"{secs(svc.med)} / {secs(cp.med)}",
        )
        rep.ratio(
            "materialize() in-process / cp",
            f"{inproc.med / cp.med:.2f}x",
            "the work itself against cp",
        )
        if dvc_row is not None:
            rep.ratio(
                "ready: dvc checkout / sidecar run",
                f"{dvc_row.med / svc.med:.2f}x",
                f"{secs(dvc_row.med)} / {secs(svc.med)}",
            )

    def _request(self, rev: str, dest: Path, *, grace: float = 0.0) -> Request:
        return Request(
            cache=NodeCache(self.cache),
            revision=Revision.parse(rev),
            dest=dest,
            strategy=Strategy.AUTO,
            spare_grace=grace,
        )

    # -- live switch ------------------------------------------------------------------------------

    def bench_switch(self) -> None:
        a, b = self.revisions()
        n = self.sizes.files
        k = self.sizes.switches
        rng = random.Random(f"{self.seed}-switch")
        for grace in (DEFAULT_GRACE, 0.0):
            label = "default" if grace == DEFAULT_GRACE else ""
            case = (
                f"2. live switch A<->B ({n:,} files, 1% differ), watch {WATCH_INTERVAL} s, "
                f"spare grace {grace:.0f} s{' (' + label + ')' if label else ''}"
            )
            self.log(f"{case}: {k} switches")
            pod = Pod(self, "run", spare_grace_seconds=str(grace))
            pod.pin(a, "A")
            dest = self.fresh("switch-inproc")
            materialize(self._request(a, dest, grace=grace))
            latency, link_at, inproc, bases_in = [], [], [], []
            try:
                pod.wait_ready(pod.spawn())
                for i in range(k):
                    target, ref = (b, "B") if i % 2 == 0 else (a, "A")
                    md5 = Revision.parse(target).md5
                    order = ["sidecar", "inproc"] if i % 2 == 0 else ["inproc", "sidecar"]
                    for who in order:
                        if who == "sidecar":
                            # Land the swap at a random phase of the watch loop.
                            time.sleep(rng.uniform(1.2, 2.2) * WATCH_INTERVAL)
                            settle()
                            started = time.perf_counter()
                            pod.pin(target, ref)
                            while os.readlink(pod.current) != f".revs/{md5}":
                                pod.alive(f"switch {i}")
                                time.sleep(0.0005)
                            link_at.append(time.perf_counter() - started)
                            while pod.serving() != target:
                                time.sleep(0.001)
                            latency.append(time.perf_counter() - started)
                        else:
                            settle()
                            t = time.perf_counter()
                            result = materialize(self._request(target, dest, grace=grace))
                            inproc.append(time.perf_counter() - t)
                            bases_in.append(result.base)
                    self.log(
                        f"  switch {i + 1}/{k} to {ref}: sidecar {secs(latency[-1])} "
                        f"(link at {secs(link_at[-1])}), in-process {secs(inproc[-1])}"
                    )
                pod.stop()
            finally:
                pod.sp.stop()
            logged = logged_seconds(read_log(pod.sp.log_path))[1:]  # [0]: the first publish
            if len(logged) != k:
                raise BenchError(f"expected {k} switches in the log, got {len(logged)}")
            own = [s for s, _ in logged]
            bases_svc = sorted({base for _, base in logged})
            # Per switch: what the service adds to its own materialise (watch delay, reading
            # the pins, the thread hop, /status).
            added = [lat - o for lat, o in zip(latency, own, strict=True)]
            row = self.report.add(Row(case, "sidecar: swap -> /status reports the pin", latency))
            row.note = (
                f"p90 {secs(quantile(latency, 0.9))}; `current` swapped at "
                f"{secs(median(link_at))} (median); the sidecar's own materialise (log) "
                f"{secs(median(own))}, base {'/'.join(bases_svc)}"
            )
            row_in = self.report.add(Row(case, "`materialize()` in-process, same switches", inproc))
            row_in.note = f"base {'/'.join(sorted(set(bases_in)))}"
            self.report.ratio(
                f"switch, grace {grace:.0f} s: sidecar latency - in-process switch",
                ms(row.med - row_in.med),
                f"medians of the two rows; the watch delay alone is uniform 0-"
                f"{WATCH_INTERVAL * 1000:.0f} ms (mean {WATCH_INTERVAL * 500:.0f} ms)",
            )
            self.report.ratio(
                f"switch, grace {grace:.0f} s: per switch, latency - the sidecar's own materialise",
                f"{ms(median(added))} (max {ms(max(added))})",
                "watch delay + reading the pins + thread hop + /status, switch by switch",
            )
            self.report.ratio(
                f"switch, grace {grace:.0f} s: sidecar latency / in-process switch",
                f"{row.med / row_in.med:.2f}x",
                f"{secs(row.med)} / {secs(row_in.med)}",
            )
            rm(pod.workspace)
            rm(dest)

    # -- GC ----------------------------------------------------------------------------------------

    def _gc_cache(self, name: str, roots: bool) -> tuple[Path, str | None, str | None]:
        """A fresh cache: gc_objects in an unused revision (+ gc_roots in one in use)."""
        root = self.fresh(name)
        corpus = Corpus(root, self.seed + 1)
        corpus.grow(self.sizes.gc_objects, self.sizes.file_bytes)
        if not roots:
            settle()
            return root, None, None
        unused = corpus.small_revision(corpus.base)
        rng = random.Random(f"{self.seed}-gc-roots")
        kept = [
            corpus.put(rng.randbytes(self.sizes.file_bytes)) for _ in range(self.sizes.gc_roots)
        ]
        in_use = corpus.small_revision(kept)
        cache = NodeCache(root)
        for rev in (unused, in_use):  # parsed, as after any materialise on the node
            cache.load_manifest(Revision.parse(rev), Layout.DVC3)
        settle()
        return root, unused, in_use

    def bench_gc(self) -> None:
        n, kept = self.sizes.gc_objects, self.sizes.gc_roots
        case = f"3. GC: evict {n:,} unreferenced {self.sizes.file_bytes // KIB} KiB objects"
        self.log(f"{case}: ({kept:,} in use kept); caches written fresh per run")
        # Our watermarks are unreachable on purpose (evict all that is not in use), which
        # collect() reports as a warning every run.
        logging.getLogger("datapin_sidecar.node.housekeeping").setLevel(logging.ERROR)
        phases: dict[str, list[float]] = {}
        current: dict[str, float] = {}

        @contextlib.contextmanager
        def timing_phases() -> Iterator[None]:
            """Wrap gc's phase functions (in this process only) to time them."""
            originals = {
                "settled": evict.settled,
                "plan": evict.plan,
            }
            take = inventory.Inventory.__dict__["take"]

            def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*a: Any, **kw: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        current[name] = current.get(name, 0.0) + time.perf_counter() - t

                return wrapper

            evict.settled = timed("settle", originals["settled"])  # type: ignore[assignment]
            evict.plan = timed("plan", originals["plan"])  # type: ignore[assignment]
            inventory.Inventory.take = classmethod(  # type: ignore[method-assign,assignment]
                timed("inventory", take.__func__)
            )
            try:
                yield
            finally:
                evict.settled = originals["settled"]  # type: ignore[assignment]
                evict.plan = originals["plan"]  # type: ignore[assignment]
                inventory.Inventory.take = take  # type: ignore[method-assign]

        scans: list[float] = []
        dus: list[float] = []

        def run_gc(r: int) -> Sample:
            root, unused, in_use = self._gc_cache("gc", roots=True)
            assert unused is not None
            assert in_use is not None
            cache = NodeCache(root)
            # The scan and du of this same cache, in rotating order, before it is collected.
            for who in ("scan", "du") if r % 2 == 0 else ("du", "scan"):
                if who == "scan":
                    settle()
                    t = time.perf_counter()
                    objects, _size = inventory.scan(cache)
                    scans.append(time.perf_counter() - t)
                    if objects != n + kept + 2:
                        raise BenchError(f"scan found {objects}, expected {n + kept + 2}")
                else:
                    dus.append(run_timed(["du", "-s", root]).wall)
            wm = Watermarks(
                high_percent=0.002,
                low_percent=0.001,
                inodes_high_percent=0.002,
                inodes_low_percent=0.001,
            )
            current.clear()
            settle()
            cpu0 = time.thread_time()
            t = time.perf_counter()
            with timing_phases():
                report = evict.collect(cache, {(in_use, Layout.DVC3)}, wm)
            wall = time.perf_counter() - t
            cpu = time.thread_time() - cpu0
            for name, value in current.items():
                phases.setdefault(name, []).append(value)
            if report.evicted_objects != n + 1 or report.evicted_revisions != (unused,):
                raise BenchError(
                    f"GC evicted {report.evicted_objects} objects and "
                    f"{report.evicted_revisions}; expected {n + 1} and ({unused},)"
                )
            left = sum(len(f) for _, _, f in os.walk(root / "files"))
            if left != kept + 1:
                raise BenchError(f"{left} objects left after GC, expected {kept + 1}")
            rm(root)
            return Sample(wall=wall, cpu=cpu)

        def run_rm(_r: int) -> Sample:
            root, _, _ = self._gc_cache("rmtree", roots=False)
            return run_timed(["rm", "-rf", root])

        res = interleave(
            [("gc.collect", self.runs, run_gc), ("rm -rf", self.runs, run_rm)], self.log
        )
        col = self.report.add(
            Row(
                case,
                "`gc.collect()` in-process",
                [s.wall for s in res["gc.collect"]],
                [s.cpu for s in res["gc.collect"]],
            )
        )
        split = ", ".join(
            f"{name} {ms(median(values))}"
            for name, values in sorted(phases.items(), key=lambda kv: -median(kv[1]))
        )
        evict_only = col.med - sum(median(v) for v in phases.values())
        col.note = (
            f"{n / col.med:,.0f} objects/s; phases (medians): {split}, unlinks and the rest "
            f"~{ms(evict_only)}"
        )
        rmr = self.report.add(
            Row(
                case,
                f"`rm -rf` of an equivalent tree ({n:,} files, 256 dirs)",
                [s.wall for s in res["rm -rf"]],
                [s.cpu for s in res["rm -rf"]],
            )
        )
        rmr.note = f"{n / rmr.med:,.0f} objects/s"
        total = n + kept + 2
        sc = self.report.add(Row(case, f"`gc.scan()` of the same cache ({total:,} objects)", scans))
        sc.note = f"{total / sc.med:,.0f} objects/s"
        du = self.report.add(Row(case, "`du -s` of the same cache", dus))
        du.note = f"{total / du.med:,.0f} objects/s"
        self.report.ratio(
            "GC: gc.collect / rm -rf (time for the same number of objects)",
            f"{col.med / rmr.med:.2f}x",
            f"{n / col.med:,.0f} against {n / rmr.med:,.0f} objects/s",
        )
        self.report.ratio(
            "GC without the final settle wait: / rm -rf",
            f"{(col.med - median(phases.get('settle', [0.0]))) / rmr.med:.2f}x",
            "collect minus `_settled` (waiting for XFS's background inode freeing)",
        )
        self.report.ratio(
            "scan: gc.scan / du -s", f"{sc.med / du.med:.2f}x", "same cache, both warm"
        )


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def volume(size: str, workdir: Path) -> Iterator[tuple[Path, bool]]:
    """An XFS loop volume when this machine can make one, else a temporary directory."""
    try:
        check_xfs_available()
    except XfsUnavailable as exc:
        print(f"bench: no XFS volume ({exc.reason}); using a temp dir", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-", dir=workdir))
        try:
            yield tmp, False
        finally:
            rm(tmp)
        return
    with xfs_volume(size, workdir=workdir) as vol:
        yield vol, True


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_sidecar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (< 1 min)")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    p.add_argument("--runs", type=int, help="rounds per peer (default 5; quick 3)")
    p.add_argument("--switches", type=int, help="switches per grace setting (default 12; quick 4)")
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave real DVC out")
    p.add_argument("--dvc-timeout", type=float, default=600.0, help="cap per dvc run (s)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="for the XFS image")
    p.add_argument("--seed", type=int, default=4, help="PRNG seed of the data")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only, CASES)
    args.runs = args.runs or (3 if args.quick else 5)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_sidecar")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        files=base.files,
        file_bytes=base.file_bytes,
        gc_objects=base.gc_objects,
        gc_roots=base.gc_roots,
        switches=args.switches or base.switches,
        volume=base.volume,
    )
    dvc = find_dvc(args)
    command = shlex.join(["python", "-m", "bench.bench_sidecar", *argv])
    when = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    steps_done = 0
    with volume(sizes.volume, args.workdir) as (vol, xfs):
        bench = Bench(
            vol=vol,
            xfs=xfs,
            sizes=sizes,
            runs=args.runs,
            dvc=dvc,
            dvc_timeout=args.dvc_timeout,
            seed=args.seed,
        )
        steps = {
            "imports": bench.bench_imports,
            "ready": bench.bench_ready,
            "switch": bench.bench_switch,
            "gc": bench.bench_gc,
        }
        for case in CASES:
            if case in args.cases:
                steps[case]()
                steps_done += 1
        elapsed = time.monotonic() - bench.started
    where = (
        f"{sizes.volume} sparse XFS image (reflink=1) on a loop device in {args.workdir}"
        if xfs
        else f"a temporary directory in {args.workdir} (not root or no XFS: no reflinks; "
        "`cp --reflink=auto`)"
    )
    header = "\n".join(
        [
            f"## datapin sidecar-as-a-service benchmark, {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root"
            f"{', as root' if os.geteuid() == 0 else ''})",
            machine(),
            f"- datapin: `{sys.executable} -m datapin_sidecar.node.main|cli` importing a "
            f"private copy of {os.environ[SOURCE_ENV]}; DVC {dvc_version(dvc)}",
            f"- volume: {where}; {args.runs} rounds per peer; seed {args.seed}",
            f"- load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"whole run {elapsed / 60:.1f} min",
            "- times are wall clock from fork (medians); ready = `/readyz` answers 200; "
            "the sidecar runs with DATAPIN_WATCH_INTERVAL_SECONDS="
            f"{WATCH_INTERVAL}",
            *(
                ["- **--quick: a smoke test; sizes too small to read much into**"]
                if args.quick
                else []
            ),
        ]
    )
    note = f" ({steps_done} cases)"
    write_report(bench.report.render(header), when, name="sidecar", quick=args.quick, note=note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
