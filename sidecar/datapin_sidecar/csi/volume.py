"""What one `NodePublishVolume` asks for, parsed and checked: `VolumeRequest`.

The contract between the webhook (which writes a pod's `csi` inline volume) and the node
plugin (which serves it) is written once, here: the attribute names (`Attr`), the driver name
and the pod-info keys kubelet adds. The operator imports these names; nothing spells them
twice.

**Who wrote what.** kubelet merges the pod-info keys (`csi.storage.k8s.io/pod.*`, with
`podInfoOnMount: true`) over the pod's own `volumeAttributes`, so a pod cannot forge its
namespace or UID: those are trusted. Every other attribute was written by whoever wrote the
pod spec (usually our webhook, but a pod written by hand can say anything) and is only ever
input: the dataset's remote comes from the Dataset in the pod's namespace, the keys from the
Secret kubelet passes, and the pin is proven against both before anything is served
(`csi.access`). The volume id and target path come from kubelet and are checked anyway,
because they become paths on the node: the id is a plain name, and the target lies under
kubelet's pods directory, in the pod's own directory.

**A part of a revision** (`path`, issue 18): the folders of the pin's `.dir` the pod gets,
a comma list as `engine.part.Part.parse` reads it (`images/train,images/val`), normalised to
one spelling so one part has one tree key. Only its syntax is checked here (relative, no `..`,
no empty or `.` segments, the length caps: nothing a pod writes can name a path outside the
tree). Whether the revision holds those folders is known only from its `.dir`, which is read
after the pod's keys proved the pin (`csi.access`): a pod learns nothing about a revision's
folders that its own remote does not show it.

Parsing is total: a bad request is a `BadVolumeError` naming the attribute and the fix, which
kubelet shows in the pod's Events.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Final

from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import BadVolumeError, RevisionError, UsageError
from datapin_sidecar.pins import is_dataset_name

#: The CSI driver's name: the `CSIDriver` object, the pods' `csi.driver`, the registration.
DRIVER: Final = "datapin.dev"


class Attr(StrEnum):
    """The `volumeAttributes` the webhook writes (untrusted input, see the module doc)."""

    DATASET = "dataset"  # the Dataset's name, in the pod's namespace
    PIN = "pin"  # `<md5>.dir` or `<md5>`: the revision, resolved by the operator
    LAYOUT = "layout"  # a `LayoutChoice`; default auto
    REF = "ref"  # what the pin was resolved from (display only)
    WRITABLE = "writable"  # "true": an overlay the pod can write; default "false"
    PATH = "path"  # folders of the revision, a comma list (`engine.part`); absent: all of it


class PodInfo(StrEnum):
    """The keys kubelet adds to the volume context (`podInfoOnMount: true`; trusted)."""

    NAME = "csi.storage.k8s.io/pod.name"
    NAMESPACE = "csi.storage.k8s.io/pod.namespace"
    UID = "csi.storage.k8s.io/pod.uid"
    SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
    EPHEMERAL = "csi.storage.k8s.io/ephemeral"


class PublishResult(StrEnum):
    """What a `NodePublishVolume` came to: the `result` label of
    `datapin_csi_publish_seconds` (a public contract)."""

    WARM = "warm"  # the shared tree was already built (or the volume already published)
    BUILT = "built"  # the tree was built (and objects maybe fetched) for this call
    REFUSED = "refused"  # a `VolumeError`: a bad request, access not proven
    FAILED = "failed"  # anything else (a remote down, no space, a bug)


_VOLUME_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_POD_UID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BOOLS: Final = {"true": True, "false": False}
#: Longest `path` attribute read (64 folders of 4 KiB and their commas are far below it):
#: anything longer is refused before it is split.
_PATH_LIMIT: Final = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    """The pod a volume is for, as kubelet says (trusted)."""

    namespace: str
    name: str
    uid: str
    service_account: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeRequest:
    """One checked `NodePublishVolume`."""

    volume_id: str
    target_path: Path
    #: kubelet's `readonly` (the pod's `csi.readOnly`).
    readonly: bool
    dataset: str
    revision: Revision
    layout: LayoutChoice
    ref: str
    writable: bool
    pod: Pod
    #: The folders of the revision to serve (`Attr.PATH`); `Part.WHOLE`: all of it.
    part: Part = Part.WHOLE
    #: The Secret kubelet read for the pod (`nodePublishSecretRef`); never logged or shown.
    secrets: Mapping[str, str] = field(repr=False, compare=False)

    @property
    def pin(self) -> str:
        return self.revision.oid


def parse_publish(
    *,
    volume_id: str,
    target_path: str,
    readonly: bool,
    context: Mapping[str, str],
    secrets: Mapping[str, str],
    kubelet_dir: Path,
) -> VolumeRequest:
    """Check a `NodePublishVolume`'s fields; `BadVolumeError` names the first problem."""
    check_volume_id(volume_id)
    pod = _pod(context)
    dataset = context.get(Attr.DATASET, "").strip()
    if not is_dataset_name(dataset):
        raise BadVolumeError(
            f"volume attribute {Attr.DATASET.value!r} is {dataset!r}, not a Dataset name. "
            "Fix: let the datapin webhook write the pod's csi volume (annotate the pod with "
            "datapin.dev/dataset), or set it to the name of a Dataset in the pod's namespace"
        )
    try:
        revision = Revision.parse(context.get(Attr.PIN, ""))
    except RevisionError as exc:
        raise BadVolumeError(
            f"dataset {dataset!r}: volume attribute {Attr.PIN.value!r}: {exc}"
        ) from None
    try:
        layout = LayoutChoice(context.get(Attr.LAYOUT, LayoutChoice.AUTO.value))
    except ValueError:
        raise BadVolumeError(
            f"dataset {dataset!r} pin {revision.oid}: volume attribute {Attr.LAYOUT.value!r} is "
            f"{context.get(Attr.LAYOUT)!r}. Fix: one of "
            f"{', '.join(c.value for c in LayoutChoice)}"
        ) from None
    writable = _bool(context, Attr.WRITABLE, f"dataset {dataset!r} pin {revision.oid}")
    if writable and readonly:
        raise BadVolumeError(
            f"dataset {dataset!r} pin {revision.oid}: the volume is `readOnly` but asks for "
            f'{Attr.WRITABLE.value}: "true". Fix: drop one of them'
        )
    part = parse_part(context.get(Attr.PATH, ""), volume=f"dataset {dataset!r} pin {revision.oid}")
    if not part.whole and not revision.is_dir:
        raise BadVolumeError(
            f"dataset {dataset!r} pin {revision.oid}: volume attribute {Attr.PATH.value!r} "
            f"names folders ({part.label}), but the pin is a single file. Fix: drop the "
            "path, or pin a directory revision (<md5>.dir)"
        )
    target = check_target(target_path, kubelet_dir=kubelet_dir, pod_uid=pod.uid)
    return VolumeRequest(
        volume_id=volume_id,
        target_path=target,
        readonly=readonly,
        dataset=dataset,
        revision=revision,
        layout=layout,
        ref=context.get(Attr.REF, "").strip()[:256],
        writable=writable,
        pod=pod,
        part=part,
        secrets=dict(secrets),
    )


def parse_part(value: str, *, volume: str) -> Part:
    """The `path` attribute as a `Part` (see the module doc); `volume` names it in errors."""
    what = f"volume attribute {Attr.PATH.value!r}"
    if len(value) > _PATH_LIMIT:
        raise BadVolumeError(
            f"{volume}: {what} is {len(value)} characters long (at most {_PATH_LIMIT}). Fix: "
            "name fewer folders, or their common parent folder"
        )
    try:
        return Part.parse([value], what=what)
    except UsageError as exc:
        # Part's message names the attribute, the value and the fix (`what`).
        raise BadVolumeError(f"{volume}: {exc}") from None


def check_volume_id(volume_id: str) -> str:
    """A volume id is a plain name (it names the pod's workspace on the node)."""
    if not _VOLUME_ID.fullmatch(volume_id):
        raise BadVolumeError(
            f"volume id {volume_id[:80]!r} is not a plain name (letters, digits, '.', '_', "
            "'-'; at most 128). Fix: this is kubelet's; use an inline csi volume"
        )
    return volume_id


def check_target(target_path: str, *, kubelet_dir: Path, pod_uid: str | None = None) -> Path:
    """A target must be `<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount`.

    `pod_uid` (publish) also pins the uid; unpublish knows only the path.
    """
    path = PurePosixPath(target_path)
    parts = path.relative_to(kubelet_dir).parts if path.is_relative_to(kubelet_dir) else ()
    ok = (
        path.is_absolute()
        and ".." not in path.parts
        and len(parts) == 6
        and parts[0] == "pods"
        and _POD_UID.fullmatch(parts[1]) is not None
        and (pod_uid is None or parts[1] == pod_uid)
        and parts[2:4] == ("volumes", "kubernetes.io~csi")
        and parts[5] == "mount"
    )
    if not ok:
        raise BadVolumeError(
            f"target path {target_path[:200]!r} is not a csi volume's mount directory of "
            f"this pod under {kubelet_dir}/pods. Fix: the plugin's kubelet directory "
            "(DATAPIN_KUBELET_DIR) must be kubelet's --root-dir"
        )
    return Path(path)


def _pod(context: Mapping[str, str]) -> Pod:
    missing = [
        k.value for k in (PodInfo.NAMESPACE, PodInfo.NAME, PodInfo.UID) if not context.get(k)
    ]
    if missing:
        raise BadVolumeError(
            f"the volume context lacks {', '.join(missing)}. Fix: the CSIDriver "
            f"{DRIVER!r} must set podInfoOnMount: true (the chart does)"
        )
    if context.get(PodInfo.EPHEMERAL, "true") != "true":
        raise BadVolumeError(
            f"driver {DRIVER!r} serves inline (ephemeral) volumes only. Fix: use a `csi` "
            "volume in the pod spec, not a PersistentVolume"
        )
    uid = context[PodInfo.UID]
    if not _POD_UID.fullmatch(uid):
        raise BadVolumeError(f"pod uid {uid[:60]!r} is not a UID")
    return Pod(
        namespace=context[PodInfo.NAMESPACE],
        name=context[PodInfo.NAME],
        uid=uid,
        service_account=context.get(PodInfo.SERVICE_ACCOUNT, ""),
    )


def _bool(context: Mapping[str, str], attr: Attr, volume: str) -> bool:
    value = context.get(attr, "false").strip().lower()
    if value not in _BOOLS:
        raise BadVolumeError(
            f'{volume}: volume attribute {attr.value!r} is {value[:20]!r}. Fix: "true" or "false"'
        )
    return _BOOLS[value]
