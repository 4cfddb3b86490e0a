"""Issue 16 benchmark: N node agents prefetching one revision at once, with and without peer
fetch, against one real S3 server: bytes the remote served, and wall time.

    python -m bench.bench_peers [--agents 2,4,8] [--objects 20000] [--size 64K] [--runs 1]
                                [--plot-dir docs/img]

Each agent is the real `datapin-sidecar agent` process with its own node cache on one XFS
volume, its own loopback address (127.0.0.N, all on one peer port as pods have their IPs) and
the chart's peer certificate shape. The remote is SeaweedFS behind the test kit's fault proxy,
which counts the body bytes it sent (the egress bill). Both modes run in each round, one after
the other, on fresh caches: `peers` (DATAPIN_PEER_PORT set) and `remote` (every agent reads the
remote, as before issue 16). The wall time is from writing the prefetch lists to the last agent
reporting the revision warm. `--plot-dir` draws the remote's bytes (as a multiple of the
dataset) against the number of agents, both modes: `peers-egress-<size>.png`.

On one machine the agents share its 2 cores with each other and with the server, so the wall
time says what peer fetch costs in CPU, not what it saves where B2's per-connection throughput
or the egress price is the limit; the remote bytes are the figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings

from bench.bench_fetch import Stage, parse_size, relpath
from testkit.faultproxy import FaultProxy
from testkit.k8svolume import kubelet_update
from testkit.peercerts import write_peer_tls
from testkit.seaweed import SeaweedServer, free_ports
from testkit.sidecarproc import SidecarProcess
from testkit.xfs import xfs_volume

PREFIX = "store"
#: One round's (wall seconds, agents' CPU seconds, bytes the remote sent).
Row = tuple[float, float, int]


def upload(server: SeaweedServer, stage: Stage, bucket: str) -> None:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_REGION": "us-east-1",
    }
    cmd = [
        "s5cmd",
        "--endpoint-url",
        server.endpoint,
        "cp",
        f"{stage.root}/*",
        f"s3://{bucket}/{PREFIX}/",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)


def one_round(
    *,
    peers: bool,
    volume: Path,
    work: Path,
    n: int,
    entry: DatasetSettings,
    tls: Path,
) -> tuple[float, float, int]:
    """(wall s, agents' CPU s, agents' remote bytes) of one cold prefetch by n agents."""
    (port,) = free_ports(1)
    addresses = [f"127.0.0.{i + 2}" for i in range(n)]
    procs: list[SidecarProcess] = []
    try:
        for i in range(n):
            root = volume / f"{'p' if peers else 'r'}-node-{i}"
            listing = work / f"prefetch-{i}.json"
            listing.write_text(prefetch_file_text([]))
            settings = {
                "root": str(root),
                "prefetch_file": str(listing),
                "prefetch_interval_seconds": "0.1",
                "gc_interval_seconds": "600",
                "scan_interval_seconds": "3600",
                "log_format": "json",
            }
            if peers:
                settings |= {
                    "peer_port": str(port),
                    "peer_address": addresses[i],
                    "peers": json.dumps([f"{a}:{port}" for a in addresses]),
                    "peer_tls_dir": str(tls),
                }
            (work / f"agent-{i}").mkdir(exist_ok=True)
            procs.append(SidecarProcess("agent", work / f"agent-{i}", settings).start())
        cpu0 = sum(_cpu(p.pid) for p in procs)
        start = time.monotonic()
        for i in range(n):
            (work / f"prefetch-{i}.json").write_text(prefetch_file_text([entry]))
        # Polled twice a second: each look renders an agent's /metrics, CPU the agents share.
        pending = list(procs)
        while pending:
            time.sleep(0.5)
            if time.monotonic() - start > 3600:
                raise RuntimeError("the agents did not warm within an hour")
            pending = [p for p in pending if not _warm(p)]
        wall = time.monotonic() - start
        cpu = sum(_cpu(p.pid) for p in procs) - cpu0
        fetched = int(
            sum(p.sample("datapin_remote_fetched_bytes_total", dataset="bench") for p in procs)
        )
        return wall, cpu, fetched
    except BaseException:
        kept = Path("/var/tmp/bench-peers-failed")
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(work, kept, ignore=shutil.ignore_patterns("prefetch-*", "*.json"))
        print(f"the agents' logs are kept in {kept}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.stop()
        for i in range(n):
            shutil.rmtree(volume / f"{'p' if peers else 'r'}-node-{i}", ignore_errors=True)


def _warm(proc: SidecarProcess) -> bool:
    """Whether the agent reports the revision warm; an agent too busy to answer /metrics
    within its 5 s (8 agents share 2 cores) is asked again later."""
    try:
        return proc.sample("datapin_prefetch_revisions", state="warm") == 1
    except AssertionError:
        return False


def _payload(rng: random.Random, size: int) -> bytes:
    """`size` random bytes (randbytes of more than 256 MiB overflows, so in pieces)."""
    piece = 64 * 1024 * 1024
    return b"".join(rng.randbytes(min(piece, size - at)) for at in range(0, size, piece))


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    # SIGTERM unwinds like ^C: the server is stopped and the volume unmounted by `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="8", help="comma list of agent counts")
    parser.add_argument("--objects", type=int, default=20000)
    parser.add_argument("--size", default="64K")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--volume", default="40G")
    parser.add_argument("--plot-dir", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.agents.split(",")]
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="bench-peers-", dir="/var/tmp"))
    (base / "xfs").mkdir()
    rows: dict[tuple[int, str], list[Row]] = {}
    try:
        with (
            SeaweedServer(base / "weed") as server,
            xfs_volume(args.volume, workdir=base / "xfs") as volume,
        ):
            bucket = server.make_bucket("peers")
            stage = Stage(base / "stage")
            rng = random.Random(16)
            entries = [(relpath(i), stage.put(_payload(rng, size))) for i in range(args.objects)]
            rev, raw = stage.revision(entries)
            upload(server, stage, bucket)
            shutil.rmtree(stage.root)
            dataset_bytes = size * args.objects + len(raw)
            tls = write_peer_tls(base / "tls")
            secret = base / "secret"
            kubelet_update(
                secret,
                {
                    "AWS_ACCESS_KEY_ID": server.access_key,
                    "AWS_SECRET_ACCESS_KEY": server.secret_key,
                },
                "2026_12_02_00_00_00.1",
            )
            with FaultProxy(server.endpoint) as proxy:
                entry = DatasetSettings(
                    name="bench",
                    remote=f"s3://{bucket}/{PREFIX}",
                    endpoint_url=proxy.endpoint,
                    credentials_dir=secret,
                    layout="dvc3",
                    pin=rev,
                    ref="bench",
                )
                for _ in range(args.runs):
                    for n in counts:
                        for mode in ("peers", "remote"):
                            proxy.reset_counters()
                            work = Path(tempfile.mkdtemp(dir=base))
                            wall, cpu, _ = one_round(
                                peers=mode == "peers",
                                volume=volume,
                                work=work,
                                n=n,
                                entry=entry,
                                tls=tls,
                            )
                            sent = sum(r.body_bytes for r in proxy.requests if r.method == "GET")
                            rows.setdefault((n, mode), []).append((wall, cpu, sent))
                            print(
                                f"{n} agents, {mode}: wall {wall:.1f} s, agents' CPU {cpu:.1f} s, "
                                f"remote bytes {sent / dataset_bytes:.2f}x the dataset",
                                flush=True,
                            )
        report(rows, counts, args, dataset_bytes)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(
    rows: dict[tuple[int, str], list[Row]],
    counts: list[int],
    args: argparse.Namespace,
    dataset_bytes: int,
) -> None:
    print()
    print(
        f"One revision of {args.objects} x {args.size} ({dataset_bytes / 2**20:.0f} MiB), cold, "
        f"prefetched by N agents at once; median of {args.runs}:"
    )
    print(
        "| agents | mode | wall (s) | agents' CPU (s) | remote bytes / dataset | wall vs remote |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n in counts:
        base_wall = statistics.median(r[0] for r in rows[(n, "remote")])
        for mode in ("peers", "remote"):
            got = rows[(n, mode)]
            wall = statistics.median(r[0] for r in got)
            cpu = statistics.median(r[1] for r in got)
            sent = statistics.median(r[2] for r in got)
            print(
                f"| {n} | {mode} | {wall:.1f} | {cpu:.1f} | {sent / dataset_bytes:.2f}x | "
                f"{wall / base_wall:.2f}x |"
            )
    if args.plot_dir is not None:
        from bench.plot import Line, save_png  # noqa: PLC0415 - only when drawing

        lines = [
            Line(
                label=label,
                points=[
                    (n, statistics.median(r[2] for r in rows[(n, mode)]) / dataset_bytes)
                    for n in counts
                ],
            )
            for mode, label in (
                ("peers", "peer fetch (issue 16)"),
                ("remote", "every agent reads the remote"),
            )
        ]
        path = save_png(
            args.plot_dir / f"peers-egress-{args.size}.png",
            title=f"Bytes read from the remote: {args.objects} x {args.size}, cold, N agents",
            x_label="agents prefetching the revision at once",
            y_label="remote bytes / dataset size",
            lines=lines,
            log_x=False,
            log_y=False,
            x_ticks=counts,
        )
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
