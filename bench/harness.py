"""The harness the benchmarks share: timing processes, rotating peers, pinning the measured
source, formatting and writing reports, and the data and tools several benchmarks use.

Each `bench/bench_*.py` is one benchmark (its cases, its targets, its report's header); what
they have in common is here, once:

* **Processes against processes.** :func:`run_timed` times a command from fork to `wait4`,
  which also yields the CPU time of its process tree; peak RSS comes from `/usr/bin/time` (why:
  its docstring). :func:`settle` (`sync`) runs first, so no writeback from the previous run is
  billed to the next. :func:`interleave` runs peers in rounds, rotating who starts, so a noisy
  neighbour on a shared machine hits every peer alike; reports quote medians (:func:`median`).
* **One version of datapin.** CLI runs import the package afresh, and people edit and commit
  it while a long run goes on, so :func:`main_pinned` re-executes the benchmark against a
  private copy of the package (:func:`pin_sources`: the working tree at start, or `--at
  COMMIT`) first on PYTHONPATH, and :func:`check_pinned` proves both this process and its
  children import that copy; :func:`source_state` names what was copied in the report.
* **Reports.** :func:`machine` describes the machine, :class:`Target` / :func:`at_most` are the
  PASS/MISS rows, :func:`write_report` prints the markdown and writes it to
  `bench/results/<UTC timestamp>[-name][-quick].md`.
* **Shared data and tools.** :class:`Corpus` writes objects and `.dir` revisions straight into a
  DVC 3 cache (seeded, so every run sees identical bytes; :func:`relpath` is the tree shape),
  :class:`DvcRepo` is a git+DVC repository whose cache is the node cache, :func:`find_dvc` and
  :func:`datapin_cmd` find the executables under test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapin_sidecar.engine.manifest import Manifest

from testkit.dvcrepo import hermetic_env

KIB = 1024

MIB = 1024 * KIB
GIB = 1024 * MIB

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULTS_DIR = REPO_ROOT / "bench" / "results"

SNAPSHOT_ENV = "DATAPIN_BENCH_SNAPSHOT"

SOURCE_ENV = "DATAPIN_BENCH_SOURCE"

FILES_PER_DIR = 100

CHANGE_EVERY = 100  # a switch changes every 100th file: 1%

CHUNK = 8 * MIB


class BenchError(RuntimeError):
    """A command under test failed or did not behave as the benchmark requires: the run is void."""


def relpath(i: int) -> str:
    """Path of file `i` of a small-file tree: three levels, 100 files per leaf directory."""
    leaf, j = divmod(i, FILES_PER_DIR)
    return f"d{leaf // 100:02d}/d{leaf // 10 % 10}/d{leaf % 10}/f{j:02d}.bin"


class Corpus:
    """Objects and `.dir` revisions written straight into a DVC 3 cache (see module doc)."""

    def __init__(self, cache: Path, seed: int) -> None:
        self.cache = cache
        self.objects = cache / "files" / "md5"
        for i in range(256):
            (self.objects / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.base: list[str] = []
        self._base_rng = random.Random(f"{seed}-base")
        self.written = 0
        self.written_bytes = 0

    def _install(self, md5: str, data: bytes, suffix: str = "") -> None:
        path = self.objects / md5[:2] / (md5[2:] + suffix)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileExistsError:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.written += 1
        self.written_bytes += len(data)

    def put(self, data: bytes) -> str:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self._install(md5, data)
        return md5

    def grow(self, n: int, size: int) -> None:
        """Make sure base files 0..n-1 exist (each `size` bytes, in index order)."""
        while len(self.base) < n:
            self.base.append(self.put(self._base_rng.randbytes(size)))

    def put_large(self, index: int, size: int) -> str:
        """A `size`-byte object streamed in chunks (never whole in memory)."""
        rng = random.Random(f"{self.seed}-large-{index}")
        tmp = self.cache / f".bench-large-{index}.tmp"
        md5 = hashlib.md5(usedforsecurity=False)
        with open(tmp, "wb") as f:
            left = size
            while left:
                chunk = rng.randbytes(min(CHUNK, left))
                md5.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = md5.hexdigest()
        os.chmod(tmp, 0o444)
        os.rename(tmp, self.objects / digest[:2] / digest[2:])
        self.written += 1
        self.written_bytes += size
        return digest

    def revision(self, entries: Sequence[tuple[str, str]]) -> str:
        """Write the `.dir` for `(relpath, md5)` entries; return `<md5>.dir`."""
        raw = Manifest.from_entries(entries, source="bench").dumps()
        md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        self._install(md5, raw, ".dir")
        return md5 + ".dir"

    def small_revision(self, md5s: Sequence[str]) -> str:
        return self.revision([(relpath(i), m) for i, m in enumerate(md5s)])

    def chain(self, n: int, steps: int, size: int, tag: str) -> list[str]:
        """Revisions S0..S<steps> of `n` files, each differing from the previous in 1%.

        Chains with different `tag`s share S0 and nothing else.
        """
        md5s = list(self.base[:n])
        revs = [self.small_revision(md5s)]
        for k in range(steps):
            rng = random.Random(f"{self.seed}-switch-{tag}-{k}")
            for i in range(k % CHANGE_EVERY, n, CHANGE_EVERY):
                md5s[i] = self.put(rng.randbytes(size))
            revs.append(self.small_revision(md5s))
        return revs


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed process: wall clock, CPU (user+sys, with its children), peak RSS if asked."""

    wall: float
    cpu: float
    maxrss: int | None = None  # bytes; only measured through /usr/bin/time (see run_timed)
    out: str = ""
    timed_out: bool = False

    @property
    def result(self) -> dict[str, Any]:
        """datapin's `--json` result."""
        data: dict[str, Any] = json.loads(self.out)
        return data


def settle() -> None:
    """Flush dirty data and the XFS log so no writeback is billed to the next timed run."""
    os.sync()


def run_timed(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    rss: bool = False,
) -> Sample:
    """Run `argv` once and time it from fork to `wait4` (see module doc).

    With `rss`, the command runs under `/usr/bin/time -f %M` for its peak RSS. `wait4`'s own
    `ru_maxrss` cannot be used: the kernel folds the pre-exec address space into it, and a
    child forked (or vforked) from this bench process starts with the bench's footprint
    (hundreds of MiB once 500k-entry manifests have been built). GNU time's pre-exec footprint
    is ~2 MiB, and it costs ~1 ms, so it is used only where RSS is the point (the scale case).
    """
    args = [os.fspath(a) for a in argv]
    rss_file: Path | None = None
    if rss:
        fd, name = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        rss_file = Path(name)
        args = ["/usr/bin/time", "-f", "%M", "-o", name, *args]
    settle()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode("utf-8", "replace")
        if proc.returncode != 0 and not fired.is_set():
            raise BenchError(
                f"{shlex.join(args)} exited {proc.returncode}:\n"
                f"{text[-2000:]}\n{err.read().decode('utf-8', 'replace')[-4000:]}"
            )
    maxrss = None
    if rss_file is not None:
        words = rss_file.read_text().split()  # "%M", after a line about the exit if non-zero
        rss_file.unlink()
        if words and words[-1].isdigit():
            maxrss = int(words[-1]) * KIB
    return Sample(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss=maxrss,
        out=text,
        timed_out=fired.is_set(),
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


#: A peer of a timed case: its name, its number of rounds, and one round (round number in, a
#: `Sample` or a richer record out).
Peer = tuple[str, int, Callable[[int], Any]]


def describe_sample(sample: Sample) -> str:
    """The log line of one round: its wall time, and whether it timed out."""
    return f"{secs(sample.wall)}{' (TIMED OUT)' if sample.timed_out else ''}"


def interleave(
    peers: Sequence[Peer],
    log: Callable[[str], None],
    describe: Callable[[Any], str] = describe_sample,
) -> dict[str, list[Any]]:
    """Round-robin the peers (rotating who starts); peer i runs its own number of rounds, and
    `describe` words each round's result for the log."""
    results: dict[str, list[Any]] = {name: [] for name, _, _ in peers}
    rounds = max(n for _, n, _ in peers)
    for r in range(rounds):
        shift = r % len(peers)
        for name, n, fn in [*peers[shift:], *peers[:shift]]:
            if r >= n:
                continue
            result = fn(r)
            results[name].append(result)
            log(f"  {name} run {r + 1}/{n}: {describe(result)}")
    return results


def secs(x: float) -> str:
    if math.isnan(x):
        return "-"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 0.01:
        return f"{x * 1000:.0f} ms"
    return f"{x * 1000:.1f} ms"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@dataclass(slots=True)
class Target:
    name: str
    measured: str
    goal: str
    ok: bool

    def row(self) -> str:
        return f"| {self.name} | {self.measured} | {self.goal} | {'PASS' if self.ok else 'MISS'} |"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def at_most(name: str, value: float, limit: float, fmt: Callable[[float], str] = ratio) -> Target:
    return Target(name, fmt(value), f"<= {fmt(limit)}", value <= limit)


def datapin_cmd() -> list[str]:
    """The installed console script next to this interpreter (no pyenv shim in the timing)."""
    exe = Path(sys.executable).with_name("datapin")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "datapin_sidecar.cli"]


class DvcRepo:
    """A git+DVC repo on the volume whose cache is the node cache, `cache.type reflink`."""

    def __init__(self, root: Path, dvc: Path, cache: Path) -> None:
        self.root = root
        self.dvc = dvc
        self.cache = cache
        self.data = root / "data"
        self.env = hermetic_env(root / ".dvc" / "tmp", who="bench")

    def _run(self, *args: str | os.PathLike[str]) -> None:
        argv = [os.fspath(a) for a in args]
        proc = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed: {proc.stdout}\n{proc.stderr}")

    def create(self) -> DvcRepo:
        self.root.mkdir(parents=True)
        self._run("git", "init", "-q", "--initial-branch=main")
        self._run(self.dvc, "init", "-q")
        self._run(self.dvc, "config", "core.analytics", "false")
        self._run(self.dvc, "cache", "dir", self.cache)
        self._run(self.dvc, "config", "cache.type", "reflink")
        (self.root / ".gitignore").write_text("/data\n")
        self._run("git", "add", "-A")
        self._run("git", "commit", "-q", "-m", "bench repo")
        return self

    def point(self, rev: str, files: int, size: int) -> None:
        (self.root / "data.dvc").write_text(
            f"outs:\n- md5: {rev}\n  size: {size}\n  nfiles: {files}\n  hash: md5\n  path: data\n"
        )

    def clear(self) -> None:
        rm(self.data)

    def checkout(self, timeout: float) -> Sample:
        return run_timed([self.dvc, "checkout"], cwd=self.root, env=self.env, timeout=timeout)


def rm(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(path)], check=True)


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def machine(*tools: Sequence[str]) -> str:
    """Two report lines: the machine, and the versions of `tools` (default: mkfs.xfs and cp)
    and Python."""

    def first_line(argv: Sequence[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            return "not installed"
        return (proc.stdout or proc.stderr).strip().splitlines()[0]

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    first, *rest = [first_line(t) for t in (tools or (["mkfs.xfs", "-V"], ["cp", "--version"]))]
    return (
        f"- machine: {os.cpu_count()} CPUs ({cpu}), {mem / 2**30:.0f} GiB RAM, "
        f"kernel {platform.release()}, shared\n"
        f"- tools: {'; '.join([first, f'Python {platform.python_version()}', *rest])}"
    )


def source_state(at: str | None, paths: Sequence[str] = ("sidecar",)) -> str:
    """What is measured: a commit, or the working tree (naming its uncommitted files under
    `paths`)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return proc.stdout

    if at is not None:
        return f"commit {git('rev-parse', '--short', at).strip() or at}"
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *paths).splitlines()]
    if not dirty:
        return f"commit {commit}"
    return f"working tree at {commit} + uncommitted changes to {', '.join(dirty)}"


def copy_package(at: str | None, into: Path) -> None:
    """Put a copy of the package, as of commit `at` (None: the working tree), in `into`
    (which then goes first on PYTHONPATH)."""
    package = REPO_ROOT / "sidecar" / "datapin_sidecar"
    if at is None:
        shutil.copytree(package, into / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        return
    archive = subprocess.run(
        ["git", "archive", "--format=tar", at, "sidecar/datapin_sidecar"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tar = ["tar", "-x", "-C", str(into), "--strip-components=1"]
    subprocess.run(tar, input=archive, check=True)
    copy_generated_stubs(into / package.name)


def copy_generated_stubs(package: Path) -> None:
    """Copy the generated gRPC stubs (gitignored, so not in `git archive`) into a snapshot of
    the package taken from a commit: without them `datapin-sidecar` of any commit fails to import
    (the agent's CSI plugin). They are build output of the same .proto, not measured source."""
    into = package / "csi" / "proto"
    here = REPO_ROOT / "sidecar" / "datapin_sidecar" / "csi" / "proto"
    for stub in here.glob("*_pb2*.py*"):
        if into.is_dir() and not (into / stub.name).exists():
            shutil.copy2(stub, into / stub.name)


def pin_sources(at: str | None, argv: Sequence[str], *, module: str) -> None:
    """Re-exec benchmark `module` against a private copy of the package, taken now.

    The CLI runs import datapin afresh each time, and other people edit and commit it while a
    run of ten minutes or more goes on: without a copy, one report would mix versions. The
    copy (of the working tree, or of commit `at`) goes first on PYTHONPATH, ahead of the
    editable install, for this process and every datapin process it starts.
    """
    if os.environ.get(SNAPSHOT_ENV):
        return
    snap = Path(tempfile.mkdtemp(prefix="datapin-bench-src-"))
    copy_package(at, snap)
    path = os.pathsep.join(
        p for p in (str(snap), str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    env = {
        **os.environ,
        SNAPSHOT_ENV: str(snap),
        SOURCE_ENV: source_state(at),
        "PYTHONPATH": path,
    }
    args = [sys.executable, "-m", module, *argv]
    os.execve(sys.executable, args, env)  # noqa: S606 - our own interpreter, no shell


def find_dvc(args: argparse.Namespace, left_out: str = "dvc columns left out") -> Path | None:
    """DVC 3 from `--dvc`, $DATAPIN_DVC3 or scripts/setup's venv; None with `--no-dvc` or when
    there is none (saying `left_out` on stderr: the run goes on without it)."""
    if args.no_dvc:
        return None
    exe = args.dvc or Path(
        os.environ.get("DATAPIN_DVC3") or REPO_ROOT / ".tools" / "dvc3" / "bin" / "dvc"
    )
    if not os.access(exe, os.X_OK):
        print(f"bench: no DVC 3 at {exe}: {left_out} (--dvc PATH)", file=sys.stderr)
        return None
    return exe.absolute()


def dvc_version(dvc: Path | None) -> str:
    """`dvc --version` for the report header ("left out" without DVC)."""
    if dvc is None:
        return "left out"
    return subprocess.run(
        [dvc, "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    ).stdout.strip()


def check_pinned() -> None:
    """Both this process and the datapin processes it starts import the private copy."""
    snap = os.environ[SNAPSHOT_ENV]
    child = subprocess.run(
        [sys.executable, "-c", "import datapin_sidecar; print(datapin_sidecar.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for where in (child, str(sys.modules["datapin_sidecar"].__file__)):
        if not where.startswith(snap + os.sep):
            raise BenchError(f"datapin imported from {where}, not from the copy in {snap}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+sys, all threads) of a live process, from /proc; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_at_option(parser: argparse.ArgumentParser) -> None:
    """`--at COMMIT`, which every pinned benchmark takes (see `pin_sources`)."""
    parser.add_argument(
        "--at", metavar="COMMIT", help="measure datapin as of COMMIT (default: the working tree)"
    )


def chosen_cases(parser: argparse.ArgumentParser, only: str, cases: Sequence[str]) -> list[str]:
    """The cases of an `--only` comma list, in order, each once; an unknown one is a usage
    error naming the choices."""
    chosen = list(dict.fromkeys(c.strip() for c in only.split(",") if c.strip()))
    unknown = set(chosen) - set(cases)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {','.join(cases)}")
    return chosen


def main_pinned(
    argv: Sequence[str] | None,
    parse: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace, Sequence[str]], int],
    *,
    module: str,
) -> int:
    """A pinned benchmark's `main`: parse, re-exec against a private copy of the package
    (:func:`pin_sources`, which reads `args.at`), run, and remove the copy afterwards."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse(args_list)
    pin_sources(args.at, args_list, module=module)
    try:
        return run(args, args_list)
    finally:
        snap = Path(os.environ.get(SNAPSHOT_ENV, ""))
        if snap.name.startswith("datapin-bench-src-"):
            shutil.rmtree(snap, ignore_errors=True)


def write_report(text: str, when: dt.datetime, *, name: str, quick: bool, note: str = "") -> Path:
    """Print the markdown report and write it to bench/results/<UTC time>[-name][-quick].md."""
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = (f"-{name}" if name else "") + ("-quick" if quick else "")
    out = RESULTS_DIR / f"{when:%Y%m%dT%H%M%SZ}{suffix}.md"
    out.write_text(text)
    print(f"bench: report written to {out}{note}", file=sys.stderr)
    return out
