"""A node for the CSI publisher's tests and benchmark: node directory, kubelet directory, requests.

`CsiNode` lays out what a real node has, on a real (XFS) directory: the node volume `ROOT`
(cache, trees, csi) and a kubelet root whose `pods/` holds each pod's volume directory, made a
shared mount as kubelet's directory is on a node (the plugin sees it with Bidirectional
propagation). `request` builds a `VolumeRequest` the way the plugin's gRPC layer does
(`parse_publish` with the pod info kubelet adds). `close` lazily unmounts everything below
the node, so a failing test never leaves a mount behind (call it before deleting the files).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.volume import Attr, PodInfo, VolumeRequest, parse_publish
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.revision import Revision


class CsiNode:
    """ROOT and kubelet's directory under `base` (see the module doc)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "node"
        self.kubelet = base / "kubelet"
        self.root.mkdir(parents=True)
        (self.kubelet / "pods").mkdir(parents=True)
        mounts.bind(self.kubelet, self.kubelet)
        mounts.set_propagation(self.kubelet, mounts.Propagation.PRIVATE)
        mounts.set_propagation(self.kubelet, mounts.Propagation.SHARED)
        self.cache = NodeCache(self.root / "cache")

    def close(self) -> None:
        mounts.unmount_under(self.base, detach=True)

    def request(
        self,
        revision: Revision,
        *,
        pod_uid: str | None = None,
        volume: str = "data",
        writable: bool = False,
        readonly: bool = False,
        layout: LayoutChoice = LayoutChoice.AUTO,
        dataset: str = "images",
    ) -> VolumeRequest:
        """A checked request for a new pod (its volume directory made, as kubelet does)."""
        uid = pod_uid or str(uuid.uuid4())
        parent = self.kubelet / "pods" / uid / "volumes" / "kubernetes.io~csi" / volume
        parent.mkdir(parents=True, exist_ok=True)
        volume_id = "csi-" + hashlib.sha256(f"{uid}{volume}".encode()).hexdigest()
        return parse_publish(
            volume_id=volume_id,
            target_path=str(parent / "mount"),
            readonly=readonly,
            context={
                Attr.DATASET: dataset,
                Attr.PIN: revision.oid,
                Attr.LAYOUT: layout.value,
                Attr.WRITABLE: "true" if writable else "false",
                PodInfo.NAMESPACE: "team-a",
                PodInfo.NAME: f"train-{uid[:8]}",
                PodInfo.UID: uid,
                PodInfo.EPHEMERAL: "true",
            },
            secrets={},
            kubelet_dir=self.kubelet,
        )


def md5_tree(root: Path) -> dict[str, str]:
    """relpath -> md5 of every regular file below `root` (following no symlink below it)."""
    found: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            found[rel] = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    return found


def md5_files(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v, usedforsecurity=False).hexdigest() for k, v in files.items()}
