"""The chart's CSI node plugin (csi.enabled), rendered offline, against Kubernetes and the code.

What users and the node plugin depend on:

* the `CSIDriver` kubelet reads: the driver the webhook writes into pods (`csi.volume.DRIVER`),
  inline ephemeral volumes only, no attach, pod info on mount (which `parse_publish` needs),
  no fsGroup chown of shared data;
* the agent DaemonSet has what a node plugin needs and nothing more: root and privileged,
  kubelet's pods directory and the node volume with Bidirectional propagation, its plugin
  directory for csi.sock and kubelet's registration directory, all at their host paths (kubelet
  speaks in host paths), and the settings the agent reads pointing into exactly those mounts;
* the agent's RBAC is read-only, pods and Datasets only, no Secrets, bound to its account;
* the operator's default mode follows csi.enabled, and `csi.enabled: false` renders the
  agent as before (non-root, locked down, no kubelet write access, no API access);
* strict schemas for every rendered object, `helm lint --strict`, values schema and template
  checks for the new values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python
import kubernetes_validate
import pytest
from datapin_operator.api import rbac
from datapin_sidecar.csi.volume import DRIVER, check_target

from testkit.chart import (
    CHART_DIR,
    Release,
    container_env,
    mount_covering,
    pod_spec,
    render,
    volume_named,
)

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
LINT_KUBE_VERSIONS = ("v1.29.0", f"v{kubernetes_validate.latest_version()}")
NODE = "gpu-node-1"
POD_UID = "6f1e0c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"

#: value combinations: id -> values
CSI_ON = {
    "defaults": {},
    "k0s": {
        "csi": {"kubeletDir": "/var/lib/k0s/kubelet"},
        "agent": {"kubeletPodsDir": "/var/lib/k0s/kubelet/pods"},
        "nodeVolume": {"path": "/mnt/datapin"},
    },
    "no-pods-dir": {"agent": {"kubeletPodsDir": ""}, "fullnameOverride": "dp"},
}
CSI_OFF = {"csi": {"enabled": False}}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    loaded = helm_python.Chart.load(str(CHART_DIR))
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="module", params=list(CSI_ON))
def combo(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def release(chart: Any, combo: str) -> Release:
    return render(chart, CSI_ON[combo], name="datapin", namespace="datapin")


@pytest.fixture(scope="module")
def values(chart: Any, combo: str) -> dict[str, Any]:
    return dict(chart.merge_values(CSI_ON[combo]))


@pytest.fixture(scope="module")
def sidecar_only(chart: Any) -> Release:
    return render(chart, CSI_OFF, name="datapin", namespace="datapin")


def _agent(release: Release) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = pod_spec(release.one("DaemonSet"))
    [container] = spec["containers"]
    return spec, container


def _env(release: Release, container: dict[str, Any]) -> dict[str, str]:
    return container_env(
        container,
        fields={
            "spec.nodeName": NODE,
            "metadata.name": "datapin-agent-x7k2p",
            "metadata.namespace": release.namespace,
            "status.podIP": "10.244.3.17",
        },
    )


def _host_path(spec: dict[str, Any], container: dict[str, Any], path: str) -> PurePosixPath:
    """Where `path` in the container is on the node (through the mount covering it)."""
    mount = mount_covering(container, path)
    volume = volume_named(spec, mount["name"])
    assert "hostPath" in volume, f"{path} is not on a hostPath volume: {volume}"
    inside = PurePosixPath(path).relative_to(mount["mountPath"])
    return PurePosixPath(volume["hostPath"]["path"]) / inside


def _validate(release: Release) -> None:
    failures = []
    for obj in release.objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {exc}")
    assert not failures, "\n".join(failures)


# --- the CSIDriver ---------------------------------------------------------------------------


def test_the_csidriver_is_the_one_the_webhook_names(release: Release) -> None:
    driver = release.one("CSIDriver")
    assert driver["apiVersion"] == "storage.k8s.io/v1"
    assert driver["metadata"]["name"] == DRIVER == "datapin.dev"
    assert "namespace" not in driver["metadata"]  # cluster-scoped
    spec = driver["spec"]
    assert spec["attachRequired"] is False  # kubelet calls only the Node service
    assert spec["podInfoOnMount"] is True  # parse_publish needs the pod's namespace and UID
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]  # inline volumes only
    assert spec["fsGroupPolicy"] == "None"  # shared read-only data is never chowned
    # kubelet republishes now and then: the keys the agent never writes down come back after
    # an agent restart (live switches need them) and after a Secret rotates.
    assert spec["requiresRepublish"] is True


def test_every_rendered_object_validates_strictly(release: Release) -> None:
    _validate(release)


@pytest.mark.parametrize("kube_version", LINT_KUBE_VERSIONS)
@pytest.mark.parametrize("values", [CSI_ON["k0s"], CSI_OFF], ids=["csi-k0s", "csi-off"])
def test_lint_is_clean(values: dict[str, Any], kube_version: str) -> None:
    report = helm_python.lint(str(CHART_DIR), values, strict=True, kube_version=kube_version)
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not serious, serious
    assert not report["errors"], report["errors"]


# --- the node plugin's DaemonSet --------------------------------------------------------------


def test_the_agent_is_a_privileged_root_container(release: Release) -> None:
    spec, container = _agent(release)
    assert spec["securityContext"]["runAsUser"] == 0
    assert "runAsNonRoot" not in spec["securityContext"]
    security = container["securityContext"]
    assert security["privileged"] is True  # mount(2); Bidirectional needs it too
    assert security["runAsNonRoot"] is False
    assert security["readOnlyRootFilesystem"] is True
    # Nothing beyond that: no host namespaces, ports or added capabilities.
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    assert not [p for p in container.get("ports", []) if "hostPort" in p]
    assert "capabilities" not in security
    assert spec["automountServiceAccountToken"] is True
    assert release.one("ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"]


def test_the_agent_mounts_what_a_node_plugin_needs_and_nothing_more(
    release: Release, values: dict[str, Any]
) -> None:
    spec, container = _agent(release)
    kubelet = values["csi"]["kubeletDir"].rstrip("/")
    host_paths = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {
        "node-volume": {"path": values["nodeVolume"]["path"], "type": "Directory"},
        "kubelet-pods": {"path": f"{kubelet}/pods", "type": "Directory"},
        "plugin-dir": {"path": f"{kubelet}/plugins/datapin.dev", "type": "DirectoryOrCreate"},
        "registration-dir": {"path": f"{kubelet}/plugins_registry", "type": "Directory"},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Host paths at their own paths: kubelet names targets and sockets by their host paths.
    for name in ("kubelet-pods", "plugin-dir", "registration-dir"):
        assert mounts[name]["mountPath"] == host_paths[name]["path"]
        assert not mounts[name].get("readOnly", False)
    propagation = {n: m.get("mountPropagation") for n, m in mounts.items()}
    assert propagation == {
        "node-volume": "Bidirectional",
        "kubelet-pods": "Bidirectional",
        "plugin-dir": None,
        "registration-dir": None,
        "prefetch": None,
        "credentials": None,
        "peers": None,  # the peer certificate (read-only Secret)
    }
    assert mounts["peers"]["readOnly"] is True


def test_the_agents_csi_settings_point_into_its_mounts(
    release: Release, values: dict[str, Any]
) -> None:
    spec, container = _agent(release)
    env = _env(release, container)
    kubelet = values["csi"]["kubeletDir"].rstrip("/")
    assert env["DATAPIN_NODE_NAME"] == NODE  # the downward API's spec.nodeName
    assert env["DATAPIN_KUBELET_DIR"] == kubelet
    # csi.sock: served in the plugin dir, and its host path is the endpoint kubelet dials.
    socket = env["DATAPIN_CSI_SOCKET"]
    assert PurePosixPath(socket).name == "csi.sock"
    assert mount_covering(container, socket)["name"] == "plugin-dir"
    assert str(_host_path(spec, container, socket)) == env["DATAPIN_CSI_ENDPOINT"]
    assert env["DATAPIN_CSI_ENDPOINT"] == f"{kubelet}/plugins/{DRIVER}/csi.sock"
    # The registration socket goes where kubelet watches.
    registration = env["DATAPIN_CSI_REGISTRATION_DIR"]
    assert mount_covering(container, registration)["mountPath"] == registration
    assert str(_host_path(spec, container, registration)) == f"{kubelet}/plugins_registry"
    # Every target kubelet sends passes the plugin's check, and lies on the Bidirectional
    # mount of the same host directory.
    target = f"{kubelet}/pods/{POD_UID}/volumes/kubernetes.io~csi/datapin-data-0/mount"
    assert check_target(target, kubelet_dir=Path(env["DATAPIN_KUBELET_DIR"]), pod_uid=POD_UID)
    covering = mount_covering(container, target)
    assert covering["mountPropagation"] == "Bidirectional"
    assert str(_host_path(spec, container, target)) == target
    # The node volume the plugin publishes from is the one the operator's sidecars use.
    root = env["DATAPIN_ROOT"]
    assert mount_covering(container, root)["mountPropagation"] == "Bidirectional"
    assert str(_host_path(spec, container, root)) == values["nodeVolume"]["path"]
    pods_dir = values["agent"]["kubeletPodsDir"]
    if pods_dir:
        assert env["DATAPIN_KUBELET_PODS_DIR"] == f"{kubelet}/pods"
    else:
        assert "DATAPIN_KUBELET_PODS_DIR" not in env


# --- RBAC ----------------------------------------------------------------------------------------


def test_the_agents_rbac_is_read_only_pods_and_datasets(release: Release) -> None:
    spec, _ = _agent(release)
    account = spec["serviceAccountName"]
    role = release.one("ClusterRole", account)
    assert role["rules"] == rbac.agent_rules()
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"pods", "datasets"}
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    assert not [rule for rule in role["rules"] if "*" in str(rule)]
    binding = release.one("ClusterRoleBinding", account)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": account,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": release.namespace}
    ]
    # The operator's own rules are untouched by csi mode.
    operator = pod_spec(release.one("Deployment"))["serviceAccountName"]
    assert release.one("ClusterRole", operator)["rules"] != role["rules"]


def test_the_agent_grants_are_documented() -> None:
    table = rbac.agent_rbac_table()
    assert "`pods` (core)" in table
    assert "`datasets` (datapin.dev)" in table
    assert "field selector" in table


# --- the operator's default mode, and csi off ---------------------------------------------------


def _default_mode(release: Release) -> str:
    [container] = pod_spec(release.one("Deployment"))["containers"]
    return container_env(container)["DATAPIN_DEFAULT_MODE"]


def test_the_operator_defaults_to_csi_only_with_the_node_plugin(
    release: Release, sidecar_only: Release
) -> None:
    assert _default_mode(release) == "csi"
    assert _default_mode(sidecar_only) == "sidecar"


def test_notes_say_what_the_namespaces_need(release: Release, sidecar_only: Release) -> None:
    assert "restricted Pod Security level" in release.notes
    assert "csi volume" in release.notes
    assert "must allow\n   privileged pods" in sidecar_only.notes


def test_csi_off_renders_the_agent_as_before(sidecar_only: Release) -> None:
    _validate(sidecar_only)
    assert sidecar_only.of_kind("CSIDriver") == []
    spec, container = _agent(sidecar_only)
    account = spec["serviceAccountName"]
    assert sidecar_only.get("ClusterRole", account) is None
    assert sidecar_only.get("ClusterRoleBinding", account) is None
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security
    env = container_env(
        container,
        fields={
            "spec.nodeName": NODE,
            "metadata.name": "a",
            "metadata.namespace": "b",
            "status.podIP": "10.244.3.17",
        },
    )
    assert not [k for k in env if k.startswith("DATAPIN_CSI_") or k == "DATAPIN_KUBELET_DIR"]
    assert not [
        m for m in container["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"
    ]
    pods = mount_covering(container, "/var/lib/kubelet/pods")
    assert pods["readOnly"] is True
    assert pods["mountPropagation"] == "HostToContainer"
    assert {v["name"] for v in spec["volumes"] if "hostPath" in v} == {
        "node-volume",
        "kubelet-pods",
    }


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        pytest.param({"csi": {"enabled": "yes"}}, "/csi/enabled", id="enabled-string"),
        pytest.param({"csi": {"kubeletDir": "var/lib/kubelet"}}, "/csi/kubeletDir", id="relative"),
        pytest.param({"csi": {"kubeletDir": "/var/../etc"}}, "/csi/kubeletDir", id="dotdot"),
        pytest.param({"csi": {"driver": "other.dev"}}, "driver", id="no-driver-value"),
    ],
)
def test_schema_rejects_bad_csi_values(chart: Any, bad: dict[str, Any], key: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as schema:
        chart.validate_schema(bad)
    message = str(schema.value)
    assert (f"'{key}" in message) if key.startswith("/") else (f"'{key}' not allowed" in message)


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        pytest.param(
            {"agent": {"enabled": False}},
            ["csi.enabled", "agent.enabled"],
            id="csi-without-agent",
        ),
        pytest.param(
            {"csi": {"kubeletDir": "/var/lib/k0s/kubelet"}},
            ["agent.kubeletPodsDir", "csi.kubeletDir"],
            id="pods-dir-elsewhere",
        ),
    ],
)
def test_template_checks_reject_inconsistent_csi_values(
    chart: Any, bad: dict[str, Any], names: list[str]
) -> None:
    chart.validate_schema(bad)
    with pytest.raises(helm_python.HelmRenderError) as failure:
        chart.render(bad, name="datapin", namespace="datapin")
    message = str(failure.value)
    for name in names:
        assert name in message
    assert "Fix:" in message
