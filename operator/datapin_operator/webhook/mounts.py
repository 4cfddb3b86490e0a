"""What every injection mode shares: the resolved dataset, the pins and label, the collisions.

Both builders (`inject.py` for the sidecar and init modes, `inject_csi.py` for the csi mode)
take the same `DatasetMount`s, write the same metadata and refuse the same collisions, so a
pod's annotations and labels, and the mistakes a user can make in it, do not depend on the
mode. Everything here is pure, like the builders.

* Metadata: `datapin.dev/pins` (and `datapin.dev/commits`), see `requests.py`, and the label
  `datapin.dev/sidecar: "true"` on every injected pod, whatever the mode (PodMonitors select
  it; in csi mode a pod exports nothing and is simply not scraped).
* Collisions are rejected (`MountCollisionError`, naming the container and the fix), never
  resolved by renaming: a volume name of ours already taken, or a container already mounting
  something at, above or below a dataset's path (one mount would hide the other).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.pins import PinRecord, format_pins

from datapin_operator.api import models
from datapin_operator.errors import MountCollisionError
from datapin_operator.webhook.requests import MountRequest, paths_overlap

SIDECAR_LABEL: Final = "datapin.dev/sidecar"


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetMount:
    """One resolved dataset, ready to inject."""

    request: MountRequest
    spec: models.DatasetSpec
    pin: PinRecord

    @property
    def layout(self) -> LayoutChoice:
        """The cache layout to read: the pin's, else the Dataset's (both may be auto)."""
        return self.pin.layout if self.pin.layout != LayoutChoice.AUTO else self.spec.remote.layout


def pin_and_label(metadata: dict[str, Any], mounts: Sequence[DatasetMount]) -> None:
    """Add the pins annotations and the injected label to `metadata`, in place."""
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        **format_pins([m.pin for m in mounts]),
    }
    metadata["labels"] = {**(metadata.get("labels") or {}), SIDECAR_LABEL: "true"}


def check_volume_names(spec: dict[str, Any], names: Iterable[str]) -> None:
    """Refuse volume names of ours that the pod already uses."""
    taken = {v.get("name") for v in spec.get("volumes") or []}
    for name in names:
        if name in taken:
            raise MountCollisionError(
                f"pod volume {name!r} already exists; datapin needs that name. "
                f"Fix: rename the volume (datapin reserves names starting with 'datapin-')"
            )


def check_mount_path(container: dict[str, Any], mount: DatasetMount) -> None:
    """Refuse a dataset whose path is, contains or is inside one of the container's mounts."""
    path = mount.request.mount_path
    for other in container.get("volumeMounts") or []:
        other_path = other.get("mountPath") or ""
        if other_path and paths_overlap(path, other_path):
            raise MountCollisionError(
                f"container {container.get('name', '?')!r} already mounts volume "
                f"{other.get('name')!r} at {other_path}, which is, contains or is inside "
                f"dataset {mount.request.dataset!r}'s mount path {path}. Fix: set "
                f"datapin.dev/mount-path.{mount.request.dataset} to a free directory, or "
                "move that volume"
            )
