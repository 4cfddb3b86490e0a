"""Peer fetch: several real node agents on one machine share objects, so the remote serves each
once in total, and a bad or dying peer costs only time.

Each agent is the real `datapin-sidecar agent` process with its own node cache (its own root on
the XFS volume), its own loopback address (127.0.0.N: every agent listens on the same peer port,
as in a cluster where each has its pod IP) and the chart's peer Secret shape (a CA and a
certificate it signed, `testkit.peercerts`). The remote is a real SeaweedFS filled by real
`dvc push`, behind the fault proxy, which counts the GETs that reach it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import random
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import BadSettingsError
from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings, load_settings
from datapin_sidecar.peers import protocol, tls
from datapin_sidecar.peers.membership import Membership
from datapin_sidecar.peers.rendezvous import Member, home

from testkit.badpeer import BadPeer
from testkit.dvcremote import S3DvcFixture, push_dvc_fixture
from testkit.dvcrepo import DvcUnavailable, tree_bytes
from testkit.faultproxy import FaultProxy
from testkit.k8svolume import kubelet_update
from testkit.peercerts import write_peer_tls
from testkit.seaweed import SeaweedServer, free_ports
from testkit.sidecarproc import SidecarProcess


def _object_gets(proxy: FaultProxy, fx: S3DvcFixture) -> collections.Counter[str]:
    """Object key -> downloads of it that reached the remote (a download starts at byte 0;
    the further parts of a large object are ranged GETs of the same download; a one-byte GET
    is `find` asking whether the remote has the `.dir`, not a download)."""
    counts: collections.Counter[str] = collections.Counter()
    for r in proxy.gets(fx.prefix):
        first = r.range is None or (r.range.startswith("bytes=0-") and r.range != "bytes=0-0")
        if first and r.status in (200, 206):
            counts[r.path.split(f"/{fx.bucket}/", 1)[-1]] += 1
    return counts


class Cluster:
    """`n` agents prefetching `fx`'s revision through `endpoint`, peers of each other."""

    def __init__(
        self,
        root: Path,
        work: Path,
        fx: S3DvcFixture,
        endpoint: str,
        n: int,
        *,
        others: tuple[str, ...] = (),
    ) -> None:
        self.root, self.work, self.fx, self.endpoint, self.n = root, work, fx, endpoint, n
        self.others = others
        self.tls = write_peer_tls(work / "peer-tls")
        (self.peer_port,) = free_ports(1)
        self.addresses = [f"127.0.0.{i + 2}" for i in range(n)]
        secret = work / "agent-secret"
        kubelet_update(
            secret,
            {"AWS_ACCESS_KEY_ID": fx.access_key, "AWS_SECRET_ACCESS_KEY": fx.secret_key},
            "2026_12_02_01_00_00.1",
        )
        self.entry = DatasetSettings(
            name="ml.images",
            remote=fx.remote_url,
            endpoint_url=endpoint,
            credentials_dir=secret,
            layout="dvc3",
            pin=fx.rev,
            ref="v1",
        )
        self.agents: list[SidecarProcess] = []

    def listing(self, i: int) -> Path:
        return self.work / f"prefetch-{i}.json"

    def prefetch(self) -> None:
        """The operator writes the node's list (after every agent listens, as the agents'
        Service lists only ready agents)."""
        for i in range(self.n):
            self.listing(i).write_text(prefetch_file_text([self.entry]))

    def settings(self, i: int, **extra: str) -> dict[str, str]:
        self.listing(i).write_text(prefetch_file_text([]))
        return {
            "root": str(self.root / f"node-{i}"),
            "prefetch_file": str(self.listing(i)),
            "prefetch_interval_seconds": "0.2",
            "gc_interval_seconds": "5",
            "log_format": "json",
            "peer_port": str(self.peer_port),
            "peer_address": self.addresses[i],
            "peers": json.dumps([f"{a}:{self.peer_port}" for a in (*self.addresses, *self.others)]),
            "peer_tls_dir": str(self.tls),
            "peer_wait_seconds": "120",
            **extra,
        }

    def cache(self, i: int) -> NodeCache:
        return NodeCache(self.root / f"node-{i}" / "cache")

    @contextlib.contextmanager
    def running(self, **extra: str) -> Iterator[list[SidecarProcess]]:
        with contextlib.ExitStack() as stack:
            for i in range(self.n):
                proc = SidecarProcess("agent", self.work / f"agent-{i}", self.settings(i, **extra))
                (self.work / f"agent-{i}").mkdir(exist_ok=True)
                self.agents.append(stack.enter_context(proc))
            yield self.agents

    def wait_warm(self, timeout: float = 180) -> None:
        for agent in self.agents:
            agent.wait_until(
                "the revision warm",
                lambda a=agent: a.sample("datapin_prefetch_revisions", state="warm") == 1,
                timeout=timeout,
            )

    def check_trees(self) -> None:
        """Each node now builds the revision with no remote at all, byte for byte."""
        for i in range(self.n):
            dest = self.root / f"node-{i}" / "workspaces" / str(uuid.uuid4()) / "images"
            result = materialize(
                Request(cache=self.cache(i), revision=Revision.parse(self.fx.rev), dest=dest)
            )
            assert result.misses == 0
            assert tree_bytes((dest / "current").resolve()) == self.fx.files


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def large_revision(
    tmp_path_factory: pytest.TempPathFactory, seaweed: SeaweedServer
) -> S3DvcFixture:
    """Three objects of 20 MiB (streamed, several 16 MiB parts from the remote) and a few small
    ones, pushed by real DVC 3."""
    rng = random.Random(16)
    files = {f"big/{i}.bin": rng.randbytes(20 * 1024 * 1024 + i) for i in range(3)}
    files.update({f"small/{i}.txt": rng.randbytes(1000 + i) for i in range(5)})
    try:
        return push_dvc_fixture(
            tmp_path_factory.mktemp("peers-large"),
            seaweed,
            f"peers-large-{uuid.uuid4().hex[:8]}",
            version=3,
            files=files,
        )
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC 3: {exc.reason}")


@pytest.mark.parametrize("which", ["small objects", "large objects"])
def test_agents_prefetching_at_once_fetch_each_object_from_the_remote_once_in_total(
    xfs_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    proxy: FaultProxy,
    which: str,
) -> None:
    if which == "small objects":
        fx, _ = request.getfixturevalue("dvc3_revisions")
    else:
        fx = request.getfixturevalue("large_revision")
    cluster = Cluster(xfs_dir, tmp_path, fx, proxy.endpoint, 4)
    with cluster.running() as agents:
        cluster.prefetch()
        cluster.wait_warm()
        gets = _object_gets(proxy, fx)
        objects = {fx.key(oid) for oid in {*_md5s(fx), fx.rev}}
        assert set(gets) == objects, "every object (and the .dir) came from the remote"
        repeated = {k: n for k, n in gets.items() if n != 1}
        assert not repeated, f"objects downloaded more than once in the cluster: {repeated}"
        received = sum(a.sample("datapin_peer_bytes_total", direction="received") for a in agents)
        served = sum(a.sample("datapin_peer_bytes_total", direction="served") for a in agents)
        assert received == served > 0
        total = len(fx.files) + 1
        objs = sum(a.sample("datapin_peer_objects_total", direction="received") for a in agents)
        remote = sum(
            a.sample("datapin_remote_fetched_objects_total", dataset="ml.images") for a in agents
        )
        # Every node holds every object: n * total arrivals, `total` of them from the remote.
        assert objs + remote >= total * cluster.n - total
        errors = {
            r: sum(a.sample("datapin_peer_errors_total", reason=r) for a in agents)
            for r in ("connection", "timeout", "tls", "corrupt", "protocol")
        }
        assert not any(errors.values()), errors
        for agent in agents:
            assert agent.sample("datapin_peer_members") == cluster.n
    cluster.check_trees()


@pytest.mark.parametrize("mode", ["corrupt", "cut"])
def test_a_peer_serving_corrupt_bytes_or_dying_mid_transfer_costs_only_time(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    proxy: FaultProxy,
    mode: str,
) -> None:
    """A peer with the certificate that claims every object, then sends wrong bytes (or half
    of them and hangs up): the agent fetches those objects from the remote, and its cache and
    tree are exact."""
    fx, _ = dvc3_revisions
    cluster = Cluster(xfs_dir, tmp_path, fx, proxy.endpoint, 1, others=("127.0.0.40",))
    with (
        BadPeer("127.0.0.40", cluster.peer_port, cluster.tls, mode=mode) as bad,
        cluster.running() as (agent,),
    ):
        cluster.prefetch()
        cluster.wait_warm()
        assert agent.sample("datapin_peer_members") == 2
        assert bad.gets > 0
        if mode == "corrupt":  # every object it answered for was refused by its md5
            assert agent.sample("datapin_peer_errors_total", reason="corrupt") == bad.gets
        else:  # a cut bundle or body fails as a whole
            cut = sum(
                agent.sample("datapin_peer_errors_total", reason=r)
                for r in ("truncated", "connection")
            )
            assert cut >= 1
        assert agent.sample("datapin_peer_bytes_total", direction="received") == 0
        gets = _object_gets(proxy, fx)
        assert set(gets) == {fx.key(oid) for oid in {*_md5s(fx), fx.rev}}
    cluster.check_trees()
    quarantine = cluster.cache(0).root / ".datapin" / "tmp"
    assert not any(quarantine.iterdir()), "no temp file of a refused body is left"


def _md5s(fx: S3DvcFixture) -> set[str]:
    return {hashlib.md5(data).hexdigest() for data in fx.files.values()}


async def test_the_peer_port_answers_only_agents_and_only_about_objects(
    xfs_dir: Path, tmp_path: Path, dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture]
) -> None:
    """What a pod or a stranger on the network gets from an agent's peer port: nothing without
    the peer certificate; with it, no path outside the cache, no PUT without a lease, and no
    wrong byte accepted into the cache."""
    fx, _ = dvc3_revisions
    cluster = Cluster(xfs_dir, tmp_path, fx, "http://127.0.0.1:9", 1)
    base = f"https://{cluster.addresses[0]}:{cluster.peer_port}{protocol.PREFIX}"
    stranger_tls = write_peer_tls(tmp_path / "stranger")
    with cluster.running():
        for ctx in (_client_ssl(None), _client_ssl(stranger_tls)):  # no cert; another CA's
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    async with http.post(f"{base}/claims", json={}, ssl=ctx) as resp:
                        await resp.read()
        ctx = _client_ssl(cluster.tls)
        oid = hashlib.md5(b"peer").hexdigest()
        async with aiohttp.ClientSession() as http:
            for bad in ("dvc3/..%2F..%2Fetc%2Fpasswd", f"dvc3/{oid[:30]}", "nope/" + oid):
                async with http.get(f"{base}/objects/{bad}", ssl=ctx) as resp:
                    assert resp.status in (400, 404), bad
            async with http.post(
                f"{base}/claims", json={"layout": "dvc3", "oids": ["x"] * 1025}, ssl=ctx
            ) as resp:
                assert resp.status == 400
            put = f"{base}/objects/dvc3/{oid}"
            async with http.put(put, data=b"peer", ssl=ctx) as resp:
                assert resp.status == 400  # no lease header
            headers = {protocol.LEASE_HEADER: "A" * 24}
            async with http.put(put, data=b"peer", headers=headers, ssl=ctx) as resp:
                assert resp.status == 409  # not a lease this home gave
            async with http.post(
                f"{base}/claims", json={"layout": "dvc3", "oids": [oid]}, ssl=ctx
            ) as resp:
                leases = (await resp.json())["leases"]
            headers = {protocol.LEASE_HEADER: leases[oid]}
            async with http.put(put, data=b"PEER", headers=headers, ssl=ctx) as resp:
                assert resp.status == 422  # not the object
            assert not cluster.cache(0).present(oid, Layout.DVC3)
            async with http.post(
                f"{base}/claims", json={"layout": "dvc3", "oids": [oid]}, ssl=ctx
            ) as resp:
                again = (await resp.json())["leases"]
            assert oid in again, "a failed delivery ends the lease: the next asker gets one"
            headers = {protocol.LEASE_HEADER: again[oid]}
            async with http.put(put, data=b"peer", headers=headers, ssl=ctx) as resp:
                assert resp.status == 204
            async with http.get(put, ssl=ctx) as resp:
                assert (resp.status, await resp.read()) == (200, b"peer")
            bundle = f"{base}/bundle"
            async with http.post(
                bundle, json={"layout": "dvc3", "oids": [oid] * 257}, ssl=ctx
            ) as resp:
                assert resp.status == 400
            other = hashlib.md5(b"absent").hexdigest()
            async with http.post(
                bundle, json={"layout": "dvc3", "oids": [other, oid]}, ssl=ctx
            ) as resp:
                answer = await resp.read()
            head, _, data = answer.partition(b"\n")
            assert json.loads(head) == {"objects": [[oid, 4]]}  # the absent one left out
            assert data == b"peer"
    assert cluster.cache(0).verify(oid, Layout.DVC3)


def _client_ssl(tls_dir: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt") if tls_dir else None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls_dir is not None:
        ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    return ctx


def test_homes_move_only_for_the_members_that_change() -> None:
    """Rendezvous hashing: every agent agrees on each home, and a member joining takes about
    1/N of the objects, moving none between the others."""
    members = [Member(f"10.0.0.{i}", 9480) for i in range(1, 9)]
    oids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(4000)]
    before = {o: home(o, members) for o in oids}
    assert before == {o: home(o, list(reversed(members))) for o in oids}
    counts = collections.Counter(before.values())
    assert min(counts.values()) > 4000 / 8 * 0.8
    joined = Member("10.0.0.99", 9480)
    after = {o: home(o, [*members, joined]) for o in oids}
    moved = {o for o in oids if after[o] != before[o]}
    assert all(after[o] == joined for o in moved)
    assert 4000 / 9 * 0.8 < len(moved) < 4000 / 9 * 1.2
    assert Member.parse("[fd00::1]:9480", default_port=1) == Member("fd00::1", 9480)
    assert Member.parse("10.0.0.1", default_port=9480) == Member("10.0.0.1", 9480)
    with pytest.raises(ValueError, match="port"):
        Member.parse("10.0.0.1:http", default_port=9480)


def test_peer_fetch_settings_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(BadSettingsError) as caught:
        load_settings(root=str(tmp_path), peer_port=9480)
    assert "DATAPIN_PEER_ADDRESS and DATAPIN_PEER_TLS_DIR" in str(caught.value)
    settings = load_settings(
        root=str(tmp_path), peer_port=9480, peer_address="127.0.0.1", peer_tls_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"lacks ca\.crt, tls\.crt, tls\.key"):
        tls.server_context(settings.peer_tls_dir or tmp_path)


async def test_membership_reads_the_service_from_dns_and_survives_a_failed_lookup() -> None:
    me = Member("127.0.0.1", 9480)
    members = Membership(me, service="localhost")
    await members.refresh()
    assert me in members.members()
    assert {m.port for m in members.members()} == {9480}
    known = members.members()
    members.service = "no-such-host.invalid"
    await members.refresh()
    assert members.members() == known
