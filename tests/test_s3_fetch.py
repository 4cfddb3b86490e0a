"""Fetching from S3 / Backblaze B2: what users pushed with real DVC comes back byte-exact.

Everything here talks to a real SeaweedFS on 127.0.0.1, through the fault-injecting proxy when
the test is about faults. Fixtures were pushed by real `dvc push` (DVC 3 and DVC 2.58).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
from datapin_sidecar import cli
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, hash_file
from datapin_sidecar.engine.materialize import Request, Result, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import CorruptObjectError, ObjectsMissingError, RemoteError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.endpoint import RemoteConfig
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote
from datapin_sidecar.remotes.sigv4 import EMPTY_SHA256, Signer

from testkit.dvcremote import S3DvcFixture
from testkit.faultproxy import FaultProxy
from testkit.seaweed import SeaweedServer
from testkit.trees import put_revision
from tests.test_materialize import published

MiB = 1024 * 1024


def creds(access: str, secret: str) -> StaticCredentials:
    return StaticCredentials(
        Credentials(access_key_id=access, secret_access_key=secret), source="the test"
    )


def config(endpoint: str, bucket: str, prefix: str = "") -> RemoteConfig:
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return RemoteConfig.from_url(url, endpoint_url=endpoint)


async def pull(
    cache: NodeCache,
    rev: str,
    dest: Path,
    cfg: RemoteConfig,
    keys: StaticCredentials,
    *,
    layout: Layout | None = None,
    **options: object,
) -> Result:
    """Materialise `rev` from the remote the way the CLI does: the remote on this loop, the
    filesystem work in a thread."""
    async with S3Remote(cfg, keys, options=FetchOptions(**options)) as remote:  # type: ignore[arg-type]
        request = Request(
            cache=cache, revision=Revision.parse(rev), dest=dest, remote=remote, layout=layout
        )
        return await asyncio.to_thread(materialize, request)


def assert_cache_sound(cache: NodeCache) -> None:
    """Every object in the cache hashes to its name (DVC 3 layout) and nothing is half-done."""
    root = cache.root / "files" / "md5"
    for path in root.rglob("*"):
        if path.is_file():
            name = path.parent.name + path.name.removesuffix(".dir")
            assert hash_file(path, Layout.DVC3) == name, f"{path} does not hash to its name"


# -- signing -----------------------------------------------------------------------------------


def test_our_sigv4_matches_botocore() -> None:
    """The same request signed by botocore's SigV4 and ours gives the same Authorization."""
    from botocore.auth import S3SigV4Auth  # noqa: PLC0415
    from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    from botocore.credentials import Credentials as BotoCredentials  # noqa: PLC0415

    now = 1_700_000_000.0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for token in (None, "TOKEN/with+chars="):
        path = "/bucket/store/files/md5/ab/c%20d%2Be%C3%A9"
        ours = Signer(region="us-west-002").headers(
            method="GET",
            host="s3.us-west-002.backblazeb2.com",
            path=path,
            access_key_id="0025AKID",
            secret_access_key="K002SECRET",
            session_token=token,
            now=now,
        )
        request = AWSRequest(
            method="GET",
            url=f"https://s3.us-west-002.backblazeb2.com{path}",
            headers={"x-amz-content-sha256": EMPTY_SHA256},
        )
        request.context["timestamp"] = stamp
        auth = S3SigV4Auth(BotoCredentials("0025AKID", "K002SECRET", token), "s3", "us-west-002")
        request.headers["X-Amz-Date"] = stamp
        if token:
            request.headers["X-Amz-Security-Token"] = token
        canonical = auth.canonical_request(request)
        signature = auth.signature(auth.string_to_sign(request, canonical), request)
        assert ours["Authorization"].endswith(f"Signature={signature}")
        assert ours["x-amz-date"] == stamp


# -- pulling what DVC pushed -------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 2])
def test_cli_pulls_what_dvc_pushed_from_the_repo_config(
    version: int, request: pytest.FixtureRequest, xfs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The B2 tutorial's repo (remote + endpoint in .dvc/config, keys in .dvc/config.local):
    `--dvc-repo --target` needs nothing else, for DVC 3 and for DVC 2's legacy layout."""
    fx: S3DvcFixture = request.getfixturevalue(f"dvc{version}_s3")
    code = cli.main(
        [
            "materialize",
            "--cache", str(xfs_dir / "cache"),
            "--dest", str(xfs_dir / "pod"),
            "--dvc-repo", str(fx.dvc.repo),
            "--target", "data.dvc",
            "--json", "--quiet",
        ]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert published(xfs_dir / "pod" / "current") == fx.files
    assert result["revision"] == fx.rev
    # Every object the push made (the files' distinct objects and the `.dir`), once each.
    assert result["fetched_objects"] == len(fx.keys)
    legacy_dir = xfs_dir / "cache" / fx.rev[:2] / fx.rev[2:]
    dvc3_dir = xfs_dir / "cache" / "files" / "md5" / fx.rev[:2] / fx.rev[2:]
    assert (legacy_dir if version == 2 else dvc3_dir).is_file()


def test_cli_remote_url_endpoint_and_environment_keys(
    dvc3_s3: S3DvcFixture,
    xfs_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--remote s3://… --endpoint-url` with keys in the environment, as s5cmd users do; then
    a warm run fetches nothing."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", dvc3_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", dvc3_s3.secret_key)
    args = [
        "materialize",
        "--cache", str(xfs_dir / "cache"),
        "--rev", dvc3_s3.rev,
        "--remote", dvc3_s3.remote_url,
        "--endpoint-url", dvc3_s3.endpoint,
        "--json", "--quiet",
    ]  # fmt: skip
    assert cli.main([*args, "--dest", str(xfs_dir / "a")]) == 0
    cold = json.loads(capsys.readouterr().out)
    assert published(xfs_dir / "a" / "current") == dvc3_s3.files
    assert cold["fetched_objects"] > 0
    assert cli.main([*args, "--dest", str(xfs_dir / "b")]) == 0
    warm = json.loads(capsys.readouterr().out)
    assert (warm["fetched_objects"], warm["misses"]) == (0, 0)
    assert published(xfs_dir / "b" / "current") == dvc3_s3.files


def test_b2_strict_endpoint_accepts_our_requests(
    dvc3_s3: S3DvcFixture, fault_proxy: FaultProxy, xfs_dir: Path
) -> None:
    """Through a proxy that answers 400 to any checksum header, as B2 does, the default
    client works; a stock botocore client (checksums on) is refused, proving the proxy bites."""
    fault_proxy.b2_strict = True
    cfg = config(fault_proxy.endpoint, dvc3_s3.bucket, dvc3_s3.prefix)
    keys = creds(dvc3_s3.access_key, dvc3_s3.secret_key)
    result = asyncio.run(pull(NodeCache(xfs_dir / "cache"), dvc3_s3.rev, xfs_dir / "p", cfg, keys))
    assert published(xfs_dir / "p" / "current") == dvc3_s3.files
    assert result.fetched_objects > 0
    # 416: the Range probe of the empty file's object, which is how we learn it is empty.
    assert [r for r in fault_proxy.requests if r.status not in (200, 206, 416)] == []

    import botocore.session  # noqa: PLC0415
    from botocore.exceptions import ClientError  # noqa: PLC0415

    stock = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=fault_proxy.endpoint,
        region_name="us-east-1",
        aws_access_key_id=dvc3_s3.access_key,
        aws_secret_access_key=dvc3_s3.secret_key,
    )
    with pytest.raises(ClientError, match="InvalidArgument"):
        stock.get_object(Bucket=dvc3_s3.bucket, Key=dvc3_s3.keys[0])


# -- faults ------------------------------------------------------------------------------------


@pytest.fixture
def big_revision(seaweed: SeaweedServer, s3_bucket: str) -> tuple[str, dict[str, bytes]]:
    """A revision with one 3 MiB object (several parts at a 1 MiB part size) and small ones,
    put in the bucket in the DVC 3 layout."""
    files = {
        "big.bin": os.urandom(3 * MiB + 123),
        "small/a.txt": b"alpha\n",
        "small/b.bin": os.urandom(70_000),
        "empty": b"",
    }
    staging = NodeCache(Path(f"/var/tmp/datapin-staging-{s3_bucket}"))
    try:
        rev = put_revision(staging, files).oid
        for path in (staging.root / "files").rglob("*"):
            if path.is_file():
                key = "store/" + str(path.relative_to(staging.root))
                seaweed.put(s3_bucket, key, path.read_bytes())
    finally:
        import shutil  # noqa: PLC0415

        shutil.rmtree(staging.root, ignore_errors=True)
    return rev, files


def _keys_of(seaweed: SeaweedServer) -> StaticCredentials:
    return creds(seaweed.access_key, seaweed.secret_key)


def test_retries_slowdown_resets_truncation_and_a_flipped_bit(
    seaweed: SeaweedServer,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    rev, files = big_revision
    big, small, tiny = (
        hashlib.md5(files[name]).hexdigest()[2:]
        for name in ("big.bin", "small/b.bin", "small/a.txt")
    )
    fault_proxy.slowdown(retry_after=1, method="GET", times=2)  # the first requests
    fault_proxy.status(500, "InternalError", method="GET", times=1)
    fault_proxy.reset(100_000, path=big, times=2)
    fault_proxy.truncate(5_000, path=small, times=1)
    fault_proxy.flip(2, path=tiny, times=1)
    cfg = config(fault_proxy.endpoint, s3_bucket, "store")
    cache = NodeCache(xfs_dir / "cache")
    started = time.monotonic()
    result = asyncio.run(
        pull(cache, rev, xfs_dir / "p", cfg, _keys_of(seaweed), part_size=MiB, backoff_base=0.05)
    )
    assert published(xfs_dir / "p" / "current") == files
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was not honoured"
    assert [(r.kind, r.applied) for r in fault_proxy.rules() if r.times != 0] == []
    assert result.retries["SlowDown"] == 2
    assert result.retries["InternalError"] == 1
    assert result.retries.get("truncated", 0) + result.retries.get("connection", 0) == 3
    assert result.retries["md5_mismatch"] == 1
    assert_cache_sound(cache)


def test_a_broken_part_resumes_from_the_last_byte_received(
    seaweed: SeaweedServer,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    rev, files = big_revision
    big = hashlib.md5(files["big.bin"]).hexdigest()
    # A clean close after 300 000 bytes (a reset may drop bytes the kernel had received, so
    # where a resume starts would depend on timing).
    fault_proxy.truncate(300_000, path=big[2:], times=1)
    cfg = config(fault_proxy.endpoint, s3_bucket, "store")
    asyncio.run(
        pull(NodeCache(xfs_dir / "c"), rev, xfs_dir / "p", cfg, _keys_of(seaweed), part_size=MiB)
    )
    assert published(xfs_dir / "p" / "current") == files
    ranges = sorted(r.range or "" for r in fault_proxy.gets(big[2:]))
    size = len(files["big.bin"])
    # Four parts; the first broke after 300 000 bytes and was resumed from there, not from 0.
    assert ranges == sorted(
        [
            f"bytes=0-{MiB - 1}",
            f"bytes=300000-{MiB - 1}",
            f"bytes={MiB}-{2 * MiB - 1}",
            f"bytes={2 * MiB}-{3 * MiB - 1}",
            f"bytes={3 * MiB}-{size - 1}",
        ]
    )


def test_bytes_that_always_fail_their_md5_never_enter_the_cache(
    seaweed: SeaweedServer,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    rev, files = big_revision
    bad = hashlib.md5(files["small/b.bin"]).hexdigest()
    fault_proxy.flip(7, path=bad[2:], times=None)
    cache = NodeCache(xfs_dir / "cache")
    cfg = config(fault_proxy.endpoint, s3_bucket, "store")
    with pytest.raises(CorruptObjectError, match=bad) as info:
        asyncio.run(pull(cache, rev, xfs_dir / "p", cfg, _keys_of(seaweed)))
    assert f"store/files/md5/{bad[:2]}/{bad[2:]}" in str(info.value)
    assert "dvc push" in str(info.value)
    assert len(fault_proxy.gets(bad[2:])) == 3  # FetchOptions.verify_attempts
    assert not cache.present(bad, Layout.DVC3)
    assert not (xfs_dir / "p" / "current").exists()
    assert_cache_sound(cache)


def test_a_stalled_response_times_out_and_is_retried(
    seaweed: SeaweedServer,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    rev, files = big_revision
    small = hashlib.md5(files["small/b.bin"]).hexdigest()
    fault_proxy.latency(3.0, path=small[2:], times=1)
    cfg = config(fault_proxy.endpoint, s3_bucket, "store")
    started = time.monotonic()
    result = asyncio.run(
        pull(NodeCache(xfs_dir / "c"), rev, xfs_dir / "p", cfg, _keys_of(seaweed), read_timeout=0.5)
    )
    assert published(xfs_dir / "p" / "current") == files
    assert result.retries["timeout"] == 1
    assert time.monotonic() - started < 3.0, "waited for the stalled answer instead of retrying"


def test_a_part_that_keeps_failing_names_its_object(
    seaweed: SeaweedServer,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    """Parts of a large object fail on every attempt: the fetch ends with a RemoteError that
    names the object's key, the other objects are kept, nothing partial is published."""
    rev, files = big_revision
    big = hashlib.md5(files["big.bin"]).hexdigest()
    fault_proxy.status(503, "ServiceUnavailable", path=big[2:], times=None)
    cache = NodeCache(xfs_dir / "c")
    cfg = config(fault_proxy.endpoint, s3_bucket, "store")
    with pytest.raises(RemoteError, match="after 2 attempts") as info:
        asyncio.run(
            pull(cache, rev, xfs_dir / "p", cfg, _keys_of(seaweed), attempts=2, backoff_base=0.01)
        )
    assert info.value.cause == "gave_up"
    assert f"store/files/md5/{big[:2]}/{big[2:]}" in str(info.value)
    assert "ServiceUnavailable" in str(info.value)
    assert not (xfs_dir / "p" / "current").exists()
    small = hashlib.md5(files["small/b.bin"]).hexdigest()
    assert cache.present(small, Layout.DVC3)
    assert not cache.present(big, Layout.DVC3)


def test_missing_object_names_the_keys_and_the_fix(
    seaweed: SeaweedServer,
    s3_bucket: str,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    rev, files = big_revision
    gone = hashlib.md5(files["small/a.txt"]).hexdigest()
    seaweed.client().delete_object(Bucket=s3_bucket, Key=f"store/files/md5/{gone[:2]}/{gone[2:]}")
    cfg = config(seaweed.endpoint, s3_bucket, "store")
    with pytest.raises(ObjectsMissingError) as info:
        asyncio.run(pull(NodeCache(xfs_dir / "c"), rev, xfs_dir / "p", cfg, _keys_of(seaweed)))
    message = str(info.value)
    assert gone in message
    assert f"store/files/md5/{gone[:2]}/{gone[2:]}" in message
    assert "dvc push" in message
    assert s3_bucket in message


def test_wrong_keys_fail_clearly_without_the_secret(
    s3_bucket: str,
    seaweed: SeaweedServer,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rev, _ = big_revision
    secret = "WRONG-SECRET-do-not-print-4242"
    caplog.set_level(logging.DEBUG)
    cfg = config(seaweed.endpoint, s3_bucket, "store")
    for keys, cause in (
        (creds(seaweed.access_key, secret), "SignatureDoesNotMatch"),
        (creds("NOSUCHKEYID", secret), "InvalidAccessKeyId|access denied"),
    ):
        started = time.monotonic()
        with pytest.raises(RemoteError, match=cause) as info:
            asyncio.run(pull(NodeCache(xfs_dir / "c"), rev, xfs_dir / "p", cfg, keys))
        assert time.monotonic() - started < 10
        assert info.value.cause == "access_denied"
        assert secret not in str(info.value)
        assert secret not in repr(info.value.__cause__)
        assert secret not in caplog.text
        assert "Fix:" in str(info.value)


def test_missing_bucket_and_unreachable_endpoint_fail_in_bounded_time(
    seaweed: SeaweedServer, xfs_dir: Path, fault_proxy: FaultProxy
) -> None:
    rev = "0" * 32 + ".dir"
    cfg = config(seaweed.endpoint, "no-such-bucket-here", "store")
    with pytest.raises(RemoteError, match="no-such-bucket-here") as info:
        asyncio.run(pull(NodeCache(xfs_dir / "c"), rev, xfs_dir / "p", cfg, _keys_of(seaweed)))
    assert info.value.cause == "no_bucket"

    fault_proxy.down()
    cfg = config(fault_proxy.endpoint, "bucket", "store")
    started = time.monotonic()
    with pytest.raises(RemoteError, match="cannot connect") as info:
        asyncio.run(
            pull(
                NodeCache(xfs_dir / "c"),
                rev,
                xfs_dir / "p",
                cfg,
                _keys_of(seaweed),
                backoff_base=0.05,
            )
        )
    assert info.value.cause == "unreachable"
    assert time.monotonic() - started < 10
    assert "--endpoint-url" in str(info.value)


def test_an_object_another_process_holds_is_waited_for_then_taken_over(
    seaweed: SeaweedServer,
    s3_bucket: str,
    big_revision: tuple[str, dict[str, bytes]],
    xfs_dir: Path,
) -> None:
    """A slot held by someone else is waited for on its lock: when the holder lets go without
    installing (it died), the fetch downloads the object itself at once, not at a poll; when it
    never lets go, the fetch fails as `wait_timeout` in about `wait_timeout`."""
    rev, files = big_revision
    oid = hashlib.md5(files["small/b.bin"]).hexdigest()
    cfg = config(seaweed.endpoint, s3_bucket, "store")
    cache = NodeCache(xfs_dir / "cache")
    holder = cache.claim(oid, Layout.DVC3)  # another open file description: another process
    assert holder is not None

    async def pull_and_let_go() -> tuple[Result, float]:
        async def let_go() -> float:
            await asyncio.sleep(1.0)
            holder.release()
            return time.monotonic()

        released = asyncio.create_task(let_go())
        result = await pull(cache, rev, xfs_dir / "p", cfg, _keys_of(seaweed), wait_timeout=60.0)
        return result, time.monotonic() - await released

    result, after_release = asyncio.run(pull_and_let_go())
    assert published(xfs_dir / "p" / "current") == files
    assert after_release < 5.0, "the fetch did not wake when the holder let go"
    assert result.waited_objects == 0, "the holder died: the object is ours to download"
    assert_cache_sound(cache)

    other = NodeCache(xfs_dir / "other")
    stuck = other.claim(oid, Layout.DVC3)
    assert stuck is not None
    started = time.monotonic()
    with pytest.raises(RemoteError, match="held the download") as info:
        asyncio.run(pull(other, rev, xfs_dir / "q", cfg, _keys_of(seaweed), wait_timeout=1.0))
    assert info.value.cause == "wait_timeout"
    assert time.monotonic() - started < 30.0
    stuck.release()


def test_a_batch_of_small_writes_keeps_each_objects_outcome_and_closes_every_descriptor(
    xfs_dir: Path,
) -> None:
    """Small objects are written in batches (s3fetch._SmallWrites): a body that fails its md5,
    or a write that fails, is that object's outcome only, and no descriptor outlives the batch
    (a leaked duplicate would hold its slot's lock for the life of the process)."""
    from datapin_sidecar.remotes.slotfiles import write_small_many  # noqa: PLC0415

    good, bad, unwritable = (os.urandom(70_000) for _ in range(3))
    names = {
        "good": hashlib.md5(good).hexdigest(),
        "bad": hashlib.md5(bad).hexdigest(),
        "unwritable": hashlib.md5(unwritable).hexdigest(),
    }
    paths = {name: xfs_dir / name for name in names}
    for path in paths.values():
        path.write_bytes(b"")
    fds = [
        os.open(paths["good"], os.O_RDWR),
        os.open(paths["bad"], os.O_RDWR),
        os.open(paths["unwritable"], os.O_RDONLY),  # its write fails: EBADF
    ]
    results = write_small_many(
        [
            (fds[0], Layout.DVC3, names["good"], good, 0),
            (fds[1], Layout.DVC3, names["bad"], bad[:-1] + b"!", 0),
            (fds[2], Layout.DVC3, names["unwritable"], unwritable, 0),
        ]
    )
    assert results[:2] == [True, False]
    assert isinstance(results[2], OSError)
    assert paths["good"].read_bytes() == good
    assert paths["bad"].read_bytes() == b""  # a body that fails its md5 is never written
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
