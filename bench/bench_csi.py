"""Issue 14 benchmark: publishing a dataset into a pod in CSI mode, beside copying a tree.

    python -m bench.bench_csi [--quick] [--only warm,first,disk,phases] [--sizes 10000,100000]
                              [--runs N] [--heavy-runs M] [--dvc-runs K] [--disk-files N]
                              [--no-dvc] [--no-grpc] [--plot PNG] [--at COMMIT]
    python -m bench.bench_csi --replot REPORT.md --plot PNG   # redraw a run's figure

Run it from the repository root as root (it builds an XFS loop volume and mounts). It prints a
markdown report (measurements, ratios, PASS/MISS per target) and writes it to
bench/results/<UTC>-csi.md. A MISS is a finding for docs/benchmarks.md, not a failure.

Cases:

* `warm`: a revision whose shared tree is already built on the node, at each size (default
  10k, 100k and 1M files of 4 KiB). datapin: `TreeStore.ensure` (finds the tree: one readlink)
  and `Publisher.publish` into a new pod's target (the binds), what the agent does for a
  `NodePublishVolume` after the proof of access. The same publish through the path a pod's
  kubelet uses: `NodePublishVolume` over the plugin's unix socket, served by the real
  `serve_node_plugin` and `NodePlugin` (Dataset from kmock's API emulator, remote on a real
  SeaweedFS, pin pre-proven: `bench/csigrpc.py` says what that means). Peers: `cp -a
  --reflink=always` of the same tree, the sidecar mode's `materialize` into a fresh
  workspace (reflinks from the cache), and DVC 3's `dvc checkout` of the same revision into
  an empty workspace of a git+DVC repo whose cache is the node cache (`cache.type reflink`,
  `harness.DvcRepo`, as in issue 2's benchmark). Targets: the publish time is flat across
  sizes (largest within 1.5x of the smallest) and at least 20x faster than cp at 100k, for
  the in-process publish and over gRPC. `--plot` draws time against files, log-log
  (`bench/plot.py`).
* `first`: the first publish on a node (tree not built, objects cached): `ensure` builds the
  tree with the engine, then publish; beside `cp -a --reflink=always`. Target: at most 1.2x cp.
* `phases`: where a warm publish over gRPC goes, at 100k files (or the largest size): the
  in-process publish, `NodePlugin.publish` called directly (API read, remote opened, proof
  looked up, publish), the same over gRPC, and the Dataset GET and the remote's open/close
  alone, interleaved (`bench/csigrpc.py`). Not in the default `--only`: run it by name.
* `disk`: 10 pods using one revision (`--disk-files`, default 100k): inodes and bytes used on
  the volume (statvfs before and after, synced), CSI mode (one shared tree, 10 volumes) beside
  10 sidecar workspaces.

How it measures, and why (the harness's conventions, `bench/harness.py`):

* **In-process for datapin**, because the agent is a long-running process: a publish is timed
  with `perf_counter` around the coroutines on one event loop (thread hops included). `cp` is
  a process timed from fork to wait4 (`run_timed`); its start-up (~1 ms) is noise at these
  sizes. The sidecar's materialise is in-process too, as the sidecar runs it.
* **Peers in rounds, rotating who starts** (`interleave`); medians, min-max beside them, ratios
  of medians. `sync` before every timed run; clean-up (unpublish, deleting copies) untimed.
* **Checked, not assumed:** the first run of each peer counts the files and checks that one
  file shares extents with the cache (`filefrag`), and the publish's target shows the tree.
* Data: `harness.Corpus` writes 4 KiB objects straight into the node cache (DVC 3 layout),
  seeded; smaller revisions are prefixes of larger ones.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.publisher import Publisher
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision

from bench.csigrpc import GrpcRig
from bench.harness import (
    KIB,
    SOURCE_ENV,
    BenchError,
    Corpus,
    DvcRepo,
    Peer,
    Target,
    add_at_option,
    at_most,
    check_pinned,
    chosen_cases,
    count_files,
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
    settle,
    write_report,
)
from bench.plot import Line, count_label, save_png, seconds_label
from testkit.csinode import CsiNode
from testkit.xfs import shared_extents, xfs_volume

CASES = ("warm", "first", "disk", "phases")
FILE_BYTES = 4 * KIB
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 5_000)
FLAT_MAX = 1.5  # largest size's warm publish / smallest's
CP_FACTOR_MIN = 20.0  # cp of the 100k tree / warm publish
FIRST_MAX = 1.2  # first publish / cp
PODS = 10
_T = TypeVar("_T")

#: The warm case's peers: key -> the report's tool column (`--replot` reads it back).
TOOLS = {
    "publish": "datapin CSI: ensure (warm) + publish",
    "grpc": "datapin CSI: `NodePublishVolume` over gRPC",
    "cp": "`cp -a --reflink=always` of the tree",
    "sidecar": "datapin sidecar mode: materialise, fresh workspace",
    "dvc": "`dvc checkout` (DVC 3, reflink), empty workspace",
}
WARM_CASE = "1. warm publish ({n:,} x 4 KiB)"
#: The warm case's peers: (key, label in the plot), in the plot's order.
CURVES = (
    ("publish", "datapin CSI: publish (in-process)"),
    ("grpc", "datapin CSI: NodePublishVolume over gRPC"),
    ("cp", "cp -a --reflink=always"),
    ("sidecar", "datapin sidecar mode: materialise"),
    ("dvc", "dvc checkout (DVC 3, reflink)"),
)


@dataclass(slots=True)
class Series:
    case: str
    tool: str
    walls: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def wall(self) -> float:
        return median(self.walls)

    def row(self) -> str:
        spread = f"{secs(min(self.walls))}-{secs(max(self.walls))}" if self.walls else "-"
        return (
            f"| {self.case} | {self.tool} | {len(self.walls)} | {secs(self.wall)} | {spread} "
            f"| {self.note} |"
        )


@dataclass(slots=True)
class Bench:
    vol: Path
    sizes: tuple[int, ...]
    runs: int
    heavy_runs: int
    seed: int
    dvc: Path | None = None
    dvc_runs: int = 3
    dvc_timeout: float = 1800.0
    grpc: bool = True
    series: list[Series] = field(default_factory=list)
    #: peer -> files -> median wall time, from the warm case (the plot's data)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    repo: DvcRepo | None = None
    rig: GrpcRig | None = None
    targets: list[Target] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    node: CsiNode = field(init=False)
    corpus: Corpus = field(init=False)
    store: TreeStore = field(init=False)
    publisher: Publisher = field(init=False)
    loop: asyncio.AbstractEventLoop = field(init=False)
    _revs: dict[int, Revision] = field(default_factory=dict)
    _n: int = 0

    def __post_init__(self) -> None:
        self.node = CsiNode(self.vol / "bench")
        self.corpus = Corpus(self.node.cache.root, self.seed)
        self.publisher = Publisher(self.node.root)
        self.store = TreeStore(
            self.node.root, self.node.cache, references=self.publisher.referenced_keys
        )
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # grpc.aio binds to the current loop
        (self.vol / "runs").mkdir()
        if self.dvc is not None:
            self.repo = DvcRepo(self.vol / "dvc", self.dvc, self.node.cache.root).create()

    def start_grpc(self) -> GrpcRig:
        if self.rig is None:
            self.log("starting the node plugin on its socket (SeaweedFS, API emulator)")
            rig = GrpcRig(
                workdir=self.vol.parent / f"{self.vol.name}-grpc",
                kubelet_dir=self.node.kubelet,
                root=self.node.root,
                cache=self.node.cache,
                trees=self.store,
                publisher=self.publisher,
            )
            self.rig = rig
            self.run(rig.start())
        return self.rig

    def close(self) -> None:
        try:
            if self.rig is not None:
                self.run(self.rig.close())
        finally:
            self.loop.close()
            self.node.close()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.vol / "runs" / f"{name}-{self._n}"

    def revision(self, n: int) -> Revision:
        if n not in self._revs:
            if len(self.corpus.base) < n:
                t = time.monotonic()
                self.corpus.grow(n, FILE_BYTES)
                settle()
                self.log(f"wrote {n:,} objects in {time.monotonic() - t:.1f}s")
            self._revs[n] = Revision.parse(self.corpus.small_revision(self.corpus.base[:n]))
        return self._revs[n]

    def runs_for(self, n: int) -> int:
        return self.heavy_runs if n >= 1_000_000 else self.runs

    # -- the peers ----------------------------------------------------------------------------

    def publish(self, rev: Revision, *, check: int | None = None) -> float:
        """One pod's ensure + publish (timed), then its unpublish (untimed)."""
        request = self.node.request(rev)

        async def go() -> float:
            t = time.perf_counter()
            tree = await self.store.ensure(rev, LayoutChoice.AUTO, None)
            await self.publisher.publish(request, tree)
            return time.perf_counter() - t

        settle()
        wall = self.run(go())
        if check is not None:
            self.check_tree("publish", request.target_path / "current", check)
        self.run(
            self.publisher.unpublish(volume_id=request.volume_id, target_path=request.target_path)
        )
        return wall

    def cp(self, src: Path, *, check: int | None = None) -> float:
        dest = self.fresh("cp")
        wall = run_timed(["cp", "-a", "--reflink=always", src, dest]).wall
        if check is not None:
            self.check_tree("cp", dest, check)
        rm(dest)
        return wall

    def sidecar(self, rev: Revision, *, check: int | None = None) -> float:
        """The sidecar mode's materialise into a fresh pod workspace (in-process)."""
        ws = self.fresh("ws")
        request = Request(
            cache=self.node.cache, revision=rev, dest=ws / "data", state=ws / ".state" / "data"
        )
        settle()
        t = time.perf_counter()
        materialize(request)
        wall = time.perf_counter() - t
        if check is not None:
            self.check_tree("sidecar", ws / "data" / "current", check)
        rm(ws)
        return wall

    def grpc_publish(self, rev: Revision, *, check: int | None = None) -> float:
        """One pod's `NodePublishVolume` over the socket (timed), then its unpublish."""
        assert self.rig is not None
        settle()

        def checker(current: Path) -> None:
            if check is not None:
                self.check_tree("gRPC publish", current, check)

        return self.run(self.rig.publish(rev, check=checker))

    def dvc_checkout(self, rev: Revision, n: int, *, check: bool) -> float:
        """`dvc checkout` of `rev` into an empty workspace (the cache holds every object)."""
        repo = self.repo
        assert repo is not None
        repo.point(rev.oid, n, n * FILE_BYTES)
        repo.clear()
        sample = repo.checkout(self.dvc_timeout)
        if sample.timed_out:
            raise BenchError(f"dvc checkout of {n:,} files hit the {self.dvc_timeout:.0f} s cap")
        if check:
            self.check_tree("dvc checkout", repo.data, n)
        repo.clear()
        return sample.wall

    def check_tree(self, who: str, root: Path, files: int) -> None:
        found = count_files(root)
        if found != files:
            raise BenchError(f"{who}: {found} files under {root}, expected {files}")
        if not shared_extents(root / relpath(0)):
            raise BenchError(f"{who}: {root / relpath(0)} shares no extents with the cache")

    # -- cases --------------------------------------------------------------------------------

    def bench_warm(self) -> None:
        if self.grpc:
            self.start_grpc()
        for n in self.sizes:
            self._warm(n)
        curves = self.curves
        for key, how in (("publish", "in-process"), ("grpc", "over gRPC")):
            if key not in curves:
                continue
            per_size = curves[key]
            smallest, largest = min(per_size), max(per_size)
            if largest != smallest:
                self.targets.append(
                    at_most(
                        f"warm publish ({how}) {largest:,} / {smallest:,} files",
                        per_size[largest] / per_size[smallest],
                        FLAT_MAX,
                    )
                )
            ref = 100_000 if 100_000 in per_size else largest
            factor = curves["cp"][ref] / per_size[ref]
            self.targets.append(
                Target(
                    f"cp -a --reflink=always / warm publish ({how}) at {ref:,} files",
                    f"{factor:,.0f}x",
                    f">= {CP_FACTOR_MIN:.0f}x",
                    factor >= CP_FACTOR_MIN,
                )
            )

    def _warm(self, n: int) -> None:
        rev = self.revision(n)
        case = WARM_CASE.format(n=n)
        self.log(f"{case}: building the shared tree")
        tree = self.run(self.store.ensure(rev, LayoutChoice.AUTO, None))
        runs = self.runs_for(n)
        if self.rig is not None:
            self.run(self.rig.prove(rev, objects=n))

        def check(r: int) -> int | None:
            return n if r == 0 else None

        peers: list[Peer] = [
            ("publish", runs, lambda r: self.publish(rev, check=check(r))),
            ("cp", runs, lambda r: self.cp(tree, check=check(r))),
            ("sidecar", runs, lambda r: self.sidecar(rev, check=check(r))),
        ]
        if self.rig is not None:
            peers.insert(1, ("grpc", runs, lambda r: self.grpc_publish(rev, check=check(r))))
        if self.repo is not None:
            dvc_runs = min(self.dvc_runs, runs)
            peers.append(("dvc", dvc_runs, lambda r: self.dvc_checkout(rev, n, check=r == 0)))
        res = interleave(peers, self.log, describe=secs)
        pub = self.add(Series(case, TOOLS["publish"], res["publish"]))
        grpc = self.add(Series(case, TOOLS["grpc"], res["grpc"])) if "grpc" in res else None
        cp = self.add(Series(case, TOOLS["cp"], res["cp"]))
        side = self.add(Series(case, TOOLS["sidecar"], res["sidecar"]))
        pub.note = f"{cp.wall / pub.wall:,.0f}x faster than cp"
        if grpc is not None:
            grpc.note = (
                f"{cp.wall / grpc.wall:,.0f}x faster than cp; "
                f"{grpc.wall / pub.wall:.1f}x in-process"
            )
        side.note = f"{side.wall / cp.wall:.2f}x cp"
        if "dvc" in res:
            dvc = self.add(Series(case, TOOLS["dvc"], res["dvc"]))
            dvc.note = f"{dvc.wall / cp.wall:.2f}x cp; {dvc.wall / pub.wall:,.0f}x publish"
        for key, walls in res.items():
            self.curves.setdefault(key, {})[n] = median(walls)

    def bench_first(self) -> None:
        n = 100_000 if 100_000 in self.sizes else max(self.sizes)
        rev = self.revision(n)
        case = f"2. first publish on the node ({n:,} x 4 KiB, objects cached)"
        self.log(case)
        src = self.run(self.store.ensure(rev, LayoutChoice.AUTO, None))
        src_copy = self.fresh("src")
        run_timed(["cp", "-a", "--reflink=always", src, src_copy])

        def first(r: int) -> float:
            key = rev.md5
            if not self.run(self.store.remove(key)) and self.store.find_key(key) is not None:
                raise BenchError(f"tree {key} could not be removed before a first publish")
            return self.publish(rev, check=n if r == 0 else None)

        res = interleave(
            [
                ("first", self.runs, first),
                ("cp", self.runs, lambda r: self.cp(src_copy, check=n if r == 0 else None)),
            ],
            self.log,
            describe=secs,
        )
        pub = self.add(
            Series(case, "datapin CSI: ensure (builds the tree) + publish", res["first"])
        )
        cp = self.add(Series(case, "`cp -a --reflink=always` of the tree", res["cp"]))
        pub.note = f"{pub.wall / cp.wall:.2f}x cp"
        self.targets.append(at_most("first publish / cp", pub.wall / cp.wall, FIRST_MAX))
        rm(src_copy)

    def bench_phases(self) -> None:
        n = 100_000 if 100_000 in self.sizes else max(self.sizes)
        rev = self.revision(n)
        rig = self.start_grpc()
        self.log(f"4. where a warm publish over gRPC goes ({n:,} files)")
        self.run(self.store.ensure(rev, LayoutChoice.AUTO, None))
        self.run(rig.prove(rev, objects=n))

        def timed(coro: Callable[[], Coroutine[Any, Any, float]]) -> Callable[[int], float]:
            def once(_r: int) -> float:
                settle()
                return self.run(coro())

            return once

        steps = (
            ("publish", "`TreeStore.ensure` + `Publisher.publish` in-process"),
            ("backend", "`NodePlugin.publish` (no gRPC)"),
            ("grpc", "`NodePublishVolume` over gRPC"),
            ("api", "Dataset GET from the API emulator"),
            ("remote", "open + close the Dataset's S3 remote"),
        )
        peers: list[Peer] = [
            ("publish", self.runs, lambda r: self.publish(rev)),
            ("backend", self.runs, timed(lambda: rig.backend_publish(rev))),
            ("grpc", self.runs, lambda r: self.grpc_publish(rev)),
            ("api", self.runs, timed(rig.dataset_get)),
            ("remote", self.runs, timed(rig.remote_open_close)),
        ]
        res = interleave(peers, self.log, describe=secs)
        med = {key: median(res[key]) for key, _ in steps}
        rows = [
            f"### 4. Where a warm publish over gRPC goes ({n:,} files, medians of {self.runs})",
            "",
            "| step | median | min-max |",
            "|---|---:|---:|",
        ]
        for key, label in steps:
            walls = res[key]
            rows.append(f"| {label} | {secs(med[key])} | {secs(min(walls))}-{secs(max(walls))} |")
        rows += [
            "",
            f"`NodePlugin.publish` adds {secs(med['backend'] - med['publish'])} to the "
            f"in-process publish (API read, remote, proof look-up); gRPC, protobuf and parsing "
            f"add {secs(med['grpc'] - med['backend'])} to that.",
        ]
        self.sections.append("\n".join(rows))

    def bench_disk(self, files: int) -> None:
        rev = self.revision(files)
        self.log(f"3. disk cost of {PODS} pods using one {files:,}-file revision")
        self.run(self.store.remove(rev.md5))

        requests = [self.node.request(rev) for _ in range(PODS)]

        async def csi() -> None:
            tree = await self.store.ensure(rev, LayoutChoice.AUTO, None)
            for request in requests:
                await self.publisher.publish(request, tree)

        tree_only = self.used(lambda: self.run(self.store.ensure(rev, LayoutChoice.AUTO, None)))
        self.run(self.store.remove(rev.md5))
        csi_cost = self.used(lambda: self.run(csi()))
        for request in requests:
            self.run(
                self.publisher.unpublish(
                    volume_id=request.volume_id, target_path=request.target_path
                )
            )
        workspaces = [self.fresh("ws") for _ in range(PODS)]

        def sidecar() -> None:
            for ws in workspaces:
                materialize(
                    Request(
                        cache=self.node.cache,
                        revision=rev,
                        dest=ws / "data",
                        state=ws / ".state" / "data",
                    )
                )

        side_cost = self.used(sidecar)
        for ws in workspaces:
            rm(ws)
        rows = [
            f"### 3. Disk cost of {PODS} pods using one {files:,}-file revision",
            "",
            "statvfs of the volume before and after (synced): inodes and bytes used.",
            "",
            "| mode | inodes | bytes | per pod |",
            "|---|---:|---:|---|",
            f"| CSI: the shared tree alone | {tree_only[0]:,} | {tree_only[1] / 2**20:.1f} MiB "
            "| - |",
            f"| CSI: shared tree + {PODS} published volumes | {csi_cost[0]:,} "
            f"| {csi_cost[1] / 2**20:.1f} MiB | {(csi_cost[0] - tree_only[0]) / PODS:,.0f} inodes, "
            f"{(csi_cost[1] - tree_only[1]) / PODS / KIB:,.0f} KiB beyond the tree |",
            f"| sidecar: {PODS} workspaces | {side_cost[0]:,} | {side_cost[1] / 2**20:.1f} MiB "
            f"| {side_cost[0] / PODS:,.0f} inodes, {side_cost[1] / PODS / 2**20:.1f} MiB |",
            "",
            f"CSI uses {side_cost[0] / max(csi_cost[0], 1):.1f}x fewer inodes and "
            f"{side_cost[1] / max(csi_cost[1], 1):.1f}x fewer bytes than the sidecar mode.",
        ]
        self.sections.append("\n".join(rows))

    def used(self, action: Callable[[], object]) -> tuple[int, int]:
        """(inodes, bytes) the volume uses more after `action` than before (synced)."""

        def now() -> tuple[int, int]:
            settle()
            time.sleep(1)  # XFS frees inodes of deleted trees in the background (inodegc)
            settle()
            st = os.statvfs(self.vol)
            return st.f_files - st.f_ffree, (st.f_blocks - st.f_bfree) * st.f_frsize

        before = now()
        action()
        after = now()
        return after[0] - before[0], after[1] - before[1]

    def add(self, series: Series) -> Series:
        self.series.append(series)
        return series

    def render(self, header: str) -> str:
        lines = [header]
        if self.series:
            lines += ["", "### Measurements", ""]
            lines += ["| case | tool | n | median | min-max | notes |"]
            lines += ["|---|---|---:|---:|---:|---|"]
            lines += [s.row() for s in self.series]
        if self.targets:
            lines += ["", "### Targets", "", "| target | measured | goal | result |"]
            lines += ["|---|---|---|---|"]
            lines += [t.row() for t in self.targets]
        for section in self.sections:
            lines += ["", section]
        return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[int, float]], path: Path, note: str) -> None:
    """The warm case as time against files, log-log (`bench/plot.py`)."""
    lines = [
        Line(label=label, points=sorted(curves[key].items()), dashed=key == "grpc")
        for key, label in CURVES
        if key in curves
    ]
    save_png(
        path,
        title="Warm publish of a revision already on the node (4 KiB files)",
        x_label="files in the revision",
        y_label="wall time, median",
        lines=lines,
        x_format=count_label,
        y_format=seconds_label,
        note=note,
    )
    print(f"bench: plot written to {path}", file=sys.stderr)


def plot_note(day: str, runs: int, heavy: int, dvc: int) -> str:
    return (
        f"{day}, 2 shared vCPUs, XFS reflinks; medians of {runs} runs ({min(dvc, runs)} of dvc), "
        f"{heavy} at 1M files ({min(dvc, heavy)} of dvc); python -m bench.bench_csi"
    )


def curves_from_report(text: str) -> dict[str, dict[int, float]]:
    """The warm case's medians, read back from a report's Measurements table (`--replot`)."""
    keys = {tool: key for key, tool in TOOLS.items()}
    curves: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        case = re.fullmatch(r"1\. warm publish \(([\d,]+) x 4 KiB\)", cells[0])
        if case is None or len(cells) < 4 or cells[1] not in keys:
            continue
        value, unit = cells[3].split()
        scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
        n = int(case.group(1).replace(",", ""))
        curves.setdefault(keys[cells[1]], {})[n] = float(value.replace(",", "")) * scale
    if not curves:
        raise BenchError("no warm-publish rows in that report")
    return curves


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_csi",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (< 1 min)")
    p.add_argument("--only", default="warm,first,disk", help=f"comma list of {','.join(CASES)}")
    p.add_argument("--sizes", help="comma list of file counts for `warm` (default 10k,100k,1M)")
    p.add_argument("--disk-files", type=int, help="files of the `disk` revision (default 100k)")
    p.add_argument("--runs", type=int, help="runs per peer (default 5; quick 3)")
    p.add_argument("--heavy-runs", type=int, default=2, help="runs per peer at 1M files")
    p.add_argument(
        "--dvc-runs",
        type=int,
        default=3,
        help="runs of dvc checkout (at most --runs / --heavy-runs)",
    )
    p.add_argument("--dvc", type=Path, help="DVC 3 executable (default .tools/dvc3/bin/dvc)")
    p.add_argument("--no-dvc", action="store_true", help="leave dvc checkout out")
    p.add_argument("--dvc-timeout", type=float, default=1800.0, help="cap per dvc run (s)")
    p.add_argument(
        "--no-grpc", action="store_true", help="leave the publish over gRPC out (no SeaweedFS)"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw the warm case to this PNG")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="REPORT",
        help="with --plot: draw the warm case of an earlier report (no run, no root)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="for the XFS image")
    p.add_argument("--seed", type=int, default=14, help="PRNG seed of the data")
    add_at_option(p)
    args = p.parse_args(argv)
    args.cases = chosen_cases(p, args.only, CASES)
    default_sizes = QUICK_SIZES if args.quick else FULL_SIZES
    args.sizes = (
        tuple(sorted(int(s) for s in args.sizes.split(","))) if args.sizes else default_sizes
    )
    args.disk_files = args.disk_files or (max(args.sizes) if args.quick else 100_000)
    args.runs = args.runs or (3 if args.quick else 5)
    if min(args.sizes) < 1 or args.runs < 1 or args.heavy_runs < 1 or args.dvc_runs < 1:
        p.error("sizes and runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.replot is not None:
        if args.plot is None:
            raise SystemExit("bench_csi: --replot needs --plot PNG")
        text = args.replot.read_text()
        when = re.search(r"benchmark, (\d{4}-\d\d-\d\d)", text)
        runs = re.search(r"runs (\d+) per peer \((\d+) at 1M files\), dvc checkout (\d+)", text)
        if when is None or runs is None:
            raise SystemExit(f"bench_csi: {args.replot} is not a bench_csi report")
        plot(
            curves_from_report(text),
            args.plot,
            plot_note(when.group(1), *(int(g) for g in runs.groups())),
        )
        return 0
    return main_pinned(argv, parse_args, run, module="bench.bench_csi")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_pinned()
    dvc = find_dvc(args, "dvc checkout left out") if "warm" in args.cases else None
    command = shlex.join(["python", "-m", "bench.bench_csi", *argv])
    when = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    biggest = max(*args.sizes, args.disk_files)
    volume = f"{max(4, biggest * 40 // 1_000_000 + 4)}G"  # ~40 KiB per file, all copies at once
    with xfs_volume(volume, workdir=args.workdir) as vol:
        bench = Bench(
            vol=vol,
            sizes=args.sizes,
            runs=args.runs,
            heavy_runs=args.heavy_runs,
            seed=args.seed,
            dvc=dvc,
            dvc_runs=args.dvc_runs,
            dvc_timeout=args.dvc_timeout,
            grpc=not args.no_grpc,
        )
        try:
            if "warm" in args.cases:
                bench.bench_warm()
            if "first" in args.cases:
                bench.bench_first()
            if "disk" in args.cases:
                bench.bench_disk(args.disk_files)
            if "phases" in args.cases:
                bench.bench_phases()
            leftover = mounts.mounts_under(vol / "bench" / "node" / "csi")
            if leftover:
                raise BenchError(f"mounts left after the run: {leftover}")
        finally:
            bench.close()
        elapsed = time.monotonic() - bench.started
    header = "\n".join(
        [
            f"## datapin CSI publish benchmark, {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root, as root)",
            machine(),
            f"- datapin: in-process, a private copy of {os.environ[SOURCE_ENV]}; "
            f"DVC {dvc_version(dvc)}",
            f"- volume: {volume} sparse XFS image (reflink=1) on a loop device in "
            f"{args.workdir}; runs {args.runs} per peer ({args.heavy_runs} at 1M files), "
            f"dvc checkout {args.dvc_runs} (at most that); seed {args.seed}",
            f"- load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"whole run {elapsed / 60:.1f} min",
            "- wall-clock medians; datapin timed in-process (the agent is long-running), cp "
            "and dvc as processes from fork to exit; over gRPC: the `NodePublishVolume` call, "
            "kubelet's client in the same process and loop (bench/csigrpc.py)",
            *(["- **--quick: a smoke test**"] if args.quick else []),
        ]
    )
    write_report(bench.render(header), when, name="csi", quick=args.quick)
    if args.plot is not None and bench.curves:
        plot(
            bench.curves,
            args.plot,
            plot_note(f"{when:%Y-%m-%d}", args.runs, args.heavy_runs, args.dvc_runs),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
