"""The csi mode of the injection builder (`datapin_operator.webhook.inject_csi`), the default.

What users depend on, on the same realistic pod templates as tests/test_operator_inject.py:

* the injected Job and Pod pass the Kubernetes 1.29 and newest schemas, strictly;
* each dataset is one `csi` volume of driver datapin.dev whose attributes the node plugin's
  own parser (`datapin_sidecar.csi.volume.parse_publish`) reads back as the pinned dataset,
  pin, layout and writability, with the Dataset's Secret named for kubelet to pass;
* every app and user init container mounts it at the dataset's path, read-only unless
  writable, with HostToContainer propagation; nothing else is added (no hostPath, no
  container, no env, no Secret, downward-API or emptyDir volume) and no security context
  changes;
* writable is accepted whatever the link mode (the node plugin gives it an overlay);
* the same annotations and labels as the other modes; idempotency; collisions refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from datapin_operator.errors import MountCollisionError, SettingsError
from datapin_operator.settings import Settings, load_settings
from datapin_operator.webhook.inject import inject, is_injected
from datapin_operator.webhook.requests import parse_request
from datapin_sidecar.csi.volume import DRIVER, Attr, PodInfo, parse_publish
from datapin_sidecar.pins import format_pins

from tests.test_operator_inject import (
    DATASETS,
    PIN_A,
    POD_UID,
    SECRET_DATA,
    TEMPLATES,
    VERSIONS,
    Case,
    _annotate,
    _check_references,
    _job,
    _one_container,
    _own_volumes_and_env,
    _pod,
    _resolve,
    _settings,
    _two_containers_and_init,
)

KUBELET = Path("/var/lib/kubelet")


def _csi_case(
    template: str, datasets: str, *, writable: bool = False, settings: Settings | None = None
) -> Case:
    annotated = _annotate(TEMPLATES[template](), DATASETS[datasets], "csi")
    if writable:
        annotated["metadata"]["annotations"]["datapin.dev/writable"] = "true"
    return Case(annotated, DATASETS[datasets], settings or _settings())


@pytest.fixture(
    params=[(t, d, w) for t in TEMPLATES for d in DATASETS for w in (False, True)],
    ids=lambda p: f"{p[0]}-{p[1]}-{'writable' if p[2] else 'read-only'}",
)
def case(request: pytest.FixtureRequest) -> Case:
    template, datasets, writable = request.param
    return _csi_case(template, datasets, writable=writable)


def _ours(case: Case) -> list[dict[str, Any]]:
    return [v for v in case.spec["volumes"] if "csi" in v]


def _user_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def test_injected_job_and_pod_pass_the_kubernetes_schemas(case: Case) -> None:
    for version in VERSIONS:
        for obj in (_job(case.out), _pod(case.out)):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} for Kubernetes {version}: {exc.message}")
    _check_references(case.spec)


def test_the_schema_check_can_fail(case: Case) -> None:
    broken = copy.deepcopy(case.out)
    _ours_broken = [v for v in broken["spec"]["volumes"] if "csi" in v]
    _ours_broken[0]["csi"]["nodePublishSecretRefs"] = {"name": "x"}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_job(broken), VERSIONS[0], strict=True)


def test_input_is_untouched_and_injection_is_idempotent(case: Case) -> None:
    assert case.given == case.original
    assert not is_injected(case.original)
    assert is_injected(case.out)
    again = inject(case.out, request=case.request, mounts=case.mounts, settings=case.settings)
    assert again == case.out
    assert again is not case.out


def test_one_csi_volume_per_dataset_that_the_node_plugin_reads_back(case: Case) -> None:
    volumes = _ours(case)
    assert [v["name"] for v in volumes] == [f"datapin-data-{i}" for i in range(len(case.mounts))]
    writable = case.request.writable
    for volume, mount in zip(volumes, case.mounts, strict=True):
        csi = volume["csi"]
        assert csi["driver"] == DRIVER == "datapin.dev"
        assert csi["readOnly"] is (not writable)
        assert csi["nodePublishSecretRef"] == {"name": "b2-keys"}  # the Dataset's Secret
        # `path` only for part of a revision (these cases ask for whole ones).
        assert set(csi["volumeAttributes"]) == {a.value for a in Attr} - {Attr.PATH.value}
        # What kubelet sends for this volume: the pod's attributes, pod info merged over them.
        context = {
            **csi["volumeAttributes"],
            PodInfo.NAME.value: "train-x7k2p",
            PodInfo.NAMESPACE.value: "ml",
            PodInfo.UID.value: POD_UID,
            PodInfo.EPHEMERAL.value: "true",
        }
        parsed = parse_publish(
            volume_id="csi-" + "ab" * 32,
            target_path=f"{KUBELET}/pods/{POD_UID}/volumes/kubernetes.io~csi/{volume['name']}/mount",
            readonly=csi["readOnly"],
            context=context,
            secrets={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
            kubelet_dir=KUBELET,
        )
        assert parsed.dataset == mount.request.dataset
        assert str(parsed.revision) == mount.pin.pin
        assert parsed.layout == mount.layout
        assert parsed.ref == "v2"
        assert parsed.writable is writable
        assert parsed.readonly is (not writable)
    layouts = {
        v["csi"]["volumeAttributes"]["dataset"]: v["csi"]["volumeAttributes"] for v in volumes
    }
    assert layouts["imagenet"]["layout"] == "dvc3"
    assert layouts["imagenet"]["pin"] == PIN_A


def test_folders_asked_for_become_the_path_attribute_the_node_plugin_reads_back() -> None:
    """`datapin.dev/path.<dataset>`: that dataset's volume says which folders, in the one
    spelling the plugin keys its trees by; the other dataset's volume stays whole."""
    annotated = _annotate(TEMPLATES["one-container"](), DATASETS["two-mixed"], "csi")
    annotated["metadata"]["annotations"]["datapin.dev/path.coco"] = "val2017/, annotations"
    case = Case(annotated, DATASETS["two-mixed"], _settings())
    volumes = {v["csi"]["volumeAttributes"]["dataset"]: v for v in _ours(case)}
    assert "path" not in volumes["imagenet"]["csi"]["volumeAttributes"]
    attributes = volumes["coco"]["csi"]["volumeAttributes"]
    assert attributes["path"] == "annotations,val2017"
    pins = json.loads(case.out["metadata"]["annotations"]["datapin.dev/pins"])
    assert pins["coco"]["paths"] == ["annotations", "val2017"]
    assert "paths" not in pins["imagenet"]
    parsed = parse_publish(
        volume_id="csi-" + "ab" * 32,
        target_path=f"{KUBELET}/pods/{POD_UID}/volumes/kubernetes.io~csi/"
        f"{volumes['coco']['name']}/mount",
        readonly=True,
        context={
            **attributes,
            PodInfo.NAME.value: "train-x7k2p",
            PodInfo.NAMESPACE.value: "ml",
            PodInfo.UID.value: POD_UID,
            PodInfo.EPHEMERAL.value: "true",
        },
        secrets={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        kubelet_dir=KUBELET,
    )
    assert parsed.part.paths == ("annotations", "val2017")
    for version in VERSIONS:
        kubernetes_validate.validate(_job(case.out), version, strict=True)


def test_every_user_container_mounts_each_dataset(case: Case) -> None:
    names = [v["name"] for v in _ours(case)]
    original = case.original["spec"]
    for before, after in zip(_user_containers(original), _user_containers(case.spec), strict=True):
        kept = before.get("volumeMounts", [])
        assert after["volumeMounts"][: len(kept)] == kept
        assert after["volumeMounts"][len(kept) :] == [
            {
                "name": name,
                "mountPath": f"/data/{dataset}",
                "readOnly": not case.request.writable,
                "mountPropagation": "HostToContainer",
            }
            for name, dataset in zip(names, case.datasets, strict=True)
        ]


def test_nothing_else_is_added(case: Case) -> None:
    original = case.original["spec"]
    assert case.spec["volumes"][: len(original.get("volumes", []))] == original.get("volumes", [])
    assert len(case.spec["volumes"]) == len(original.get("volumes", [])) + len(case.datasets)
    assert not [v for v in _ours(case) if set(v) != {"name", "csi"}]
    # No container of ours, no env, no security context change: the pod is the user's.
    stripped = copy.deepcopy(case.out["spec"])
    stripped["volumes"] = stripped["volumes"][: len(original.get("volumes", []))] or None
    if stripped["volumes"] is None:
        del stripped["volumes"]
    for container in _user_containers(stripped):
        container["volumeMounts"] = container["volumeMounts"][: -len(case.datasets)]
        if not container["volumeMounts"]:
            del container["volumeMounts"]
    assert stripped == original
    text = json.dumps(case.out)
    for value in SECRET_DATA.values():
        assert value not in text
    assert "hostPath" not in text


def test_metadata_is_the_same_as_in_sidecar_mode(case: Case) -> None:
    pins = format_pins([m.pin for m in case.mounts])
    assert set(pins) == {"datapin.dev/pins", "datapin.dev/commits"}
    assert case.out["metadata"]["annotations"] == {
        **case.original["metadata"]["annotations"],
        **pins,
    }
    assert case.out["metadata"]["labels"] == {
        **case.original["metadata"].get("labels", {}),
        "datapin.dev/sidecar": "true",
    }
    template = copy.deepcopy(case.original)
    template["metadata"]["annotations"]["datapin.dev/mode"] = "sidecar"
    template["metadata"]["annotations"].pop("datapin.dev/writable", None)  # link auto refuses it
    sidecar = Case(template, case.datasets, case.settings)
    for key in pins:
        assert sidecar.out["metadata"]["annotations"][key] == pins[key]
    assert sidecar.out["metadata"]["labels"] == case.out["metadata"]["labels"]


@pytest.mark.parametrize("link", ["auto", "hardlink", "reflink", "copy"])
def test_writable_is_accepted_whatever_the_link_mode(link: str) -> None:
    case = _csi_case(
        "two-containers-and-init", "one-with-keys", writable=True, settings=_settings(link=link)
    )
    [volume] = _ours(case)
    assert volume["csi"]["readOnly"] is False
    assert volume["csi"]["volumeAttributes"]["writable"] == "true"
    for container in _user_containers(case.spec):
        assert [
            m["readOnly"] for m in container["volumeMounts"] if m["name"] == volume["name"]
        ] == [False]


def test_ephemeral_containers_are_left_alone() -> None:
    template = _annotate(_one_container(), {"imagenet": True}, "csi")
    debug = {"name": "debug", "image": "busybox:1.36", "targetContainerName": "train"}
    template["spec"]["ephemeralContainers"] = [debug]
    request = parse_request(template["metadata"]["annotations"], mount_root="/data")
    assert request is not None
    out = inject(
        template,
        request=request,
        mounts=_resolve(request, {"imagenet": True}),
        settings=_settings(),
    )
    assert out["spec"]["ephemeralContainers"] == [debug]


# --- the default --------------------------------------------------------------------------------


def test_a_pod_without_a_mode_gets_csi() -> None:
    template = _one_container()
    template["metadata"]["annotations"] = {
        "datapin.dev/dataset": "imagenet",
        "datapin.dev/revision": "v2",
    }
    settings = _settings()
    assert settings.default_mode == "csi"
    request = parse_request(
        template["metadata"]["annotations"],
        mount_root=settings.mount_root,
        default_mode=settings.default_mode,
    )
    assert request is not None
    assert request.mode == "csi"
    out = inject(
        template, request=request, mounts=_resolve(request, {"imagenet": True}), settings=settings
    )
    assert "initContainers" not in out["spec"]
    assert [v["csi"]["driver"] for v in out["spec"]["volumes"]] == [DRIVER]


def test_the_default_mode_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATAPIN_DEFAULT_MODE", raising=False)
    assert load_settings().default_mode == "csi"
    monkeypatch.setenv("DATAPIN_DEFAULT_MODE", "sidecar")
    assert load_settings().default_mode == "sidecar"
    monkeypatch.setenv("DATAPIN_DEFAULT_MODE", "hostpath")
    with pytest.raises(SettingsError, match=r"DATAPIN_DEFAULT_MODE.*'csi', 'sidecar' or 'init'"):
        load_settings()


# --- collisions ---------------------------------------------------------------------------------


def _inject(template: dict[str, Any]) -> dict[str, Any]:
    _annotate(template, {"imagenet": True}, "csi")
    request = parse_request(template["metadata"]["annotations"], mount_root="/data")
    assert request is not None
    return inject(
        template,
        request=request,
        mounts=_resolve(request, {"imagenet": True}),
        settings=_settings(),
    )


def test_a_taken_volume_name_collides() -> None:
    template = _own_volumes_and_env()
    template["spec"]["volumes"].append({"name": "datapin-data-0", "emptyDir": {}})
    with pytest.raises(
        MountCollisionError, match=r"volume 'datapin-data-0'.*Fix: rename the volume"
    ):
        _inject(template)


@pytest.mark.parametrize("path", ["/data/imagenet", "/data", "/data/imagenet/cache", "/"])
@pytest.mark.parametrize("where", ["containers", "initContainers"])
def test_a_container_mounting_at_above_or_below_the_path_collides(path: str, where: str) -> None:
    template = _two_containers_and_init()
    template["spec"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
    container = template["spec"][where][0]
    container["volumeMounts"] = [{"name": "cache", "mountPath": path}]
    with pytest.raises(MountCollisionError) as info:
        _inject(template)
    message = str(info.value)
    assert f"container {container['name']!r}" in message
    assert "datapin.dev/mount-path.imagenet" in message
    assert "Fix: " in message


def test_names_only_the_sidecar_modes_reserve_are_free() -> None:
    # No container and no env of ours in csi mode: a container named datapin, a volume named
    # datapin-node and any DATAPIN_POD_UID are the user's business.
    template = _one_container()
    template["spec"]["containers"][0]["name"] = "datapin"
    template["spec"]["containers"][0]["env"] = [{"name": "DATAPIN_POD_UID", "value": "mine"}]
    template["spec"]["volumes"] = [{"name": "datapin-node", "emptyDir": {}}]
    out = _inject(template)
    assert out["spec"]["containers"][0]["env"] == [{"name": "DATAPIN_POD_UID", "value": "mine"}]
