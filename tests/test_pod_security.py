"""Pod Security: an injected csi-mode pod still passes the `restricted` level.

Issue 14's point is that training namespaces may enforce `restricted`. What users depend on:

* the checker (`testkit.podsecurity`) catches each rule of the Pod Security Standards page,
  at the level the page puts it, in every kind of container, and reads pod-level settings as
  kubelet applies them; so a pass below means something;
* a user pod that passes `restricted` still passes after injection in csi mode (one dataset,
  several, writable; as a Job's template and as a bare Pod), and is valid for the Kubernetes
  1.29 and newest schemas (strict);
* the sidecar and init modes do not pass (their node volume is a hostPath), and that is the
  only thing they break: the datapin container itself meets every container rule.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from datapin_operator.webhook.inject import inject
from datapin_operator.webhook.requests import parse_request

from testkit import podsecurity
from tests.test_operator_inject import VERSIONS, _job, _pod, _resolve, _settings

LOCKED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def _restricted_pod() -> dict[str, Any]:
    """A training pod that passes `restricted`: pod-level user and seccomp, locked containers."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "train", "namespace": "ml", "annotations": {"team": "vision"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [
                {
                    "name": "check",
                    "image": "busybox:1.36",
                    "command": ["ls", "/data"],
                    "securityContext": copy.deepcopy(LOCKED),
                }
            ],
            "containers": [
                {
                    "name": "train",
                    "image": "python:3.11",
                    "securityContext": copy.deepcopy(LOCKED),
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                },
                {
                    "name": "web",
                    "image": "nginx:1.27",
                    "ports": [{"containerPort": 8080}],
                    "securityContext": {
                        **copy.deepcopy(LOCKED),
                        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                        "readOnlyRootFilesystem": True,
                    },
                },
            ],
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "config", "configMap": {"name": "c"}},
                {
                    "name": "token",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]},
                },
                {"name": "claim", "persistentVolumeClaim": {"claimName": "data"}},
            ],
        },
    }


def _controls(found: list[podsecurity.Violation]) -> set[str]:
    return {v.control for v in found}


# --- the checker -----------------------------------------------------------------------------


def test_a_restricted_pod_passes_both_levels() -> None:
    pod = _restricted_pod()
    assert podsecurity.restricted(pod) == []
    assert podsecurity.baseline(pod) == []
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def _set(path: str, value: Any) -> Any:
    """A change to the restricted pod: set `value` at a dotted path (`[n]` indexes lists)."""

    def change(pod: dict[str, Any]) -> None:
        node: Any = pod
        keys = path.replace("[", ".").replace("]", "").split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        last: Any = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return change


_DELETE = object()

#: (change, the control, whether baseline forbids it too, the path reported)
VIOLATIONS = [
    pytest.param(
        _set("spec.volumes[0]", {"name": "scratch", "hostPath": {"path": "/var/lib/datapin"}}),
        "HostPath Volumes",
        True,
        "spec.volumes[0].hostPath",
        id="hostPath",
    ),
    pytest.param(
        _set("spec.volumes[0]", {"name": "scratch", "nfs": {"server": "n", "path": "/"}}),
        "Volume Types",
        False,
        "spec.volumes[0].nfs",
        id="nfs-volume",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.privileged", True),
        "Privileged Containers",
        True,
        "spec.containers[0].securityContext.privileged",
        id="privileged",
    ),
    pytest.param(
        _set("spec.hostNetwork", True),
        "Host Namespaces",
        True,
        "spec.hostNetwork",
        id="hostNetwork",
    ),
    pytest.param(_set("spec.hostPID", True), "Host Namespaces", True, "spec.hostPID", id="hostPID"),
    pytest.param(_set("spec.hostIPC", True), "Host Namespaces", True, "spec.hostIPC", id="hostIPC"),
    pytest.param(
        _set("spec.containers[1].ports[0].hostPort", 80),
        "Host Ports",
        True,
        "spec.containers[1].ports[0].hostPort",
        id="hostPort",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.capabilities.add", ["SYS_ADMIN"]),
        "Capabilities",
        True,
        "spec.containers[0].securityContext.capabilities.add",
        id="add-SYS_ADMIN",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.capabilities.add", ["CHOWN"]),
        "Capabilities",
        False,
        "spec.containers[0].securityContext.capabilities.add",
        id="add-CHOWN",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.capabilities.drop", ["NET_RAW"]),
        "Capabilities",
        False,
        "spec.containers[0].securityContext.capabilities.drop",
        id="drop-not-ALL",
    ),
    pytest.param(
        _set("spec.initContainers[0].securityContext.allowPrivilegeEscalation", True),
        "Privilege Escalation",
        False,
        "spec.initContainers[0].securityContext.allowPrivilegeEscalation",
        id="escalation-true",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.allowPrivilegeEscalation", _DELETE),
        "Privilege Escalation",
        False,
        "spec.containers[0].securityContext.allowPrivilegeEscalation",
        id="escalation-unset",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.runAsNonRoot", False),
        "Running as Non-root",
        False,
        "spec.containers[0].securityContext.runAsNonRoot",
        id="container-runAsNonRoot-false",
    ),
    pytest.param(
        _set("spec.securityContext.runAsNonRoot", _DELETE),
        "Running as Non-root",
        False,
        "spec.securityContext.runAsNonRoot",
        id="runAsNonRoot-unset",
    ),
    pytest.param(
        _set("spec.securityContext.runAsUser", 0),
        "Running as Non-root user",
        False,
        "spec.securityContext.runAsUser",
        id="pod-runAsUser-0",
    ),
    pytest.param(
        _set("spec.containers[1].securityContext.runAsUser", 0),
        "Running as Non-root user",
        False,
        "spec.containers[1].securityContext.runAsUser",
        id="container-runAsUser-0",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.seccompProfile", {"type": "Unconfined"}),
        "Seccomp",
        True,
        "spec.containers[0].securityContext.seccompProfile.type",
        id="seccomp-unconfined",
    ),
    pytest.param(
        _set("spec.securityContext.seccompProfile", _DELETE),
        "Seccomp",
        False,
        "spec.securityContext.seccompProfile.type",
        id="seccomp-unset",
    ),
    pytest.param(
        _set("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
        "Sysctls",
        True,
        "spec.securityContext.sysctls[0].name",
        id="unsafe-sysctl",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.procMount", "Unmasked"),
        "/proc Mount Type",
        True,
        "spec.containers[0].securityContext.procMount",
        id="procMount",
    ),
    pytest.param(
        _set("spec.securityContext.appArmorProfile", {"type": "Unconfined"}),
        "AppArmor",
        True,
        "spec.securityContext.appArmorProfile.type",
        id="apparmor-field",
    ),
    pytest.param(
        _set(
            "metadata.annotations",
            {"container.apparmor.security.beta.kubernetes.io/train": "unconfined"},
        ),
        "AppArmor",
        True,
        "metadata.annotations[container.apparmor.security.beta.kubernetes.io/train]",
        id="apparmor-annotation",
    ),
    pytest.param(
        _set("spec.containers[0].securityContext.seLinuxOptions", {"type": "spc_t"}),
        "SELinux",
        True,
        "spec.containers[0].securityContext.seLinuxOptions.type",
        id="selinux-type",
    ),
    pytest.param(
        _set("spec.securityContext.seLinuxOptions", {"user": "system_u"}),
        "SELinux",
        True,
        "spec.securityContext.seLinuxOptions.user",
        id="selinux-user",
    ),
    pytest.param(
        _set("spec.securityContext.windowsOptions", {"hostProcess": True}),
        "HostProcess",
        True,
        "spec.securityContext.windowsOptions.hostProcess",
        id="hostProcess",
    ),
    pytest.param(
        _set("spec.containers[0].volumeMounts[0].mountPropagation", "Bidirectional"),
        "Mount Propagation",
        True,
        "spec.containers[0].volumeMounts[0].mountPropagation",
        id="bidirectional",
    ),
    pytest.param(
        _set(
            "spec.ephemeralContainers",
            [{"name": "debug", "image": "busybox:1.36", "securityContext": {"privileged": True}}],
        ),
        "Privileged Containers",
        True,
        "spec.ephemeralContainers[0].securityContext.privileged",
        id="ephemeral-privileged",
    ),
]


@pytest.mark.parametrize(("change", "control", "in_baseline", "path"), VIOLATIONS)
def test_each_rule_is_caught_at_its_level(
    change: Any, control: str, in_baseline: bool, path: str
) -> None:
    pod = _restricted_pod()
    change(pod)
    found = podsecurity.restricted(pod)
    assert control in _controls(found), found
    assert path in {v.path for v in found}, found
    assert (control in _controls(podsecurity.baseline(pod))) is in_baseline
    # Reported inside a workload's pod template too, as the admission plugin does for Jobs.
    job = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": pod}}
    assert podsecurity.restricted(job) == found


def test_pod_level_settings_are_inherited_and_container_settings_win() -> None:
    pod = _restricted_pod()
    # The containers set neither runAsNonRoot nor seccomp: the pod's apply.
    assert all("runAsNonRoot" not in c["securityContext"] for c in pod["spec"]["containers"])
    assert podsecurity.restricted(pod) == []
    # A container's own setting wins over the pod's, both ways.
    pod["spec"]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        c["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    assert _controls(podsecurity.restricted(pod)) == {"Seccomp"}  # the pod's own Unconfined
    assert all(v.path.startswith("spec.securityContext") for v in podsecurity.restricted(pod))


def test_host_to_container_propagation_is_allowed() -> None:
    pod = _restricted_pod()
    pod["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"] = "HostToContainer"
    assert podsecurity.restricted(pod) == []


# --- injected pods ---------------------------------------------------------------------------


def _inject(obj: dict[str, Any], annotations: dict[str, str]) -> dict[str, Any]:
    """Inject as the webhook does for a Pod or a Job's template (mode default: csi)."""
    obj = copy.deepcopy(obj)
    template = obj["spec"]["template"] if obj["kind"] == "Job" else obj
    template["metadata"].setdefault("annotations", {}).update(annotations)
    request = parse_request(template["metadata"]["annotations"], mount_root="/data")
    assert request is not None
    datasets = dict.fromkeys(request.datasets, True)
    injected = inject(
        template, request=request, mounts=_resolve(request, datasets), settings=_settings()
    )
    if obj["kind"] == "Job":
        obj["spec"]["template"] = injected
        return obj
    return injected


def _as(kind: str) -> dict[str, Any]:
    pod = _restricted_pod()
    if kind == "Pod":
        return pod
    template = {"metadata": {"annotations": pod["metadata"]["annotations"]}, "spec": pod["spec"]}
    return _job(template)


REQUESTS = {
    "one": {"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2"},
    "several": {"datapin.dev/dataset": "imagenet, coco", "datapin.dev/revision": "v2"},
    "writable": {
        "datapin.dev/dataset": "imagenet, coco",
        "datapin.dev/revision": "v2",
        "datapin.dev/writable": "true",
    },
    "explicit-csi": {
        "datapin.dev/dataset": "coco",
        "datapin.dev/revision": "v2",
        "datapin.dev/mode": "csi",
        "datapin.dev/mount-path": "/mnt/coco",
    },
}


@pytest.mark.parametrize("kind", ["Job", "Pod"])
@pytest.mark.parametrize("asked", list(REQUESTS))
def test_an_injected_csi_pod_still_passes_restricted(kind: str, asked: str) -> None:
    before = _as(kind)
    assert podsecurity.restricted(before) == []
    after = _inject(before, REQUESTS[asked])
    spec, _ = podsecurity.pod_spec_of(after)
    assert [v for v in spec["volumes"] if "csi" in v], "nothing was injected"
    assert podsecurity.restricted(after) == []
    for version in VERSIONS:
        kubernetes_validate.validate(after, version, strict=True)


@pytest.mark.parametrize("kind", ["Job", "Pod"])
@pytest.mark.parametrize("mode", ["sidecar", "init"])
def test_the_sidecar_modes_break_restricted_only_by_their_host_path(kind: str, mode: str) -> None:
    after = _inject(
        _as(kind),
        {"datapin.dev/dataset": "imagenet", "datapin.dev/revision": "v2", "datapin.dev/mode": mode},
    )
    found = podsecurity.restricted(after)
    assert _controls(found) == {"HostPath Volumes", "Volume Types"}, found
    assert {str(v.value) for v in found if v.control == "Volume Types"} == {"hostPath"}
    assert _controls(podsecurity.baseline(after)) == {"HostPath Volumes"}
    # Kubernetes would still accept the object itself.
    for version in VERSIONS:
        kubernetes_validate.validate(after if kind == "Job" else _pod(after), version, strict=True)
