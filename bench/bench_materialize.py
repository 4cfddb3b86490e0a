"""Issue 2 benchmark: materialising pinned revisions, beside `cp --reflink` and `dvc checkout`.

    python -m bench.bench_materialize [--quick] [--only S,L,switch,noop,scale,profile]
                                      [--runs N] [--heavy-runs M] [--at COMMIT]

Run it from the repository root as root (it builds an XFS loop volume). It prints a markdown
report (measurements, ratios, PASS/MISS per target) and writes the same report to
bench/results/<UTC timestamp>.md. Timings are never pass/fail for tests: a MISS here is a
finding to explain in docs/benchmarks.md, not a failure (the exit code is 0 unless something
broke).

Design, and why:

* **One volume, one run, peers side by side.** Every case runs on the same fresh reflink XFS
  volume (`testkit.xfs.xfs_volume`, always torn down), and datapin and its peers take
  turns within each round (the starting peer rotates per round), so a noisy neighbour on this
  shared 2-core machine hits every peer alike. We quote medians (min-max beside them), never
  means, and ratios of medians.
* **Processes against processes.** datapin runs as its CLI (`datapin materialize --json`), like
  `cp` and `dvc`, timed from fork to `wait4`, which also yields the CPU time of each child's
  process tree. Peak RSS comes from `/usr/bin/time` (why: `run_timed`). The CLI's JSON
  `seconds` is the materialise alone, without interpreter start-up and imports (~65 ms): it
  is what the long-running sidecar pays, so it gets its own target rows ("in-process")
  wherever start-up could decide the outcome.
* **Warm, consistently.** Objects are in the node cache and the page cache; we never drop
  caches. Before every timed run we `sync`, so each starts from a clean XFS log and no
  writeback (or deferred inode freeing from the previous run's clean-up) is billed to the next
  tool. Deleting trees between runs is never timed.
* **Data straight into the cache.** 500k objects through the cache's verified, fsynced insert
  would take longer than the benchmark itself, so objects are written directly in the DVC 3
  layout (`files/md5/<2>/<30>`, mode 0444) and each `.dir` comes from `Manifest.dumps()`, which
  produces DVC's exact bytes. Contents come from seeded PRNGs (`random.Random`), so every run
  of a given size sees identical bytes; sizes are generated in index order, so the smaller
  revisions (10k, S) are prefixes of the larger ones and share objects.
* **Real DVC.** `dvc checkout` is DVC 3 itself in a git+DVC repo on the same volume whose
  `cache.dir` is the very node cache and `cache.type` is `reflink`; `data.dvc` is written by
  hand (md5, size, nfiles, `hash: md5`). It is the slowest peer, so its runs are fewer
  (`--heavy-runs`) and capped (`--dvc-timeout`).
* **One version of datapin.** Each CLI run imports the package afresh, and people edit and
  commit it while a long run goes on, so the benchmark first re-executes itself against a
  private copy of the package (the working tree as it is at start, or `--at COMMIT`) put first
  on PYTHONPATH; the report names what was copied.
* **Checked, not assumed.** The first run of every peer is checked: file counts, and one file
  of each output must share extents with the cache (`filefrag`), so no peer silently copied.

Tree layout: three directory levels, 100 files per leaf (`d00/d0/d0/f00.bin` ...). A switch
changes every 100th file (1%) to new content; the steady-state chain S0 -> S1 -> S2 ... changes
a different 1% at each step, so a recycled spare (two revisions back) differs by 2%. A steady
switch is measured twice, on two chains that share only S0: to a revision datapin has never
parsed, and to one whose `.dir` was parsed beforehand (as a sidecar can, once it knows the
next revision), which separates the O(files) parse from the O(changed) apply.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import os
import pstats
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision

from bench.harness import (
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
    at_most,
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
    pct,
    relpath,
    rm,
    run_timed,
    secs,
    settle,
    write_report,
)
from testkit.xfs import shared_extents, xfs_volume

CASES = ("S", "L", "switch", "noop", "scale", "profile")

# Targets from issue 2.
CP_SMALL_MAX = 1.5
DVC_MIN = 10.0
CP_LARGE_MAX = 1.2
SWITCH_MAX = 0.05
NOOP_MAX = 0.02
SCALE_MAX = 1.3
RSS_MAX = 256 * MIB


@dataclass(frozen=True, slots=True)
class Sizes:
    """Dataset sizes for one mode (full or `--quick`)."""

    small: int  # files in S
    small_bytes: int
    large: int  # files in L
    large_bytes: int
    scale: tuple[int, ...]
    volume: str  # sparse image size


FULL = Sizes(
    small=100_000,
    small_bytes=4 * KIB,
    large=8,
    large_bytes=512 * MIB,
    scale=(10_000, 100_000, 500_000),
    volume="12G",
)
QUICK = Sizes(
    small=2_000,
    small_bytes=4 * KIB,
    large=8,
    large_bytes=4 * MIB,
    scale=(500, 2_000, 5_000),
    volume="2G",
)


# -- data ---------------------------------------------------------------------------------------


# -- measuring ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Series:
    """The samples of one tool in one case."""

    case: str
    tool: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    @property
    def wall(self) -> float:
        return median([s.wall for s in self.samples])

    @property
    def cpu(self) -> float:
        return median([s.cpu for s in self.samples])

    @property
    def inproc(self) -> float:
        """Median of datapin's own `seconds` (no interpreter start-up)."""
        return median([float(s.result["seconds"]) for s in self.samples])

    @property
    def peak_rss(self) -> int:
        return max((s.maxrss for s in self.samples if s.maxrss is not None), default=0)

    @property
    def timed_out(self) -> int:
        return sum(s.timed_out for s in self.samples)


# -- formatting ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    series: list[Series] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def add(self, series: Series) -> Series:
        self.series.append(series)
        return series

    def render(self, header: str) -> str:
        lines = [header, "", "### Measurements", ""]
        lines += [
            "| case | tool | n | median | min-max | CPU (median) | notes |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for s in self.series:
            walls = [x.wall for x in s.samples]
            spread = f"{secs(min(walls))}-{secs(max(walls))}" if walls else "-"
            note = s.note + (f"; {s.timed_out} run(s) hit the time cap" if s.timed_out else "")
            lines.append(
                f"| {s.case} | {s.tool} | {len(s.samples)} | {secs(s.wall)} | {spread} "
                f"| {secs(s.cpu)} | {note} |"
            )
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


# -- tools under test ---------------------------------------------------------------------------


# -- the benchmark run --------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    vol: Path
    sizes: Sizes
    runs: int
    heavy_runs: int
    dvc: Path | None
    dvc_timeout: float
    seed: int
    report: Report = field(default_factory=Report)
    started: float = field(default_factory=time.monotonic)
    corpus: Corpus = field(init=False)
    cache: Path = field(init=False)
    scratch: Path = field(init=False)
    _n: int = 0
    _revs: dict[str, str] = field(default_factory=dict)
    _chains: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = self.vol / "cache"
        self.scratch = self.vol / "runs"
        self.scratch.mkdir(parents=True)
        self.corpus = Corpus(self.cache, self.seed)

    # -- helpers ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.scratch / f"{name}-{self._n}"

    def datapin(
        self, rev: str, dest: Path, *, expect: str | None = None, rss: bool = False
    ) -> Sample:
        sample = run_timed(
            [
                *datapin_cmd(),
                "materialize",
                "--cache",
                self.cache,
                "--rev",
                rev,
                "--dest",
                dest,
                "--json",
                "--quiet",
            ],
            rss=rss,
        )
        if expect is not None and sample.result["base"] != expect:
            raise BenchError(f"expected base {expect}, got {sample.result}")
        return sample

    def check_tree(self, who: str, root: Path, files: int, first: str) -> None:
        """The first run of each peer: right file count, and data shared with the cache."""
        found = count_files(root)
        if found != files:
            raise BenchError(f"{who}: {found} files under {root}, expected {files}")
        if not shared_extents(root / first):
            raise BenchError(f"{who}: {root / first} shares no extents: not a reflink")

    def small_files(self, n: int) -> None:
        if len(self.corpus.base) < n:
            t = time.monotonic()
            self.corpus.grow(n, self.sizes.small_bytes)
            settle()
            self.log(f"wrote {n} objects in {time.monotonic() - t:.1f}s")

    def rev_small(self, n: int) -> str:
        key = f"small-{n}"
        if key not in self._revs:
            self.small_files(n)
            self._revs[key] = self.corpus.small_revision(self.corpus.base[:n])
        return self._revs[key]

    def switch_chain(self, tag: str = "a") -> list[str]:
        """S0 -> S1 -> ..., each 1% different from the one before (see module doc)."""
        if tag not in self._chains:
            n = self.sizes.small
            self.small_files(n)
            steps = max(self.runs, self.heavy_runs) + 2
            self._chains[tag] = self.corpus.chain(n, steps, self.sizes.small_bytes, tag)
            settle()
        return self._chains[tag]

    def dvc_repo(self, name: str) -> DvcRepo | None:
        if self.dvc is None:
            return None
        return DvcRepo(self.vol / name, self.dvc, self.cache).create()

    # -- 1. warm S ----------------------------------------------------------------------------

    def bench_small(self) -> None:
        n = self.sizes.small
        rev = self.rev_small(n)
        case = f"1. warm S ({n:,} x {self.sizes.small_bytes // KIB} KiB)"
        self.log(f"{case}: preparing")
        src_dest = self.vol / "src-S"
        src = Path(self.datapin(rev, src_dest).result["tree"])
        repo = self.dvc_repo("dvc-S")
        if repo is not None:
            repo.point(rev, n, n * self.sizes.small_bytes)

        def run_datapin(r: int) -> Sample:
            dest = self.fresh("dp")
            sample = self.datapin(rev, dest, expect="fresh")
            if sample.result["modes"] != {"reflink": n}:
                raise BenchError(f"datapin did not reflink every file: {sample.result['modes']}")
            if r == 0:
                self.check_tree("datapin", dest / "current", n, relpath(0))
            rm(dest)
            return sample

        def run_cp(r: int) -> Sample:
            dest = self.fresh("cp")
            sample = run_timed(["cp", "-a", "--reflink=always", src, dest])
            if r == 0:
                self.check_tree("cp", dest, n, relpath(0))
            rm(dest)
            return sample

        def run_dvc(r: int) -> Sample:
            assert repo is not None
            repo.clear()
            sample = repo.checkout(self.dvc_timeout)
            if r == 0 and not sample.timed_out:
                self.check_tree("dvc", repo.data, n, relpath(0))
            return sample

        peers: list[Peer] = [("datapin", self.runs, run_datapin), ("cp", self.runs, run_cp)]
        if repo is not None:
            peers.append(("dvc", self.heavy_runs, run_dvc))
        res = interleave(peers, self.log)
        dp = self.report.add(Series(case, "datapin CLI", res["datapin"]))
        dp.note = f"in-process {secs(dp.inproc)}; {n} reflinks"
        cp = self.report.add(Series(case, "`cp -a --reflink=always`", res["cp"]))
        self.report.targets += [
            at_most("S: datapin CLI / cp", dp.wall / cp.wall, CP_SMALL_MAX),
            at_most("S: datapin in-process / cp", dp.inproc / cp.wall, CP_SMALL_MAX),
        ]
        if repo is not None:
            dv = self.report.add(Series(case, "`dvc checkout` (DVC 3.67, reflink)", res["dvc"]))
            capped = " (at least: runs hit the cap)" if dv.timed_out else ""
            self.report.targets.append(
                Target(
                    "S: dvc checkout / datapin CLI",
                    f"{dv.wall / dp.wall:.1f}x{capped}",
                    f">= {DVC_MIN:.0f}x",
                    dv.wall / dp.wall >= DVC_MIN,
                )
            )
            rm(repo.root)
        rm(src_dest)

    # -- 2. warm L ----------------------------------------------------------------------------

    def bench_large(self) -> None:
        n, size = self.sizes.large, self.sizes.large_bytes
        case = f"2. warm L ({n} x {size // MIB} MiB)"
        self.log(f"{case}: writing {n * size // MIB} MiB of objects")
        t = time.monotonic()
        md5s = [self.corpus.put_large(i, size) for i in range(n)]
        rev = self.corpus.revision([(f"shard-{i}.bin", m) for i, m in enumerate(md5s)])
        settle()
        self.log(f"wrote L in {time.monotonic() - t:.1f}s")
        src_dest = self.vol / "src-L"
        src = Path(self.datapin(rev, src_dest).result["tree"])

        def run_datapin(r: int) -> Sample:
            dest = self.fresh("dpL")
            sample = self.datapin(rev, dest, expect="fresh")
            if sample.result["modes"] != {"reflink": n}:
                raise BenchError(f"datapin did not reflink every file: {sample.result['modes']}")
            if r == 0:
                self.check_tree("datapin", dest / "current", n, "shard-0.bin")
            rm(dest)
            return sample

        def run_cp(r: int) -> Sample:
            dest = self.fresh("cpL")
            sample = run_timed(["cp", "-a", "--reflink=always", src, dest])
            if r == 0:
                self.check_tree("cp", dest, n, "shard-0.bin")
            rm(dest)
            return sample

        res = interleave([("datapin", self.runs, run_datapin), ("cp", self.runs, run_cp)], self.log)
        dp = self.report.add(Series(case, "datapin CLI", res["datapin"]))
        dp.note = f"in-process {secs(dp.inproc)}"
        cp = self.report.add(Series(case, "`cp -a --reflink=always`", res["cp"]))
        self.report.targets += [
            at_most("L: datapin CLI / cp", dp.wall / cp.wall, CP_LARGE_MAX),
            at_most("L: datapin in-process / cp", dp.inproc / cp.wall, CP_LARGE_MAX),
        ]
        rm(src_dest)

    # -- 3. switch ----------------------------------------------------------------------------

    def bench_switch(self) -> None:
        n = self.sizes.small
        case = f"3. switch S -> S' (1% of {n:,} changed)"
        self.small_files(n)
        chain = self.switch_chain()
        self.log(f"{case}: chain of {len(chain)} revisions")
        full: list[Sample] = []

        def run_first(_r: int) -> Sample:
            dest = self.fresh("sw1")
            full.append(self.datapin(chain[0], dest, expect="fresh"))
            sample = self.datapin(chain[1], dest, expect="published")
            rm(dest)
            return sample

        steady_dest = self.fresh("sw2")
        self.datapin(chain[0], steady_dest, expect="fresh")
        self.datapin(chain[1], steady_dest, expect="published")

        def run_steady(r: int) -> Sample:
            return self.datapin(chain[r + 2], steady_dest, expect="spare")

        # The same steady switches on a second chain, each target's `.dir` parsed beforehand
        # (untimed, in this process; the node cache keeps the parsed form), as a sidecar can
        # do once it knows the next revision. Separates the O(changed) apply from the
        # O(files) parse of a revision never seen before.
        chain_b = self.switch_chain("b")
        parsed_dest = self.fresh("sw3")
        self.datapin(chain_b[0], parsed_dest, expect="fresh")
        self.datapin(chain_b[1], parsed_dest, expect="published")

        def run_parsed(r: int) -> Sample:
            rev = Revision.parse(chain_b[r + 2])
            NodeCache(self.cache).load_manifest(rev, Layout.DVC3)
            return self.datapin(rev.oid, parsed_dest, expect="spare")

        repo = self.dvc_repo("dvc-switch")
        dvc_full: list[Sample] = []
        if repo is not None:
            repo.point(chain[0], n, n * self.sizes.small_bytes)
            dvc_full.append(repo.checkout(self.dvc_timeout))

        def run_dvc(r: int) -> Sample:
            assert repo is not None
            repo.point(chain[r + 1], n, n * self.sizes.small_bytes)
            return repo.checkout(self.dvc_timeout)

        peers: list[Peer] = [
            ("datapin first switch", self.runs, run_first),
            ("datapin steady switch", self.runs, run_steady),
            ("datapin steady switch, parsed", self.runs, run_parsed),
        ]
        if repo is not None:
            peers.append(("dvc", self.heavy_runs, run_dvc))
        res = interleave(peers, self.log)
        ref = self.report.add(Series(case, "datapin CLI, full warm S (reference)", full))
        ref.note = f"in-process {secs(ref.inproc)}; the fresh tree each first switch starts from"
        first = self.report.add(
            Series(case, "datapin CLI, first switch (base: published)", res["datapin first switch"])
        )
        r0 = first.samples[0].result
        first.note = (
            f"in-process {secs(first.inproc)}; reused {r0['reused']} (hardlinks), "
            f"linked {sum(r0['modes'].values())}"
        )
        steady = self.report.add(
            Series(case, "datapin CLI, steady switch (base: spare)", res["datapin steady switch"])
        )
        r1 = steady.samples[0].result
        steady.note = (
            f"in-process {secs(steady.inproc)}; spare is 2 revisions back: removed "
            f"{r1['removed']}, linked {sum(r1['modes'].values())}"
        )
        parsed = self.report.add(
            Series(
                case,
                "datapin CLI, steady switch, target `.dir` parsed beforehand",
                res["datapin steady switch, parsed"],
            )
        )
        parsed.note = f"in-process {secs(parsed.inproc)}; as above, without the parse"
        for label, s in (("first", first), ("steady", steady), ("steady, parsed ahead", parsed)):
            self.report.targets += [
                at_most(
                    f"switch, {label}: datapin CLI / full S", s.wall / ref.wall, SWITCH_MAX, pct
                ),
                at_most(
                    f"switch, {label}: datapin in-process / full S in-process",
                    s.inproc / ref.inproc,
                    SWITCH_MAX,
                    pct,
                ),
            ]
        rm(steady_dest)
        rm(parsed_dest)
        if repo is not None:
            dv = self.report.add(Series(case, "`dvc checkout` of the same switch", res["dvc"]))
            dv.note = (
                f"{pct(dv.wall / ref.wall)} of datapin full S; {dv.wall / steady.wall:.0f}x "
                f"datapin steady; its own full checkout took {secs(dvc_full[0].wall)}"
            )
            rm(repo.root)

    # -- 4. no-op -----------------------------------------------------------------------------

    def bench_noop(self) -> None:
        n = self.sizes.small
        rev = self.rev_small(n)
        case = f"4. no-op re-materialise of S ({n:,})"
        self.log(case)
        full: list[Sample] = []

        def run(_r: int) -> Sample:
            dest = self.fresh("noop")
            full.append(self.datapin(rev, dest, expect="fresh"))
            sample = self.datapin(rev, dest, expect="noop")
            rm(dest)
            return sample

        res = interleave([("datapin no-op", self.runs, run)], self.log)
        ref = self.report.add(Series(case, "datapin CLI, full warm S (reference)", full))
        ref.note = f"in-process {secs(ref.inproc)}"
        noop = self.report.add(Series(case, "datapin CLI, no-op", res["datapin no-op"]))
        noop.note = f"in-process {secs(noop.inproc)}"
        self.report.targets += [
            at_most("no-op: datapin CLI / full S", noop.wall / ref.wall, NOOP_MAX, pct),
            at_most(
                "no-op: datapin in-process / full S in-process",
                noop.inproc / ref.inproc,
                NOOP_MAX,
                pct,
            ),
        ]

    # -- 5. scale -----------------------------------------------------------------------------

    def bench_scale(self) -> None:
        sizes = self.sizes.scale
        case = "5. scale (4 KiB files, fresh dest)"
        revs = {n: self.rev_small(n) for n in sizes}
        self.log(f"{case}: {sizes}")

        def runner(n: int) -> Callable[[int], Sample]:
            def run(_r: int) -> Sample:
                dest = self.fresh(f"scale{n}")
                sample = self.datapin(revs[n], dest, expect="fresh", rss=True)
                rm(dest)
                return sample

            return run

        largest = max(sizes)
        peers: list[Peer] = [
            (f"{n}", self.heavy_runs if n == largest else self.runs, runner(n)) for n in sizes
        ]
        res = interleave(peers, self.log)
        per_file_wall, per_file_in = {}, {}
        for n in sizes:
            s = self.report.add(Series(case, f"datapin CLI, {n:,} files", res[f"{n}"]))
            per_file_wall[n] = s.wall / n
            per_file_in[n] = s.inproc / n
            s.note = (
                f"in-process {secs(s.inproc)}; {per_file_in[n] * 1e6:.1f} us/file in-process, "
                f"{per_file_wall[n] * 1e6:.1f} us/file wall (under /usr/bin/time); "
                f"peak RSS {s.peak_rss / MIB:.0f} MiB"
            )
        spread_in = max(per_file_in.values()) / min(per_file_in.values())
        spread_wall = max(per_file_wall.values()) / min(per_file_wall.values())
        rss = next(s for s in self.report.series if s.tool == f"datapin CLI, {largest:,} files")
        self.report.targets += [
            at_most("scale: max/min time per file, in-process", spread_in, SCALE_MAX),
            at_most("scale: max/min time per file, CLI wall", spread_wall, SCALE_MAX),
            Target(
                f"scale: peak RSS of datapin at {largest:,} files",
                f"{rss.peak_rss / MIB:.0f} MiB",
                f"<= {RSS_MAX // MIB} MiB",
                rss.peak_rss <= RSS_MAX,
            ),
        ]

    # -- where the time goes ------------------------------------------------------------------

    def bench_profile(self) -> None:
        n = self.sizes.small
        rev = self.rev_small(n)
        chain = self.switch_chain()
        self.log("profile: cProfile of an in-process warm S and steady switch; strace -c")
        dest = self.fresh("prof")
        lines = self._cprofile(f"one in-process warm materialise of S ({n:,} files)", rev, dest)
        rm(dest)
        dest = self.fresh("prof-switch")
        for step in chain[:2]:
            materialize(self._request(step, dest))
        lines += [""]
        lines += self._cprofile(
            f"one in-process steady-state switch of S (spare recycled, {n // 50:,} entries "
            "differ from it)",
            chain[2],
            dest,
        )
        rm(dest)
        lines += self._strace(rev, n)
        self.report.sections.append("\n".join(lines))

    def _request(self, rev: str, dest: Path) -> Request:
        return Request(
            cache=NodeCache(self.cache),
            revision=Revision.parse(rev),
            dest=dest,
            strategy=Strategy.AUTO,
        )

    def _cprofile(self, title: str, rev: str, dest: Path) -> list[str]:
        """`materialize()` in this process under cProfile; the top functions by own time."""
        request = self._request(rev, dest)
        settle()
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        result = materialize(request)
        profiler.disable()
        wall = time.perf_counter() - started
        stats = pstats.Stats(profiler, stream=io.StringIO())
        rows = []
        for func, (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((tottime, calls, cumtime, pstats.func_std_string(func)))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        lines = [
            f"### Profile: {title}",
            "",
            f"`materialize()` under cProfile: {secs(wall)} wall, profiler overhead included "
            f"(base: {result.base}). Top functions by own time:",
            "",
            "| own time | share | calls | cumulative | function |",
            "|---:|---:|---:|---:|---|",
        ]
        for tottime, calls, cumtime, name in rows[:14]:
            short = re.sub(r".*/(datapin_sidecar/)", r"\1", name)
            lines.append(
                f"| {secs(tottime)} | {pct(tottime / total)} | {calls} | {secs(cumtime)} "
                f"| `{short}` |"
            )
        return lines

    def _strace(self, rev: str, n: int) -> list[str]:
        if subprocess.run(["which", "strace"], capture_output=True).returncode != 0:
            return ["", "(strace not installed: no syscall counts)"]
        src_dest = self.fresh("prof-src")
        src = Path(self.datapin(rev, src_dest).result["tree"])
        out = [
            "",
            f"Syscalls for S (`strace -c -f`, {n:,} files; strace slows both alike):",
            "",
            "| tool | syscalls | per file | top calls |",
            "|---|---:|---:|---|",
        ]
        for tool, argv in (
            (
                "datapin CLI",
                [
                    *datapin_cmd(),
                    "materialize",
                    "--cache",
                    str(self.cache),
                    "--rev",
                    rev,
                    "--dest",
                    str(self.fresh("strace-dp")),
                    "--json",
                    "--quiet",
                ],
            ),
            ("cp -a --reflink=always", ["cp", "-a", "--reflink=always", str(src)]),
        ):
            if tool.startswith("cp"):
                argv.append(str(self.fresh("strace-cp")))
            log = self.fresh("strace").with_suffix(".txt")
            settle()
            subprocess.run(
                ["strace", "-c", "-f", "-o", str(log), *argv], check=True, capture_output=True
            )
            calls: list[tuple[int, str]] = []
            total = 0
            for line in log.read_text().splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
                if m is None:
                    continue
                if m.group(2) == "total":
                    total = int(m.group(1))
                else:
                    calls.append((int(m.group(1)), m.group(2)))
            calls.sort(reverse=True)
            top = ", ".join(f"{name} {count:,}" for count, name in calls[:7])
            out.append(f"| {tool} | {total:,} | {total / n:.1f} | {top} |")
        for path in self.scratch.iterdir():
            if path.name.startswith(("strace-", "prof-src")):
                rm(path)
        return out


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_materialize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (< 1 min)")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    p.add_argument("--runs", type=int, help="runs per peer (default 5; quick 3)")
    p.add_argument(
        "--heavy-runs", type=int, help="runs of dvc checkout and the largest scale (default 3)"
    )
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave real DVC out")
    p.add_argument("--dvc-timeout", type=float, default=1800.0, help="cap per dvc run (s)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="for the XFS image")
    p.add_argument("--seed", type=int, default=2, help="PRNG seed of the data")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only, CASES)
    args.runs = args.runs or (3 if args.quick else 5)
    args.heavy_runs = args.heavy_runs or (2 if args.quick else 3)
    if args.runs < 1 or args.heavy_runs < 1:
        p.error("--runs and --heavy-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_pinned(argv, parse_args, run, module="bench.bench_materialize")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    sizes = QUICK if args.quick else FULL
    dvc = find_dvc(args)
    command = shlex.join(["python", "-m", "bench.bench_materialize", *argv])
    when = dt.datetime.now(dt.UTC)
    state = os.environ[SOURCE_ENV]
    load_before = os.getloadavg()
    with xfs_volume(sizes.volume, workdir=args.workdir) as vol:
        bench = Bench(
            vol=vol,
            sizes=sizes,
            runs=args.runs,
            heavy_runs=args.heavy_runs,
            dvc=dvc,
            dvc_timeout=args.dvc_timeout,
            seed=args.seed,
        )
        steps = {
            "S": bench.bench_small,
            "L": bench.bench_large,
            "switch": bench.bench_switch,
            "noop": bench.bench_noop,
            "scale": bench.bench_scale,
            "profile": bench.bench_profile,
        }
        for case in CASES:
            if case in args.cases:
                steps[case]()
        elapsed = time.monotonic() - bench.started
    header = "\n".join(
        [
            f"## datapin materialise benchmark, {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root, as root)",
            machine(),
            f"- datapin: `{shlex.join(datapin_cmd())}` importing a private copy of {state}; "
            f"DVC {dvc_version(dvc)}",
            f"- volume: {sizes.volume} sparse XFS image (reflink=1) on a loop device in "
            f"{args.workdir}; runs {args.runs} per peer, heavy runs {args.heavy_runs}; "
            f"seed {args.seed}",
            f"- load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"whole run {elapsed / 60:.1f} min",
            "- times are wall clock of the whole process (fork to exit), medians; "
            '"in-process" is datapin\'s own `seconds` (no interpreter start-up)',
            *(
                ["- **--quick: a smoke test; at these sizes start-up decides the verdicts**"]
                if args.quick
                else []
            ),
        ]
    )
    write_report(bench.report.render(header), when, name="", quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
