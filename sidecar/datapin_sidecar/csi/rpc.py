"""The node plugin's gRPC face: CSI's Identity and Node services, and kubelet registration.

This module is the boundary between kubelet and the agent. It owns the wire (the `csi.v1`
messages, served with grpc.aio on a unix socket, `csi.sockets`) and the CSI spec's rules about
requests and status codes; what a volume *is* belongs to the `NodeBackend` the agent passes
in (authorise, build, bind-mount: `csi.plugin`). So the backend sees only checked values: a
`VolumeRequest` parsed by `volume.parse_publish`, or a checked volume id and target.

**Requests are checked as the spec says, before the backend runs.** A publish needs a volume
id, a target path and a volume capability whose access type is `mount` (a block volume cannot
be a directory tree); anything else is INVALID_ARGUMENT. The volume context and target are
then parsed by `volume.parse_publish`, whose `BadVolumeError` is INVALID_ARGUMENT too, so
kubelet's retry loop shows the fix in the pod's Events. Mount flags and fs type are ignored:
the volume is a bind mount of a tree the agent built, and kubelet sends none for an inline
volume.

**One mapping from errors to codes, `status_of`.** kubelet retries every failure with backoff,
so the code is for people and tools reading it: INVALID_ARGUMENT for a request that will never
work as written, NOT_FOUND for a missing Dataset, PERMISSION_DENIED when the request's own keys
and remote do not prove access, UNAVAILABLE for a remote that may come back, FAILED_PRECONDITION
for data that is not there or not intact, ABORTED when the agent is stopping, and INTERNAL for
the rest. The details are the error's own message (it names the dataset, the pin and the fix);
an exception that is not a `DatapinError` is a bug, logged with its traceback and answered with
a generic message, so nothing unexpected (a path, a key) leaks into the pod's Events.

**Secrets.** The request's `secrets` map goes to the backend inside the `VolumeRequest` (which
keeps it out of its repr) and nowhere else: no request message is ever logged or formatted,
only named fields.

**Cancellation.** kubelet gives a publish a deadline (2 minutes) and retries; when a call is
cancelled, the backend's coroutine is cancelled with it. A backend whose work should outlive
one call (a cold build) shields it and lets the retry join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from datapin_sidecar import __version__
from datapin_sidecar.csi import sockets
from datapin_sidecar.csi.proto import csi_pb2 as pb
from datapin_sidecar.csi.registration import KubeletRegistration, Registrar, registration_socket
from datapin_sidecar.csi.sockets import Behavior, Req, Resp
from datapin_sidecar.csi.volume import (
    DRIVER,
    PublishResult,
    VolumeRequest,
    check_target,
    check_volume_id,
    parse_publish,
)
from datapin_sidecar.errors import (
    BadVolumeError,
    CorruptObjectError,
    DatapinError,
    ObjectsMissingError,
    Refusal,
    RemoteError,
    StoppedError,
    VolumeError,
)

log = logging.getLogger(__name__)

IDENTITY: Final = "csi.v1.Identity"
NODE: Final = "csi.v1.Node"

#: What a caller is told about an exception that is not one of ours (a bug).
BUG_MESSAGE: Final = (
    "internal error in the datapin node plugin (a bug; the agent's log on this node has the "
    "details). Fix: report it with that log"
)

_REFUSAL_CODES: Final[dict[Refusal, grpc.StatusCode]] = {
    Refusal.BAD_VOLUME: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NO_CREDENTIALS: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NO_DATASET: grpc.StatusCode.NOT_FOUND,
    Refusal.WRONG_KEYS: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.NOT_ON_REMOTE: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.OBJECTS_NOT_ON_REMOTE: grpc.StatusCode.PERMISSION_DENIED,
}


#: Told of every publish: how it ended, how long it took, and the error if it failed.
PublishObserver = Callable[[PublishResult, float, BaseException | None], None]


class NodeBackend(Protocol):
    """What the agent does with a checked request (`csi.plugin` implements it)."""

    async def publish(self, request: VolumeRequest) -> PublishResult:
        """Make the volume appear at `request.target_path`; idempotent."""

    async def unpublish(self, *, volume_id: str, target_path: Path) -> None:
        """Undo a publish; idempotent, also for a volume this process never published."""

    def ready(self) -> bool:
        """Whether the plugin can serve publishes now (CSI `Probe`)."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code kubelet gets for a failed call (see the module doc)."""
    match exc:
        case VolumeError():
            return _REFUSAL_CODES[exc.refusal]
        case RemoteError():
            transient = exc.cause.transient
            return grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.FAILED_PRECONDITION
        case ObjectsMissingError() | CorruptObjectError():
            return grpc.StatusCode.FAILED_PRECONDITION
        case StoppedError():
            return grpc.StatusCode.ABORTED
        case _:
            return grpc.StatusCode.INTERNAL


def details_of(exc: BaseException) -> str:
    """The message kubelet gets (and shows in the pod's Events) for a failed call."""
    return str(exc) if isinstance(exc, DatapinError) else BUG_MESSAGE


class NodeService:
    """CSI Identity and Node, over a `NodeBackend`."""

    def __init__(
        self,
        backend: NodeBackend,
        *,
        node_id: str,
        kubelet_dir: Path,
        observe: PublishObserver | None = None,
    ) -> None:
        self._backend = backend
        self._node_id = node_id
        self._kubelet_dir = kubelet_dir
        self._observe: PublishObserver = observe or (lambda *_: None)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        u = sockets.unary
        identity: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "GetPluginInfo": u(
                self._guard(self._plugin_info), pb.GetPluginInfoRequest, pb.GetPluginInfoResponse
            ),
            "GetPluginCapabilities": u(
                self._guard(self._plugin_capabilities),
                pb.GetPluginCapabilitiesRequest,
                pb.GetPluginCapabilitiesResponse,
            ),
            "Probe": u(self._guard(self._probe), pb.ProbeRequest, pb.ProbeResponse),
        }
        node: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "NodePublishVolume": u(
                self._guard(self._publish),
                pb.NodePublishVolumeRequest,
                pb.NodePublishVolumeResponse,
            ),
            "NodeUnpublishVolume": u(
                self._guard(self._unpublish),
                pb.NodeUnpublishVolumeRequest,
                pb.NodeUnpublishVolumeResponse,
            ),
            "NodeGetCapabilities": u(
                self._guard(self._node_capabilities),
                pb.NodeGetCapabilitiesRequest,
                pb.NodeGetCapabilitiesResponse,
            ),
            "NodeGetInfo": u(
                self._guard(self._node_info), pb.NodeGetInfoRequest, pb.NodeGetInfoResponse
            ),
        }
        return [sockets.service(IDENTITY, identity), sockets.service(NODE, node)]

    @staticmethod
    def _guard(
        call: Callable[[Req], Awaitable[Resp]],
    ) -> Behavior[Req, Resp]:
        """Run `call`; turn its failure into the status `status_of` says, with a message."""
        name = call.__name__.lstrip("_")

        async def handle(request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
            try:
                return await call(request)
            except Exception as exc:  # every failure becomes a gRPC status
                code = status_of(exc)
                if isinstance(exc, VolumeError):
                    log.warning("%s refused (%s): %s", name, exc.refusal.value, exc)
                elif isinstance(exc, DatapinError):
                    log.error("%s failed (%s): %s", name, code.name, exc)
                else:
                    log.exception("%s failed with a bug", name)
                await context.abort(code, details_of(exc))

        return handle

    # -- Identity ---------------------------------------------------------------------------

    async def _plugin_info(self, request: pb.GetPluginInfoRequest) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER, vendor_version=__version__)

    async def _plugin_capabilities(
        self, request: pb.GetPluginCapabilitiesRequest
    ) -> pb.GetPluginCapabilitiesResponse:
        # No CONTROLLER_SERVICE: inline volumes need no controller (CSIDriver attachRequired
        # false), and no topology: every node can serve every dataset.
        return pb.GetPluginCapabilitiesResponse()

    async def _probe(self, request: pb.ProbeRequest) -> pb.ProbeResponse:
        return pb.ProbeResponse(ready=BoolValue(value=self._backend.ready()))

    # -- Node -------------------------------------------------------------------------------

    async def _node_capabilities(
        self, request: pb.NodeGetCapabilitiesRequest
    ) -> pb.NodeGetCapabilitiesResponse:
        # None: no STAGE_UNSTAGE_VOLUME (kubelet never stages an ephemeral volume, and a
        # plugin that advertises it must get a staging path on every publish), no volume stats.
        return pb.NodeGetCapabilitiesResponse()

    async def _node_info(self, request: pb.NodeGetInfoRequest) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self._node_id)

    async def _publish(self, request: pb.NodePublishVolumeRequest) -> pb.NodePublishVolumeResponse:
        """Every publish is observed, a request refused before the backend ran included."""
        started = time.monotonic()
        try:
            result = await self._publish_checked(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = PublishResult.REFUSED if isinstance(exc, VolumeError) else PublishResult.FAILED
            self._observe(failed, time.monotonic() - started, exc)
            raise
        self._observe(result, time.monotonic() - started, None)
        return pb.NodePublishVolumeResponse()

    async def _publish_checked(self, request: pb.NodePublishVolumeRequest) -> PublishResult:
        volume = self.parse_publish(request)
        started = time.monotonic()
        log.info(
            "publishing volume %s for pod %s/%s: dataset %s pin %s%s%s",
            volume.volume_id,
            volume.pod.namespace,
            volume.pod.name,
            volume.dataset,
            volume.pin,
            "" if volume.part.whole else f" path {volume.part.label}",
            " (writable)" if volume.writable else "",
        )
        result = await self._backend.publish(volume)
        log.info(
            "published volume %s in %.3fs (%s)",
            volume.volume_id,
            time.monotonic() - started,
            result.value,
        )
        return result

    def parse_publish(self, request: pb.NodePublishVolumeRequest) -> VolumeRequest:
        """The checked `VolumeRequest`, or the `BadVolumeError` the spec calls for."""
        _required(request.volume_id, "volume_id")
        _required(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise BadVolumeError(
                f"volume {request.volume_id[:80]!r}: the request has no volume_capability. "
                "Fix: this is kubelet's; use an inline csi volume"
            )
        access = request.volume_capability.WhichOneof("access_type")
        if access != "mount":
            raise BadVolumeError(
                f"volume {request.volume_id[:80]!r}: access type {access or 'none'!r}, but "
                f"driver {DRIVER} serves only filesystem (mount) volumes. Fix: use an inline "
                "csi volume mounted with volumeMounts, not volumeDevices"
            )
        return parse_publish(
            volume_id=request.volume_id,
            target_path=request.target_path,
            readonly=request.readonly,
            context=request.volume_context,
            secrets=request.secrets,
            kubelet_dir=self._kubelet_dir,
        )

    async def _unpublish(
        self, request: pb.NodeUnpublishVolumeRequest
    ) -> pb.NodeUnpublishVolumeResponse:
        _required(request.volume_id, "volume_id")
        _required(request.target_path, "target_path")
        volume_id = check_volume_id(request.volume_id)
        target = check_target(request.target_path, kubelet_dir=self._kubelet_dir)
        log.info("unpublishing volume %s from %s", volume_id, target)
        await self._backend.unpublish(volume_id=volume_id, target_path=target)
        log.info("unpublished volume %s", volume_id)
        return pb.NodeUnpublishVolumeResponse()


def _required(value: str, field: str) -> None:
    if not value:
        raise BadVolumeError(
            f"the request has no {field} (the CSI spec requires it). Fix: this is kubelet's; "
            "use an inline csi volume"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginServer:
    """The running node plugin: its sockets, and what kubelet said about registering it."""

    csi_socket: Path
    #: None when the plugin does not register itself (no registration directory).
    registration_socket: Path | None
    _registrar: Registrar

    @property
    def registration(self) -> KubeletRegistration | None:
        """kubelet's last verdict on the registration, or None while it has not called."""
        return self._registrar.status


@contextlib.asynccontextmanager
async def serve_node_plugin(
    backend: NodeBackend,
    *,
    csi_socket: Path,
    registration_dir: Path | None,
    endpoint_on_host: str,
    node_id: str,
    kubelet_dir: Path,
    observe: PublishObserver | None = None,
) -> AsyncIterator[PluginServer]:
    """Serve CSI on `csi_socket` and, with a `registration_dir`, register with kubelet.

    `endpoint_on_host` is `csi_socket` as kubelet sees it on the host. The CSI socket is up
    before the registration socket appears (kubelet calls NodeGetInfo as it registers), and
    the registration socket goes first on exit, so kubelet drops the plugin before its
    endpoint disappears.
    """
    service = NodeService(backend, node_id=node_id, kubelet_dir=kubelet_dir, observe=observe)
    registrar = Registrar(endpoint_on_host=endpoint_on_host)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            sockets.serve_unix(csi_socket, service.handlers(), what="CSI")
        )
        reg_socket = None
        if registration_dir is not None:
            reg_socket = registration_socket(registration_dir)
            await stack.enter_async_context(
                sockets.serve_unix(reg_socket, [registrar.handler()], what="kubelet registration")
            )
        yield PluginServer(
            csi_socket=csi_socket, registration_socket=reg_socket, _registrar=registrar
        )
