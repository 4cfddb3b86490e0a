"""Client CPU per small object: aiobotocore against our SigV4-over-aiohttp path (issue 3).

    python -m bench.bench_s3_client [--objects 5000] [--size 65536] [--jobs 32] [--runs 5]

Why this exists: on a 2-core node the client's CPU per request decides small-object speed, and
the choice of HTTP stack was made on this measurement (docs/benchmarks.md). Each case runs in
its own child process (fresh interpreter, same objects, same SeaweedFS on 127.0.0.1) and does
the same work per object -- GET the whole object, read the body, md5 it -- so the CPU
difference is the client stack's:

* `aiobotocore`: `get_object` + `Body.read()`, B2-safe checksum settings, one client.
* `datapin-get`: `S3Client.get` (our signer, one aiohttp session), `resp.read()`.
* `datapin-fetch`: the real `S3Remote.afetch` into a node cache on a reflink XFS loop volume
  (as on a node): the above plus
  claiming, writing, fsyncing and installing each object (what `datapin materialize` pays).

Cases take turns within each round (rotating start); medians of wall time and of the child's
CPU (user + sys of all its threads, `time.process_time()` around the work), per object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testkit.seaweed import SeaweedServer  # noqa: E402
from testkit.xfs import xfs_volume  # noqa: E402

_CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, json, os, shutil, sys, time
    from pathlib import Path
    case, endpoint, access, secret, bucket, jobs, keys_file, cache, size = sys.argv[1:]
    jobs, size = int(jobs), int(size)
    keys = Path(keys_file).read_text().split()

    async def botocore_case():
        from aiobotocore.session import get_session
        from botocore.config import Config
        cfg = Config(max_pool_connections=jobs, request_checksum_calculation="when_required",
                     response_checksum_validation="when_required")
        async with get_session().create_client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
            region_name="us-east-1", config=cfg) as client:
            it = iter(keys)
            async def worker():
                for key in it:
                    r = await client.get_object(Bucket=bucket, Key=key)
                    async with r["Body"] as body:
                        hashlib.md5(await body.read()).hexdigest()
            await asyncio.gather(*(worker() for _ in range(jobs)))

    def remote():
        from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote
        from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
        from datapin_sidecar.remotes.endpoint import RemoteConfig
        cfg = RemoteConfig.from_url(f"s3://{bucket}", endpoint_url=endpoint)
        creds = StaticCredentials(
            Credentials(access_key_id=access, secret_access_key=secret), source="bench")
        return S3Remote(cfg, creds, options=FetchOptions(jobs=jobs))

    async def get_case():
        async with remote() as r:
            it = iter(keys)
            async def worker():
                for key in it:
                    async with r._client.get(key, 0, size - 1) as resp:
                        hashlib.md5(await resp.read()).hexdigest()
            await asyncio.gather(*(worker() for _ in range(jobs)))

    async def fetch_case():
        from datapin_sidecar.engine.cache import NodeCache
        from datapin_sidecar.engine.hashing import Layout
        async with remote() as r:
            oids = [k.split("/")[-2] + k.split("/")[-1] for k in keys]
            report = await r.afetch(NodeCache(cache), oids, Layout.DVC3)
            assert report.fetched == len(oids), report

    shutil.rmtree(cache, ignore_errors=True)  # the previous run's; not timed
    os.sync()
    started, cpu = time.monotonic(), time.process_time()
    asyncio.run({"aiobotocore": botocore_case, "datapin-get": get_case,
                 "datapin-fetch": fetch_case}[case]())
    print(json.dumps({"wall": time.monotonic() - started, "cpu": time.process_time() - cpu}))
    """
)

CASES = ("aiobotocore", "datapin-get", "datapin-fetch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datapin-bench-client-", dir="/var/tmp"))
    try:
        with (
            SeaweedServer(work / "seaweed") as server,
            xfs_volume("4G", workdir=work) as volume,
        ):
            bucket = server.make_bucket("client-bench")
            client = server.client()
            keys = []
            for i in range(args.objects):
                data = i.to_bytes(8, "big") + os.urandom(args.size - 8)
                md5 = hashlib.md5(data).hexdigest()  # noqa: S324 - DVC's object name
                key = f"files/md5/{md5[:2]}/{md5[2:]}"
                client.put_object(Bucket=bucket, Key=key, Body=data)
                keys.append(key)
            keys_file = work / "keys"
            keys_file.write_text("\n".join(keys))
            results: dict[str, list[tuple[float, float]]] = {c: [] for c in CASES}
            for run in range(args.runs):
                for n in range(len(CASES)):
                    case = CASES[(run + n) % len(CASES)]
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            _CHILD,
                            case,
                            server.endpoint,
                            server.access_key,
                            server.secret_key,
                            bucket,
                            str(args.jobs),
                            str(keys_file),
                            str(volume / "cache"),
                            str(args.size),
                        ],
                        capture_output=True,
                        text=True,
                        check=False,
                        env={**os.environ, "PYTHONPATH": str(REPO / "sidecar")},
                    )
                    if out.returncode != 0:
                        raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
                    timing = json.loads(out.stdout.strip().splitlines()[-1])
                    results[case].append((timing["wall"], timing["cpu"]))
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(
                f"## S3 client CPU per object: {args.objects} x {args.size} B, "
                f"--jobs {args.jobs}, {args.runs} runs, {when}"
            )
            print()
            print(
                "| client | wall (median) | objects/s | CPU per object (median) | vs aiobotocore |"
            )
            print("|---|---:|---:|---:|---:|")
            base = statistics.median(c for _, c in results["aiobotocore"])
            for case in CASES:
                wall = statistics.median(w for w, _ in results[case])
                cpu = statistics.median(c for _, c in results[case])
                print(
                    f"| {case} | {wall:.2f} s | {args.objects / wall:,.0f} | "
                    f"{cpu * 1000 / args.objects:.2f} ms | {cpu / base:.2f}x |"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
