"""Adversarial: a hostile or broken remote must not exhaust the node's time, memory or disk.

A real HTTP server on 127.0.0.1 (`testkit.hostiles3.HostileS3`) answers the client's S3
GETs with what no honest server sends: a body trickled a byte at a time, a chunked body that
never ends, a Content-Length or Content-Range that lies, a 1 PiB object. The client under test
is the real `S3Remote` (in this process, with short deadlines) or the real `datapin` CLI in a
child process whose address space is capped, so "memory is bounded" is proved by the kernel,
not by our own counters. A DVC directory remote that cannot be read is tried for real too
(permission denied as an unprivileged user, a file, a missing path, a FIFO object).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapin_sidecar import cli
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport
from datapin_sidecar.errors import DestinationError, RemoteError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.directory import DirectoryRemote
from datapin_sidecar.remotes.endpoint import RemoteConfig
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote

from testkit.hostiles3 import HostileS3, Hostility
from testkit.trees import object_name, put_revision

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "hostile"
#: The address-space cap of the CLI children: far below the 2.9 GiB the old client reached.
CHILD_MEMORY = 1536 * MiB


def _key(oid: str) -> str:
    return f"store/files/md5/{oid[:2]}/{oid[2:]}"


@pytest.fixture
def revision(tmp_path: Path) -> tuple[str, dict[str, bytes], dict[str, bytes]]:
    """(rev, files, objects by key) of a small revision with one 3 MiB object."""
    files = {
        "big.bin": os.urandom(3 * MiB + 5),
        "small.txt": b"small\n" * 300,
        "b.bin": os.urandom(70_000),
    }
    staging = NodeCache(tmp_path / "staging")
    rev = put_revision(staging, files).oid
    objects = {
        "store/" + str(p.relative_to(staging.root)): p.read_bytes()
        for p in (staging.root / "files").rglob("*")
        if p.is_file()
    }
    return rev, files, objects


@pytest.fixture
def server(revision: tuple[str, dict[str, bytes], dict[str, bytes]]) -> Iterator[HostileS3]:
    with HostileS3(BUCKET, revision[2]) as s3:
        yield s3


def _remote(server: HostileS3, **options: float) -> S3Remote:
    cfg = RemoteConfig.from_url(f"s3://{BUCKET}/store", endpoint_url=server.endpoint)
    keys = StaticCredentials(
        Credentials(access_key_id="AKIDHOSTILE", secret_access_key="never-checked"),
        source="the test",
    )
    opts = {"backoff_base": 0.01, "backoff_cap": 0.05, "part_size": MiB, **options}
    return S3Remote(cfg, keys, options=FetchOptions(**opts))  # type: ignore[arg-type]


def _fetch(
    server: HostileS3, cache: NodeCache, oids: list[str], *, limit: float = 60, **options: float
) -> FetchReport:
    async def go() -> FetchReport:
        async with _remote(server, **options) as remote:
            return await asyncio.wait_for(remote.afetch(cache, oids, Layout.DVC3), limit)

    return asyncio.run(go())


def assert_no_claim_held(cache: NodeCache) -> None:
    """Every download slot can be locked: nothing of ours still holds one."""
    for path in cache.fetch_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)


def slot_bytes(cache: NodeCache) -> int:
    """Apparent bytes of every download slot and journal (a sparse 1 PiB slot counts 1 PiB)."""
    return sum(p.stat().st_size for p in cache.fetch_dir.rglob("*") if p.is_file())


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def run_cli(
    server: HostileS3, cache: Path, dest: Path, rev: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `datapin materialize` against the hostile server, memory capped."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDHOSTILE", "AWS_SECRET_ACCESS_KEY": "x" * 40}
    # fmt: off
    args = [
        sys.executable, "-m", "datapin_sidecar.cli", "materialize",
        "--cache", str(cache), "--dest", str(dest), "--rev", rev,
        "--remote", f"s3://{BUCKET}/store", "--endpoint-url", server.endpoint,
        "--quiet", *extra,
    ]
    # fmt: on
    return subprocess.run(
        args,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,  # the point: cap the child's address space
    )


# -- time ---------------------------------------------------------------------------------------


def test_a_trickled_body_hits_the_request_deadline_and_fails_clearly(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    """One byte per 0.2 s never trips the between-reads timeout; the overall deadline does,
    on every attempt, and the fetch ends with a RemoteError naming the remote, key and fix."""
    _, files, _ = revision
    oid = object_name(files["b.bin"])
    server.hostile(_key(oid), Hostility.TRICKLE, interval=0.2)
    cache = NodeCache(tmp_path / "cache")
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        _fetch(server, cache, [oid], request_timeout=1.0, read_timeout=30, attempts=2)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"took {elapsed:.1f} s: the deadline is not overall"
    message = str(info.value)
    assert info.value.cause == "gave_up"
    assert "timeout" in message
    assert f"s3://{BUCKET}/store" in message
    assert _key(oid) in message
    assert "Fix:" in message
    assert server.gets[_key(oid)] == 2
    assert not cache.present(oid, Layout.DVC3)
    assert_no_claim_held(cache)


def test_a_trickle_once_is_retried_and_the_object_arrives(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    _, files, _ = revision
    oid = object_name(files["b.bin"])
    server.hostile(_key(oid), Hostility.TRICKLE, interval=0.2, times=1)
    cache = NodeCache(tmp_path / "cache")
    report = _fetch(server, cache, [oid], request_timeout=1.0, read_timeout=30)
    assert report.fetched == 1
    assert report.retries["timeout"] == 1
    assert cache.present(oid, Layout.DVC3)


# -- memory: bodies never longer than declared ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "params"),
    [
        ("small.txt", Hostility.ENDLESS_CHUNKED, {}),
        ("small.txt", Hostility.LYING_LENGTH, {"length": 3 * GiB}),
        ("big.bin", Hostility.ENDLESS_CHUNKED, {}),
        ("big.bin", Hostility.LYING_LENGTH, {"length": 3 * GiB}),
    ],
)
def test_a_body_longer_than_declared_is_refused_without_reading_on(
    server: HostileS3,
    revision: tuple[str, dict[str, bytes], dict[str, bytes]],
    tmp_path: Path,
    name: str,
    kind: Hostility,
    params: dict[str, float],
) -> None:
    """An endless chunked body or a Content-Length beyond the range: the client stops at the
    declared end (the server hands over little more than the object), every time, and says
    so; nothing enters the cache and no claim is kept."""
    _, files, _ = revision
    oid = object_name(files[name])
    server.hostile(_key(oid), kind, cap=256 * MiB, **params)
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(RemoteError, match=r"overlong|longer") as info:
        _fetch(server, cache, [oid], attempts=3)
    assert info.value.cause == "gave_up"
    # Per request: the range and what socket buffers hold past it, not hundreds of MiB.
    key = _key(oid)
    assert server.sent[key] < server.gets[key] * (MiB + 8 * MiB), server.sent[key]
    assert not cache.present(oid, Layout.DVC3)
    assert_no_claim_held(cache)


def test_lying_length_and_endless_bodies_through_the_cli_exit_8_in_bounded_memory(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    """The `.dir` itself answered with a 3 GiB Content-Length (the old client read it whole:
    MemoryError near 2.9 GiB), an object with an endless body: exit 8, no traceback, in a
    process capped at 1.5 GiB of address space."""
    rev, files, _ = revision
    server.hostile(_key(rev), Hostility.LYING_LENGTH, length=3 * GiB, cap=3 * GiB)
    done = run_cli(server, tmp_path / "cache", tmp_path / "pod", rev)
    assert done.returncode == 8, done.stderr
    assert "Traceback" not in done.stderr
    assert f"s3://{BUCKET}/store" in done.stderr
    assert "Fix:" in done.stderr
    assert server.sent[_key(rev)] < 64 * MiB

    server.hostile(_key(rev), Hostility.LYING_LENGTH, length=len(revision[2][_key(rev)]), times=0)
    big = object_name(files["big.bin"])
    server.hostile(_key(big), Hostility.ENDLESS_CHUNKED, cap=3 * GiB)
    done = run_cli(server, tmp_path / "cache", tmp_path / "pod", rev)
    assert done.returncode == 8, done.stderr
    assert "Traceback" not in done.stderr
    assert _key(big) in done.stderr
    assert not (tmp_path / "pod" / "current").exists()


# -- disk: sizes the remote claims ----------------------------------------------------------------


def test_a_1_pib_content_range_is_refused_before_anything_is_sized(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    _, files, _ = revision
    oid = object_name(files["big.bin"])
    server.hostile(_key(oid), Hostility.HUGE_TOTAL, total=1 << 50)
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(RemoteError, match="5 TiB") as info:
        _fetch(server, cache, [oid])
    assert info.value.cause == "bad_size"
    assert _key(oid) in str(info.value)
    assert slot_bytes(cache) == 0, "a slot or journal was sized by the lie"
    assert_no_claim_held(cache)


def test_an_object_larger_than_the_free_space_is_refused_as_volume_full(
    server: HostileS3,
    revision: tuple[str, dict[str, bytes], dict[str, bytes]],
    small_xfs: Path,
) -> None:
    """A plausible size (1 TiB, under S3's maximum) that the 320M cache volume cannot hold:
    "volume full" at once, naming the object, with no sparse slot and no journal left."""
    _, files, _ = revision
    oid = object_name(files["big.bin"])
    server.hostile(_key(oid), Hostility.HUGE_TOTAL, total=1 << 40)
    cache = NodeCache(small_xfs / "cache")
    with pytest.raises(DestinationError, match="no space left on the node cache volume") as info:
        _fetch(server, cache, [oid])
    assert _key(oid) in str(info.value)
    assert str(small_xfs / "cache") in str(info.value)
    assert slot_bytes(cache) == 0
    assert not list(cache.fetch_dir.rglob("*.parts"))
    assert_no_claim_held(cache)


def test_a_dir_manifest_over_the_cap_is_refused(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    rev, _, _ = revision
    server.hostile(_key(rev), Hostility.HUGE_TOTAL, total=2 * GiB)
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(RemoteError, match="1 GiB") as info:
        _fetch(server, cache, [rev])
    assert info.value.cause == "too_large"
    assert slot_bytes(cache) == 0
    assert_no_claim_held(cache)


# -- absurd --jobs -------------------------------------------------------------------------------


def test_a_billion_jobs_allocates_nothing_per_job(
    server: HostileS3, revision: tuple[str, dict[str, bytes], dict[str, bytes]], tmp_path: Path
) -> None:
    """`--jobs 1000000000` (the flag is capped elsewhere; the client is safe regardless): the
    pull works, fast, in a process capped at 1.5 GiB."""
    rev, files, _ = revision
    started = time.monotonic()
    done = run_cli(
        server, tmp_path / "cache", tmp_path / "pod", rev, "--jobs", "1000000000", timeout=60
    )
    if done.returncode == 2 and "--jobs" in done.stderr:
        # The CLI refused the number itself, with its cap: the client never saw it. Drive the
        # client directly with it then.
        report = _fetch(server, NodeCache(tmp_path / "c2"), [rev], jobs=10**9)
        assert report.fetched == 1
        return
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    for name, data in files.items():
        assert (tmp_path / "pod" / "current" / name).read_bytes() == data


# -- a DVC directory remote that cannot be read ---------------------------------------------------


def _dir_remote(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    files = {"a.txt": b"alpha\n", "b.bin": os.urandom(5000)}
    remote = tmp_path / "remote"
    rev = put_revision(NodeCache(remote), files).oid
    return remote, rev, files


def _materialize(cache: Path, dest: Path, rev: str, remote: Path) -> list[str]:
    return [
        *("materialize", "--cache", str(cache), "--dest", str(dest), "--rev", rev),
        *("--remote", str(remote), "--quiet"),
    ]


@pytest.mark.parametrize("case", ["missing", "file"])
def test_a_directory_remote_that_is_not_one_exits_8(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = tmp_path / "remote"
    if case == "file":
        remote.write_text("not a directory")
    code = cli.main(_materialize(tmp_path / "cache", tmp_path / "pod", "0" * 32 + ".dir", remote))
    err = capsys.readouterr().err
    assert code == 8, err
    assert str(remote) in err
    assert ("does not exist" if case == "missing" else "is not a directory") in err
    assert "Fix:" in err
    assert "Traceback" not in err


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="datapin-hostile-", dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103 - the unprivileged child must reach it
    try:
        yield path
    finally:
        for sub in (path, *path.rglob("*")):
            if sub.is_dir() and not sub.is_symlink():
                os.chmod(sub, 0o755)  # noqa: S103 - undo the test's chmod 000
        shutil.rmtree(path)


def test_an_unreadable_directory_remote_exits_8_naming_the_path(public_dir: Path) -> None:
    """As an unprivileged user (root reads anything): the remote's objects mode 000, then the
    remote itself mode 000. The old code gave a traceback (exit 1) or "objects missing"."""
    remote, rev, _ = _dir_remote(public_dir)
    work = public_dir / "work"
    work.mkdir()
    nobody = 65534
    os.chown(work, nobody, nobody)
    obj = next(p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    os.chmod(obj, 0)

    # The interpreter lives under /root: the child imports datapin as root, then drops to
    # nobody before it touches the remote.
    child = (
        "import os, sys, asyncio, concurrent.futures.thread, json\n"
        "from datapin_sidecar import cli, safefs\n"
        "from datapin_sidecar.engine import cache, materialize\n"
        "from datapin_sidecar.engine import remote\n"
        # What the CLI imports when it gets there (progress, the directory remote and its slot
        # files): the checkout may be unreadable to nobody (a CI clone is mode 0700).
        "from datapin_sidecar import progress\n"
        "from datapin_sidecar.remotes import directory, slotfiles\n"
        f"os.setgroups([]); os.setgid({nobody}); os.setuid({nobody})\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", child, *_materialize(work / "cache", work / "pod", rev, remote)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": str(work)},
        )

    done = run()
    assert done.returncode == 8, done.stderr
    assert "Traceback" not in done.stderr
    assert str(obj) in done.stderr, done.stderr
    assert "Permission denied" in done.stderr
    assert "chmod" in done.stderr

    os.chmod(remote, 0)
    done = run()
    assert done.returncode == 8, done.stderr
    assert "Traceback" not in done.stderr
    assert str(remote) in done.stderr
    assert "Fix:" in done.stderr


def test_a_fifo_in_a_directory_remote_does_not_block(tmp_path: Path) -> None:
    """A FIFO where an object should be: refused as not the object, at once (opening it
    plainly would block forever)."""
    remote, _, files = _dir_remote(tmp_path)
    oid = object_name(files["b.bin"])
    path = Path(DirectoryRemote(remote).key(oid, Layout.DVC3))
    path.unlink()
    os.mkfifo(path)
    result: list[FetchReport] = []
    worker = threading.Thread(
        target=lambda: result.append(
            DirectoryRemote(remote).fetch(NodeCache(tmp_path / "cache"), [oid], Layout.DVC3)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(path, "wb"):  # unblock the reader so the thread can end
            pass
        pytest.fail("fetching from a FIFO blocked")
    assert result[0].corrupt == [oid]
