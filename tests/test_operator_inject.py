"""The injection builder (`datapin_operator.webhook.inject`): pod templates in, injected
templates out.

What users depend on, checked on realistic Job pod templates in both modes and with one or two
datasets (with and without Secret key names):

* the injected object, as a `batch/v1` Job and as a `v1` Pod, passes the Kubernetes 1.29 and
  latest schemas in strict mode, plus the cross-references the API server checks and the
  schemas cannot (volume names, unique mount paths, probes only on restartable init
  containers);
* the sidecar accepts what it is given: its `Settings` built from the container's env, its
  datasets, and the pins through the same downward-API file kubelet writes, down to the very
  targets it would serve; the app containers' `subPathExpr` is the workspace the sidecar
  publishes into;
* no Secret value can appear: credentials arrive only as Secret volumes referenced by name;
* the read-only rule, idempotency, and every collision is refused with a fix.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from datapin_operator.api import models
from datapin_operator.errors import MountCollisionError, RejectedError
from datapin_operator.settings import STARTUP_PERIOD_SECONDS, Settings
from datapin_operator.webhook.inject import (
    ANNOTATIONS_FILE,
    DatasetMount,
    inject,
    is_injected,
)
from datapin_operator.webhook.requests import Request, parse_request
from datapin_sidecar.node import settings as sidecar_settings
from datapin_sidecar.node.sidecar import targets
from datapin_sidecar.pins import PinRecord, format_downward_annotations, parse_pins

PIN_A = "0123456789abcdef0123456789abcdef.dir"
PIN_B = "fedcba9876543210fedcba9876543210.dir"
POD_UID = "6f1e0c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"
VERSIONS = ("1.29", kubernetes_validate.latest_version())

#: The Secret the Datasets name. It is given to nothing: the builder never sees Secret data, and
#: these values must never appear in what it builds.
SECRET_DATA = {
    "keyID": "0027c1b5e0000000000000001",
    "applicationKey": "K002Xq7SuperSecretApplicationKeyValue",
    "AWS_ACCESS_KEY_ID": "AKIADATAPINTESTKEYID",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/datapinTESTsecretKEY",
}
SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "b2-keys", "namespace": "ml"},
    "stringData": SECRET_DATA,
}


def _settings(**overrides: Any) -> Settings:
    # Every value the tests rely on is passed, so DATAPIN_* in the environment cannot leak in.
    values: dict[str, Any] = {
        "sidecar_image": "example.org/datapin:test",
        "sidecar_image_pull_policy": "IfNotPresent",
        "node_path": "/var/lib/datapin",
        "sidecar_root": "/datapin",
        "link": "auto",
        "sidecar_cpu_request": "100m",
        "sidecar_memory_request": "128Mi",
        "sidecar_cpu_limit": None,
        "sidecar_memory_limit": "1Gi",
        "sidecar_user": 65532,
        "sidecar_port": 9479,
        "startup_timeout_seconds": 3600,
        "mount_root": "/data",
    }
    return Settings(**{**values, **overrides})


def _dataset_spec(*, keys: bool) -> models.DatasetSpec:
    ref: dict[str, str] = {"name": "b2-keys"}
    if keys:
        ref |= {"accessKeyIdKey": "keyID", "secretAccessKeyKey": "applicationKey"}
    return models.DatasetSpec.model_validate(
        {
            "remote": {
                "url": "s3://datapin-test/dvcstore",
                "endpoint": "https://s3.us-west-002.backblazeb2.com",
                "credentialsSecretRef": ref,
            }
        }
    )


# --- pod templates, as users write them ------------------------------------------------------


def _one_container() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "train"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "train",
                    "image": "python:3.11",
                    "command": ["python", "train.py", "--data", "/data/imagenet/current"],
                }
            ],
        },
    }


def _two_containers_and_init() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "train"}, "annotations": {"team": "vision"}},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [
                {"name": "check-data", "image": "busybox:1.36", "command": ["ls", "/data"]}
            ],
            "containers": [
                {"name": "train", "image": "python:3.11", "args": ["train.py"]},
                {
                    "name": "tensorboard",
                    "image": "tensorflow/tensorflow:2.15.0",
                    "ports": [{"name": "tb", "containerPort": 6006}],
                },
            ],
        },
    }


def _own_volumes_and_env() -> dict[str, Any]:
    return {
        "metadata": {},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "config", "configMap": {"name": "train-config"}},
            ],
            "containers": [
                {
                    "name": "train",
                    "image": "python:3.11",
                    "env": [
                        {"name": "EPOCHS", "value": "10"},
                        {
                            "name": "WANDB_API_KEY",
                            "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}},
                        },
                    ],
                    "volumeMounts": [
                        {"name": "scratch", "mountPath": "/scratch"},
                        {"name": "config", "mountPath": "/etc/train", "readOnly": True},
                    ],
                }
            ],
        },
    }


def _with_security_context() -> dict[str, Any]:
    return {
        "metadata": {},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "train",
                    "image": "python:3.11",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


TEMPLATES = {
    "one-container": _one_container,
    "two-containers-and-init": _two_containers_and_init,
    "own-volumes-and-env": _own_volumes_and_env,
    "security-context": _with_security_context,
}

#: dataset name -> whether its Dataset names the Secret's keys
DATASETS = {
    "one-with-keys": {"imagenet": True},
    "one-without-keys": {"imagenet": False},
    "two-mixed": {"imagenet": True, "coco": False},
}


def _annotate(template: dict[str, Any], datasets: dict[str, bool], mode: str) -> dict[str, Any]:
    template["metadata"].setdefault("annotations", {}).update(
        {
            "datapin.dev/dataset": ", ".join(datasets),
            "datapin.dev/revision": "v2",
            "datapin.dev/mode": mode,
        }
    )
    return template


def _resolve(request: Request, datasets: dict[str, bool]) -> list[DatasetMount]:
    """What the webhook would look up: each Dataset's spec and its resolved pin."""
    pins = {"imagenet": (PIN_A, "dvc3", "ab" * 20), "coco": (PIN_B, "auto", None)}
    return [
        DatasetMount(
            request=m,
            spec=_dataset_spec(keys=datasets[m.dataset]),
            pin=PinRecord(
                dataset=m.dataset,
                pin=pins[m.dataset][0],
                ref=m.revision,
                layout=pins[m.dataset][1],  # type: ignore[arg-type]
                commit=pins[m.dataset][2],
                part=m.part,  # a plain revision: the annotation's folders
            ),
        )
        for m in request.mounts
    ]


class Case:
    """One annotated pod template, resolved and injected."""

    def __init__(
        self, template: dict[str, Any], datasets: dict[str, bool], settings: Settings
    ) -> None:
        self.datasets = datasets
        self.original = template
        request = parse_request(
            self.original["metadata"]["annotations"], mount_root=settings.mount_root
        )
        assert request is not None
        self.request = request
        self.mounts = _resolve(request, self.datasets)
        self.settings = settings
        self.given = copy.deepcopy(self.original)
        self.out = inject(self.given, request=request, mounts=self.mounts, settings=settings)

    @property
    def spec(self) -> dict[str, Any]:
        return self.out["spec"]  # type: ignore[no-any-return]

    @property
    def sidecar(self) -> dict[str, Any]:
        return self.spec["initContainers"][0]  # type: ignore[no-any-return]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture(
    params=[(t, m, d) for t in TEMPLATES for m in ("sidecar", "init") for d in DATASETS],
    ids="-".join,
)
def case(request: pytest.FixtureRequest) -> Case:
    template, mode, datasets = request.param
    return _case(template, mode, datasets)


def _case(template: str, mode: str, datasets: str, settings: Settings | None = None) -> Case:
    annotated = _annotate(TEMPLATES[template](), DATASETS[datasets], mode)
    return Case(annotated, DATASETS[datasets], settings or _settings())


# --- the API server would accept it ----------------------------------------------------------


def _job(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train", "namespace": "ml"},
        "spec": {"backoffLimit": 0, "template": template},
    }


def _pod(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": "train-x7k2p", "namespace": "ml"},
        "spec": template["spec"],
    }


def _check_references(spec: dict[str, Any]) -> None:
    """What the API server validates beyond the schema, for the fields the builder touches."""
    volumes = [v["name"] for v in spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), volumes
    assert all(len(v) <= 63 for v in volumes)
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    names = [c["name"] for c in containers]
    assert len(names) == len(set(names)), names
    for container in containers:
        paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert len(paths) == len(set(paths)), (container["name"], paths)
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount)
            assert not ("subPath" in mount and "subPathExpr" in mount)
        env = [e["name"] for e in container.get("env", [])]
        assert len(env) == len(set(env)), (container["name"], env)
        probes = {"startupProbe", "livenessProbe", "readinessProbe"} & set(container)
        if container in spec.get("initContainers", []) and probes:
            assert container.get("restartPolicy") == "Always", container["name"]
        for port in container.get("ports", []):
            assert len(port.get("name", "")) <= 15


def test_injected_job_and_pod_pass_the_kubernetes_schemas(case: Case) -> None:
    for version in VERSIONS:
        for obj in (_job(case.out), _pod(case.out)):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} for Kubernetes {version}: {exc.message}")
    _check_references(case.spec)


def test_the_schema_check_can_fail(case: Case) -> None:
    # Guards the test above: a misspelt field in the injected container is caught.
    broken = copy.deepcopy(case.out)
    broken["spec"]["initContainers"][0]["restartpolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_job(broken), VERSIONS[0], strict=True)


def test_input_is_untouched_and_injection_is_idempotent(case: Case) -> None:
    assert case.given == case.original
    assert not is_injected(case.original)
    assert is_injected(case.out)
    again = inject(case.out, request=case.request, mounts=case.mounts, settings=case.settings)
    assert again == case.out
    assert again is not case.out


def test_user_content_is_kept(case: Case) -> None:
    original = case.original["spec"]
    assert case.out["metadata"]["annotations"].items() >= (
        case.original["metadata"]["annotations"].items()
    )
    assert case.out["metadata"]["labels"]["datapin.dev/sidecar"] == "true"
    assert case.spec["volumes"][: len(original.get("volumes", []))] == original.get("volumes", [])
    user_init = [c["name"] for c in original.get("initContainers", [])]
    assert [c["name"] for c in case.spec["initContainers"]] == ["datapin", *user_init]
    assert [c["name"] for c in case.spec["containers"]] == [
        c["name"] for c in original["containers"]
    ]
    assert case.spec.get("securityContext") == original.get("securityContext")
    for before, after in zip(original["containers"], case.spec["containers"], strict=True):
        assert after["env"][: len(before.get("env", []))] == before.get("env", [])
        assert after["volumeMounts"][: len(before.get("volumeMounts", []))] == before.get(
            "volumeMounts", []
        )


# --- the sidecar accepts what it is given -----------------------------------------------------


def test_sidecar_container_by_mode(case: Case) -> None:
    sidecar = case.sidecar
    assert sidecar["name"] == "datapin"
    assert sidecar["image"] == "example.org/datapin:test"
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == 65532
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    if case.request.mode == "sidecar":
        assert sidecar["args"] == ["run"]
        assert sidecar["restartPolicy"] == "Always"
        probe = sidecar["startupProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": 9479}
        assert probe["periodSeconds"] == STARTUP_PERIOD_SECONDS
        # kubelet gives the sidecar at least startup_timeout_seconds to publish.
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9479}
        assert sidecar["ports"] == [
            {"name": "datapin-http", "containerPort": 9479, "protocol": "TCP"}
        ]
    else:
        assert sidecar["args"] == ["once"]
        assert "restartPolicy" not in sidecar
        assert not {"startupProbe", "livenessProbe", "ports"} & set(sidecar)


def _sidecar_settings(case: Case, monkeypatch: pytest.MonkeyPatch) -> sidecar_settings.Settings:
    """The sidecar's settings, read from the container's env exactly as the program does."""
    for name in [n for n in os.environ if n.startswith("DATAPIN_")]:
        monkeypatch.delenv(name)
    fake = {
        "DATAPIN_POD_UID": POD_UID,
        "DATAPIN_POD_NAME": "train-x7k2p",
        "DATAPIN_POD_NAMESPACE": "ml",
        "DATAPIN_NODE_NAME": "gpu-node-1",
    }
    for env in case.sidecar["env"]:
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        else:
            assert env["name"] in fake, env
            monkeypatch.setenv(env["name"], fake[env["name"]])
    return sidecar_settings.load_settings()


def test_sidecar_settings_from_its_env_validate(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _sidecar_settings(case, monkeypatch)
    assert settings.root == Path("/datapin")
    assert settings.pod_uid == POD_UID
    assert settings.annotations_file == Path(ANNOTATIONS_FILE)
    assert settings.link == "auto"
    assert [d.name for d in settings.datasets] == list(case.datasets)
    if case.request.mode == "sidecar":
        assert settings.http_port == 9479
    mounts = {m["mountPath"]: m for m in case.sidecar["volumeMounts"]}
    # The annotations file is inside the downward-API volume of metadata.annotations.
    podinfo = mounts[str(Path(ANNOTATIONS_FILE).parent)]
    volumes = {v["name"]: v for v in case.spec["volumes"]}
    assert volumes[podinfo["name"]]["downwardAPI"]["items"] == [
        {"path": Path(ANNOTATIONS_FILE).name, "fieldRef": {"fieldPath": "metadata.annotations"}}
    ]
    # The whole node volume at the root: cache and workspaces on one mount.
    assert volumes[mounts["/datapin"]["name"]]["hostPath"] == {
        "path": "/var/lib/datapin",
        "type": "Directory",
    }
    assert "subPath" not in mounts["/datapin"]
    assert "subPathExpr" not in mounts["/datapin"]
    # A writable /tmp, since the root filesystem is read-only.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_datasets_parse_and_find_their_credentials(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = json.loads(case.env(case.sidecar)["DATAPIN_DATASETS"])
    datasets = [sidecar_settings.DatasetSettings.model_validate(d) for d in raw]
    mounts = {m["mountPath"]: m["name"] for m in case.sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in case.spec["volumes"]}
    for dataset in datasets:
        with_keys = case.datasets[dataset.name]
        assert dataset.remote == "s3://datapin-test/dvcstore"
        assert dataset.endpoint_url == "https://s3.us-west-002.backblazeb2.com"
        assert dataset.credentials_dir is not None
        secret = volumes[mounts[str(dataset.credentials_dir)]]["secret"]
        assert secret["secretName"] == "b2-keys"
        assert secret["optional"] is False
        if with_keys:
            assert (dataset.access_key_id_file, dataset.secret_access_key_file) == (
                "keyID",
                "applicationKey",
            )
            # The files the sidecar opens are exactly the projected paths.
            assert {i["path"] for i in secret["items"]} == {"keyID", "applicationKey"}
            assert {i["key"] for i in secret["items"]} == {"keyID", "applicationKey"}
        else:
            assert dataset.access_key_id_file is None
            assert dataset.secret_access_key_file is None
            assert "items" not in secret  # the whole Secret: the sidecar tries the known names
    layouts = {d.name: d.layout for d in datasets}
    assert layouts.get("imagenet") == "dvc3"


def test_the_sidecar_would_serve_exactly_the_pins(
    case: Case, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    annotations = case.out["metadata"]["annotations"]
    pins = parse_pins(annotations, source="test")
    assert {n: str(p.revision) for n, p in pins.items()} == {
        m.pin.dataset: m.pin.pin for m in case.mounts
    }
    # Through the file kubelet writes from the downward-API volume, into the sidecar's targets.
    file = tmp_path / "annotations"
    file.write_text(format_downward_annotations(annotations))
    settings = _sidecar_settings(case, monkeypatch).model_copy(update={"annotations_file": file})
    served = targets(settings)
    assert {n: str(t.revision) for n, t in served.items()} == {
        m.pin.dataset: m.pin.pin for m in case.mounts
    }
    assert {n: t.ref for n, t in served.items()} == dict.fromkeys(case.datasets, "v2")


def test_app_containers_mount_the_pods_workspace(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _sidecar_settings(case, monkeypatch)
    user_containers = [*case.spec["initContainers"][1:], *case.spec["containers"]]
    for container in user_containers:
        uid = [e for e in container["env"] if e["name"] == "DATAPIN_POD_UID"]
        assert uid == [
            {"name": "DATAPIN_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
        ]
        ours = [m for m in container["volumeMounts"] if m["name"] == "datapin-node"]
        assert [m["mountPath"] for m in ours] == [f"/data/{d}" for d in case.datasets]
        for mount, dataset in zip(ours, case.datasets, strict=True):
            assert mount["readOnly"] is True
            # kubelet expands the subPathExpr inside the node volume, which the sidecar has at
            # its root: the result must be the directory the sidecar publishes `current` in.
            sub = mount["subPathExpr"].replace("$(DATAPIN_POD_UID)", POD_UID)
            assert settings.root / sub == settings.workspaces_dir / POD_UID / dataset


def test_no_secret_value_anywhere(case: Case) -> None:
    text = json.dumps(case.out)
    for value in SECRET_DATA.values():
        assert value not in text

    def walk(node: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    # Only the user's own secretKeyRef (own-volumes-and-env) may exist; ours are volumes only.
    refs = [v for k, v in walk(case.sidecar) if k in {"secretKeyRef", "envFrom"}]
    assert refs == []
    secrets = [v["secret"] for v in case.spec["volumes"] if "secret" in v]
    assert len(secrets) == len(case.datasets)
    assert {s["secretName"] for s in secrets} == {"b2-keys"}
    assert all(s["defaultMode"] & 0o222 == 0 for s in secrets)  # read-only files
    assert not [v for v in case.spec["volumes"] if "projected" in v]
    # A secret volume is mounted by the sidecar only.
    secret_volumes = {v["name"] for v in case.spec["volumes"] if "secret" in v}
    for container in [*case.spec["initContainers"][1:], *case.spec["containers"]]:
        assert not {m["name"] for m in container.get("volumeMounts", [])} & secret_volumes


def test_ephemeral_containers_are_left_alone() -> None:
    template = _annotate(_one_container(), {"imagenet": True}, "sidecar")
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


def test_resources_come_from_settings() -> None:
    settings = _settings(sidecar_cpu_limit="2", sidecar_memory_limit="512Mi")
    case = _case("one-container", "sidecar", "one-with-keys", settings)
    assert case.sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "2", "memory": "512Mi"},
    }
    default = _case("one-container", "sidecar", "one-with-keys")
    assert default.sidecar["resources"]["limits"] == {"memory": "1Gi"}


# --- the read-only rule ------------------------------------------------------------------------


def _writable(link: str) -> Case:
    template = _annotate(_two_containers_and_init(), {"imagenet": True}, "sidecar")
    template["metadata"]["annotations"]["datapin.dev/writable"] = "true"
    return Case(template, {"imagenet": True}, _settings(link=link))


@pytest.mark.parametrize("link", ["reflink", "copy"])
def test_writable_mounts_with_links_that_never_share_the_cache(link: str) -> None:
    case = _writable(link)
    for container in [*case.spec["initContainers"][1:], *case.spec["containers"]]:
        ours = [m for m in container["volumeMounts"] if m["name"] == "datapin-node"]
        assert [m["readOnly"] for m in ours] == [False]
    assert case.env(case.sidecar)["DATAPIN_LINK"] == link
    # The sidecar is told, so it never trusts a tree the pod could have edited.
    raw = json.loads(case.env(case.sidecar)["DATAPIN_DATASETS"])
    datasets = [sidecar_settings.DatasetSettings.model_validate(d) for d in raw]
    assert [d.writable for d in datasets] == [True]


def test_read_only_datasets_are_not_marked_writable(case: Case) -> None:
    raw = json.loads(case.env(case.sidecar)["DATAPIN_DATASETS"])
    assert all("writable" not in d for d in raw)
    assert not any(sidecar_settings.DatasetSettings.model_validate(d).writable for d in raw)


@pytest.mark.parametrize("link", ["auto", "hardlink"])
def test_writable_is_refused_when_files_may_share_the_cache(link: str) -> None:
    with pytest.raises(RejectedError) as info:
        _writable(link)
    message = str(info.value)
    assert "datapin.dev/writable" in message
    assert "Fix: ask the admin for link=reflink" in message


@pytest.mark.parametrize("link", ["reflink", "copy", "hardlink"])
def test_read_only_unless_asked(link: str) -> None:
    case = _case("one-container", "sidecar", "two-mixed", _settings(link=link))
    mounts = [m for m in case.spec["containers"][0]["volumeMounts"] if m["name"] == "datapin-node"]
    assert [m["readOnly"] for m in mounts] == [True, True]


# --- collisions --------------------------------------------------------------------------------


def _inject(template: dict[str, Any]) -> dict[str, Any]:
    _annotate(template, {"imagenet": True}, "sidecar")
    request = parse_request(template["metadata"]["annotations"], mount_root="/data")
    assert request is not None
    mounts = _resolve(request, {"imagenet": True})
    return inject(template, request=request, mounts=mounts, settings=_settings())


@pytest.mark.parametrize(
    "name", ["datapin-node", "datapin-podinfo", "datapin-tmp", "datapin-cred-0"]
)
def test_a_taken_volume_name_collides(name: str) -> None:
    template = _own_volumes_and_env()
    template["spec"]["volumes"].append({"name": name, "emptyDir": {}})
    with pytest.raises(MountCollisionError, match=rf"volume '{name}'.*Fix: rename the volume"):
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


def test_a_sibling_mount_does_not_collide() -> None:
    template = _own_volumes_and_env()
    template["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "scratch", "mountPath": "/data/imagenet2"}
    )
    out = _inject(template)
    paths = [m["mountPath"] for m in out["spec"]["containers"][0]["volumeMounts"]]
    assert paths == ["/scratch", "/etc/train", "/data/imagenet2", "/data/imagenet"]


@pytest.mark.parametrize(
    "env",
    [
        {"name": "DATAPIN_POD_UID", "value": "fixed"},
        {"name": "DATAPIN_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
)
def test_a_different_pod_uid_env_collides(env: dict[str, Any]) -> None:
    template = _one_container()
    template["spec"]["containers"][0]["env"] = [env]
    with pytest.raises(MountCollisionError, match=r"container 'train'.*DATAPIN_POD_UID.*Fix: "):
        _inject(template)


def test_the_same_pod_uid_env_is_kept_once() -> None:
    # As the API server defaults it (fieldRef.apiVersion), e.g. from another tool's injection.
    env = {
        "name": "DATAPIN_POD_UID",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}},
    }
    template = _one_container()
    template["spec"]["containers"][0]["env"] = [env]
    out = _inject(template)
    assert out["spec"]["containers"][0]["env"] == [env]


def test_a_user_container_named_datapin_collides() -> None:
    template = _one_container()
    template["spec"]["containers"][0]["name"] = "datapin"
    with pytest.raises(MountCollisionError, match=r"container name 'datapin'.*Fix: rename"):
        _inject(template)


def test_mounts_must_match_the_request() -> None:
    case = _case("one-container", "sidecar", "two-mixed")
    with pytest.raises(ValueError, match="do not match"):
        inject(
            case.original,
            request=case.request,
            mounts=list(reversed(case.mounts)),
            settings=case.settings,
        )
