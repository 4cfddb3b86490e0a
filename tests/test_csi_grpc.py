"""The node plugin's gRPC face (csi.rpc, csi.registration, csi.sockets), called as kubelet does.

Everything goes over real unix sockets to real grpc.aio servers, and the calls are made by
testkit.kubelet, which builds them the way kubelet's csi_mounter does. The backend is a small
real one that records what it was given and raises the datapin error a test chooses, so what
is checked is the contract the agent's backend and kubelet both depend on: the handshake,
the parsed `VolumeRequest` (secrets included, and never logged), each error's gRPC code and
message, bad requests refused before the backend runs, and the sockets' life cycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from datapin_sidecar import __version__
from datapin_sidecar.csi.proto import csi_pb2 as pb
from datapin_sidecar.csi.registration import KubeletRegistration, registration_socket
from datapin_sidecar.csi.rpc import BUG_MESSAGE, PluginServer, serve_node_plugin, status_of
from datapin_sidecar.csi.volume import DRIVER, Attr, PublishResult, VolumeRequest
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.errors import (
    AccessRefusedError,
    BadSettingsError,
    BadVolumeError,
    CorruptObjectError,
    DatasetNotFoundError,
    DestinationError,
    ObjectsMissingError,
    Refusal,
    RemoteCause,
    RemoteError,
    StoppedError,
    VolumeError,
)

from testkit.kubelet import CsiClient, InlineVolume, Kubelet, publish_request

PIN = "0123456789abcdef0123456789abcdef.dir"
NODE_ID = "node-7"
#: Where the plugin tells kubelet its CSI socket is: the host's path, not the container's.
HOST_ENDPOINT = "/var/lib/kubelet/plugins/datapin.dev/csi.sock"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0042",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue-9f8e",
}


@dataclass
class RecordingBackend:
    """A NodeBackend that records its calls and raises `error` when one is set."""

    is_ready: bool = True
    error: BaseException | None = None
    published: list[VolumeRequest] = field(default_factory=list)
    unpublished: list[tuple[str, Path]] = field(default_factory=list)

    async def publish(self, request: VolumeRequest) -> PublishResult:
        self.published.append(request)
        if self.error is not None:
            raise self.error
        return PublishResult.WARM

    async def unpublish(self, *, volume_id: str, target_path: Path) -> None:
        self.unpublished.append((volume_id, target_path))
        if self.error is not None:
            raise self.error

    def ready(self) -> bool:
        return self.is_ready


@dataclass
class Plugin:
    server: PluginServer
    backend: RecordingBackend
    kubelet: Kubelet
    client: CsiClient


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def observed() -> list[tuple[PublishResult, BaseException | None]]:
    return []


@pytest.fixture
async def plugin(
    tmp_path: Path,
    backend: RecordingBackend,
    observed: list[tuple[PublishResult, BaseException | None]],
) -> AsyncIterator[Plugin]:
    kubelet = Kubelet(kubelet_dir=tmp_path / "kubelet", node_name=NODE_ID)
    async with (
        serve_node_plugin(
            backend,
            csi_socket=tmp_path / "plugins" / DRIVER / "csi.sock",
            registration_dir=tmp_path / "plugins_registry",
            endpoint_on_host=HOST_ENDPOINT,
            node_id=NODE_ID,
            kubelet_dir=kubelet.kubelet_dir,
            observe=lambda result, seconds, exc: observed.append((result, exc)),
        ) as server,
        kubelet.csi(server.csi_socket) as client,
    ):
        yield Plugin(server=server, backend=backend, kubelet=kubelet, client=client)


def _volume(*, read_only: bool = False, attributes: dict[str, str] | None = None) -> InlineVolume:
    """A pod's volume as the webhook writes it, with the Dataset's keys as its Secret."""
    if attributes is None:
        attributes = {Attr.DATASET.value: "imagenet", Attr.PIN.value: PIN, Attr.REF.value: "v1"}
    return InlineVolume(attributes=attributes, secrets=SECRETS, read_only=read_only)


# -- registration and identity ---------------------------------------------------------------


async def test_kubelet_registers_the_plugin_and_its_verdict_is_kept(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    reg = plugin.server.registration_socket
    assert reg is not None
    assert reg.name == f"{DRIVER}-reg.sock"
    assert plugin.server.registration is None  # kubelet has not called yet

    registered = await plugin.kubelet.register(reg, csi_socket=plugin.server.csi_socket)

    assert registered.name == DRIVER
    assert registered.endpoint == HOST_ENDPOINT
    assert registered.supported_versions == ("1.0.0",)
    assert registered.node_id == NODE_ID
    assert plugin.server.registration == KubeletRegistration(registered=True, error="")

    caplog.set_level(logging.INFO)
    await plugin.kubelet.notify(reg, registered=False, error="version 0.3 not supported")
    assert plugin.server.registration == KubeletRegistration(
        registered=False, error="version 0.3 not supported"
    )
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1
    assert "version 0.3 not supported" in refusals[0].getMessage()


async def test_identity_says_who_we_are_and_probe_follows_the_backend(plugin: Plugin) -> None:
    info = await plugin.client.get_plugin_info()
    assert (info.name, info.vendor_version) == (DRIVER, __version__)
    # No controller service and no topology: kubelet must not look for either.
    assert list((await plugin.client.get_plugin_capabilities()).capabilities) == []

    probe = await plugin.client.probe()
    assert probe.HasField("ready")
    assert probe.ready.value is True
    plugin.backend.is_ready = False
    assert (await plugin.client.probe()).ready.value is False


async def test_node_has_no_stage_capability_and_reports_its_node_id(plugin: Plugin) -> None:
    # Without STAGE_UNSTAGE_VOLUME kubelet goes straight to NodePublishVolume.
    assert list((await plugin.client.node_get_capabilities()).capabilities) == []
    assert (await plugin.client.node_get_info()).node_id == NODE_ID


async def test_without_a_registration_dir_only_csi_is_served(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    async with serve_node_plugin(
        backend,
        csi_socket=tmp_path / "csi.sock",
        registration_dir=None,
        endpoint_on_host=HOST_ENDPOINT,
        node_id=NODE_ID,
        kubelet_dir=tmp_path / "kubelet",
    ) as server:
        assert server.registration_socket is None
        assert os.listdir(tmp_path) == ["csi.sock"]


# -- publish and unpublish -------------------------------------------------------------------


async def test_publish_and_unpublish_reach_the_backend_parsed_and_secrets_stay_out_of_logs(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    volume = _volume(read_only=True)
    target = await plugin.kubelet.publish(plugin.client, volume)

    [request] = plugin.backend.published
    assert request.volume_id == volume.volume_id
    assert request.volume_id.startswith("csi-")
    assert len(request.volume_id) == len("csi-") + 64
    assert request.target_path == target
    assert target == plugin.kubelet.kubelet_dir / "pods" / volume.pod_uid / (
        "volumes/kubernetes.io~csi/data/mount"
    )
    assert request.readonly is True
    assert request.writable is False
    assert (request.dataset, request.pin, request.ref) == ("imagenet", PIN, "v1")
    assert request.layout is LayoutChoice.AUTO
    assert (request.pod.namespace, request.pod.name, request.pod.uid) == (
        volume.namespace,
        volume.pod_name,
        volume.pod_uid,
    )
    assert dict(request.secrets) == SECRETS
    # kubelet made the target's parent (0750, vol_data.json beside it); the plugin owns `mount`.
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
    assert (target.parent / "vol_data.json").is_file()

    await plugin.kubelet.unpublish(plugin.client, volume)
    assert plugin.backend.unpublished == [(volume.volume_id, target)]
    assert not target.parent.exists()

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert volume.volume_id in logged  # the calls are logged...
    for value in SECRETS.values():  # ...but never with the keys
        assert value not in logged
    assert all(value not in repr(request) for value in SECRETS.values())


async def test_the_pod_cannot_forge_its_identity_through_attributes(plugin: Plugin) -> None:
    volume = _volume(
        attributes={
            Attr.DATASET.value: "imagenet",
            Attr.PIN.value: PIN,
            "csi.storage.k8s.io/pod.namespace": "kube-system",
        }
    )
    await plugin.kubelet.publish(plugin.client, volume)
    assert plugin.backend.published[0].pod.namespace == volume.namespace


async def test_kubelet_giving_up_on_a_publish_cancels_the_backend_call(
    tmp_path: Path, plugin: Plugin
) -> None:
    """kubelet's deadline ends the call and cancels the backend's coroutine with it (a backend
    shields work that must outlive one call)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    class SlowBackend(RecordingBackend):
        async def publish(self, request: VolumeRequest) -> PublishResult:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    kubelet_dir = plugin.kubelet.kubelet_dir
    async with (
        serve_node_plugin(
            SlowBackend(),
            csi_socket=tmp_path / "slow.sock",
            registration_dir=None,
            endpoint_on_host=HOST_ENDPOINT,
            node_id=NODE_ID,
            kubelet_dir=kubelet_dir,
        ) as server,
        plugin.kubelet.csi(server.csi_socket) as client,
    ):
        request = _publish(plugin, _volume())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.node_publish(request, deadline=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert started.is_set()
        await asyncio.wait_for(cancelled.wait(), timeout=5)


# -- errors ------------------------------------------------------------------------------------

_MISSING = ObjectsMissingError(oids=["ab" * 16], cache="/datapin/cache", remote="s3://b/p")
ERRORS: list[tuple[BaseException, grpc.StatusCode]] = [
    (BadVolumeError("volume attribute 'pin' is bad. Fix: x"), grpc.StatusCode.INVALID_ARGUMENT),
    (
        VolumeError("no keys for dataset 'imagenet'. Fix: y", refusal=Refusal.NO_CREDENTIALS),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (DatasetNotFoundError(dataset="imagenet", namespace="training"), grpc.StatusCode.NOT_FOUND),
    (
        AccessRefusedError("keys refused for 'imagenet'. Fix: z", refusal=Refusal.WRONG_KEYS),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        AccessRefusedError("pin not on remote. Fix: push", refusal=Refusal.NOT_ON_REMOTE),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        AccessRefusedError("objects not on remote", refusal=Refusal.OBJECTS_NOT_ON_REMOTE),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        RemoteError(remote="s3://b", problem="down", fix="wait", cause=RemoteCause.UNREACHABLE),
        grpc.StatusCode.UNAVAILABLE,
    ),
    (
        RemoteError(remote="s3://b", problem="no", fix="keys", cause=RemoteCause.NO_BUCKET),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    (_MISSING, grpc.StatusCode.FAILED_PRECONDITION),
    (
        CorruptObjectError(oids=["cd" * 16], cache="/datapin/cache"),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    (StoppedError(), grpc.StatusCode.ABORTED),
    (
        DestinationError(dest="/datapin/csi/x", problem="no space", fix="free some"),
        grpc.StatusCode.INTERNAL,
    ),
]


def test_every_refusal_has_a_code() -> None:
    codes = {r: status_of(VolumeError("x", refusal=r)) for r in Refusal}
    assert set(codes) == set(Refusal)
    assert grpc.StatusCode.INTERNAL not in codes.values()


def _error_id(value: object) -> str:
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, VolumeError):
        return value.refusal.value
    if isinstance(value, RemoteError):
        return f"remote-{value.cause.value}"
    return type(value).__name__


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=_error_id)
async def test_each_error_reaches_kubelet_as_its_code_and_message(
    plugin: Plugin, error: BaseException, code: grpc.StatusCode
) -> None:
    plugin.backend.error = error
    volume = _volume()
    for call in (plugin.kubelet.publish, plugin.kubelet.unpublish):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(plugin.client, volume)
        assert raised.value.code() == code
        assert raised.value.details() == str(error)
    assert len(plugin.backend.published) == len(plugin.backend.unpublished) == 1


async def test_a_bug_is_internal_with_a_generic_message_and_a_logged_traceback(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    plugin.backend.error = KeyError("/datapin/csi/some/internal/path")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await plugin.kubelet.publish(plugin.client, _volume())
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == BUG_MESSAGE
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.ERROR
    assert isinstance(record.exc_info[1], KeyError)  # type: ignore[index]


def _publish(plugin: Plugin, volume: InlineVolume) -> pb.NodePublishVolumeRequest:
    plugin.kubelet.prepare(volume)
    return publish_request(volume, kubelet_dir=plugin.kubelet.kubelet_dir)


def _bad_publishes(plugin: Plugin) -> dict[str, pb.NodePublishVolumeRequest]:
    bad: dict[str, pb.NodePublishVolumeRequest] = {}
    volume = _volume()
    for name in ("volume_id", "target_path", "volume_capability"):
        request = _publish(plugin, volume)
        request.ClearField(name)
        bad[f"no {name}"] = request
    request = _publish(plugin, volume)
    request.volume_capability.block.SetInParent()
    bad["block volume"] = request
    request = _publish(plugin, volume)
    request.volume_capability.ClearField("mount")
    bad["no access type"] = request
    request = _publish(plugin, volume)
    request.volume_id = "../../etc"
    bad["volume id a path"] = request
    request = _publish(plugin, volume)
    request.target_path = "/etc/kubernetes/mount"
    bad["target outside kubelet"] = request
    other = _volume()
    request = _publish(plugin, volume)
    request.target_path = str(other.target_path(plugin.kubelet.kubelet_dir))
    bad["target of another pod"] = request
    request = _publish(plugin, volume)
    del request.volume_context["csi.storage.k8s.io/pod.uid"]
    bad["no pod info"] = request
    request = _publish(plugin, volume)
    request.volume_context[Attr.DATASET.value] = "../secrets"
    bad["bad dataset"] = request
    return bad


async def test_bad_publishes_are_invalid_argument_and_never_reach_the_backend(
    plugin: Plugin,
) -> None:
    for what, request in _bad_publishes(plugin).items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await plugin.client.node_publish(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert "Fix:" in (raised.value.details() or ""), what
    assert plugin.backend.published == []


@pytest.mark.parametrize(
    ("volume_id", "target"),
    [
        ("", "pods/{uid}/volumes/kubernetes.io~csi/data/mount"),
        ("csi-1", ""),
        ("../x", "pods/{uid}/volumes/kubernetes.io~csi/data/mount"),
        ("csi-1", "pods/{uid}/volumes/kubernetes.io~csi/data/../../../../etc"),
        ("csi-1", "/etc/passwd"),
    ],
)
async def test_bad_unpublishes_are_invalid_argument_and_never_reach_the_backend(
    plugin: Plugin, volume_id: str, target: str
) -> None:
    uid = _volume().pod_uid
    path = str(plugin.kubelet.kubelet_dir / target.format(uid=uid)) if target else ""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await plugin.client.node_unpublish(volume_id=volume_id, target_path=path)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.backend.unpublished == []


# -- sockets ---------------------------------------------------------------------------------


def _stale_socket(path: Path) -> None:
    """What a killed agent leaves: a bound socket file nobody listens on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


async def test_stale_sockets_are_replaced_and_every_socket_goes_on_exit(
    tmp_path: Path, backend: RecordingBackend
) -> None:
    csi_socket = tmp_path / "plugins" / DRIVER / "csi.sock"
    registry = tmp_path / "plugins_registry"
    reg = registration_socket(registry)
    _stale_socket(csi_socket)
    _stale_socket(reg)
    kubelet = Kubelet(kubelet_dir=tmp_path / "kubelet")
    async with serve_node_plugin(
        backend,
        csi_socket=csi_socket,
        registration_dir=registry,
        endpoint_on_host=str(csi_socket),
        node_id=NODE_ID,
        kubelet_dir=kubelet.kubelet_dir,
    ):
        for path in (csi_socket, reg):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600  # only root (kubelet) connects
        registered = await kubelet.register(reg)  # the endpoint is reachable as announced
        assert registered.node_id == NODE_ID
    assert not csi_socket.exists()
    assert not reg.exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
async def test_a_non_socket_at_the_socket_path_is_an_error_and_left_alone(
    tmp_path: Path, backend: RecordingBackend, kind: str
) -> None:
    csi_socket = tmp_path / "csi.sock"
    elsewhere = tmp_path / "elsewhere.sock"
    _stale_socket(elsewhere)
    if kind == "file":
        csi_socket.write_text("not a socket")
    else:
        csi_socket.symlink_to(elsewhere)
    with pytest.raises(BadSettingsError, match=r"csi\.sock"):
        async with serve_node_plugin(
            backend,
            csi_socket=csi_socket,
            registration_dir=None,
            endpoint_on_host=str(csi_socket),
            node_id=NODE_ID,
            kubelet_dir=tmp_path / "kubelet",
        ):
            pass
    os.lstat(csi_socket)  # still there
    assert stat.S_ISSOCK(os.lstat(elsewhere).st_mode)
    if kind == "file":
        assert csi_socket.read_text() == "not a socket"


async def test_every_publish_is_observed_with_its_result(
    plugin: Plugin, observed: list[tuple[PublishResult, BaseException | None]]
) -> None:
    """Metrics see every publish: served, refused before the backend ran, and failed."""
    await plugin.kubelet.publish(plugin.client, _volume())
    bad = _volume(attributes={Attr.DATASET.value: "Not_A_Name", Attr.PIN.value: PIN})
    with pytest.raises(grpc.aio.AioRpcError):
        await plugin.kubelet.publish(plugin.client, bad)
    plugin.backend.error = StoppedError()
    with pytest.raises(grpc.aio.AioRpcError):
        await plugin.kubelet.publish(plugin.client, _volume())
    assert [r for r, _ in observed] == [
        PublishResult.WARM,
        PublishResult.REFUSED,
        PublishResult.FAILED,
    ]
    assert isinstance(observed[1][1], BadVolumeError)
    assert observed[1][1].refusal is Refusal.BAD_VOLUME
