"""Issue 15 benchmark: start-up of `datapin` and `datapin-sidecar run`, against DVC 3.

    python -m bench.bench_startup [--quick] [--runs N] [--sizes 1000,10000,100000]
                                  [--at COMMIT] [--no-dvc] [--plot PATH]

Run it from the repository root, as root (an XFS loop volume). It prints a markdown report
(measurements, ratios, targets with PASS/MISS, what each path imports) and writes it to
bench/results/<UTC>-startup.md; with `--plot PATH`, the figure of no-op time against revision
size goes to PATH (docs/img/startup.png in docs/benchmarks.md). Timings are findings, never
pass/fail: the exit code is 0 unless something broke.

What is timed, each in a fresh process from fork (`harness.run_timed`) to exit, or to ready:

* `python -c pass`: the floor, the interpreter and its site packages alone.
* `datapin --help` and `dvc --version`: start-up and argument parsing, nothing else.
* Per revision size (1k, 10k, 100k files of 256 bytes; quick: 1k), on a warm node: the objects
  and the parsed manifest in the node cache, byte code written, the revision already
  published. Peers:
  - `datapin materialize --json --quiet` of the revision already published at its destination
    (a directory remote, never read): the CLI no-op. Every timed run must report `noop`.
  - `datapin-sidecar run` of a pod whose workspace already serves the revision (a restarted
    sidecar container: same pod UID, pin from a downward-API annotations file written by
    `testkit.k8svolume.kubelet_update`, settings as `testkit.sidecarproc.SidecarProcess` builds
    them), from fork until `/readyz` answers 200 (polled every 1 ms with
    `bench_sidecar.probe`, which costs a refused connect while nothing listens). Each run must
    log `already serving`. SIGTERM and the exit are not timed (the exit must be 0).
  - the same with the pod's dataset on an S3 remote (https, as B2, at a port nobody listens
    on: a warm start must not contact it); the keys in the environment.
  - `dvc checkout` in a DVC 3 repository whose cache is the node cache (`cache.type reflink`)
    and whose data is already checked out: DVC's no-op. `--heavy-runs` at 100k files and up.

Design (the shared helpers are bench/harness.py's):

* **Console scripts, as users and the image run them** (`datapin`, `datapin-sidecar` next to
  this interpreter, the image's entrypoint), against a private copy of the package first on
  PYTHONPATH (`harness.main_pinned`; `--at COMMIT` for a baseline).
* **Warm means warm**: an untimed first run of every peer publishes (or checks out) and leaves
  byte code in the private copy's `__pycache__`; PYTHONDONTWRITEBYTECODE is never passed on.
  Every Python process gets the same PATH, HOME, LANG and PYTHONPATH and nothing else.
* **Peers side by side**: within a round the peers take turns and the first rotates
  (`harness.interleave`); medians with min-max, ratios of medians. `sync` before every run.
* **What each path imports**: `python -X importtime` of `--help`, the CLI no-op and `run` to
  ready (min of 3 per module), the biggest top-level imports, and the count of modules loaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datapin_sidecar.pins import ANNOTATION, format_downward_annotations

from bench.bench_sidecar import probe
from bench.harness import (
    SOURCE_ENV,
    BenchError,
    Corpus,
    DvcRepo,
    Sample,
    Target,
    at_most,
    check_pinned,
    count_files,
    datapin_cmd,
    dvc_version,
    find_dvc,
    interleave,
    machine,
    main_pinned,
    median,
    ratio,
    run_timed,
    secs,
    settle,
    write_report,
)
from bench.plot import Line, count_label, save_png, seconds_label
from testkit.k8svolume import kubelet_update
from testkit.launcher import free_ports
from testkit.sidecarproc import SidecarProcess
from testkit.xfs import xfs_volume

DATASET = "ds"
#: The sidecar peer whose dataset is an S3 remote (https, as B2), on the same warm node.
S3_RUN = "S3 dataset: `datapin-sidecar run` -> `/readyz` 200"
FILE_BYTES = 256  # a no-op never reads a file's bytes; small files keep the volume small
HELP_GOAL = 0.150  # seconds: `datapin --help` and the CLI no-op
READY_GOAL = 1.10  # `datapin-sidecar run` to ready / the CLI no-op
HEAVY = 100_000  # sizes from here run dvc `--heavy-runs` times


def sidecar_cmd() -> list[str]:
    """The `datapin-sidecar` console script next to this interpreter (as `datapin_cmd`)."""
    exe = Path(sys.executable).with_name("datapin-sidecar")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "datapin_sidecar.node.main"]


@dataclass(slots=True)
class Row:
    what: str
    files: int | None  # revision size, None for the size-independent peers
    values: list[float]
    note: str = ""

    @property
    def med(self) -> float:
        return median(self.values)


@dataclass(slots=True)
class Imports:
    """`-X importtime` of one path: modules loaded, top-level imports (min of the runs, us)."""

    path: str
    modules: int
    top: list[tuple[str, int]]


def with_importtime(argv: Sequence[str]) -> list[str]:
    """`argv` (a console script, or this interpreter with `-m`) under `-X importtime`."""
    if argv[0] == sys.executable:
        return [sys.executable, "-X", "importtime", *argv[1:]]
    return [sys.executable, "-X", "importtime", *argv]


def parse_importtime(text: str) -> dict[str, tuple[int, int]]:
    """{module: (cumulative us, depth)} from `-X importtime` lines (others are ignored)."""
    found: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", line)
        if m:
            found[m[4]] = (int(m[2]), (len(m[3]) - 1) // 2)
    return found


@dataclass(slots=True)
class Bench:
    vol: Path
    args: argparse.Namespace
    dvc: Path | None
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    imports: list[Imports] = field(default_factory=list)
    cache: Path = field(init=False)
    home: Path = field(init=False)
    remote: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    corpus: Corpus = field(init=False)

    def __post_init__(self) -> None:
        self.cache = self.vol / "cache"  # the sidecar's ROOT/cache, shared with the CLI
        self.home = self.vol / "home"
        self.remote = self.vol / "remote"  # an empty DVC directory remote: a no-op never reads it
        for d in (self.home, self.remote):
            d.mkdir(parents=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
        self.corpus = Corpus(self.cache, self.args.seed)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def timed(
        self, argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None
    ) -> Callable[[int], Sample]:
        def run(_r: int) -> Sample:
            return run_timed(argv, env=env or self.env, timeout=self.args.timeout)

        return run

    # -- size-independent --------------------------------------------------------------------

    def bench_fixed(self) -> None:
        self.log("floor, --help, dvc --version")
        peers: list[tuple[str, int, Callable[[int], Sample]]] = [
            ("`python -c pass`", self.args.runs, self.timed([sys.executable, "-c", "pass"])),
            ("`datapin --help`", self.args.runs, self.timed([*datapin_cmd(), "--help"])),
            (
                "`datapin-sidecar --help`",
                self.args.runs,
                self.timed([*sidecar_cmd(), "--help"]),
            ),
        ]
        if self.dvc is not None:
            env = {**self.env, "DVC_NO_ANALYTICS": "1"}
            peers.append(
                ("`dvc --version`", self.args.runs, self.timed([self.dvc, "--version"], env=env))
            )
        for _, _, fn in peers:
            fn(-1)  # untimed: byte code, page cache
        results = interleave(peers, self.log)
        for name, samples in results.items():
            self.rows.append(Row(name, None, [s.wall for s in samples]))

    # -- per size ---------------------------------------------------------------------------

    def bench_size(self, n: int) -> None:
        t = time.monotonic()
        self.corpus.grow(n, FILE_BYTES)
        rev = self.corpus.small_revision(self.corpus.base[:n])
        settle()
        self.log(f"{n:,} files: revision {rev} in the cache ({time.monotonic() - t:.1f}s)")

        dest = self.vol / f"cli-{n}"
        cli = [
            *datapin_cmd(),
            "materialize",
            "--cache",
            str(self.cache),
            "--dest",
            str(dest),
            "--rev",
            rev,
            "--remote",
            str(self.remote),
            "--json",
            "--quiet",
        ]
        first = run_timed(cli, env=self.env, timeout=self.args.timeout)
        if first.result["noop"] or first.result["files"] != n:
            raise BenchError(f"the first CLI run was no publish of {n} files: {first.out}")

        def run_cli(_r: int) -> Sample:
            sample = run_timed(cli, env=self.env, timeout=self.args.timeout)
            if not sample.result["noop"]:
                raise BenchError(f"the CLI did not find {rev} published: {sample.out}")
            return sample

        pod = Pod(self, n, rev)
        pod.ready()  # untimed: publishes the pod's workspace
        if pod.noops():
            raise BenchError("the sidecar's first run found its workspace already served")

        def run_sidecar(r: int) -> Sample:
            sample = pod.ready()
            if pod.noops() != r + 1:
                raise BenchError(f"sidecar run {r + 1} did not find {rev} already served")
            return sample

        s3_pod = Pod(self, n, rev, s3=True)
        s3_pod.ready()  # untimed: publishes its workspace from the warm cache

        def run_s3_sidecar(r: int) -> Sample:
            sample = s3_pod.ready()
            if s3_pod.noops() != r + 1:
                raise BenchError(f"S3 sidecar run {r + 1} did not find {rev} already served")
            return sample

        peers: list[tuple[str, int, Callable[[int], Sample]]] = [
            ("`python -c pass`", self.args.runs, self.timed([sys.executable, "-c", "pass"])),
            ("`datapin materialize` (no-op)", self.args.runs, run_cli),
            ("`datapin-sidecar run` -> `/readyz` 200", self.args.runs, run_sidecar),
            (S3_RUN, self.args.runs, run_s3_sidecar),
        ]
        if self.dvc is not None:
            repo = DvcRepo(self.vol / f"dvc-{n}", self.dvc, self.cache).create()
            repo.point(rev, n, n * FILE_BYTES)
            repo.checkout(self.args.dvc_timeout)  # untimed: checks the data out
            if count_files(repo.data) != n:
                raise BenchError(f"dvc checkout made {count_files(repo.data)} files, not {n}")
            runs = self.args.heavy_runs if n >= HEAVY else self.args.runs

            def run_dvc(_r: int) -> Sample:
                return repo.checkout(self.args.dvc_timeout)

            peers.append(("`dvc checkout` (no-op)", runs, run_dvc))
        results = interleave(peers, self.log)
        for name, samples in results.items():
            note = ""
            if name.startswith("`datapin materialize`"):
                own = median([float(s.result["seconds"]) for s in samples])
                note = f"its own `seconds` (the engine's no-op): {secs(own)}"
            self.rows.append(Row(name, n, [s.wall for s in samples], note))
        if n == min(self.args.sizes):
            self.bench_imports(cli, pod)

    # -- imports ----------------------------------------------------------------------------

    def bench_imports(self, cli: list[str], pod: Pod) -> None:
        self.log("imports: -X importtime of --help, the CLI no-op and sidecar run, 3 runs each")
        paths: list[tuple[str, Callable[[], dict[str, tuple[int, int]]]]] = [
            ("`datapin --help`", lambda: self.importtime([*datapin_cmd(), "--help"])),
            ("`datapin materialize` (no-op)", lambda: self.importtime(cli)),
            ("`datapin-sidecar run` to ready", pod.importtime),
        ]
        for name, fn in paths:
            best: dict[str, tuple[int, int]] = {}
            counts = []
            for _ in range(3):
                found = fn()
                counts.append(len(found))
                for module, (us, depth) in found.items():
                    if module not in best or us < best[module][0]:
                        best[module] = (us, depth)
            top = sorted(
                ((m, us) for m, (us, depth) in best.items() if depth == 0), key=lambda x: -x[1]
            )
            self.imports.append(Imports(name, int(median(counts)), top[:10]))

    def importtime(self, argv: list[str]) -> dict[str, tuple[int, int]]:
        proc = subprocess.run(
            with_importtime(argv), env=self.env, capture_output=True, text=True, check=False
        )
        return parse_importtime(proc.stderr)

    # -- the report -------------------------------------------------------------------------

    def find(self, what: str, n: int | None) -> Row | None:
        return next((r for r in self.rows if r.what.startswith(what) and r.files == n), None)

    def render(self, when: dt.datetime) -> str:
        a = self.args
        lines = [
            f"## Start-up (issue 15), {when:%Y-%m-%d %H:%M} UTC",
            "",
            machine(),
            f"- DVC: {dvc_version(self.dvc)}",
            f"- datapin: {os.environ.get(SOURCE_ENV, 'unknown')}",
            f"- `python -m bench.bench_startup {' '.join(a.argv)}`".rstrip() + ": "
            f"{a.runs} runs per peer ({a.heavy_runs} for dvc at >= {HEAVY:,} files), "
            f"revisions of {', '.join(f'{n:,}' for n in a.sizes)} files x {FILE_BYTES} B on a "
            "reflink XFS loop volume, warm (objects, parsed manifest, byte code; the revision "
            "already published)",
            "",
            "### Measurements",
            "",
            "| what | files | n | median | min-max | notes |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            files = "-" if r.files is None else f"{r.files:,}"
            spread = f"{secs(min(r.values))}-{secs(max(r.values))}"
            lines.append(
                f"| {r.what} | {files} | {len(r.values)} | {secs(r.med)} | {spread} | {r.note} |"
            )
        floor = self.find("`python -c pass`", None)
        helps = self.find("`datapin --help`", None)
        ratios: list[tuple[str, str]] = []
        targets: list[Target] = []
        if helps is not None:
            targets.append(at_most("`datapin --help`", helps.med, HELP_GOAL, secs))
            if floor is not None:
                ratios.append(("`datapin --help` - `python -c pass`", secs(helps.med - floor.med)))
        for n in a.sizes:
            cli = self.find("`datapin materialize`", n)
            run = self.find("`datapin-sidecar run`", n)
            dvc = self.find("`dvc checkout`", n)
            if cli is None or run is None:
                continue
            targets.append(at_most(f"CLI no-op, {n:,} files", cli.med, HELP_GOAL, secs))
            targets.append(
                at_most(
                    f"sidecar `run` ready / CLI no-op, {n:,} files", run.med / cli.med, READY_GOAL
                )
            )
            base = self.find("`python -c pass`", n) or floor  # the floor of the same rounds
            if base is not None:
                ratios.append(
                    (f"CLI no-op - `python -c pass`, {n:,} files", secs(cli.med - base.med))
                )
                ratios.append(
                    (f"sidecar ready - `python -c pass`, {n:,} files", secs(run.med - base.med))
                )
            ratios.append((f"sidecar ready / CLI no-op, {n:,} files", ratio(run.med / cli.med)))
            if dvc is not None:
                ratios.append(
                    (f"`dvc checkout` no-op / CLI no-op, {n:,} files", ratio(dvc.med / cli.med))
                )
        dvc_v = self.find("`dvc --version`", None)
        if dvc_v is not None and helps is not None:
            ratios.append(("`dvc --version` / `datapin --help`", ratio(dvc_v.med / helps.med)))
        lines += [
            "",
            "### Ratios and differences (of medians)",
            "",
            "| what | value |",
            "|---|---:|",
        ]
        lines += [f"| {w} | {v} |" for w, v in ratios]
        lines += [
            "",
            "### Targets",
            "",
            "| target | measured | goal | result |",
            "|---|---:|---:|---|",
        ]
        lines += [t.row() for t in targets]
        if self.imports:
            lines += [
                "",
                f"### What each path imports (`-X importtime`, {min(a.sizes):,} files)",
                "",
            ]
            for imp in self.imports:
                top = ", ".join(f"`{m}` {us / 1000:.1f} ms" for m, us in imp.top)
                lines.append(f"- {imp.path}: {imp.modules} modules; biggest top-level: {top}")
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        series = [
            ("datapin materialize (no-op)", "`datapin materialize`", False),
            ("datapin-sidecar run -> ready", "`datapin-sidecar run`", False),
            ("the same, S3 dataset (https)", S3_RUN, True),
            ("dvc checkout (no-op)", "`dvc checkout`", False),
        ]
        lines = []
        for label, what, dashed in series:
            points = [
                (float(r.files), r.med) for r in self.rows if r.what.startswith(what) and r.files
            ]
            lines.append(Line(label=label, points=points, dashed=dashed))
        floors = [
            (float(r.files), r.med) for r in self.rows if r.what == "`python -c pass`" and r.files
        ]
        lines.append(Line(label="python -c pass (the floor)", points=floors, dashed=True))
        save_png(
            path,
            title="No-op on a warm node: revision already published (median of fresh processes)",
            x_label="files in the revision",
            y_label="seconds, fork to exit (sidecar: to /readyz 200)",
            lines=lines,
            x_format=count_label,
            y_format=seconds_label,
            note=os.environ.get(SOURCE_ENV, ""),
        )
        self.log(f"figure written to {path}")


class Pod:
    """One pod's `datapin-sidecar run`, restarted for every round (same UID, same workspace)."""

    def __init__(self, bench: Bench, n: int, rev: str, *, s3: bool = False) -> None:
        self.bench = bench
        uid = str(uuid.uuid4())
        podinfo = bench.home / f"podinfo-{n}{'-s3' if s3 else ''}"
        pins = json.dumps({DATASET: {"pin": rev, "ref": f"bench-{n}"}})
        kubelet_update(
            podinfo,
            {"annotations": format_downward_annotations({ANNOTATION: pins})},
            "2026_12_02_00_00_00.1",
        )
        dataset: dict[str, str] = {"name": DATASET, "remote": str(bench.remote)}
        if s3:  # as a B2 bucket over https; warm, so never contacted (nothing listens there)
            (port,) = free_ports(1)
            dataset |= {"remote": "s3://bench/store", "endpoint_url": f"https://127.0.0.1:{port}"}
        self.sp = SidecarProcess(
            "run",
            bench.home,
            {
                "root": str(bench.vol),
                "pod_uid": uid,
                "pod_name": f"bench-{n}",
                "pod_namespace": "bench",
                "datasets": [dataset],
                "annotations_file": str(podinfo / "annotations"),
                "log_format": "json",
            },
        )
        self.sp.env.update(bench.env)
        if s3:
            self.sp.env |= {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "bench"}
        self.argv = [*sidecar_cmd(), "run"]

    def spawn(self, argv: Sequence[str]) -> float:
        settle()
        with self.sp.log_path.open("ab") as log:
            started = time.perf_counter()
            self.sp.proc = subprocess.Popen(
                argv,
                env=self.sp.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return started

    def wait_ready(self, started: float) -> float:
        assert self.sp.proc is not None
        while probe(self.sp.port, "/readyz")[0] != 200:
            if self.sp.proc.poll() is not None:
                raise BenchError(
                    f"sidecar exited {self.sp.proc.returncode}:\n{self.sp.output()[-3000:]}"
                )
            if time.perf_counter() - started > self.bench.args.timeout:
                raise BenchError(f"sidecar not ready in time:\n{self.sp.output()[-3000:]}")
            time.sleep(0.001)
        return time.perf_counter() - started

    def stop(self) -> None:
        code = self.sp.stop()
        if code != 0:
            raise BenchError(f"sidecar exited {code} on SIGTERM:\n{self.sp.output()[-3000:]}")

    def ready(self) -> Sample:
        try:
            wall = self.wait_ready(self.spawn(self.argv))
        finally:
            self.stop()
        return Sample(wall=wall, cpu=float("nan"))

    def noops(self) -> int:
        """How many runs found the revision already served (their `already serving` lines)."""
        return self.sp.output().count('"msg": "already serving')

    def importtime(self) -> dict[str, tuple[int, int]]:
        mark = self.sp.log_path.stat().st_size if self.sp.log_path.exists() else 0
        try:
            self.wait_ready(self.spawn(with_importtime(self.argv)))
        finally:
            assert self.sp.proc is not None
            self.sp.proc.send_signal(signal.SIGTERM)
            self.sp.proc.wait(30)
        with self.sp.log_path.open("rb") as f:
            f.seek(mark)
            return parse_importtime(f.read().decode(errors="replace"))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_startup", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="1k files only, 3 runs: a smoke test")
    p.add_argument("--runs", type=int, default=7, help="runs per peer (default 7)")
    p.add_argument("--heavy-runs", type=int, default=3, help=f"dvc runs at >= {HEAVY:,} files")
    p.add_argument("--sizes", default="1000,10000,100000", help="revision sizes, files")
    p.add_argument("--at", help="measure datapin as of this commit (default: the working tree)")
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave DVC out")
    p.add_argument("--dvc-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=120.0, help="cap per datapin run, seconds")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the image lives")
    p.add_argument("--volume", default="6G", help="size of the sparse XFS image")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument(
        "--plot", type=Path, help="write the PNG figure here (e.g. docs/img/startup.png)"
    )
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.quick:
        args.sizes, args.runs, args.heavy_runs = [1000], min(args.runs, 3), min(args.heavy_runs, 2)
    return args


def run(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    check_pinned()
    dvc = find_dvc(args)
    when = dt.datetime.now(dt.UTC)
    with xfs_volume(args.volume, workdir=args.workdir) as vol:
        bench = Bench(vol, args, dvc)
        bench.bench_fixed()
        for n in args.sizes:
            bench.bench_size(n)
        text = bench.render(when)
        if args.plot is not None:
            bench.plot(args.plot)
    write_report(text, when, name="startup", quick=args.quick)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_startup")


if __name__ == "__main__":
    raise SystemExit(main())
