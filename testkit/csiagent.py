"""The agent as a CSI node plugin on a test node: the real program, kubelet's calls, kmock.

For the end-to-end tests of the node plugin (tests/test_csi_node.py): everything kubelet and
the API server would give the agent on a node, and nothing mocked inside it.

- `CsiAgentNode` is one node: a `CsiNode` (the node volume ROOT and kubelet's root, whose
  pods/ is a shared mount as on a node), short socket paths (a unix socket path is at most
  107 bytes, pytest's temporary paths can be longer), and the real `datapin-sidecar agent`
  (`SidecarProcess`) serving CSI with those settings and the kmock API's URL. `start` and
  `kill` (SIGKILL by PID) may be repeated on the same ROOT, as a node's agent restarts.
  `close` stops the agent by PID, then lazily unmounts everything below the node (deepest
  first), so a failing test leaves no mount behind.
  As in the chart's DaemonSet, the agent runs in a mount namespace of its own (`unshare
  --mount`, exec'd: the PID is the agent's) in which ROOT and kubelet's pods directory are
  shared with the host's (`Bidirectional`): what the agent mounts must propagate out to where
  kubelet and the container runtime (here: the test, in the host's namespace) look, and a
  killed agent's namespace goes with it, as a restarted container's does.
- `injected` builds a pod's volume the way the webhook does (`inject_csi` on a pod template
  annotated for a Dataset) and returns what kubelet then holds: the `InlineVolume` with the
  attributes, readOnly and the Secret's data, and the pod object to create in the API. A
  `part` (some folders of the revision) goes into the pins annotation (`PinRecord.part`) and
  the volume's `path` attribute, as the webhook's contract says (the attribute is added here
  when `inject_csi` does not write it yet).
- `dataset_object` is a Dataset as the operator's CRD defines it.
- `ContainerView` is a container's view of a volume: a process in its own mount namespace
  that binds the target the way the container runtime does for `mountPropagation:
  HostToContainer` (recursive bind, rslave), so a test sees what the pod sees, including the
  mounts the plugin adds later (a live switch).

Blocking calls (process start, HTTP to the agent) run in threads: the API the agent reads is
kmock's emulator in the test's own event loop, which must keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapin_operator.api import models
from datapin_operator.webhook.inject_csi import inject_csi
from datapin_operator.webhook.mounts import DatasetMount
from datapin_operator.webhook.requests import parse_request
from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.registration import registration_socket
from datapin_sidecar.csi.volume import Attr
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.pins import PinRecord

from testkit import rmtree_robust
from testkit.csinode import CsiNode
from testkit.kubelet import InlineVolume, Kubelet
from testkit.sidecarproc import SidecarProcess

__all__ = ["ContainerView", "CsiAgentNode", "Injected", "dataset_object", "injected"]

NODE_NAME = "node-1"


class CsiAgentNode:
    """One node with the agent serving CSI (see the module doc)."""

    def __init__(
        self,
        base: Path,
        workdir: Path,
        *,
        kube_api_url: str,
        trusted_endpoints: Sequence[str] = (),
        node_name: str = NODE_NAME,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.node = CsiNode(base)
        # The node volume's hostPath is Bidirectional in the chart: a shared mount on the host.
        mounts.bind(self.node.root, self.node.root)
        mounts.set_propagation(self.node.root, mounts.Propagation.PRIVATE)
        mounts.set_propagation(self.node.root, mounts.Propagation.SHARED)
        self.workdir = workdir
        self.sockets = Path(tempfile.mkdtemp(prefix="dp-csi-", dir="/tmp"))
        self.csi_socket = self.sockets / "csi.sock"
        self.registration_dir = self.sockets / "plugins_registry"
        self.registration_dir.mkdir()
        self.kubelet = Kubelet(kubelet_dir=self.node.kubelet, node_name=node_name)
        self.settings: dict[str, Any] = {
            "root": str(self.node.root),
            "csi_socket": str(self.csi_socket),
            "csi_registration_dir": str(self.registration_dir),
            "kubelet_dir": str(self.node.kubelet),
            "kube_api_url": kube_api_url,
            "node_name": node_name,
            "csi_trusted_endpoints": list(trusted_endpoints),
            "gc_interval_seconds": "0.5",
            "scan_interval_seconds": "0.5",
            "spare_grace_seconds": "0",
            "log_format": "json",
            **(extra or {}),
        }
        self.agent: SidecarProcess | None = None
        self.agents: list[SidecarProcess] = []

    @property
    def root(self) -> Path:
        return self.node.root

    @property
    def registration_socket(self) -> Path:
        return registration_socket(self.registration_dir)

    async def start(self) -> SidecarProcess:
        """Start the agent and wait until both of its sockets answer."""
        agent = SidecarProcess(
            "agent",
            self.workdir,
            self.settings,
            wrapper=("unshare", "--mount", "--propagation", "unchanged"),
        )
        self.agent = agent
        self.agents.append(agent)
        await asyncio.to_thread(agent.start)
        # Connect, not exists(): a killed agent leaves its socket files behind, and the new one
        # answers only once it has replaced them.
        await self.until(
            "the CSI and registration sockets",
            lambda: _answers(self.csi_socket) and _answers(self.registration_socket),
        )
        return agent

    def kill(self) -> None:
        """kill -9 of the agent, by PID."""
        assert self.agent is not None
        os.kill(self.agent.pid, signal.SIGKILL)
        self.agent.wait(30)

    async def until(self, what: str, check: Any, within: float = 60.0) -> Any:
        """Poll `check()` in a thread until truthy (the agent's log on failure)."""
        assert self.agent is not None
        agent = self.agent
        return await asyncio.to_thread(agent.wait_until, what, check, within)

    async def sample(self, name: str, **labels: str) -> float:
        assert self.agent is not None
        return await asyncio.to_thread(self.agent.sample, name, **labels)

    def close(self) -> None:
        """Stop every agent by PID, unmount everything below the node, remove the sockets."""
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
        try:
            self.node.close()
        finally:
            rmtree_robust(self.sockets)

    def mounts_below(self, path: Path) -> list[str]:
        """The mount points at or below `path` in the host's namespace, except the node's own
        (ROOT and kubelet's directory, mounts this harness made)."""
        own = {mounts.canonical(self.node.root), mounts.canonical(self.node.kubelet)}
        return [m.mount_point for m in mounts.mounts_under(path) if m.mount_point not in own]


def _answers(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Injected:
    """A pod the webhook injected: its volume as kubelet sees it and its API object."""

    volume: InlineVolume
    pod: dict[str, Any]
    secret_name: str


def dataset_object(
    name: str, namespace: str, *, url: str, endpoint: str, secret: str
) -> dict[str, Any]:
    """A Dataset whose keys are in `secret` (default key names)."""
    return {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "remote": {"url": url, "endpoint": endpoint, "credentialsSecretRef": {"name": secret}}
        },
    }


def injected(
    *,
    dataset: Mapping[str, Any],
    pin: str,
    secrets: Mapping[str, str],
    ref: str = "v1",
    writable: bool = False,
    pod_name: str | None = None,
    node_name: str = NODE_NAME,
    namespace: str | None = None,
    layout: LayoutChoice = LayoutChoice.DVC3,
    part: Part = Part.WHOLE,
) -> Injected:
    """The webhook's injection of a pod asking for `dataset` at `pin` (see the module doc).

    `namespace` is the pod's (default: the Dataset's); `secrets` the data of the Secret the
    injected `nodePublishSecretRef` names, which kubelet passes.
    """
    meta = dataset["metadata"]
    namespace = namespace or meta["namespace"]
    annotations = {
        "datapin.dev/dataset": meta["name"],
        "datapin.dev/revision": ref,
        "datapin.dev/mode": "csi",
    }
    if writable:
        annotations["datapin.dev/writable"] = "true"
    template: dict[str, Any] = {
        "metadata": {"annotations": annotations},
        "spec": {"containers": [{"name": "train", "image": "example.org/train:1"}]},
    }
    request = parse_request(annotations, mount_root="/data")
    assert request is not None
    mount = DatasetMount(
        request=request.mounts[0],
        spec=models.DatasetSpec.model_validate(dataset["spec"]),
        pin=PinRecord(dataset=meta["name"], pin=pin, ref=ref, layout=layout, part=part),
    )
    out = inject_csi(template, request=request, mounts=[mount])
    (volume,) = [v for v in out["spec"]["volumes"] if "csi" in v]
    csi = volume["csi"]
    if not part.whole:
        csi["volumeAttributes"].setdefault(Attr.PATH.value, part.label)
        assert csi["volumeAttributes"][Attr.PATH.value] == part.label
    uid = str(uuid.uuid4())
    name = pod_name or f"train-{uid[:8]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**out["metadata"], "name": name, "namespace": namespace, "uid": uid},
        "spec": {**out["spec"], "nodeName": node_name},
    }
    inline = InlineVolume(
        namespace=namespace,
        pod_name=name,
        pod_uid=uid,
        name=volume["name"],
        driver=csi["driver"],
        attributes=dict(csi["volumeAttributes"]),
        read_only=bool(csi["readOnly"]),
        secrets=dict(secrets),
    )
    return Injected(volume=inline, pod=pod, secret_name=csi["nodePublishSecretRef"]["name"])


_CONTAINER = r"""
import hashlib, json, os, subprocess, sys
target, mount_path = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "--rbind", target, mount_path], check=True)
subprocess.run(["mount", "--make-rslave", mount_path], check=True)
print("ready", flush=True)
for _ in sys.stdin:
    found = {}
    try:
        base = os.path.join(mount_path, "current")
        for d, _dirs, files in os.walk(base):
            for name in files:
                p = os.path.join(d, name)
                with open(p, "rb") as f:
                    found[os.path.relpath(p, base)] = hashlib.md5(f.read()).hexdigest()
        print(json.dumps(found), flush=True)
    except OSError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
"""


class ContainerView:
    """A container's mount of a volume target, HostToContainer (see the module doc)."""

    def __init__(self, target: Path, mount_path: Path) -> None:
        mount_path.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *("unshare", "--mount", "--propagation", "slave"),
                *(sys.executable, "-c", _CONTAINER, str(target), str(mount_path)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise AssertionError(f"the container's mount namespace failed: {line!r}")

    def md5_tree(self) -> dict[str, str]:
        """relpath -> md5 of every file below `current`, as the container reads them."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        found: dict[str, str] = json.loads(self.proc.stdout.readline())
        return found

    def close(self) -> None:
        """Stop the process by PID: its namespace, and the mounts in it, go with it."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
