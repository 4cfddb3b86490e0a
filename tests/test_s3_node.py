"""Once per node: several processes, crashes and rotating keys around one node cache.

These run the real CLI (or a small child program) as separate processes against SeaweedFS,
through the fault proxy, which counts every byte it hands out: "downloaded once" is asserted
as "each object's bytes crossed the wire once", not inferred from our own counters.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from datapin_sidecar import cli
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.remotes.credentials import SecretDirCredentials
from datapin_sidecar.remotes.endpoint import RemoteConfig
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote

from testkit.faultproxy import FaultProxy
from testkit.k8svolume import kubelet_update
from testkit.seaweed import SeaweedServer
from testkit.trees import object_name, put_revision
from tests.test_materialize import published
from tests.test_s3_fetch import assert_cache_sound

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def upload_revision(seaweed: SeaweedServer, bucket: str, files: dict[str, bytes], tmp: Path) -> str:
    """Put `files` and their `.dir` into `bucket` under `store/` (DVC 3 layout); the rev."""
    staging = NodeCache(tmp / "staging")
    rev = put_revision(staging, files).oid
    client = seaweed.client()
    for path in (staging.root / "files").rglob("*"):
        if path.is_file():
            key = "store/" + str(path.relative_to(staging.root))
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return rev


def wire_bytes(proxy: FaultProxy) -> Counter[str]:
    """Body bytes handed out per object path, leaving out one-byte existence probes."""
    sent: Counter[str] = Counter()
    for r in proxy.requests:
        if r.method == "GET" and r.range != "bytes=0-0" and r.status in (200, 206):
            sent[r.path] += r.body_bytes
    return sent


def test_four_processes_download_each_object_once(
    seaweed: SeaweedServer, s3_bucket: str, fault_proxy: FaultProxy, xfs_dir: Path
) -> None:
    files = {f"d{i % 7}/f{i:04d}.bin": os.urandom(16 * 1024 + i) for i in range(400)}
    files["big.bin"] = os.urandom(40 * MiB + 17)
    rev = upload_revision(seaweed, s3_bucket, files, xfs_dir)
    fault_proxy.latency(0.002, method="GET", times=None)  # keep the four in each other's way
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
    }
    cache = xfs_dir / "cache"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "datapin_sidecar.cli",
                "materialize",
                "--cache",
                str(cache),
                "--dest",
                str(xfs_dir / f"pod{n}"),
                "--rev",
                rev,
                "--remote",
                f"s3://{s3_bucket}/store",
                "--endpoint-url",
                fault_proxy.endpoint,
                "--jobs",
                "8",
                "--json",
                "--quiet",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))
    for n in range(4):
        assert published(xfs_dir / f"pod{n}" / "current") == files
    sizes = {f"/{s3_bucket}/store/files/md5/{o[:2]}/{o[2:]}": len(d) for o, d in (
        (object_name(data), data) for data in files.values()
    )}  # fmt: skip
    sent = wire_bytes(fault_proxy)
    twice = {k: (sent[k], size) for k, size in sizes.items() if sent[k] != size}
    assert twice == {}, "objects whose bytes crossed the wire other than exactly once"
    fetched = sum(r["fetched_objects"] for r in results)
    waited = sum(r["waited_objects"] for r in results)
    assert fetched == len(sizes) + 1  # each object and the `.dir`, by exactly one process
    assert waited > 0, "the processes never overlapped: the test proves nothing"
    assert_cache_sound(NodeCache(cache))


_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from datapin_sidecar.engine.cache import NodeCache
    from datapin_sidecar.engine.materialize import Request, materialize
    from datapin_sidecar.engine.revision import Revision
    from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote
    from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
    from datapin_sidecar.remotes.endpoint import RemoteConfig

    endpoint, bucket, rev, cache, dest, access, secret = sys.argv[1:]
    async def main():
        keys = StaticCredentials(
            Credentials(access_key_id=access, secret_access_key=secret), source="test"
        )
        cfg = RemoteConfig.from_url(f"s3://{bucket}/store", endpoint_url=endpoint)
        opts = FetchOptions(part_size=1024 * 1024, jobs=2)
        async with S3Remote(cfg, keys, options=opts) as remote:
            req = Request(cache=NodeCache(cache), revision=Revision.parse(rev),
                          dest=Path(dest), remote=remote)
            return await asyncio.to_thread(materialize, req)
    result = asyncio.run(main())
    print(json.dumps({"fetched_bytes": result.fetched_bytes}))
    """
)


def parts_done(journal: Path) -> int:
    """Parts a download journal records as on disk (its second line: one flag per part)."""
    return journal.read_bytes().partition(b"\n")[2].count(b"1")


def test_kill_9_mid_download_then_the_rerun_resumes(
    seaweed: SeaweedServer, s3_bucket: str, fault_proxy: FaultProxy, xfs_dir: Path
) -> None:
    big = os.urandom(12 * MiB + 5)
    files = {"big.bin": big, "small.txt": b"small\n"}
    rev = upload_revision(seaweed, s3_bucket, files, xfs_dir)
    key = object_name(big)
    fault_proxy.latency(0.4, path=key[2:], times=None)  # ~0.4 s per 1 MiB part, 2 at a time
    cache = NodeCache(xfs_dir / "cache")
    args = [
        sys.executable, "-c", _CHILD, fault_proxy.endpoint, s3_bucket, rev,
        str(cache.root), str(xfs_dir / "pod"), seaweed.access_key, seaweed.secret_key,
    ]  # fmt: skip
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = Path(cache.slot_path(key, Layout.DVC3) + ".parts")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and parts_done(journal) >= 3:
            break
        assert child.poll() is None, child.communicate()[1].decode()
        time.sleep(0.05)
    else:
        pytest.fail("the download never got three parts in")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not cache.present(key, Layout.DVC3)
    assert not (xfs_dir / "pod" / "current").exists()
    assert_cache_sound(cache)
    done_before = parts_done(journal)

    fault_proxy.clear_faults()
    fault_proxy.reset_counters()
    rerun = subprocess.run(args, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert published(xfs_dir / "pod" / "current") == files
    assert_cache_sound(cache)
    # It resumed: the parts already on disk were not fetched again.
    sent = wire_bytes(fault_proxy)
    big_path = f"/{s3_bucket}/store/files/md5/{key[:2]}/{key[2:]}"
    assert sent[big_path] <= len(big) - done_before * MiB
    assert json.loads(rerun.stdout)["fetched_bytes"] < len(big)
    assert not journal.exists()
    assert not [p for p in cache.fetch_dir.rglob("*") if p.is_file()], "download slots left"


def test_rotated_secret_is_picked_up_after_a_403(
    seaweed: SeaweedServer, s3_bucket: str, xfs_dir: Path, tmp_path: Path
) -> None:
    files = {"a.txt": b"rotated keys still read this\n"}
    rev = upload_revision(seaweed, s3_bucket, files, xfs_dir)
    secret_dir = tmp_path / "secret"
    kubelet_update(
        secret_dir,
        {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": "old-revoked-secret"},
        "2026_11_21_10_00_00.000000001",
    )
    # A check interval longer than the test: only the 403 can make it re-read the Secret.
    source = SecretDirCredentials(secret_dir, min_check_interval=3600)
    assert source.get().secret_access_key == "old-revoked-secret"
    kubelet_update(
        secret_dir,
        {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key},
        "2026_11_21_10_05_00.000000002",
    )
    cfg = RemoteConfig.from_url(f"s3://{s3_bucket}/store", endpoint_url=seaweed.endpoint)

    async def pull() -> object:
        async with S3Remote(cfg, source, options=FetchOptions()) as remote:
            request = Request(
                cache=NodeCache(xfs_dir / "c"),
                revision=Revision.parse(rev),
                dest=xfs_dir / "p",
                remote=remote,
            )
            return await asyncio.to_thread(materialize, request)

    result = asyncio.run(pull())
    assert published(xfs_dir / "p" / "current") == files
    assert result.retries == {"credentials_rotated": 1}  # type: ignore[attr-defined]


def test_cli_keys_from_env_file_and_credentials_dir(
    seaweed: SeaweedServer,
    s3_bucket: str,
    xfs_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {"x/y.bin": os.urandom(1000)}
    rev = upload_revision(seaweed, s3_bucket, files, xfs_dir)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"# as in the B2 tutorial\nexport AWS_ACCESS_KEY_ID={seaweed.access_key}\n"
        f'AWS_SECRET_ACCESS_KEY="{seaweed.secret_key}"\n'
    )
    secret_dir = tmp_path / "secret"
    kubelet_update(
        secret_dir,
        {"keyID": seaweed.access_key, "applicationKey": seaweed.secret_key + "\n"},
        "2026_11_21_10_00_00.000000001",
    )
    base = ["materialize", "--cache", str(xfs_dir / "c"), "--rev", rev,
            "--remote", f"s3://{s3_bucket}/store", "--endpoint-url", seaweed.endpoint,
            "--quiet"]  # fmt: skip
    assert cli.main([*base, "--dest", str(xfs_dir / "a"), "--env-file", str(env_file)]) == 0
    assert published(xfs_dir / "a" / "current") == files
    assert (
        cli.main([*base, "--dest", str(xfs_dir / "b"), "--credentials-dir", str(secret_dir)]) == 0
    )
    assert published(xfs_dir / "b" / "current") == files
    # No keys anywhere and a cold cache: a usage error that says where it looked. (A warm
    # cache needs no keys: nothing is fetched.)
    cold = [*base, "--dest", str(xfs_dir / "c2")]
    cold[cold.index("--cache") + 1] = str(xfs_dir / "cold")
    assert cli.main(cold) == 2
    err = capsys.readouterr().err
    assert "AWS_ACCESS_KEY_ID" in err
    assert seaweed.secret_key not in err


def test_an_s3_remote_opens_once_at_its_first_use_and_never_after_an_abort(
    seaweed: SeaweedServer, s3_bucket: str, tmp_path: Path
) -> None:
    """node.remotes.LazyRemote: nothing opens (no HTTP client, no connection) until a call
    needs the network; threads asking at once share one opening; the program's exit closes
    it; an abort before the first use means no call opens it at all."""
    import contextlib  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from datapin_sidecar.engine.remote import Remote  # noqa: PLC0415
    from datapin_sidecar.node.remotes import LazyRemote  # noqa: PLC0415
    from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials  # noqa: PLC0415
    from datapin_sidecar.remotes.opening import open_s3_remote  # noqa: PLC0415

    rev = put_revision(NodeCache(tmp_path / "src"), {"a.txt": b"a"}).oid
    seaweed.put(s3_bucket, f"store/files/md5/{rev[:2]}/{rev[2:]}", b"x")  # any object will do
    config = RemoteConfig.from_url(f"s3://{s3_bucket}/store", endpoint_url=seaweed.endpoint)
    keys = StaticCredentials(
        Credentials(access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key),
        source="the test",
    )
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def opener() -> AsyncIterator[Remote]:
        events.append("open")
        async with open_s3_remote(config, keys, jobs=4) as remote:
            yield remote
        events.append("closed")

    async def scenario() -> list[Layout | None]:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            lazy = LazyRemote(config, opener, loop=loop, stack=stack)
            assert lazy.url == config.describe()
            assert lazy.key(rev, Layout.DVC3).endswith(f"files/md5/{rev[:2]}/{rev[2:]}")
            assert events == []  # no network yet
            found: list[Layout | None] = []
            lock = threading.Lock()

            def ask() -> None:
                layout = lazy.find(rev, (Layout.DVC3,))
                with lock:
                    found.append(layout)

            await asyncio.gather(*(asyncio.to_thread(ask) for _ in range(4)))
            assert events == ["open"]  # one opening for four threads

            aborted = LazyRemote(config, opener, loop=loop, stack=stack)
            aborted.abort()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.to_thread(aborted.find, rev, (Layout.DVC3,))
            assert events == ["open"]
        assert events == ["open", "closed"]
        return found

    assert asyncio.run(scenario()) == [Layout.DVC3] * 4
