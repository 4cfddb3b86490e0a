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
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.node.agent import prefetch_file_text
from datapin_sidecar.node.settings import DatasetSettings

from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import tree_bytes
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

    def __init__(self, root: Path, work: Path, fx: S3DvcFixture, endpoint: str, n: int) -> None:
        self.root, self.work, self.fx, self.endpoint, self.n = root, work, fx, endpoint, n
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
            "peers": json.dumps([f"{a}:{self.peer_port}" for a in self.addresses]),
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


def test_agents_prefetching_at_once_fetch_each_object_from_the_remote_once_in_total(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    proxy: FaultProxy,
) -> None:
    fx, _ = dvc3_revisions
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


def _md5s(fx: S3DvcFixture) -> set[str]:
    return {hashlib.md5(data).hexdigest() for data in fx.files.values()}
