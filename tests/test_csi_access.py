"""The CSI node plugin's proof of access, per tenant (`datapin_sidecar.csi.access`).

Two tenants share one node cache and one real SeaweedFS server, each with keys that S3 itself
scopes to the tenant's own bucket (`testkit.tenants`). Tenant A's dataset was pushed by real
DVC; tenant B tries to be served A's cached bytes by every route the threat model names, and
must be refused, while A is accepted. The S3 remote's `prove` is also tested alone (multipart
ETags, legacy text objects, hostile listings), and the directory remote's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from datapin_sidecar.csi.access import Access, ProofMethod, fingerprint, remote_id
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import ProofReport
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_key
from datapin_sidecar.errors import AccessRefusedError, Refusal, RemoteCause, RemoteError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.directory import DirectoryRemote
from datapin_sidecar.remotes.endpoint import RemoteConfig
from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote
from datapin_sidecar.remotes.s3list import MAX_KEYS, MAX_LIST_BODY, parse_page

from testkit.dvcremote import S3DvcFixture, object_key
from testkit.seaweed import SeaweedUnavailable, find_weed
from testkit.tenants import Tenant, TenantSeaweed, push_for
from testkit.trees import object_name

pytestmark = pytest.mark.s3

EMPTY = hashlib.md5(b"", usedforsecurity=False).hexdigest()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantSeaweed]:
    """A SeaweedFS server with tenants `a` and `b`, each with keys for its own bucket only."""
    try:
        weed = find_weed()
    except SeaweedUnavailable as exc:
        pytest.skip(f"no SeaweedFS S3 server: {exc.reason}")
    with TenantSeaweed(tmp_path_factory.mktemp("tenants"), weed=weed, tenants=("a", "b")) as s:
        yield s


@pytest.fixture(scope="module")
def pushed_a(tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed) -> S3DvcFixture:
    """Tenant A's dataset, pushed by real DVC 3 to `s3://<A's bucket>/dvcstore`."""
    return push_for(tenants, "a", tmp_path_factory.mktemp("push-a"))


def _keys(tenant: Tenant | None, *, access: str = "", secret: str = "") -> StaticCredentials:
    creds = Credentials(
        access_key_id=tenant.access_key if tenant else access,
        secret_access_key=tenant.secret_key if tenant else secret,
    )
    return StaticCredentials(creds, source="the test's Secret")


@contextlib.asynccontextmanager
async def s3_remote(
    endpoint: str, bucket: str, keys: StaticCredentials, prefix: str = "dvcstore"
) -> AsyncIterator[S3Remote]:
    config = RemoteConfig.from_url(f"s3://{bucket}/{prefix}", endpoint_url=endpoint)
    async with S3Remote(config, keys, options=FetchOptions(jobs=8, attempts=2)) as remote:
        yield remote


class Counting:
    """A real remote, counting the objects it is asked to prove (how a test sees a proof
    remembered or a record used)."""

    def __init__(self, remote: S3Remote) -> None:
        self.remote = remote
        self.asked: list[int] = []

    @property
    def url(self) -> str:
        return self.remote.url

    def key(self, oid: str, layout: Layout) -> str:
        return self.remote.key(oid, layout)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self.remote.find(oid, layouts)

    def fetch(self, *args: Any, **kwargs: Any) -> Any:
        return self.remote.fetch(*args, **kwargs)

    def abort(self) -> None:
        self.remote.abort()

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        self.asked.append(len(oids))
        return self.remote.prove(oids, layout, trust_etags=trust_etags, sizes=sizes)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _objects(pushed: S3DvcFixture) -> list[str]:
    return sorted({object_name(data) for data in pushed.files.values()})


@pytest.fixture
async def node(tmp_path: Path, tenants: TenantSeaweed, pushed_a: S3DvcFixture) -> NodeCache:
    """A node cache holding A's whole revision, fetched with A's keys (A's pod came first)."""
    cache = NodeCache(tmp_path / "root" / "cache")
    a = tenants.tenants["a"]
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as remote:
        report = await remote.afetch(cache, [pushed_a.rev, *_objects(pushed_a)], Layout.DVC3)
    assert not report.absent
    assert not report.corrupt
    return cache


def _access(cache: NodeCache, clock: Clock | None = None) -> Access:
    return Access(cache.root.parent, ttl=300.0, **({"clock": clock} if clock else {}))


async def _prove(
    access: Access,
    remote: Any,
    cache: NodeCache,
    pin: str,
    tenant: Tenant,
    *,
    trust_etags: bool = True,
) -> None:
    await access.prove(
        remote=remote,
        credentials_fingerprint=fingerprint(tenant.access_key, tenant.secret_key),
        cache=cache,
        revision=Revision.parse(pin),
        layout=Layout.DVC3,
        dataset=f"data-{tenant.name}",
        trust_etags=trust_etags,
    )


def _assert_names_no_keys(message: str, *tenants: Tenant) -> None:
    for t in tenants:
        assert t.access_key not in message
        assert t.secret_key not in message


# -- two tenants on one node --------------------------------------------------------------------


@pytest.mark.parametrize("trust_etags", [True, False], ids=["etags", "content"])
async def test_owner_is_accepted_and_its_record_written(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture, trust_etags: bool
) -> None:
    a = tenants.tenants["a"]
    access = _access(node)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await _prove(access, remote, node, pushed_a.rev, a, trust_etags=trust_etags)
        objects = len(_objects(pushed_a))
        assert remote.asked == [1, objects]
        (record,) = access.records()
        assert record.remote_id == remote_id(s3)
        assert record.tree_key == tree_key(pushed_a.rev.removesuffix(".dir"), "dvc3")
        assert record.objects == objects
        assert record.method is (ProofMethod.ETAG if trust_etags else ProofMethod.CONTENT)
        path = node.root.parent / "provenance" / record.remote_id / record.tree_key
        assert json.loads(path.read_text())["remote"] == s3.url
        # A warm publish: the pin is remembered and the tree recorded, nothing is asked.
        await _prove(access, remote, node, pushed_a.rev, a, trust_etags=trust_etags)
        assert remote.asked == [1, objects]


async def test_a_dir_naming_another_tenants_objects_is_refused(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    # B copies A's manifest (B knows A's md5s) into B's own bucket, and nothing else.
    tenants.put(b.bucket, pushed_a.dir_key, tenants.get(a.bucket, pushed_a.dir_key))
    access = _access(node)
    async with s3_remote(tenants.endpoint, b.bucket, _keys(b)) as remote:
        with pytest.raises(AccessRefusedError) as refused:
            await _prove(access, remote, node, pushed_a.rev, b)
    assert refused.value.refusal is Refusal.OBJECTS_NOT_ON_REMOTE
    message = str(refused.value)
    assert "'data-b'" in message
    assert pushed_a.rev in message
    assert remote.url in message
    assert "they are missing" in message
    assert "dvc push" in message
    _assert_names_no_keys(message, a, b)
    assert access.records() == []


@pytest.mark.parametrize("trust_etags", [True, False], ids=["etags", "content"])
async def test_garbage_under_another_tenants_object_keys_is_refused(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture, trust_etags: bool
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    # In B's own bucket: A's manifest, and B's own bytes under the key of every object it names.
    prefix = f"garbage-{'etags' if trust_etags else 'content'}"
    dir_key = object_key(prefix, pushed_a.rev, layout="dvc3")
    tenants.put(b.bucket, dir_key, tenants.get(a.bucket, pushed_a.dir_key))
    for oid in _objects(pushed_a):
        tenants.put(b.bucket, object_key(prefix, oid, layout="dvc3"), b"not it " + oid.encode())
    access = _access(node)
    async with s3_remote(tenants.endpoint, b.bucket, _keys(b), prefix=prefix) as remote:
        with pytest.raises(AccessRefusedError) as refused:
            await _prove(access, remote, node, pushed_a.rev, b, trust_etags=trust_etags)
    assert refused.value.refusal is Refusal.OBJECTS_NOT_ON_REMOTE
    assert "they hold other bytes" in str(refused.value)
    assert access.records() == []


async def test_wrong_keys_are_refused(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    access = _access(node)
    # B's real keys against A's bucket (S3 answers AccessDenied), and keys nobody issued.
    for keys in (_keys(b), _keys(None, access="AKNOBODY1234", secret="Snot-a-secret-at-all")):
        async with s3_remote(tenants.endpoint, a.bucket, keys) as remote:
            with pytest.raises(AccessRefusedError) as refused:
                await _prove(access, remote, node, pushed_a.rev, b)
        assert refused.value.refusal is Refusal.WRONG_KEYS
        message = str(refused.value)
        assert "'data-b'" in message
        assert remote.url in message
        assert "Secret" in message
        _assert_names_no_keys(message, a, b)
    assert access.records() == []


async def test_a_pin_not_on_the_tenants_remote_is_refused_even_when_cached(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    b = tenants.tenants["b"]
    assert node.find(pushed_a.rev, (Layout.DVC3,)) is Layout.DVC3  # the node has it
    access = _access(node)
    async with s3_remote(tenants.endpoint, b.bucket, _keys(b), prefix="elsewhere") as remote:
        with pytest.raises(AccessRefusedError) as refused:
            await _prove(access, remote, node, pushed_a.rev, b)
    assert refused.value.refusal is Refusal.NOT_ON_REMOTE
    message = str(refused.value)
    assert remote.key(pushed_a.rev, Layout.DVC3) in message
    assert "even when the node" in message
    assert access.records() == []


async def test_a_cold_node_proves_by_content_with_the_fetch_that_fills_the_cache(
    tmp_path: Path, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    """ETags not trusted and nothing cached: the objects are downloaded once, into the cache
    (md5-checked), and that is their proof; the build then finds them there."""
    a = tenants.tenants["a"]
    cold = NodeCache(tmp_path / "root" / "cache")
    access = _access(cold)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await _prove(access, remote, cold, pushed_a.rev, a, trust_etags=False)
    assert remote.asked == [1]  # the pin; the objects came with the fetch
    assert all(cold.present(oid, Layout.DVC3) for oid in _objects(pushed_a))
    (record,) = access.records()
    assert record.method is ProofMethod.CONTENT
    assert record.objects == len(_objects(pushed_a))


@pytest.mark.parametrize("planted", ["manifest-only", "garbage"])
async def test_a_cold_node_still_refuses_objects_the_remote_lacks(
    tmp_path: Path, tenants: TenantSeaweed, pushed_a: S3DvcFixture, planted: str
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    prefix = f"cold-{planted}"
    tenants.put(
        b.bucket,
        object_key(prefix, pushed_a.rev, layout="dvc3"),
        tenants.get(a.bucket, pushed_a.dir_key),
    )
    if planted == "garbage":
        for oid in _objects(pushed_a):
            tenants.put(b.bucket, object_key(prefix, oid, layout="dvc3"), b"not " + oid.encode())
    cold = NodeCache(tmp_path / "root" / "cache")
    access = _access(cold)
    async with s3_remote(tenants.endpoint, b.bucket, _keys(b), prefix=prefix) as remote:
        with pytest.raises(AccessRefusedError) as refused:
            await _prove(access, remote, cold, pushed_a.rev, b, trust_etags=False)
    assert refused.value.refusal is Refusal.OBJECTS_NOT_ON_REMOTE
    assert access.records() == []
    assert not any(cold.present(oid, Layout.DVC3) for oid in _objects(pushed_a) if oid != EMPTY)


async def test_a_single_file_pin_is_proven_alone(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    pin = _objects(pushed_a)[0]
    access = _access(node)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await _prove(access, remote, node, pin, a)
        assert remote.asked == [1]
    assert access.records() == []  # nothing to record: the pin is the one object
    async with s3_remote(tenants.endpoint, b.bucket, _keys(b)) as remote_b:
        with pytest.raises(AccessRefusedError) as refused:
            await _prove(access, remote_b, node, pin, b)
    assert refused.value.refusal is Refusal.NOT_ON_REMOTE


async def test_the_pin_is_remembered_for_the_ttl_then_proven_again(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a = tenants.tenants["a"]
    clock = Clock()
    access = _access(node, clock)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await _prove(access, remote, node, pushed_a.rev, a)
        assert len(remote.asked) == 2
        clock.now += 299
        await _prove(access, remote, node, pushed_a.rev, a)
        assert len(remote.asked) == 2
        clock.now += 2  # expired: step (a) again, the record still covers the objects
        await _prove(access, remote, node, pushed_a.rev, a)
        assert remote.asked[2:] == [1]
        # Other keys (another pod's Secret) prove the pin themselves, and reuse the record.
        other = Tenant(
            name="a2", bucket=a.bucket, access_key=tenants.access_key, secret_key=tenants.secret_key
        )
        await _prove(access, remote, node, pushed_a.rev, other)
        assert remote.asked[3:] == [1]


async def test_the_dir_is_fetched_from_the_remote_when_the_cache_lacks_it(
    tmp_path: Path, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a = tenants.tenants["a"]
    cache = NodeCache(tmp_path / "root" / "cache")
    access = _access(cache)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as remote:
        await _prove(access, remote, cache, pushed_a.rev, a)
    assert cache.find(pushed_a.rev, (Layout.DVC3,)) is Layout.DVC3
    assert len(access.records()) == 1


async def test_a_damaged_cached_dir_is_fetched_again(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a = tenants.tenants["a"]
    damaged = Path(node.path(pushed_a.rev, Layout.DVC3))
    await asyncio.to_thread(damaged.write_bytes, b'[{"md5": "0", "relpath": "x"}]')
    access = _access(node)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as remote:
        await _prove(access, remote, node, pushed_a.rev, a)
    (record,) = access.records()
    assert record.objects == len(_objects(pushed_a))
    assert node.verify(pushed_a.rev, Layout.DVC3)


async def test_concurrent_publishes_share_one_proof(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a = tenants.tenants["a"]
    access = _access(node)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await asyncio.gather(*(_prove(access, remote, node, pushed_a.rev, a) for _ in range(5)))
        assert remote.asked == [1, len(_objects(pushed_a))]


# -- the S3 remote's prove ------------------------------------------------------------------------


async def test_s3_prove_by_etag_by_download_and_absent(
    tenants: TenantSeaweed, s3_scratch: str
) -> None:
    good = b"the object itself\n" * 1000
    oid = object_name(good)
    multipart = b"uploaded in parts " * 5000
    mp_oid = object_name(multipart)
    garbage_oid = object_name(b"what the key should hold")
    absent_oid = object_name(b"never pushed")
    client = tenants.client()
    tenants.put(s3_scratch, object_key("p", oid, layout="dvc3"), good)
    # A one-part multipart upload: its ETag is `<md5 of md5s>-1`, not the bytes' md5.
    key = object_key("p", mp_oid, layout="dvc3")
    upload = client.create_multipart_upload(Bucket=s3_scratch, Key=key)["UploadId"]
    part = client.upload_part(
        Bucket=s3_scratch, Key=key, UploadId=upload, PartNumber=1, Body=multipart
    )
    client.complete_multipart_upload(
        Bucket=s3_scratch,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert "-" in client.head_object(Bucket=s3_scratch, Key=key)["ETag"]
    tenants.put(s3_scratch, object_key("p", garbage_oid, layout="dvc3"), b"something else")
    oids = [oid, mp_oid, garbage_oid, absent_oid]
    admin = _keys(None, access=tenants.access_key, secret=tenants.secret_key)
    async with s3_remote(tenants.endpoint, s3_scratch, admin, prefix="p") as remote:
        for trust in (True, False):
            # Few objects (one-byte GETs each) and many (listed by shard) alike.
            many = [*oids, *(object_name(str(i).encode()) for i in range(20))]
            for batch in (oids, many):
                report = await remote.aprove(batch, Layout.DVC3, trust_etags=trust)
                assert set(report.proven) == {oid, mp_oid}
                assert report.mismatched == (garbage_oid,)
                assert set(report.absent) == {absent_oid} | set(batch[4:])
                # Where the node knows the size, another size is not the object, ETag or not.
                sized = await remote.aprove(
                    batch, Layout.DVC3, trust_etags=trust, sizes={oid: len(good) + 1}
                )
                assert set(sized.mismatched) == {oid, garbage_oid}


async def test_s3_prove_of_legacy_text_objects_hashes_them(
    tmp_path_factory: pytest.TempPathFactory, tenants: TenantSeaweed
) -> None:
    """DVC 2 names a CRLF text object by the md5 of its LF form, so its ETag (the md5 of the
    raw bytes) is not its name: it is proven by downloading and hashing it as DVC 2 does."""
    a = tenants.tenants["a"]
    pushed = push_for(
        tenants, "a", tmp_path_factory.mktemp("push-legacy"), version=2, prefix="legacy"
    )
    oids = sorted({object_name(d, Layout.LEGACY) for d in pushed.files.values()})
    crlf = [o for o, d in _legacy(pushed).items() if hashlib.md5(d).hexdigest() != o]
    assert crlf, "the sample has CRLF text objects"
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a), prefix="legacy") as remote:
        report = await remote.aprove([pushed.rev, *oids], Layout.LEGACY)
        assert report.complete
        assert len(report.proven) == len(oids) + 1
        few = await remote.aprove(crlf[:3], Layout.LEGACY)
        assert few.complete


def _legacy(pushed: S3DvcFixture) -> dict[str, bytes]:
    return {object_name(d, Layout.LEGACY): d for d in pushed.files.values()}


@pytest.fixture
def s3_scratch(tenants: TenantSeaweed) -> Iterator[str]:
    name = tenants.make_bucket(f"scratch-{os.urandom(4).hex()}")
    yield name
    tenants.delete_bucket(name)


async def test_s3_prove_of_a_remote_that_refuses_the_keys_raises(
    tenants: TenantSeaweed,
) -> None:
    a, b = tenants.tenants["a"], tenants.tenants["b"]
    async with s3_remote(tenants.endpoint, a.bucket, _keys(b)) as remote:
        for batch in ([object_name(b"x")], [object_name(str(i).encode()) for i in range(20)]):
            with pytest.raises(RemoteError) as raised:
                await remote.aprove(batch, Layout.DVC3)
            assert raised.value.cause is RemoteCause.ACCESS_DENIED


# -- hostile listings ---------------------------------------------------------------------------

_PREFIX = "p/files/md5/ab/"


def _page(
    contents: str, *, truncated: str = "false", extra: str = "", prefix: str = _PREFIX
) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>b</Name><Prefix>{prefix}</Prefix><IsTruncated>{truncated}</IsTruncated>"
        f"{extra}{contents}</ListBucketResult>"
    ).encode()


def _entry(key: str, etag: str = '"' + "0" * 32 + '"', size: str = "3") -> str:
    return f"<Contents><Key>{key}</Key><ETag>{etag}</ETag><Size>{size}</Size></Contents>"


_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i else "&lol;" * 10}">' for i in range(9))
    + "]><ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>&lol8;</Key>"
    "</Contents></ListBucketResult>"
).encode()


def test_a_well_formed_listing_is_parsed() -> None:
    page = parse_page(
        _page(_entry(_PREFIX + "cd" * 15) + _entry(_PREFIX + "ef" * 15, '"abc-2"', "7"),
              truncated="true", extra="<NextContinuationToken>tok</NextContinuationToken>"),
        prefix=_PREFIX,
        remote="r",
    )  # fmt: skip
    assert [o.key for o in page.objects] == [_PREFIX + "cd" * 15, _PREFIX + "ef" * 15]
    assert page.objects[0].md5 == "0" * 32
    assert page.objects[1].md5 is None
    assert page.next_token == "tok"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (_LAUGHS, "DOCTYPE"),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
            b"<ListBucketResult><Contents><Key>&e;</Key></Contents></ListBucketResult>",
            "DOCTYPE",
        ),
        (_page(_entry("other/prefix/" + "cd" * 15)), "not under the prefix"),
        (_page(_entry(_PREFIX + "x", size="-1")), "has size"),
        (_page("", truncated="true"), "NextContinuationToken"),
        (_page(_entry(_PREFIX + "x") * (MAX_KEYS + 1)), "more than"),
        (_page("<Contents>" * 20), "nest deeper"),
        (_page(_entry(_PREFIX + "k" * 5000)), "over 4096 characters"),
        (b"<ListBucketResult><IsTruncated>false", "malformed"),
        (b"<Error><Code>x</Code></Error>", "root element"),
        (_page("&undeclared;"), "malformed"),
        (b"x" * (MAX_LIST_BODY + 1), "over"),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "key-outside-prefix",
        "bad-size",
        "truncated-without-token",
        "too-many-keys",
        "deep",
        "long-text",
        "unterminated",
        "not-a-listing",
        "undeclared-entity",
        "oversized",
    ],
)
def test_a_hostile_listing_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(RemoteError, match=problem) as refused:
        parse_page(body, prefix=_PREFIX, remote="s3://b/p at http://evil")
    assert refused.value.cause is RemoteCause.REMOTE


@pytest.fixture
async def hostile_lister() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """An HTTP server answering every listing with `answer["body"]` (set by the test), and
    anything else with 500 (counted in `answer["others"]`: a request a test must not cause)."""
    answer: dict[str, bytes] = {"body": b"", "others": b""}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.query.get("list-type") != "2":
            answer["others"] += b"x"
            return web.Response(status=500)
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        body = answer["body"]
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", answer
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("kind", ["laughs", "outside", "huge"])
async def test_s3_prove_refuses_a_hostile_server(
    hostile_lister: tuple[str, dict[str, bytes]], kind: str
) -> None:
    endpoint, answer = hostile_lister
    answer["body"] = {
        "laughs": _LAUGHS,
        "outside": _page(_entry("dvcstore/files/md5/zz/" + "0" * 30)),
        "huge": _page(_entry(_PREFIX + "x") * 200_000),  # ~16 MB, far past the bound
    }[kind]
    oids = [f"ab{i:030x}" for i in range(20)]  # one shard: one listing
    keys = _keys(None, access="AKTEST", secret="Stest")
    async with s3_remote(endpoint, "bucket", keys) as remote:
        with pytest.raises(RemoteError, match=r"can(not)? believe") as refused:
            await remote.aprove(oids, Layout.DVC3)
    assert refused.value.cause is RemoteCause.REMOTE


async def test_s3_prove_never_downloads_a_size_the_server_made_up(
    hostile_lister: tuple[str, dict[str, bytes]],
) -> None:
    """The node knows its copy's size: a listing claiming another (here 1 TB, with an ETag
    that is not an md5) is a mismatch at once, without a byte downloaded."""
    endpoint, answer = hostile_lister
    oids = [f"ab{i:030x}" for i in range(20)]
    key = f"dvcstore/files/md5/ab/{oids[0][2:]}"
    answer["body"] = _page(_entry(key, '"made-up"', str(10**12)), prefix="dvcstore/files/md5/ab/")
    keys = _keys(None, access="AKTEST", secret="Stest")
    async with s3_remote(endpoint, "bucket", keys) as remote:
        report = await remote.aprove(oids, Layout.DVC3, sizes={oids[0]: 3})
    assert report.mismatched == (oids[0],)
    assert set(report.absent) == set(oids[1:])
    assert answer["others"] == b""


# -- records ------------------------------------------------------------------------------------


async def test_records_we_did_not_write_are_ignored_and_trees_forgotten(
    node: NodeCache, tenants: TenantSeaweed, pushed_a: S3DvcFixture
) -> None:
    a = tenants.tenants["a"]
    access = _access(node)
    async with s3_remote(tenants.endpoint, a.bucket, _keys(a)) as s3:
        remote = Counting(s3)
        await _prove(access, remote, node, pushed_a.rev, a)
        (record,) = access.records()
        path = node.root.parent / "provenance" / record.remote_id / record.tree_key
        # Not ours (another uid), a symlink, a record filed under another tree: none counts.
        os.chown(path, 12345, 12345)
        assert access.records() == []
        os.chown(path, os.geteuid(), os.getegid())
        other = path.with_name("0" * 32)
        other.symlink_to(path)
        wrong = path.with_name("1" * 32)
        wrong.write_text(path.read_text())
        assert access.records() == [record]
        assert access.forget_tree(record.tree_key) == 1
        assert access.records() == []
        # The record gone, the next publish proves the objects again (the pin is remembered).
        await _prove(access, remote, node, pushed_a.rev, a)
        assert remote.asked == [1, len(_objects(pushed_a)), len(_objects(pushed_a))]


def test_fingerprints_tell_keys_apart_and_hide_them() -> None:
    one = fingerprint("AKID", "secret-one")
    assert one == fingerprint("AKID", "secret-one")
    assert one != fingerprint("AKID", "secret-two") != fingerprint("AKID2", "secret-one")
    assert "secret" not in one
    assert "AKID" not in one
    assert fingerprint("AB", "C") != fingerprint("A", "BC")


# -- the directory remote's prove ---------------------------------------------------------------


def test_directory_prove(tmp_path: Path) -> None:
    root = tmp_path / "remote"
    good = b"bytes\r\nwith CRLF\r\n"
    objects = {"good": good, "bad": b"x", "link": b"y", "shard": b"z"}
    names = {k: object_name(v) for k, v in objects.items()}

    def place(oid: str, data: bytes, layout: Layout = Layout.DVC3) -> Path:
        path = root / layout.prefix() / oid[:2] / oid[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    place(names["good"], good)
    place(names["bad"], b"not x")
    target = place(object_name(b"elsewhere"), b"y")
    link = root / "files/md5" / names["link"][:2] / names["link"][2:]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / names["shard"][2:]).write_bytes(b"z")
    # (The sample's objects are in distinct shards, so this link is the shard's only way in.)
    (root / "files/md5" / names["shard"][:2]).symlink_to(outside)
    absent = object_name(b"never")
    remote = DirectoryRemote(root)
    report = remote.prove([*names.values(), absent], Layout.DVC3)
    assert report.proven == (names["good"],)
    assert set(report.mismatched) == {names["bad"], names["link"], names["shard"]}
    assert report.absent == (absent,)
    sized = remote.prove([names["good"]], Layout.DVC3, sizes={names["good"]: len(good) - 1})
    assert sized.mismatched == (names["good"],)
    # Legacy: a CRLF text object is named by its LF form, and proven so.
    legacy = object_name(good, Layout.LEGACY)
    assert legacy != names["good"]
    place(legacy, good, Layout.LEGACY)
    assert remote.prove([legacy], Layout.LEGACY).proven == (legacy,)


def test_directory_prove_of_an_unreadable_remote_raises(tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    remote = DirectoryRemote(root)
    root.rmdir()
    with pytest.raises(RemoteError) as raised:
        remote.prove([object_name(b"x")], Layout.DVC3)
    assert raised.value.cause is RemoteCause.UNREADABLE
