"""The node plugin's backend: authorise a volume from the pod's own namespace, then publish.

`NodePlugin` is the `rpc.NodeBackend` the agent serves. One `NodePublishVolume`:

1. **Already published?** kubelet calls publish again for a volume it has mounted (a retry,
   or a republish: the chart's CSIDriver sets `requiresRepublish` so that the keys, which the
   agent never writes down, come back after an agent restart and after a Secret rotates). A
   volume whose record names this target is answered at once (`PublishResult.WARM`), its keys
   refreshed for live switches; nothing is re-proven, because nothing about it changed.
2. **Authorise.** The Dataset named by the volume is read from the pod's namespace (never
   from an attribute: `DatasetNotFoundError` if it is not there), which gives the remote; the
   Secret kubelet passed gives the keys (`datasets.DatasetRemote.credentials`). The layout is
   the volume's (the webhook wrote the pin's), else the Dataset's, and for `auto` whichever
   layout the request's own remote holds the pin in (remembered with the proof). Then
   `access.Access.prove`: the request's keys read the pin from the request's remote, and every
   object of its tree is proven on that remote (once per remote and tree, on disk).
3. **Build** the shared tree if the node does not have it (`trees.TreeStore.ensure`: once per
   node, concurrent publishes wait for one build). kubelet cancels a call after its deadline
   and retries; a build is a task of its own (`_builds`), so a cancelled call leaves it
   running and the retry joins it instead of starting over.
4. **Publish**: `publisher.Publisher.publish` binds the tree read-only (or an overlay for a
   writable volume) under the volume's directory and that onto kubelet's target.

A live switch (`switch`, called by `follow.Follower` when the pod's `datapin.dev/pins`
changes) runs steps 2-3 for the new pin with the keys of the volume's last publish, then
`Publisher.switch`. Without keys (the agent restarted and kubelet has not republished yet)
it waits for them: the follower retries at its next list.

**Parts** (`engine.part`, the volume's `path` attribute): a publish serves the folders the
attribute names, a switch the folders the pod's pins name for the new pin (`Pin.paths`: the
webhook writes the same folders in both, so a switch keeps the part unless the pins change
it). Each step works on the part: the proof covers the part's objects (`Access.prove`), the
tree is the part's own (`TreeStore`, keyed with the part's suffix) and the record keeps the
folders. A folder the revision does not hold is found once the pin's `.dir` is proven with the
pod's keys, and refused as a bad volume (INVALID_ARGUMENT, like any attribute that will never
work as written) whose message lists the revision's top-level folders: the request is wrong,
not the node, so kubelet's retries show the fix in the pod's Events until the pod is fixed.

Remotes: one S3 session per publish or switch that needs the remote (a warm publish whose
proof is remembered still opens one for the proof's bookkeeping; it sends no request).

ETags: whether a remote's ETags count as the server's md5 of the bytes (`access`'s
`trust_etags`) is the admin's list of endpoint host patterns (`trusted_endpoints`), matched
only over verified TLS: a tenant's own server could answer any ETag.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from datapin_sidecar.csi.access import Access, fingerprint
from datapin_sidecar.csi.datasets import DatasetRemote
from datapin_sidecar.csi.follow import Served
from datapin_sidecar.csi.kubeapi import KubeApi
from datapin_sidecar.csi.publisher import Publisher
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.csi.volume import Attr, PublishResult, VolumeRequest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_key, tree_md5
from datapin_sidecar.errors import (
    AccessRefusedError,
    BadVolumeError,
    DatasetNotFoundError,
    PathNotInRevisionError,
    Refusal,
    RemoteCause,
    RemoteError,
)
from datapin_sidecar.pins import Pin
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.opening import open_s3_remote

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Keys:
    """What a volume's last publish brought: its Dataset's remote and the keys kubelet sent."""

    dataset: DatasetRemote
    credentials: Credentials


@dataclass(frozen=True, slots=True, kw_only=True)
class _Asked:
    """The part a publish or switch asks for, and where it was written (for a refusal)."""

    part: Part
    source: str


class NodePlugin:
    """Authorise, build, publish (see the module doc)."""

    def __init__(
        self,
        *,
        kube: KubeApi,
        cache: NodeCache,
        access: Access,
        trees: TreeStore,
        publisher: Publisher,
        jobs: int,
        trusted_endpoints: Sequence[str] = (),
        build_remote: Callable[[Remote], Remote] | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.access = access
        self.trees = trees
        self.publisher = publisher
        self.jobs = jobs
        self.trusted_endpoints = tuple(trusted_endpoints)
        #: What a tree build fetches through (the agent's peers, `node.peering.wrap`); a proof
        #: of access always reads the request's own remote.
        self.build_remote = build_remote or (lambda remote: remote)
        self._keys: dict[str, _Keys] = {}
        self._builds: dict[str, asyncio.Task[Path]] = {}
        self._ready = False
        #: Called after every switch with its outcome (metrics).
        self.on_switch: Callable[[bool], None] = lambda ok: None

    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Rebuild state from the node volume and the mount table (after a restart)."""
        recovered = await asyncio.to_thread(self.publisher.recover_sync)
        log.info("node plugin: %s", recovered)
        self._ready = True

    # -- publish --------------------------------------------------------------------------------

    async def publish(self, request: VolumeRequest) -> PublishResult:
        record = await asyncio.to_thread(self.publisher.record, request.volume_id)
        if record is not None and record.target_path == str(request.target_path):
            with contextlib.suppress(Exception):  # a republish: only the keys can be new
                self._keys[request.volume_id] = await self._authorised_keys(request)
            # Idempotent: it checks the request is the same and repairs a half-made target.
            await self.publisher.publish(request, self.trees.tree(record.published_key))
            return PublishResult.WARM
        keys = await self._authorised_keys(request)
        layout_choice = request.layout if request.layout is not LayoutChoice.AUTO else None
        tree, result = await self._prove_and_build(
            keys,
            request.revision,
            layout_choice or keys.dataset.layout,
            request.dataset,
            _Asked(part=request.part, source=f"volume attribute {Attr.PATH.value!r}"),
        )
        await self.publisher.publish(request, tree)
        self._keys[request.volume_id] = keys
        return result

    async def _authorised_keys(self, request: VolumeRequest) -> _Keys:
        namespace = request.pod.namespace
        obj = await self.kube.get_dataset(namespace, request.dataset)
        if obj is None:
            raise DatasetNotFoundError(
                dataset=request.dataset, namespace=namespace, pin=request.revision.oid
            )
        dataset = DatasetRemote.from_object(obj)
        credentials = dataset.credentials(request.secrets, pin=request.revision.oid)
        return _Keys(dataset=dataset, credentials=credentials)

    async def _prove_and_build(
        self, keys: _Keys, revision: Revision, layout: LayoutChoice, dataset: str, asked: _Asked
    ) -> tuple[Path, PublishResult]:
        try:
            return await self._prove_and_build_part(keys, revision, layout, dataset, asked.part)
        except PathNotInRevisionError as exc:
            raise BadVolumeError(
                f"dataset {dataset!r} pin {revision.oid}: {asked.source} "
                f"({asked.part.label}): {exc}"
            ) from None

    async def _prove_and_build_part(
        self, keys: _Keys, revision: Revision, layout: LayoutChoice, dataset: str, part: Part
    ) -> tuple[Path, PublishResult]:
        async with self._remote(keys) as remote:
            resolved = await self._layout(remote, revision, layout, dataset)
            await self.access.prove(
                remote=remote,
                credentials_fingerprint=fingerprint(
                    keys.credentials.access_key_id, keys.credentials.secret_access_key
                ),
                cache=self.cache,
                revision=revision,
                layout=resolved,
                dataset=dataset,
                trust_etags=self.trusts(keys.dataset),
                part=part,
            )
        key = tree_key(revision.md5, resolved.value, part)
        tree = self.trees.find_key(key)
        if tree is not None:
            return tree, PublishResult.WARM
        build = self._builds.get(key)
        if build is None:
            build = asyncio.create_task(self._build(keys, revision, resolved, part))
            self._builds[key] = build
            build.add_done_callback(functools.partial(self._built, key))
        # A cancelled call (kubelet's deadline) leaves the build running for the retry.
        return await asyncio.shield(build), PublishResult.BUILT

    async def _build(self, keys: _Keys, revision: Revision, layout: Layout, part: Part) -> Path:
        """A build owns its remote: it outlives the call that started it."""
        async with self._remote(keys) as remote:
            built = self.build_remote(remote)
            return await self.trees.ensure(revision, LayoutChoice(layout.value), built, part)

    def _built(self, key: str, task: asyncio.Task[Path]) -> None:
        if self._builds.get(key) is task:
            del self._builds[key]
        if not task.cancelled():
            task.exception()  # retrieved: the callers that still wait have it raised

    async def _layout(
        self, remote: Remote, revision: Revision, choice: LayoutChoice, dataset: str
    ) -> Layout:
        """The layout to serve: pinned, or the first the request's own remote holds it in."""
        pinned = choice.pinned
        if pinned is not None:
            return pinned
        try:
            found = await asyncio.to_thread(remote.find, revision.oid, choice.candidates)
        except RemoteError as exc:
            if exc.cause is not RemoteCause.ACCESS_DENIED:
                raise
            raise AccessRefusedError(
                f"dataset {dataset!r}: {exc}", refusal=Refusal.WRONG_KEYS
            ) from None
        if found is None:
            raise AccessRefusedError(
                f"dataset {dataset!r}: remote {remote.url} holds pin {revision.oid} in no "
                "layout (neither files/md5/ nor the legacy one). Fix: `dvc push` the revision "
                f"to {remote.url}, or correct the Dataset's remote or the pod's pin",
                refusal=Refusal.NOT_ON_REMOTE,
            )
        return found

    @contextlib.asynccontextmanager
    async def _remote(self, keys: _Keys) -> AsyncIterator[Remote]:
        source = StaticCredentials(
            keys.credentials,
            source=f"the Secret of Dataset {keys.dataset.namespace}/{keys.dataset.name}",
        )
        async with open_s3_remote(keys.dataset.config, source, jobs=self.jobs) as remote:
            yield remote

    def trusts(self, dataset: DatasetRemote) -> bool:
        """Whether the Dataset's endpoint may be taken at its word about md5s (ETags)."""
        config = dataset.config
        endpoint = config.endpoint_url or f"https://s3.{config.region}.amazonaws.com"
        parts = urlsplit(endpoint)
        if parts.scheme != "https" or not config.verify_tls:
            return any(p == endpoint for p in self.trusted_endpoints)
        host = parts.hostname or ""
        return any(fnmatch.fnmatchcase(host, p) or p == endpoint for p in self.trusted_endpoints)

    # -- unpublish ------------------------------------------------------------------------------

    async def unpublish(self, *, volume_id: str, target_path: Path) -> None:
        await self.publisher.unpublish(volume_id=volume_id, target_path=target_path)
        self._keys.pop(volume_id, None)

    # -- live switch ----------------------------------------------------------------------------

    def served(self) -> list[Served]:
        """The published volumes, for the follower."""
        return [
            Served(
                volume_id=r.volume_id,
                pod_uid=r.pod_uid,
                dataset=r.dataset,
                # What `current` names now (a switch changes the tree, not the record's pin).
                pin=tree_md5(r.tree_key) + (".dir" if r.pin.endswith(".dir") else ""),
                part=r.tree_part,
            )
            for r in self.publisher.published()
        ]

    async def switch(self, served: Served, pin: Pin) -> None:
        """Serve `pin` in the volume from now on (see the module doc)."""
        keys = self._keys.get(served.volume_id)
        if keys is None:
            log.info(
                "volume %s: a switch of dataset %s to %s waits for the volume's keys (kubelet "
                "republishes them)",
                served.volume_id,
                served.dataset,
                pin.revision.oid,
            )
            return
        try:
            layout = LayoutChoice(pin.layout.value) if pin.layout else keys.dataset.layout
            asked = _Asked(part=pin.part, source="the paths of the pod's datapin.dev/pins")
            tree, _ = await self._prove_and_build(keys, pin.revision, layout, served.dataset, asked)
            await self.publisher.switch(served.volume_id, tree.name, tree, part=pin.part)
        except Exception as exc:
            self.on_switch(False)
            log.error(
                "volume %s: switch of dataset %s to %s (%s) failed: %s",
                served.volume_id,
                served.dataset,
                pin.revision.oid,
                pin.part,
                exc,
            )
            raise
        self.on_switch(True)
        log.info(
            "volume %s: dataset %s switched to %s (%s)",
            served.volume_id,
            served.dataset,
            pin.ref,
            pin.part,
        )
