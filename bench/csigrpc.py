"""The CSI node plugin served over gRPC, for `bench_csi`: kubelet's publish, end to end.

`bench_csi` times the agent's publish in-process (`TreeStore.ensure` + `Publisher.publish`).
A pod's kubelet reaches more than that: a `NodePublishVolume` over the plugin's unix socket,
parsed by `csi.rpc`, then `csi.plugin.NodePlugin.publish`, which reads the pod's Dataset from
the API server, opens the Dataset's S3 remote with the Secret's keys, checks the proof of
access and finds the tree before it publishes. `GrpcRig` runs exactly that path: the real
`serve_node_plugin` and `NodePlugin` in the benchmark's event loop, kmock's API emulator on
127.0.0.1 serving the Dataset, a real SeaweedFS serving the pins' `.dir` objects, and
`testkit.kubelet` making the calls as kubelet does.

**Where the time goes** (`phases`): the same new pod's publish one layer down, straight into
`NodePlugin.publish` (what the rpc layer calls after parsing: the gap to the gRPC figure is the
channel, protobuf and parsing), and the two pieces of that which talk to servers, timed alone:
the Dataset GET from the API emulator (`KubeApi.get_dataset`), and opening and closing the
Dataset's S3 remote (`open_s3_remote`: a session, no request).

**Pre-proven.** A warm publish is one whose pin is already proven for the remote; what that
costs is what this measures. The proof has two steps (`csi.access`): (a) the pin's `.dir` on
the remote, with the request's keys, remembered for the TTL; (b) every object the `.dir` names
on that remote, kept on disk as a provenance record. Step (a) is made for real, by one untimed
publish per revision (the `.dir` is uploaded to SeaweedFS; the TTL is set far beyond the run,
so a slow 1M round does not let it lapse). Step (b) would need every object of a 1M-file
revision uploaded, so its record is written directly (`Access`'s own writer, method
`content`) - what a node has after the first pod of that remote. Everything else is as in the
agent.

**One event loop.** Client (kubelet) and server share the benchmark's loop and process, so a
timed call includes both ends' Python (protobuf encoding, the channel) on two shared cores;
kubelet's side is Go in a cluster. The timed part is the `NodePublishVolume` call alone:
kubelet's own preparation (the target's parent and `vol_data.json`) and the unpublish after
it are not timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapin_sidecar.csi.access import Access, ProofMethod, ProvenanceRecord, remote_id
from datapin_sidecar.csi.datasets import DatasetRemote
from datapin_sidecar.csi.kubeapi import KubeApi, KubeConfig
from datapin_sidecar.csi.plugin import NodePlugin
from datapin_sidecar.csi.publisher import Publisher
from datapin_sidecar.csi.rpc import serve_node_plugin
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.csi.volume import Attr, parse_publish
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_key
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.opening import open_s3_remote

from testkit.kubeapi import DATASETS, emulator
from testkit.kubelet import CsiClient, InlineVolume, Kubelet, publish_request
from testkit.seaweed import SeaweedServer

NAMESPACE = "training"
DATASET = "images"
BUCKET = "bench-csi"
PREFIX = "datasets/images"
KEYS_REF = "keys"  # the Secret nodePublishSecretRef names
#: Step (a) of the proof is remembered this long: beyond any run (see the module doc).
PROOF_TTL = 86_400.0


@dataclass(slots=True)
class GrpcRig:
    """The plugin on its socket, with its API server and remote (see the module doc)."""

    workdir: Path
    kubelet_dir: Path
    root: Path
    cache: NodeCache
    trees: TreeStore
    publisher: Publisher
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    server: SeaweedServer | None = None
    client: CsiClient | None = None
    access: Access | None = None
    kubelet: Kubelet | None = None
    plugin: NodePlugin | None = None
    kube: KubeApi | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    _proven: set[str] = field(default_factory=set)

    async def start(self) -> None:
        """SeaweedFS with the bucket, the emulator with the Dataset, the plugin served."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = self.stack.enter_context(SeaweedServer(self.workdir / "seaweed"))
        self.server = server
        server.client().create_bucket(Bucket=BUCKET)
        self.secrets = {
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
        }
        _, api = await self.stack.enter_async_context(emulator())
        self.dataset = {
            "apiVersion": "datapin.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": DATASET, "namespace": NAMESPACE},
            "spec": {
                "remote": {
                    "url": f"s3://{BUCKET}/{PREFIX}",
                    "endpoint": server.endpoint,
                    "region": server.region,
                    "addressing": "path",
                    "layout": "dvc3",
                    "credentialsSecretRef": {"name": KEYS_REF},
                }
            },
        }
        await api.create(DATASETS, self.dataset)
        kube = await self.stack.enter_async_context(KubeApi(KubeConfig(url=api.url)))
        self.kube = kube
        self.access = Access(self.root, ttl=PROOF_TTL)
        plugin = NodePlugin(
            kube=kube,
            cache=self.cache,
            access=self.access,
            trees=self.trees,
            publisher=self.publisher,
            jobs=4,
        )
        await plugin.start()
        self.plugin = plugin
        socket = self.workdir / "csi.sock"
        await self.stack.enter_async_context(
            serve_node_plugin(
                plugin,
                csi_socket=socket,
                registration_dir=None,
                endpoint_on_host=str(socket),
                node_id="bench-node",
                kubelet_dir=self.kubelet_dir,
            )
        )
        self.kubelet = Kubelet(kubelet_dir=self.kubelet_dir)
        self.client = await self.stack.enter_async_context(self.kubelet.csi(socket))

    async def close(self) -> None:
        """Stop everything, and remove SeaweedFS's directory (its data, log and sockets)."""
        try:
            await self.stack.aclose()
        finally:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)

    async def prove(self, revision: Revision, *, objects: int) -> None:
        """Make `revision` pre-proven (module doc): its `.dir` on the remote, step (b)'s
        record written, and one untimed publish for step (a)."""
        if revision.oid in self._proven:
            return
        assert self.server is not None
        assert self.access is not None
        async with self.remote() as r:
            key, rid, url = r.key(revision.oid, Layout.DVC3), remote_id(r), r.url
        record = ProvenanceRecord(
            remote_id=rid,
            tree_key=tree_key(revision.md5, Layout.DVC3.value),
            remote=url,
            objects=objects,
            method=ProofMethod.CONTENT,
            proven_at=time.time(),
        )
        await asyncio.to_thread(self._upload_and_record, key, revision, record)
        await self.publish(revision)
        self._proven.add(revision.oid)

    def remote(self) -> contextlib.AbstractAsyncContextManager[Remote]:
        """The Dataset's remote, opened with the Secret's keys (as the plugin opens it)."""
        config = DatasetRemote.from_object(self.dataset).config
        keys = Credentials(
            access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
            secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"],
        )
        return open_s3_remote(config, StaticCredentials(keys, source="bench"), jobs=4)

    # -- where the time goes (see the module doc) ----------------------------------------------

    async def backend_publish(self, revision: Revision) -> float:
        """A new pod's publish straight into `NodePlugin.publish` (timed), then unpublish."""
        assert self.plugin is not None
        assert self.kubelet is not None
        volume = self.volume(revision)
        target = self.kubelet.prepare(volume)
        request = parse_publish(
            volume_id=volume.volume_id,
            target_path=str(target),
            readonly=volume.read_only,
            context=volume.volume_context(),
            secrets=volume.secrets,
            kubelet_dir=self.kubelet_dir,
        )
        t = time.perf_counter()
        await self.plugin.publish(request)
        wall = time.perf_counter() - t
        await self.plugin.unpublish(volume_id=volume.volume_id, target_path=target)
        await asyncio.to_thread(self.kubelet.clean_up, volume)
        self.kubelet.remove_pod(volume)
        return wall

    async def dataset_get(self) -> float:
        assert self.kube is not None
        t = time.perf_counter()
        if await self.kube.get_dataset(NAMESPACE, DATASET) is None:
            raise LookupError(f"Dataset {NAMESPACE}/{DATASET} is gone from the emulator")
        return time.perf_counter() - t

    async def remote_open_close(self) -> float:
        t = time.perf_counter()
        async with self.remote():
            pass
        return time.perf_counter() - t

    def _upload_and_record(self, key: str, revision: Revision, record: ProvenanceRecord) -> None:
        assert self.server is not None
        assert self.access is not None
        body = Path(self.cache.path(revision.oid, Layout.DVC3)).read_bytes()
        self.server.client().put_object(Bucket=BUCKET, Key=key, Body=body)
        self.access._write(record)  # step (b)'s record, see the module doc

    def volume(self, revision: Revision) -> InlineVolume:
        return InlineVolume(
            namespace=NAMESPACE,
            attributes={
                Attr.DATASET.value: DATASET,
                Attr.PIN.value: revision.oid,
                Attr.LAYOUT.value: "dvc3",
            },
            read_only=True,
            secrets=self.secrets,
        )

    async def publish(
        self, revision: Revision, *, check: Callable[[Path], None] | None = None
    ) -> float:
        """One new pod's `NodePublishVolume` (timed), then its unpublish (untimed); `check`
        sees the tree as the pod does (`<target>/current`) before the unpublish."""
        assert self.client is not None
        assert self.kubelet is not None
        volume = self.volume(revision)
        self.kubelet.prepare(volume)
        request = publish_request(volume, kubelet_dir=self.kubelet_dir)
        t = time.perf_counter()
        await self.client.node_publish(request)
        wall = time.perf_counter() - t
        target = volume.target_path(self.kubelet_dir)
        try:
            if check is not None:
                check(target / "current")
        finally:
            await self.kubelet.unpublish(self.client, volume)
            self.kubelet.remove_pod(volume)
        return wall
