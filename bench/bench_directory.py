"""Issue 15 benchmark: cold materialise from a DVC directory remote, beside `dvc pull` and cp.

    python -m bench.bench_directory [--quick] [--only small,large,xfs-small,xfs-large,sizes]
                                    [--runs N] [--jobs 8] [--at COMMIT] [--plot PATH]

Run it from the repository root as root (it builds an XFS loop volume). It prints a markdown
report (medians, ratios, PASS/MISS per target) and writes it to
bench/results/<UTC timestamp>-directory.md. A MISS is a finding, not a failure: the exit code
is 0 unless something broke.

Cases (`--only`, comma list):

* `small`: 20,000 objects of 4 KiB, the remote on the root filesystem (`--workdir`, /var/tmp).
* `large`: 4 objects of 1 GiB, the remote on the root filesystem.
* `xfs-small`, `xfs-large`: the same with the remote on the XFS volume that holds the caches
  (reflinks possible: datapin clones large objects and hashes the clone, dvc clones and
  hashes nothing, cp clones).
* `sizes`: 1,000 and 5,000 objects of 4 KiB on the root filesystem, for the plot (time against
  revision size, with `small` as its 20,000 point).

Peers, each cold (its outputs deleted, untimed, before every run), all writing to one fresh
reflink XFS loop volume (`testkit.xfs.xfs_volume`):

* datapin: `datapin materialize --cache C --dest D --rev REV --remote REMOTE_DIR`: copy every
  object into a cold node cache (md5-checked, made durable by `syncfs` before it is named),
  then build and publish the tree.
* dvc pull: DVC 3 (`harness.DvcRepo`, `cache.type reflink`, the directory as its default
  remote, `dvc pull -j JOBS`): copy into its cache (reflink, else `shutil.copyfile`), then
  check out with reflinks. It neither hashes what it copies nor flushes it.
* cp: `cp -r REMOTE/files OUT`, the remote's objects copied and nothing else: a floor.

Target: dvc pull / datapin >= 2x in `small` and `large` (the issue's "at least 2x faster than
`dvc pull` from the same remote"); the xfs cases are reported beside them.

What is timed and why (the shared helpers are bench/harness.py's):

* **Processes against processes**, fork to exit (`harness.run_timed`, `sync` before each run,
  so no earlier writeback is billed). datapin `syncfs`es what it copied before installing it;
  dvc and cp flush nothing, so their writeback may finish after their clock stops: the figures
  favour them by exactly the durability datapin promises and they do not.
* **Peers side by side** (`harness.interleave`: rounds, rotating who starts), medians of
  `--runs` (default 3), ratios of medians.
* **Same concurrency**: `--jobs` (default 8, DVC's own default for a local remote on this 2-core
  machine and datapin's `DirectoryRemote.DEFAULT_JOBS`) goes to `dvc pull -j` and to datapin's
  `--jobs` (which the CLI, as of this writing, hands to S3 remotes only: a directory remote
  runs its default 8 jobs, so keep `--jobs 8` for like against like).
* **Checked, not assumed**: the first run of each peer is checked (file count, sizes, the md5 of
  a sample of files against the manifest).
* **One version of datapin** (`harness.main_pinned`): a private copy of the working tree, or of
  `--at COMMIT`, so edits during a run never mix into it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    GIB,
    KIB,
    MIB,
    SOURCE_ENV,
    BenchError,
    Corpus,
    DvcRepo,
    Peer,
    Sample,
    Target,
    add_at_option,
    check_pinned,
    chosen_cases,
    count_files,
    datapin_cmd,
    dvc_version,
    find_dvc,
    interleave,
    machine,
    main_pinned,
    median,
    relpath,
    rm,
    run_timed,
    secs,
    write_report,
)
from bench.plot import Line, count_label, save_png, seconds_label
from testkit.xfs import xfs_volume

CASES = ("small", "large", "xfs-small", "xfs-large", "sizes")
PEERS = ("datapin", "dvc", "cp")
TARGET = 2.0


@dataclass(frozen=True, slots=True)
class Sizes:
    small: int  # objects of 4 KiB in `small`
    sizes: tuple[int, ...]  # extra plot points
    large: int  # bytes of each of the 4 large objects
    volume: str


FULL = Sizes(small=20_000, sizes=(1_000, 5_000), large=GIB, volume="24G")
QUICK = Sizes(small=2_000, sizes=(200, 500), large=64 * MIB, volume="4G")


@dataclass(frozen=True, slots=True)
class Dataset:
    """One revision in a directory remote of its own (so `cp -r` copies exactly it)."""

    name: str
    remote: Path
    rev: str
    entries: tuple[tuple[str, str], ...]  # (relpath, md5)
    file_bytes: int  # per file

    @property
    def files(self) -> int:
        return len(self.entries)


@dataclass(slots=True)
class Bench:
    vol: Path
    base: Path
    sizes: Sizes
    args: argparse.Namespace
    dvc: Path | None
    started: float = field(default_factory=time.monotonic)
    sections: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    medians: dict[str, dict[str, float]] = field(default_factory=dict)
    _n: int = 0

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.vol / f"{name}-{self._n}"

    # -- data -----------------------------------------------------------------------------------

    def small(self, name: str, n: int, where: Path) -> Dataset:
        corpus = Corpus(where / f"remote-{name}", seed=self.args.seed)
        corpus.grow(n, 4 * KIB)
        entries = tuple((relpath(i), m) for i, m in enumerate(corpus.base[:n]))
        return Dataset(name, corpus.cache, corpus.revision(entries), entries, 4 * KIB)

    def large(self, name: str, where: Path) -> Dataset:
        corpus = Corpus(where / f"remote-{name}", seed=self.args.seed)
        entries = tuple((f"part-{i}.bin", corpus.put_large(i, self.sizes.large)) for i in range(4))
        return Dataset(name, corpus.cache, corpus.revision(entries), entries, self.sizes.large)

    # -- checks ---------------------------------------------------------------------------------

    def check_tree(self, who: str, root: Path, ds: Dataset) -> None:
        found = count_files(root)
        if found != ds.files:
            raise BenchError(f"{who}: {found} files in {root}, expected {ds.files}")
        step = max(1, ds.files // 50)
        for rel, md5 in ds.entries[::step][:50]:
            path = root / rel
            if path.stat().st_size != ds.file_bytes:
                raise BenchError(f"{who}: {path} is not {ds.file_bytes} bytes")
            small = ds.file_bytes <= 64 * MIB  # the large ones: sizes only (seconds each)
            if small and hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() != md5:
                raise BenchError(f"{who}: {path} does not hash to {md5}")

    # -- peers ----------------------------------------------------------------------------------

    def peers(self, ds: Dataset, runs: int) -> list[Peer]:
        jobs = str(self.args.jobs)

        def run_datapin(r: int) -> Sample:
            cache, dest = self.fresh("dp-cache"), self.fresh("dp-dest")
            argv = [
                *datapin_cmd(),
                "materialize",
                "--cache",
                str(cache),
                "--dest",
                str(dest),
                "--rev",
                ds.rev,
                "--remote",
                str(ds.remote),
                "--jobs",
                jobs,
                "--json",
                "--quiet",
            ]
            sample = run_timed(argv, timeout=self.args.timeout)
            result = sample.result
            if result["misses"] != ds.files or result["base"] != "fresh":
                raise BenchError(f"datapin: not a cold full materialise: {result}")
            if r == 0:
                self.check_tree("datapin", dest / "current", ds)
            rm(dest)
            rm(cache)
            return sample

        def run_cp(r: int) -> Sample:
            out = self.fresh("cp")
            sample = run_timed(["cp", "-r", ds.remote / "files", out], timeout=self.args.timeout)
            if r == 0 and count_files(out) != ds.files + 1:  # and the .dir
                raise BenchError(f"cp: {count_files(out)} files in {out}, not {ds.files + 1}")
            rm(out)
            return sample

        peers: list[Peer] = [("datapin", runs, run_datapin), ("cp", runs, run_cp)]
        if self.dvc is not None:
            repo = DvcRepo(self.vol / f"dvc-{ds.name}", self.dvc, self.vol / f"dvc-{ds.name}-c")
            repo.create()
            repo.point(ds.rev, ds.files, ds.files * ds.file_bytes)
            add: list[str | Path] = [self.dvc, "remote", "add", "-d", "dir", ds.remote]
            subprocess.run(add, cwd=repo.root, env=repo.env, check=True, capture_output=True)

            def clear() -> None:
                for path in (repo.data, repo.cache, repo.root / ".dvc" / "tmp"):
                    rm(path)

            def run_dvc(r: int) -> Sample:
                clear()
                sample = run_timed(
                    [repo.dvc, "pull", "-j", jobs],
                    cwd=repo.root,
                    env=repo.env,
                    timeout=self.args.timeout,
                )
                if r == 0:
                    self.check_tree("dvc", repo.data, ds)
                clear()
                return sample

            peers.insert(1, ("dvc", runs, run_dvc))
        return peers

    def measure(self, ds: Dataset, title: str, *, target: bool) -> None:
        self.log(f"{title}: {ds.files:,} files, revision {ds.rev}, remote {ds.remote}")
        results = interleave(self.peers(ds, self.args.runs), self.log)
        med = {name: median([s.wall for s in samples]) for name, samples in results.items()}
        cpu = {name: median([s.cpu for s in samples]) for name, samples in results.items()}
        self.medians[ds.name] = med
        rows = [
            "| peer | median | min - max | CPU (median) | / datapin |",
            "|---|---|---|---|---|",
        ]
        for name in PEERS:
            if name not in results:
                continue
            walls = [s.wall for s in results[name]]
            rows.append(
                f"| {name} | {secs(med[name])} | {secs(min(walls))} - {secs(max(walls))} | "
                f"{secs(cpu[name])} | {med[name] / med['datapin']:.2f}x |"
            )
        self.sections.append(f"### {title}\n\n" + "\n".join(rows))
        if target and "dvc" in med:
            speedup = med["dvc"] / med["datapin"]
            self.targets.append(
                Target(
                    f"{title}: dvc pull / datapin",
                    f"{speedup:.2f}x",
                    f">= {TARGET:.0f}x",
                    speedup >= TARGET,
                )
            )

    # -- cases ----------------------------------------------------------------------------------

    def run_case(self, case: str) -> None:
        n = self.sizes.small
        large = self.sizes.large // MIB
        if case == "small":
            ds = self.small("small", n, self.base)
            self.measure(ds, f"{n:,} x 4 KiB, remote on the root filesystem", target=True)
        elif case == "large":
            ds = self.large("large", self.base)
            title = f"4 x {large} MiB, remote on the root filesystem"
            self.measure(ds, title, target=True)
        elif case == "xfs-small":
            ds = self.small("xfs-small", n, self.vol)
            self.measure(ds, f"{n:,} x 4 KiB, remote on the cache's XFS volume", target=False)
        elif case == "xfs-large":
            ds = self.large("xfs-large", self.vol)
            self.measure(ds, f"4 x {large} MiB, remote on the cache's XFS volume", target=False)
        else:
            for k in self.sizes.sizes:
                ds = self.small(f"s{k}", k, self.base)
                self.measure(ds, f"{k:,} x 4 KiB, remote on the root filesystem", target=False)
                rm(ds.remote)
            return
        rm(ds.remote)

    def plot(self, path: Path) -> None:
        points: dict[str, list[tuple[float, float]]] = {p: [] for p in PEERS}
        for name, med in self.medians.items():
            if name == "small" or (name.startswith("s") and name[1:].isdigit()):
                files = self.sizes.small if name == "small" else int(name[1:])
                for peer, wall in med.items():
                    points[peer].append((files, wall))
        labels = {"datapin": "datapin materialize", "dvc": "dvc pull", "cp": "cp -r (floor)"}
        lines = [Line(label=labels[p], points=pts) for p, pts in points.items() if pts]
        save_png(
            path,
            title="Cold materialise from a DVC directory remote (4 KiB objects)",
            x_label="objects in the revision",
            y_label="wall time (median)",
            lines=lines,
            x_format=count_label,
            y_format=seconds_label,
            note=f"remote on the root fs (ext4), cache on XFS; --jobs {self.args.jobs}; "
            f"{os.environ.get(SOURCE_ENV, '')}",
        )
        self.log(f"plot written to {path}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    p.add_argument("--runs", type=int, help="runs per peer (default 3; quick 1)")
    p.add_argument("--jobs", type=int, default=8, help="concurrency of datapin and dvc pull")
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave dvc pull out")
    p.add_argument("--timeout", type=float, default=900.0, help="cap per run (s)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="image, root remotes")
    p.add_argument("--seed", type=int, default=15, help="PRNG seed of the data")
    p.add_argument("--plot", type=Path, help="write the size plot (PNG) here (needs `sizes`)")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only, CASES)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1 or args.jobs < 1:
        p.error("--runs and --jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_directory")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    sizes = QUICK if args.quick else FULL
    dvc = find_dvc(args, "dvc pull left out")
    command = shlex.join(["python", "-m", "bench.bench_directory", *argv])
    when = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="datapin-bench-dir-", dir=args.workdir))
    try:
        with xfs_volume(sizes.volume, workdir=args.workdir) as vol:
            bench = Bench(vol=vol, base=base, sizes=sizes, args=args, dvc=dvc)
            for case in CASES:
                if case in args.cases:
                    bench.run_case(case)
            if args.plot is not None:
                bench.plot(args.plot)
            elapsed = time.monotonic() - bench.started
    finally:
        shutil.rmtree(base, ignore_errors=True)
    header = "\n".join(
        [
            f"## datapin directory-remote benchmark (issue 15), {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root, as root)",
            machine(),
            f"- datapin: `{shlex.join(datapin_cmd())}` importing a private copy of "
            f"{os.environ[SOURCE_ENV]}",
            f"- peers: DVC {dvc_version(dvc)} (`dvc pull -j {args.jobs}`, cache.type reflink); "
            "`cp -r REMOTE/files OUT`",
            f"- remotes in {args.workdir} (root filesystem) or on the volume (xfs cases); "
            f"caches and outputs on a {sizes.volume} sparse XFS image (reflink=1) on a loop "
            f"device; runs {args.runs}; seed {args.seed}",
            f"- load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"whole run {elapsed / 60:.1f} min",
            "- wall clock of the whole process (fork to exit), medians; every run cold, the "
            "remote's files in the page cache (written just before)",
            *(["- **--quick: a smoke test; sizes too small for verdicts**"] if args.quick else []),
        ]
    )
    targets = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    targets += [t.row() for t in bench.targets]
    text = "\n\n".join([header, *bench.sections, "### Targets\n\n" + "\n".join(targets)]) + "\n"
    text += "\n<!-- medians: " + json.dumps(bench.medians) + " -->\n"
    write_report(text, when, name="directory", quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
