"""kubelet's plugin registration, served by the agent itself (no node-driver-registrar).

kubelet watches `<kubelet>/plugins_registry/` with inotify; for a new socket there it calls
`pluginregistration.Registration/GetInfo`, learns the plugin's type, driver name, CSI endpoint
and versions, checks them (and calls the CSI socket's `NodeGetInfo`), and then tells the
plugin the outcome with `NotifyRegistrationStatus`. The socket is named `<driver>-reg.sock`
(kubelet skips names starting with `.`).

The endpoint is the CSI socket's path *as kubelet sees it on the host*, which is a parameter
rather than derived from our own socket path: the agent's container may mount the host's
plugin directory elsewhere. kubelet's verdict is kept (`Registrar.status`) for the agent's
/status, and a refusal is logged as an error, because until kubelet accepts the plugin every
pod using the driver stays in ContainerCreating.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from datapin_sidecar.csi import sockets
from datapin_sidecar.csi.proto import registration_pb2 as pb
from datapin_sidecar.csi.volume import DRIVER

log = logging.getLogger(__name__)

#: The proto service kubelet calls.
SERVICE: Final = "pluginregistration.Registration"
#: `PluginInfo.type` of a CSI driver (kubelet's `CSIPlugin` plugin type).
PLUGIN_TYPE: Final = "CSIPlugin"
#: The CSI versions the plugin speaks (kubelet accepts 1.x).
SUPPORTED_VERSIONS: Final = ("1.0.0",)


def registration_socket(registration_dir: Path, driver: str = DRIVER) -> Path:
    """Where kubelet looks for our registration socket."""
    return registration_dir / f"{driver}-reg.sock"


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeletRegistration:
    """What kubelet last said about registering the plugin."""

    registered: bool
    #: kubelet's reason when it refused (empty when registered).
    error: str


class Registrar:
    """The `Registration` service: our plugin info, and kubelet's verdict on it."""

    def __init__(self, *, endpoint_on_host: str, driver: str = DRIVER) -> None:
        self._info = pb.PluginInfo(
            type=PLUGIN_TYPE,
            name=driver,
            endpoint=endpoint_on_host,
            supported_versions=SUPPORTED_VERSIONS,
        )
        self._status: KubeletRegistration | None = None

    @property
    def status(self) -> KubeletRegistration | None:
        """kubelet's last verdict, or None while it has not called (yet)."""
        return self._status

    def handler(self) -> grpc.GenericRpcHandler:
        return sockets.service(
            SERVICE,
            {
                "GetInfo": sockets.unary(self._get_info, pb.InfoRequest, pb.PluginInfo),
                "NotifyRegistrationStatus": sockets.unary(
                    self._notify, pb.RegistrationStatus, pb.RegistrationStatusResponse
                ),
            },
        )

    async def _get_info(
        self,
        request: pb.InfoRequest,
        context: grpc.aio.ServicerContext[pb.InfoRequest, pb.PluginInfo],
    ) -> pb.PluginInfo:
        log.info(
            "kubelet asked for the plugin info: driver %s, endpoint %s",
            self._info.name,
            self._info.endpoint,
        )
        return self._info

    async def _notify(
        self,
        request: pb.RegistrationStatus,
        context: grpc.aio.ServicerContext[pb.RegistrationStatus, pb.RegistrationStatusResponse],
    ) -> pb.RegistrationStatusResponse:
        self._status = KubeletRegistration(
            registered=request.plugin_registered, error=request.error
        )
        if request.plugin_registered:
            log.info("kubelet registered CSI driver %s", self._info.name)
        else:
            log.error(
                "kubelet refused to register CSI driver %s: %s. Pods using the driver stay in "
                "ContainerCreating until it does. Fix: see kubelet's log on this node",
                self._info.name,
                request.error[:500] or "(no reason given)",
            )
        return pb.RegistrationStatusResponse()
