"""Adversarial: a full node cache volume must not leak download claims.

On the real 320M XFS volume (`small_xfs`) and a real SeaweedFS: fill the volume, fetch, and the
fetch fails with "no space left on the node cache volume" naming the cache; every download slot
it claimed is free again (the test locks each one); after space is freed the *same* remote
object (a long-lived sidecar in `run` mode keeps one) fetches everything; a second process
waiting on the same objects takes them over instead of waiting out its 900 s. A failure at
install time (a shard directory that refuses links) releases the whole batch too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport
from datapin_sidecar.errors import DestinationError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.endpoint import RemoteConfig
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote

from testkit.seaweed import SeaweedServer
from testkit.trees import object_name
from tests.test_s3_node import upload_revision

MiB = 1024 * 1024


def _objects(n: int, size: int) -> dict[str, bytes]:
    return {f"d/f{i:04d}.bin": os.urandom(size) for i in range(n)}


def _fill(volume: Path, leave: int) -> Path:
    """Fill `volume` until about `leave` bytes are free; the filler file."""
    filler = volume / "filler"
    os.sync()
    st = os.statvfs(volume)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        chunk = b"\0" * MiB
        with contextlib.suppress(OSError):
            while size > 0:
                size -= f.write(chunk[: min(MiB, size)])
            f.flush()
            os.fsync(f.fileno())
    return filler


def held_claims(cache: NodeCache) -> list[str]:
    """Download slots some open file description still holds locked."""
    held = []
    for path in cache.fetch_dir.rglob("*"):
        if not path.is_file() or path.name.endswith(".parts"):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path.name)
        finally:
            os.close(fd)
    return held


@pytest.fixture
def remote_config(seaweed: SeaweedServer, s3_bucket: str) -> tuple[RemoteConfig, StaticCredentials]:
    cfg = RemoteConfig.from_url(f"s3://{s3_bucket}/store", endpoint_url=seaweed.endpoint)
    keys = StaticCredentials(
        Credentials(access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key),
        source="the test",
    )
    return cfg, keys


def _oids(files: dict[str, bytes]) -> list[str]:
    return [object_name(data) for data in files.values()]


def test_a_full_volume_fails_cleanly_releases_every_claim_and_recovers(
    seaweed: SeaweedServer,
    s3_bucket: str,
    remote_config: tuple[RemoteConfig, StaticCredentials],
    small_xfs: Path,
    tmp_path: Path,
) -> None:
    files = _objects(120, 256 * 1024)  # 30 MiB, on a volume left with 8 MiB
    upload_revision(seaweed, s3_bucket, files, tmp_path)
    oids = _oids(files)
    cache = NodeCache(small_xfs / "cache")
    cache.fetch_dir.mkdir(parents=True)
    filler = _fill(small_xfs, 8 * MiB)
    cfg, keys = remote_config

    async def scenario() -> tuple[BaseException | None, list[str], FetchReport]:
        # One remote for both fetches, as a sidecar in `run` mode keeps it.
        opts = FetchOptions(jobs=8, wait_timeout=5.0)
        async with S3Remote(cfg, keys, options=opts) as remote:
            failure: BaseException | None = None
            try:
                await remote.afetch(cache, oids, Layout.DVC3)
            except DestinationError as exc:
                failure = exc
            held = await asyncio.to_thread(held_claims, cache)
            filler.unlink()
            await asyncio.to_thread(os.sync)
            report = await remote.afetch(cache, oids, Layout.DVC3)
            return failure, held, report

    failure, held, report = asyncio.run(scenario())
    assert failure is not None, "the fetch did not hit the full volume"
    assert "no space left on the node cache volume" in str(failure)
    assert str(cache.root) in str(failure)
    assert "Fix:" in str(failure)
    assert held == [], "claims kept after the failed fetch"
    assert report.fetched + report.present == len(oids)
    for oid in oids:
        assert cache.present(oid, Layout.DVC3)
    assert held_claims(cache) == []


_CHILD = """
import asyncio, sys, time
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.errors import DatapinError
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.endpoint import RemoteConfig

endpoint, bucket, access, secret, cache, oids = sys.argv[1:7]
cfg = RemoteConfig.from_url(f"s3://{bucket}/store", endpoint_url=endpoint)
keys = StaticCredentials(Credentials(access_key_id=access, secret_access_key=secret), source="t")

async def attempt(remote):
    started = time.monotonic()
    try:
        await remote.afetch(NodeCache(cache), oids.split(","), Layout.DVC3)
        print("ok", flush=True)
    except DatapinError as exc:
        print(f"error {exc.exit_code} after {time.monotonic() - started:.1f} s: {exc}", flush=True)

async def main():
    # Like a sidecar in `run` mode: one remote, kept; a retry when told (a line on stdin).
    async with S3Remote(cfg, keys, options=FetchOptions()) as remote:  # 32 jobs, 4 threads
        await attempt(remote)
        while await asyncio.to_thread(sys.stdin.readline):
            await attempt(remote)

asyncio.run(main())
"""


def test_processes_on_a_full_volume_never_wait_for_each_other(
    seaweed: SeaweedServer,
    s3_bucket: str,
    small_xfs: Path,
    tmp_path: Path,
) -> None:
    """Two long-lived processes (sidecars in `run` mode) fetch the same objects into a full
    cache: both fail with the volume-full error, neither waiting on the other. Space is freed
    while they stay alive: a third process fetches everything at once (it would wait 900 s
    for claims a failed process kept), and the two succeed on their next attempt."""
    files = _objects(120, 256 * 1024)
    upload_revision(seaweed, s3_bucket, files, tmp_path)
    oids = _oids(files)
    cache = NodeCache(small_xfs / "cache")
    cache.fetch_dir.mkdir(parents=True)
    filler = _fill(small_xfs, 8 * MiB)

    def start() -> subprocess.Popen[str]:
        args = [seaweed.endpoint, s3_bucket, seaweed.access_key, seaweed.secret_key]
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args, str(cache.root), ",".join(oids)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def answer(proc: subprocess.Popen[str], limit: float = 60) -> str:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], limit)
        assert ready, f"no answer within {limit} s"
        return proc.stdout.readline()

    procs = [start(), start()]
    try:
        for proc in procs:
            line = answer(proc)
            assert line.startswith("error 6"), line
            assert "no space left on the node cache volume" in line
            assert "another process" not in line
        filler.unlink()
        os.sync()
        third = start()
        assert answer(third, 60) == "ok\n", "waited on claims the failed processes kept"
        assert third.stdin is not None
        third.stdin.close()
        third.wait(30)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("retry\n")
            proc.stdin.flush()
            assert answer(proc) == "ok\n"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc in procs:
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    for oid in oids:
        assert cache.present(oid, Layout.DVC3)


def _chattr(flag: str, paths: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True)


def test_a_failed_install_releases_the_whole_batch(
    seaweed: SeaweedServer,
    s3_bucket: str,
    remote_config: tuple[RemoteConfig, StaticCredentials],
    small_xfs: Path,
    tmp_path: Path,
) -> None:
    """The batch's sync succeeds and its links fail (the shard directories are immutable,
    `chattr +i`): the fetch fails naming the cache, and no slot of the batch stays claimed,
    so the same remote fetches them all once the directories take links again."""
    files = _objects(40, 4096)
    upload_revision(seaweed, s3_bucket, files, tmp_path)
    oids = _oids(files)
    cache = NodeCache(small_xfs / "cache")
    shards = sorted({Path(cache.path(oid, Layout.DVC3)).parent for oid in oids})
    for shard in shards:
        shard.mkdir(parents=True, exist_ok=True)
    _chattr("+i", shards)
    cfg, keys = remote_config

    async def scenario() -> tuple[BaseException | None, list[str], FetchReport]:
        async with S3Remote(cfg, keys, options=FetchOptions(jobs=4, wait_timeout=5.0)) as remote:
            failure: BaseException | None = None
            try:
                await remote.afetch(cache, oids, Layout.DVC3)
            except DestinationError as exc:
                failure = exc
            held = await asyncio.to_thread(held_claims, cache)
            _chattr("-i", shards)
            report = await remote.afetch(cache, oids, Layout.DVC3)
            return failure, held, report

    try:
        failure, held, report = asyncio.run(scenario())
    finally:
        _chattr("-i", shards)
    assert failure is not None
    assert str(cache.root) in str(failure)
    assert held == []
    assert report.fetched + report.present == len(oids)
    for oid in oids:
        assert cache.present(oid, Layout.DVC3)
