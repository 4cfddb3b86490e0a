"""The csi mode's builder: each dataset becomes a `csi` inline volume the node plugin serves.

Pure, like `inject.py` (whose `inject` calls this for `datapin.dev/mode: csi`, the default).
What is added, and nothing else:

* `metadata`: the pins annotations and the injected label, exactly as in the other modes
  (`mounts.pin_and_label`).
* Per dataset, a volume `datapin-data-<n>` (n: the dataset's index)::

      csi:
        driver: datapin.dev
        readOnly: true                   # false for a writable request
        volumeAttributes: {dataset, pin, layout, ref, writable[, path]}
        nodePublishSecretRef: {name: <the Dataset's credentials Secret>}

  kubelet reads the Secret from the pod's namespace and hands it to the node plugin in the
  `NodePublishVolume` request, so the keys never enter the pod. The attribute names and the
  driver name are `datapin_sidecar.csi.volume`'s (`DRIVER`, `Attr`): that module is the other
  side of this contract. `path` is written only for part of a revision (the pin's
  `Part.label`, a comma list of folders): absent means the whole revision, so pods of
  Jobs without `datapin.dev/path` carry exactly the attributes they did before parts.
  Volume names carry an index, not the dataset's name: a Dataset name
  may hold dots, which a volume name may not.
* In every app container and user init container (not ephemeral containers: they are added
  after admission), per dataset, a mount of that volume at the dataset's mount path with
  `mountPropagation: HostToContainer`, `readOnly` unless writable. HostToContainer is what
  lets a live switch reach the pod: the plugin binds the new tree under the volume on the node
  and renames `current`, and the container sees the new mount without a remount. Users read
  `<mount path>/current/...`, as in the sidecar modes.

No hostPath, no container, no Secret, downward-API or emptyDir volume, no env: an injected pod
uses only a `csi` volume, which the `restricted` Pod Security level allows, and changes no
security context, so a pod that passes `restricted` still does.

**The read-only rule in csi mode.** A writable request (`datapin.dev/writable: "true"`) gets
an overlay on the node: the shared read-only tree is its lower layer, and upper and work dirs
live in that volume's own directory, so a write copies the file up (a reflink on XFS) and
never reaches the shared tree or the cache. Unlike the sidecar modes, where a writable mount
is the pod's own tree and its files may be hardlinks into the cache, safety does not depend on
the operator's link mode, so writable is accepted whatever `link` says.

**Idempotency.** A template that already has a `csi` volume of our driver is returned
unchanged by `inject` (see `has_csi_volumes`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Final

from datapin_sidecar.csi.volume import DRIVER, Attr
from datapin_sidecar.engine.hashing import LayoutChoice

from datapin_operator.webhook.mounts import (
    DatasetMount,
    check_mount_path,
    check_volume_names,
    pin_and_label,
)
from datapin_operator.webhook.requests import Request

VOLUME_PREFIX: Final = "datapin-data-"
#: The propagation that lets the plugin's later mounts (a switch) reach the container.
PROPAGATION: Final = "HostToContainer"


def has_csi_volumes(pod_template: Mapping[str, Any]) -> bool:
    """Whether the template already has a `csi` volume of datapin's driver."""
    spec = pod_template.get("spec") or {}
    return any(
        (volume.get("csi") or {}).get("driver") == DRIVER for volume in spec.get("volumes") or []
    )


def volume_name(index: int) -> str:
    """The name of the `index`-th dataset's volume."""
    return f"{VOLUME_PREFIX}{index}"


def inject_csi(
    pod_template: Mapping[str, Any], *, request: Request, mounts: Sequence[DatasetMount]
) -> dict[str, Any]:
    """A copy of `pod_template` with one `csi` volume per dataset mounted in every container.

    Raises `MountCollisionError` for a volume name or mount path already taken.
    """
    result: dict[str, Any] = copy.deepcopy(dict(pod_template))
    pin_and_label(result.setdefault("metadata", {}), mounts)
    spec = result.setdefault("spec", {})
    volumes = [
        _volume(index, mount, writable=request.writable) for index, mount in enumerate(mounts)
    ]
    check_volume_names(spec, [v["name"] for v in volumes])
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes]
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        volume_mounts = container.setdefault("volumeMounts", [])
        for index, mount in enumerate(mounts):
            check_mount_path(container, mount)
            volume_mounts.append(
                {
                    "name": volume_name(index),
                    "mountPath": mount.request.mount_path,
                    "readOnly": not request.writable,
                    "mountPropagation": PROPAGATION,
                }
            )
    return result


def _volume(index: int, mount: DatasetMount, *, writable: bool) -> dict[str, Any]:
    attributes = {
        Attr.DATASET.value: mount.request.dataset,
        Attr.PIN.value: mount.pin.pin,
        Attr.LAYOUT.value: LayoutChoice(mount.layout).value,
        Attr.REF.value: mount.pin.ref,
        Attr.WRITABLE.value: "true" if writable else "false",
    }
    if not mount.pin.part.whole:
        attributes[Attr.PATH.value] = mount.pin.part.label
    return {
        "name": volume_name(index),
        "csi": {
            "driver": DRIVER,
            "readOnly": not writable,
            "volumeAttributes": attributes,
            "nodePublishSecretRef": {"name": mount.spec.remote.credentials_secret_ref.name},
        },
    }
