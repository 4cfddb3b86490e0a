"""The agent as a CSI node plugin: `csi.*` wired from the agent's `Settings`.

With `DATAPIN_CSI_SOCKET` set, the agent's TaskGroup runs `serve_plugin` beside prefetch, GC
and gauges. It builds the pieces once (the API view, the tree store, the publisher, the proof
of access, the plugin), recovers the volumes a previous agent left (`NodePlugin.start`: never
unmounting what a pod may use), serves CSI and kubelet registration on their sockets, and
follows the node's pods for live switches until the agent stops.

What the rest of the agent needs from the plugin goes through `PluginState`: the GC's roots
(trees a volume uses: the revision and layout from each tree's key, the part from its record,
so a volume of a part keeps only that part's objects cached) and the removal of unused trees
under space pressure, the gauges of shared trees and published volumes, and `/status`.
Metrics are observed here, from the rpc layer's observer (every publish, refused ones
included) and the plugin's switch callback.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapin_sidecar.csi.access import Access
from datapin_sidecar.csi.follow import Follower
from datapin_sidecar.csi.kubeapi import KubeApi, KubeConfig
from datapin_sidecar.csi.plugin import NodePlugin
from datapin_sidecar.csi.publisher import Publisher
from datapin_sidecar.csi.rpc import PluginServer, serve_node_plugin
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.csi.volume import PublishResult
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import is_part_key, tree_key, tree_layout, tree_md5
from datapin_sidecar.errors import UnsafeFileError, UsageError, VolumeError
from datapin_sidecar.node.housekeeping.roots import RevisionRoot
from datapin_sidecar.node.housekeeping.tasks import OnError, Task, log_item_error
from datapin_sidecar.node.metrics import Metrics
from datapin_sidecar.node.settings import Settings

log = logging.getLogger(__name__)

#: How blocking work is run (the agent's daemon-thread runner).
Runner = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class PluginState:
    """The running plugin's parts, for GC, gauges and /status (None until it is up)."""

    trees: TreeStore | None = None
    publisher: Publisher | None = None
    access: Access | None = None
    server: PluginServer | None = None
    removed_trees: list[str] = field(default_factory=list)
    #: What /status lists of the published volumes (`VolumeRecord.summary`: pod, dataset, pin,
    #: the part served), refreshed by `counts` in a worker thread with the gauges, so /status
    #: never reads records on the event loop.
    volumes: list[dict[str, object]] = field(default_factory=list)

    def roots(self, on_error: OnError | None = None) -> list[RevisionRoot]:
        """The revisions, or parts of them, of the trees published volumes use: their
        objects stay cached (in a worker thread).

        A key names its tree's revision and layout, and whether it holds a part; which part
        is in the tree's record (`TreeInfo.paths`, read bounded), read for part keys only. A
        part key whose record is missing, unreadable or names another part is reported to
        `on_error` and protects its whole revision: these trees are the agent's own and in
        use, so the doubt costs cache space, never a re-download under a pod.
        """
        if self.publisher is None:
            return []
        report = on_error or log_item_error
        found: list[RevisionRoot] = []
        for record in self.publisher.published():
            is_dir = record.pin.endswith(".dir")
            for key in sorted(record.keys):
                revision = Revision(md5=tree_md5(key), is_dir=is_dir)
                part = self._part(key, report) if is_part_key(key) else Part.WHOLE
                found.append((revision, tree_layout(key), part))
        return found

    def _part(self, key: str, report: OnError) -> Part:
        """The part the tree `key` holds, from its record (`Part.WHOLE` when in doubt)."""
        where = f"trees/{key}"
        info = self.trees.info(key) if self.trees is not None else None
        if info is None:
            report(Task.ROOTS, where, UnsafeFileError(where, "has no readable record"))
            return Part.WHOLE
        try:
            part = info.part
        except Exception as exc:
            report(Task.ROOTS, where, exc)
            return Part.WHOLE
        if tree_key(tree_md5(key), tree_layout(key), part) != key:
            report(Task.ROOTS, where, UnsafeFileError(where, f"is recorded as {part}"))
            return Part.WHOLE
        return part

    def remove_unused_trees(self) -> list[str]:
        """Delete the shared trees no volume uses (space pressure; in a worker thread)."""
        if self.trees is None:
            return []
        removed = []
        for key in sorted(set(self.trees.keys()) - self.trees.in_use()):
            if self.trees.remove_sync(key):
                removed.append(key)
                if self.access is not None:
                    self.access.forget_tree(key)
        self.trees.sweep()
        return removed

    def counts(self) -> tuple[int, int]:
        """(shared trees, published volumes); in a worker thread. Refreshes `volumes`."""
        trees = len(self.trees.keys()) if self.trees is not None else 0
        published = self.publisher.published() if self.publisher is not None else []
        self.volumes = [record.summary() for record in published]
        return trees, len(published)

    def status(self) -> dict[str, object]:
        registration = self.server.registration if self.server is not None else None
        return {
            "registered": None if registration is None else registration.registered,
            "registration_error": None if registration is None else registration.error,
            "volumes": self.volumes,
        }


def kube_config(settings: Settings, environ: Mapping[str, str]) -> KubeConfig:
    """The API the plugin reads: `kube_api_url` (tests), else the pod's in-cluster access."""
    if settings.kube_api_url:
        return KubeConfig(url=settings.kube_api_url)
    config = KubeConfig.in_cluster(environ)
    if config is None:
        raise UsageError(
            "DATAPIN_CSI_SOCKET is set but the agent has no Kubernetes API to read Datasets "
            "from (no KUBERNETES_SERVICE_HOST). Fix: run it in the cluster with the chart's "
            "service account, or set DATAPIN_KUBE_API_URL"
        )
    return config


def share_cache(root: Path, cache: NodeCache) -> None:
    """The node plugin runs as root. A node volume owned by another user (the sidecar modes'
    `sidecar.user`, install.md step 1) also serves sidecar-mode pods, which write the cache as
    that user: the cache's directories are made theirs first, so none the agent creates locks
    them out. A volume owned by root serves csi pods only, and stays all root's."""
    st = os.stat(root)
    if os.geteuid() == 0 and st.st_uid != 0:
        given = cache.share_directories(st.st_uid, st.st_gid)
        if given:
            log.info(
                "gave %d cache directories to %d:%d, the node volume's owner (sidecar modes)",
                given,
                st.st_uid,
                st.st_gid,
            )


def observer(metrics: Metrics) -> Callable[[PublishResult, float, BaseException | None], None]:
    """The rpc layer's publish observer: latency by result, refusals by reason."""

    def observe(result: PublishResult, seconds: float, exc: BaseException | None) -> None:
        metrics.publish_seconds.labels(result.value).observe(seconds)
        if isinstance(exc, VolumeError):
            metrics.refusals.labels(exc.refusal.value).inc()

    return observe


async def serve_plugin(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    cache: NodeCache,
    metrics: Metrics,
    state: PluginState,
    stopping: asyncio.Event,
    run: Runner,
    build_remote: Callable[[Remote], Remote] | None = None,
) -> None:
    """Serve the node plugin until `stopping` (see the module doc)."""
    socket = settings.csi_socket
    if socket is None:
        return
    if not settings.node_name:
        raise UsageError(
            "DATAPIN_CSI_SOCKET is set but DATAPIN_NODE_NAME is not: the plugin reports its "
            "node to kubelet and follows that node's pods. Fix: set it from spec.nodeName "
            "(the chart does)"
        )
    await run(share_cache, settings.root, cache)
    async with KubeApi(kube_config(settings, environ)) as kube:
        publisher = Publisher(settings.root, grace=settings.spare_grace_seconds)
        trees = TreeStore(
            settings.root,
            cache,
            strategy=Strategy(settings.link),
            references=publisher.referenced_keys,
        )
        access = Access(settings.root, ttl=settings.csi_proof_seconds, run=run)
        plugin = NodePlugin(
            kube=kube,
            cache=cache,
            access=access,
            trees=trees,
            publisher=publisher,
            jobs=settings.jobs,
            trusted_endpoints=settings.csi_trusted_endpoints,
            build_remote=build_remote,
        )
        plugin.on_switch = lambda ok: metrics.switches.labels("ok" if ok else "failed").inc()
        await plugin.start()
        state.trees, state.publisher, state.access = trees, publisher, access
        async with serve_node_plugin(
            plugin,
            csi_socket=socket,
            registration_dir=settings.csi_registration_dir,
            endpoint_on_host=settings.csi_endpoint or str(socket),
            node_id=settings.node_name,
            kubelet_dir=settings.kubelet_dir,
            observe=observer(metrics),
        ) as server:
            state.server = server
            log.info("serving the CSI node plugin on %s", Path(socket))
            follower = Follower(
                kube=kube, node=settings.node_name, served=plugin.served, switch=plugin.switch
            )
            await follower.run(stopping)
