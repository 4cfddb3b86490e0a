"""kubelet's side of a CSI inline volume, for tests: the calls, in kubelet's order and form.

A node plugin is only as right as the requests it is tested with, so this client builds them
the way kubelet does (read in kubelet's csi_mounter.go / csi_plugin.go, v1.36; see
REFERENCE.md "CSI node plugins"), not the way that is easiest to serve:

- **Registration** (`register`): `GetInfo` on the `<driver>-reg.sock` socket, kubelet's checks
  (type `CSIPlugin`, a 1.x version, our driver name), `NodeGetInfo` on the endpoint it names,
  then `NotifyRegistrationStatus` with the verdict.
- **Publish** (`publish`): volume id `csi-<sha256(pod uid + volume name)>`; target
  `<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`, whose *parent* kubelet
  creates (0750, `vol_data.json` beside the target) and whose `mount` directory it leaves to
  the plugin; a `mount` capability with access mode SINGLE_NODE_WRITER; `readonly` from the
  pod's `csi.readOnly`; the volume context is the pod's `volumeAttributes` with the pod-info
  keys merged over them (`podInfoOnMount: true`, so a pod cannot forge them); the secrets are
  the `nodePublishSecretRef` Secret's data.
- **Unpublish** (`unpublish`): `NodeUnpublishVolume`, then kubelet's own clean-up: the target
  directory if the plugin left it (and it is not a mount point), `vol_data.json`, the parent.
  A target still mounted after a successful unpublish is an `AssertionError`, as kubelet would
  refuse to remove it.

A failed call raises grpc's `AioRpcError` (`.code()`, `.details()`), as kubelet sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from datapin_sidecar.csi.proto import csi_pb2 as pb
from datapin_sidecar.csi.proto import registration_pb2 as reg
from datapin_sidecar.csi.volume import DRIVER, PodInfo
from google.protobuf.message import Message

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

#: How long one call may take, as kubelet's CSI client allows (csiTimeout).
CALL_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class InlineVolume:
    """One pod's `csi` inline volume, as written in the pod spec."""

    namespace: str = "training"
    pod_name: str = "trainer"
    pod_uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    service_account: str = "default"
    #: `volumes[].name`
    name: str = "data"
    driver: str = DRIVER
    #: `volumes[].csi.volumeAttributes` (written by whoever wrote the pod).
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: `volumes[].csi.readOnly`
    read_only: bool = False
    #: The data of the Secret `nodePublishSecretRef` names (kubelet reads it).
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def volume_id(self) -> str:
        """kubelet's `makeVolumeHandle`: `csi-` and the sha256 of pod UID + volume name."""
        return "csi-" + hashlib.sha256((self.pod_uid + self.name).encode()).hexdigest()

    def target_path(self, kubelet_dir: Path) -> Path:
        return (
            kubelet_dir / "pods" / self.pod_uid / "volumes" / "kubernetes.io~csi" / self.name
        ) / "mount"

    def volume_context(self) -> dict[str, str]:
        """The attributes with the pod-info keys merged over them (kubelet's mergeMap)."""
        pod_info = {
            PodInfo.NAME.value: self.pod_name,
            PodInfo.NAMESPACE.value: self.namespace,
            PodInfo.UID.value: self.pod_uid,
            PodInfo.SERVICE_ACCOUNT.value: self.service_account,
            PodInfo.EPHEMERAL.value: "true",
        }
        return {**self.attributes, **pod_info}


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredPlugin:
    """What registration learnt: the plugin's info and its node id."""

    name: str
    endpoint: str
    supported_versions: tuple[str, ...]
    node_id: str


class CsiClient:
    """The CSI calls kubelet makes, on one channel to the plugin's socket."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    async def _call(
        self, method: str, request: Req, response: type[Resp], *, deadline: float = CALL_TIMEOUT
    ) -> Resp:
        return await _unary(self._channel, method, request, response, deadline=deadline)

    async def get_plugin_info(self) -> pb.GetPluginInfoResponse:
        return await self._call(
            "/csi.v1.Identity/GetPluginInfo", pb.GetPluginInfoRequest(), pb.GetPluginInfoResponse
        )

    async def get_plugin_capabilities(self) -> pb.GetPluginCapabilitiesResponse:
        return await self._call(
            "/csi.v1.Identity/GetPluginCapabilities",
            pb.GetPluginCapabilitiesRequest(),
            pb.GetPluginCapabilitiesResponse,
        )

    async def probe(self) -> pb.ProbeResponse:
        return await self._call("/csi.v1.Identity/Probe", pb.ProbeRequest(), pb.ProbeResponse)

    async def node_get_capabilities(self) -> pb.NodeGetCapabilitiesResponse:
        return await self._call(
            "/csi.v1.Node/NodeGetCapabilities",
            pb.NodeGetCapabilitiesRequest(),
            pb.NodeGetCapabilitiesResponse,
        )

    async def node_get_info(self) -> pb.NodeGetInfoResponse:
        return await self._call(
            "/csi.v1.Node/NodeGetInfo", pb.NodeGetInfoRequest(), pb.NodeGetInfoResponse
        )

    async def node_publish(
        self, request: pb.NodePublishVolumeRequest, *, deadline: float = CALL_TIMEOUT
    ) -> None:
        """A raw `NodePublishVolume` (tests of malformed requests); see `Kubelet.publish`."""
        await self._call(
            "/csi.v1.Node/NodePublishVolume",
            request,
            pb.NodePublishVolumeResponse,
            deadline=deadline,
        )

    async def node_unpublish(self, *, volume_id: str, target_path: str) -> None:
        await self._call(
            "/csi.v1.Node/NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path),
            pb.NodeUnpublishVolumeResponse,
        )


def publish_request(volume: InlineVolume, *, kubelet_dir: Path) -> pb.NodePublishVolumeRequest:
    """The `NodePublishVolume` kubelet sends for `volume`."""
    capability = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    return pb.NodePublishVolumeRequest(
        volume_id=volume.volume_id,
        target_path=str(volume.target_path(kubelet_dir)),
        volume_capability=capability,
        readonly=volume.read_only,
        secrets=dict(volume.secrets),
        volume_context=volume.volume_context(),
    )


class Kubelet:
    """kubelet on one node: its root directory, its node name, its CSI calls."""

    def __init__(self, *, kubelet_dir: Path, node_name: str = "node-1") -> None:
        self.kubelet_dir = kubelet_dir
        self.node_name = node_name

    @contextlib.asynccontextmanager
    async def csi(self, socket: Path | str) -> AsyncIterator[CsiClient]:
        """A CSI client on the plugin's socket (a path, as registration's `endpoint` is)."""
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            yield CsiClient(channel)

    async def register(
        self, registration_socket: Path, *, csi_socket: Path | None = None
    ) -> RegisteredPlugin:
        """kubelet's plugin watcher meeting a new socket: GetInfo, checks, NodeGetInfo, Notify.

        `csi_socket` stands in for the endpoint when the host path the plugin announces is
        not where this test can reach it.
        """
        async with grpc.aio.insecure_channel(f"unix:{registration_socket}") as channel:
            info = await _unary(
                channel,
                "/pluginregistration.Registration/GetInfo",
                reg.InfoRequest(),
                reg.PluginInfo,
            )
            problem = _registration_problem(info)
            node_id = ""
            if problem is None:
                async with self.csi(csi_socket or info.endpoint) as client:
                    node_id = (await client.node_get_info()).node_id
                if not node_id:
                    problem = "NodeGetInfo returned an empty node_id"
            await _unary(
                channel,
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                reg.RegistrationStatus(plugin_registered=problem is None, error=problem or ""),
                reg.RegistrationStatusResponse,
            )
        if problem is not None:
            raise AssertionError(f"kubelet would refuse the plugin: {problem}")
        return RegisteredPlugin(
            name=info.name,
            endpoint=info.endpoint,
            supported_versions=tuple(info.supported_versions),
            node_id=node_id,
        )

    async def notify(self, registration_socket: Path, *, registered: bool, error: str) -> None:
        """Only the verdict (kubelet refusing a plugin, say)."""
        async with grpc.aio.insecure_channel(f"unix:{registration_socket}") as channel:
            await _unary(
                channel,
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                reg.RegistrationStatus(plugin_registered=registered, error=error),
                reg.RegistrationStatusResponse,
            )

    def prepare(self, volume: InlineVolume) -> Path:
        """What kubelet does before NodePublishVolume: the target's parent and vol_data.json."""
        target = volume.target_path(self.kubelet_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.parent.chmod(0o750)
        data = {
            "specVolID": volume.name,
            "volumeHandle": volume.volume_id,
            "driverName": volume.driver,
            "nodeName": self.node_name,
            "attachmentID": "",
            "volumeLifecycleMode": "Ephemeral",
        }
        (target.parent / "vol_data.json").write_text(json.dumps(data))
        return target

    async def publish(self, client: CsiClient, volume: InlineVolume) -> Path:
        """Mount `volume` for its pod as kubelet does; the target path."""
        target = self.prepare(volume)
        await client.node_publish(publish_request(volume, kubelet_dir=self.kubelet_dir))
        return target

    async def unpublish(self, client: CsiClient, volume: InlineVolume) -> None:
        """NodeUnpublishVolume, then kubelet's removal of the volume's directory."""
        target = volume.target_path(self.kubelet_dir)
        await client.node_unpublish(volume_id=volume.volume_id, target_path=str(target))
        await asyncio.to_thread(self.clean_up, volume)

    def clean_up(self, volume: InlineVolume) -> None:
        """kubelet's removeMountDir: the target (empty, not a mount), vol_data.json, parent."""
        target = volume.target_path(self.kubelet_dir)
        if os.path.ismount(target):
            raise AssertionError(f"{target} is still a mount point after NodeUnpublishVolume")
        if target.is_dir():
            target.rmdir()
        with contextlib.suppress(FileNotFoundError):
            (target.parent / "vol_data.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            target.parent.rmdir()

    def remove_pod(self, volume: InlineVolume) -> None:
        """Forget the pod's directory (a test's clean-up, after unpublish)."""
        shutil.rmtree(self.kubelet_dir / "pods" / volume.pod_uid, ignore_errors=True)


def _registration_problem(info: reg.PluginInfo) -> str | None:
    """kubelet's checks of a plugin's info, as its plugin watcher and csi plugin make them."""
    if info.type != "CSIPlugin":
        return f"plugin type {info.type!r} is not CSIPlugin"
    if info.name != DRIVER:
        return f"driver name {info.name!r}, expected {DRIVER!r}"
    if not info.endpoint:
        return "the plugin gave no endpoint"
    if not any(v.split(".")[0] == "1" for v in info.supported_versions):
        return f"no supported CSI version in {list(info.supported_versions)}"
    return None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def _unary(
    channel: grpc.aio.Channel,
    method: str,
    request: Req,
    response: type[Resp],
    *,
    deadline: float = CALL_TIMEOUT,
) -> Resp:
    call = channel.unary_unary(
        method, request_serializer=_serialize, response_deserializer=response.FromString
    )
    result: Resp = await call(request, timeout=deadline)
    return result
