"""The injection builder: a pod template and resolved pins in, the injected template out.

`inject` serves every mode: csi (the default) is built by `inject_csi.py`, and what follows
describes the sidecar and init modes, built here; what the modes share (the resolved
`DatasetMount`, pins and label, collision checks) is in `mounts.py`.

Pure (no I/O, no clock, no API calls), so the webhook's whole effect can be tested by
validating its output against the Kubernetes schemas, and so a Job and a bare Pod get exactly
the same pod spec. `inject` returns a new dict and never modifies its input; the webhook turns
the difference into a JSONPatch.

What is added:

* `metadata.annotations`: `datapin.dev/pins` (and `datapin.dev/commits`), see `requests.py`;
  `metadata.labels`: `datapin.dev/sidecar: "true"`, which PodMonitors select on.
* Volumes: `datapin-node` (the node volume, hostPath `Directory`: it must have been prepared,
  never created empty by kubelet), `datapin-podinfo` (downward API of `metadata.annotations`:
  the sidecar learns its pins from it, live, without API access), `datapin-tmp` (a small
  memory emptyDir, because the sidecar's root filesystem is read-only) and one Secret volume
  per dataset, `datapin-cred-<n>` (n: the dataset's index). One volume per dataset, not one
  projected volume, because a projected Secret without `items` cannot be placed in a
  subdirectory and we must not need to know a Secret's keys when the Dataset does not name
  them. When the Dataset names both keys, only those two are projected. Only Secret *names*
  and key names appear in the pod: the builder never sees a Secret's data.
  The files are mode 0444, not 0440: without a pod `fsGroup` (which we do not set, since it
  would chown the user's volumes) kubelet makes them root:root, and our non-root sidecar
  could not read a 0440 file. Only the sidecar mounts these volumes.
* The `datapin` container, FIRST in `initContainers`, so the user's own init containers
  already see the data. Mode `sidecar`: a native sidecar (`restartPolicy: Always`) running
  `run`, whose startupProbe on `/readyz` holds back every later container until all datasets
  are published, and which follows pin changes; it is stopped after the app exits, so Jobs
  complete. Mode `init`: a plain init container running `once`. Both mount the whole node
  volume at `sidecar_root` (cache and workspaces must share one mount for reflinks and
  hardlinks to work) and run as a non-root user with a read-only root filesystem, no
  privilege escalation, no capabilities and the runtime's seccomp profile, so pods under
  `runAsNonRoot` or the restricted profile's container rules still start (the hostPath
  volume itself is outside the restricted Pod Security profile; that is the admin's choice).
* Every app container and user init container (not ephemeral containers: they are added
  after admission): `DATAPIN_POD_UID` from the downward API, and per dataset a mount of
  `datapin-node` at the request's mount path with `subPathExpr:
  workspaces/$(DATAPIN_POD_UID)/<dataset>`: the pod's own workspace, whose `current` symlink
  the sidecar publishes. The webhook sees a Pod before it has a UID; `subPathExpr` is
  expanded by kubelet, which knows it. Users read `<mount path>/current/...`.

**The read-only rule.** A dataset's mount is `readOnly` unless the request says
`datapin.dev/writable: "true"` AND the operator's `link` is `reflink` or `copy`. Files made
by hardlinks share their inode with the node cache, so one write through them corrupts the
cache for every pod on the node; reflinked and copied files never share an inode with it (a
write to a reflink copies the extent), so writes stay in the pod's workspace. `link: auto`
may fall back to hardlinks, so it is not enough. Writable with `auto`/`hardlink` is rejected,
not silently made read-only: the user's program would fail later, far from the cause. A
writable dataset's sidecar settings say `writable: true`, so the sidecar never reuses a tree
the pod could have edited (each switch builds afresh).

**Idempotency.** A template that already has the `datapin` init container, or a `csi` volume
of datapin's driver, is returned unchanged (a copy): the webhook may see a Pod of an admitted
Job, and reinvocation may call it twice.

**Collisions** are rejected (`MountCollisionError`, naming the container and the fix), never
resolved by renaming: a volume of ours whose name is taken, a container named `datapin`, a
container already mounting something at, above or below a dataset's path, or a
`DATAPIN_POD_UID` the user set to anything but `metadata.uid`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from datapin_sidecar.node.settings import DatasetSettings
from pydantic import ValidationError

from datapin_operator.errors import MountCollisionError, RejectedError
from datapin_operator.settings import STARTUP_PERIOD_SECONDS, Settings
from datapin_operator.webhook.inject_csi import has_csi_volumes, inject_csi
from datapin_operator.webhook.mounts import (
    SIDECAR_LABEL,
    DatasetMount,
    check_mount_path,
    check_volume_names,
    pin_and_label,
)
from datapin_operator.webhook.requests import Request

__all__ = ["SIDECAR_LABEL", "DatasetMount", "inject", "is_injected"]

CONTAINER_NAME: Final = "datapin"
NODE_VOLUME: Final = "datapin-node"
PODINFO_VOLUME: Final = "datapin-podinfo"
TMP_VOLUME: Final = "datapin-tmp"
CREDENTIALS_VOLUME_PREFIX: Final = "datapin-cred-"
PODINFO_DIR: Final = "/etc/datapin/podinfo"
ANNOTATIONS_FILE: Final = f"{PODINFO_DIR}/annotations"
CREDENTIALS_DIR: Final = "/etc/datapin/credentials"
HTTP_PORT_NAME: Final = "datapin-http"
POD_UID_ENV: Final = "DATAPIN_POD_UID"
#: Links whose files never share an inode with the cache: the only ones writable mounts allow.
WRITABLE_LINKS: Final = frozenset({"reflink", "copy"})
_SECRET_MODE: Final = 0o444
_TMP_SIZE: Final = "64Mi"
_LIVENESS_PERIOD_SECONDS: Final = 10
_LIVENESS_FAILURES: Final = 6


def is_injected(pod_template: Mapping[str, Any]) -> bool:
    """Whether the template already has datapin's init container or csi volumes."""
    spec = pod_template.get("spec") or {}
    return has_csi_volumes(pod_template) or any(
        c.get("name") == CONTAINER_NAME for c in spec.get("initContainers") or []
    )


def inject(
    pod_template: Mapping[str, Any],
    *,
    request: Request,
    mounts: Sequence[DatasetMount],
    settings: Settings,
) -> dict[str, Any]:
    """A copy of `pod_template` (`{"metadata": ..., "spec": ...}`) with datapin injected.

    `mounts` must be `request`'s datasets, resolved. Raises `RejectedError` for a writable
    request the link mode cannot honour (sidecar and init modes) and `MountCollisionError`
    for a name or path taken.
    """
    result: dict[str, Any] = copy.deepcopy(dict(pod_template))
    if is_injected(result):
        return result
    if [m.request.dataset for m in mounts] != list(request.datasets):
        raise ValueError(
            f"mounts {[m.request.dataset for m in mounts]} do not match the request's "
            f"datasets {list(request.datasets)}"
        )
    if request.mode == "csi":
        return inject_csi(result, request=request, mounts=mounts)
    read_only = _read_only(request, settings)
    pin_and_label(result.setdefault("metadata", {}), mounts)
    spec = result.setdefault("spec", {})

    volumes = _volumes(mounts, settings)
    check_volume_names(spec, [v["name"] for v in volumes])
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if container.get("name") == CONTAINER_NAME:
            raise MountCollisionError(
                f"container name {CONTAINER_NAME!r} is taken by one of the pod's containers; "
                "datapin's own container has that name. Fix: rename your container"
            )
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes]

    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        _add_to_app_container(container, mounts, read_only=read_only)
    spec["initContainers"] = [
        _sidecar(request, mounts, settings),
        *(spec.get("initContainers") or []),
    ]
    return result


def _read_only(request: Request, settings: Settings) -> bool:
    if not request.writable:
        return True
    if settings.link not in WRITABLE_LINKS:
        raise RejectedError(
            f'annotation datapin.dev/writable: "true" needs files that never share an inode '
            f"with the node cache, but the operator's link mode is {settings.link!r} (hardlinks "
            "would let one write corrupt the cache for every pod on the node). Fix: ask the "
            "admin for link=reflink (or copy; the operator's DATAPIN_LINK), or drop "
            "datapin.dev/writable and copy the files you change"
        )
    return False


def _credentials_dir(dataset: str) -> str:
    return f"{CREDENTIALS_DIR}/{dataset}"


def _volumes(mounts: Sequence[DatasetMount], settings: Settings) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": NODE_VOLUME, "hostPath": {"path": settings.node_path, "type": "Directory"}},
        {
            "name": PODINFO_VOLUME,
            "downwardAPI": {
                "items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
                ]
            },
        },
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": _TMP_SIZE}},
    ]
    for index, mount in enumerate(mounts):
        ref = mount.spec.remote.credentials_secret_ref
        secret: dict[str, Any] = {
            "secretName": ref.name,
            "defaultMode": _SECRET_MODE,
            "optional": False,
        }
        if ref.access_key_id_key is not None and ref.secret_access_key_key is not None:
            secret["items"] = [
                {"key": key, "path": key}
                for key in (ref.access_key_id_key, ref.secret_access_key_key)
            ]
        volumes.append({"name": f"{CREDENTIALS_VOLUME_PREFIX}{index}", "secret": secret})
    return volumes


def _dataset_settings(mount: DatasetMount, *, writable: bool = False) -> dict[str, Any]:
    """The sidecar's settings of one dataset, validated by the sidecar's own model.

    `writable` (the app mounts it read-write) tells the sidecar never to trust the pod's trees.
    """
    remote = mount.spec.remote
    ref = remote.credentials_secret_ref
    name = mount.request.dataset
    try:
        settings = DatasetSettings(
            name=name,
            remote=remote.url,
            endpoint_url=remote.endpoint,
            region=remote.region,
            addressing=remote.addressing,
            layout=mount.layout,
            credentials_dir=Path(_credentials_dir(name)),
            access_key_id_file=ref.access_key_id_key,
            secret_access_key_file=ref.secret_access_key_key,
            writable=writable,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise RejectedError(
            f"Dataset {name!r}: the sidecar would refuse its settings ({problems}). Fix: "
            f"correct spec.remote of Dataset {name!r}"
        ) from None
    dumped = settings.model_dump(mode="json", exclude_none=True)
    if not writable:
        del dumped["writable"]  # the default: keep read-only pods' settings as they were
    return dumped


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _sidecar(
    request: Request, mounts: Sequence[DatasetMount], settings: Settings
) -> dict[str, Any]:
    writable = not _read_only(request, settings)
    datasets = [_dataset_settings(m, writable=writable) for m in mounts]
    env: list[dict[str, Any]] = [
        {"name": "DATAPIN_ROOT", "value": settings.sidecar_root},
        _field_env(POD_UID_ENV, "metadata.uid"),
        _field_env("DATAPIN_POD_NAME", "metadata.name"),
        _field_env("DATAPIN_POD_NAMESPACE", "metadata.namespace"),
        _field_env("DATAPIN_NODE_NAME", "spec.nodeName"),
        {"name": "DATAPIN_ANNOTATIONS_FILE", "value": ANNOTATIONS_FILE},
        {"name": "DATAPIN_LINK", "value": settings.link},
        {"name": "DATAPIN_DATASETS", "value": json.dumps(datasets, separators=(",", ":"))},
    ]
    if request.mode == "sidecar":
        # `once` serves no HTTP, so the port would only mislead.
        env.append({"name": "DATAPIN_HTTP_PORT", "value": str(settings.sidecar_port)})
    volume_mounts: list[dict[str, Any]] = [
        {"name": NODE_VOLUME, "mountPath": settings.sidecar_root},
        {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True},
        *(
            {
                "name": f"{CREDENTIALS_VOLUME_PREFIX}{index}",
                "mountPath": _credentials_dir(m.request.dataset),
                "readOnly": True,
            }
            for index, m in enumerate(mounts)
        ),
        {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
    ]
    limits = {"memory": settings.sidecar_memory_limit}
    if settings.sidecar_cpu_limit is not None:
        limits["cpu"] = settings.sidecar_cpu_limit
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.sidecar_image_pull_policy,
        "args": ["run"] if request.mode == "sidecar" else ["once"],
        "env": env,
        "volumeMounts": volume_mounts,
        "resources": {
            "requests": {
                "cpu": settings.sidecar_cpu_request,
                "memory": settings.sidecar_memory_request,
            },
            "limits": limits,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.sidecar_user,
            "runAsGroup": settings.sidecar_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if request.mode == "sidecar":
        # Probes are only allowed on restartable init containers; `once` serves no HTTP.
        container["restartPolicy"] = "Always"
        container["ports"] = [
            {"name": HTTP_PORT_NAME, "containerPort": settings.sidecar_port, "protocol": "TCP"}
        ]
        container["startupProbe"] = {
            "httpGet": {"path": "/readyz", "port": settings.sidecar_port},
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "failureThreshold": settings.startup_failure_threshold,
        }
        container["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": settings.sidecar_port},
            "periodSeconds": _LIVENESS_PERIOD_SECONDS,
            "failureThreshold": _LIVENESS_FAILURES,
        }
    return container


def _is_pod_uid(env: Mapping[str, Any]) -> bool:
    """Whether an env entry is `metadata.uid` by fieldRef (the API server may have added
    `apiVersion: v1` to it, so only the field path is compared)."""
    field_ref = (env.get("valueFrom") or {}).get("fieldRef") or {}
    return env.get("value") is None and field_ref.get("fieldPath") == "metadata.uid"


def _add_to_app_container(
    container: dict[str, Any], mounts: Sequence[DatasetMount], *, read_only: bool
) -> None:
    name = container.get("name", "?")
    env = container.setdefault("env", [])
    existing = next((e for e in env if e.get("name") == POD_UID_ENV), None)
    if existing is None:
        env.append(_field_env(POD_UID_ENV, "metadata.uid"))
    elif not _is_pod_uid(existing):
        raise MountCollisionError(
            f"container {name!r} sets env {POD_UID_ENV} to something other than the pod's "
            "metadata.uid; datapin's mounts need it to find the pod's workspace. Fix: remove "
            f"{POD_UID_ENV} from the container (datapin sets it)"
        )
    volume_mounts = container.setdefault("volumeMounts", [])
    for mount in mounts:
        check_mount_path(container, mount)
        volume_mounts.append(
            {
                "name": NODE_VOLUME,
                "mountPath": mount.request.mount_path,
                "subPathExpr": f"workspaces/$({POD_UID_ENV})/{mount.request.dataset}",
                "readOnly": read_only,
            }
        )
