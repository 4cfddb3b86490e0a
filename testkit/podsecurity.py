"""The Pod Security Standards' `baseline` and `restricted` levels, checked on a pod spec.

Design: one function per control of the Kubernetes "Pod Security Standards" page, each
reading exactly the fields that control restricts (pod, containers, init containers and
ephemeral containers) and reporting every offending field as a `Violation` with its path, so a
failing test says what the Pod Security admission would have said. `baseline` is the list of
baseline controls; `restricted` adds its own, as the page defines the levels (cumulative).
The effective value of a setting both the pod and a container may hold (runAsNonRoot,
runAsUser, seccompProfile) is the container's, else the pod's, as kubelet applies it.

One check goes beyond the page, because the API server enforces it for every pod and an
injected mount must pass it too: `mountPropagation: Bidirectional` needs a privileged
container; only none or `HostToContainer` is accepted on an unprivileged one
(`mount_propagation`).

This is a test aid: it validates what datapin injects (and proves itself on pods built to
break each rule, tests/test_pod_security.py); it is no replacement for the admission plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BASELINE",
    "RESTRICTED",
    "Violation",
    "baseline",
    "pod_spec_of",
    "restricted",
]

#: The volume types the restricted level allows (every other source is refused).
RESTRICTED_VOLUMES: Final = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
#: Capabilities baseline allows adding; restricted allows only NET_BIND_SERVICE.
BASELINE_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_CAPABILITIES: Final = frozenset({"NET_BIND_SERVICE"})
#: The "safe" sysctls (the newest list: later Kubernetes versions only add to it).
SAFE_SYSCTLS: Final = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES: Final = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
_APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"
_CONTAINER_LISTS: Final = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """One field a level forbids: which control, where, and the value found."""

    control: str
    path: str
    value: Any

    def __str__(self) -> str:
        return f"{self.control}: {self.path} = {self.value!r}"


Check = Callable[[Mapping[str, Any], Mapping[str, str]], Iterator[Violation]]


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, container) of every container of every kind."""
    for kind in _CONTAINER_LISTS:
        for index, container in enumerate(spec.get(kind) or []):
            yield f"spec.{kind}[{index}]", container


def _security(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def _effective(spec: Mapping[str, Any], container: Mapping[str, Any], key: str) -> tuple[str, Any]:
    """The container's setting, else the pod's, with the path it was read from."""
    own = _security(container)
    if key in own:
        return "securityContext", own[key]
    return "spec.securityContext", _security(spec).get(key)


# --- baseline --------------------------------------------------------------------------------


def host_process(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    if (_security(spec).get("windowsOptions") or {}).get("hostProcess"):
        yield Violation(
            control="HostProcess",
            path="spec.securityContext.windowsOptions.hostProcess",
            value=True,
        )
    for path, c in _containers(spec):
        if (_security(c).get("windowsOptions") or {}).get("hostProcess"):
            yield Violation(
                control="HostProcess",
                path=f"{path}.securityContext.windowsOptions.hostProcess",
                value=True,
            )


def host_namespaces(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            yield Violation(control="Host Namespaces", path=f"spec.{key}", value=spec[key])


def privileged(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        if _security(c).get("privileged"):
            yield Violation(
                control="Privileged Containers",
                path=f"{path}.securityContext.privileged",
                value=True,
            )


def added_capabilities(allowed: frozenset[str]) -> Check:
    def check(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
        for path, c in _containers(spec):
            for cap in (_security(c).get("capabilities") or {}).get("add") or []:
                if cap not in allowed:
                    yield Violation(
                        control="Capabilities",
                        path=f"{path}.securityContext.capabilities.add",
                        value=cap,
                    )

    return check


def host_path_volumes(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for index, volume in enumerate(spec.get("volumes") or []):
        if "hostPath" in volume:
            yield Violation(
                control="HostPath Volumes",
                path=f"spec.volumes[{index}].hostPath",
                value=volume["hostPath"],
            )


def host_ports(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        for index, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                yield Violation(
                    control="Host Ports",
                    path=f"{path}.ports[{index}].hostPort",
                    value=port["hostPort"],
                )


def apparmor(spec: Mapping[str, Any], annotations: Mapping[str, str]) -> Iterator[Violation]:
    allowed = {"RuntimeDefault", "Localhost"}
    profile = _security(spec).get("appArmorProfile") or {}
    if profile and profile.get("type") not in allowed:
        yield Violation(
            control="AppArmor",
            path="spec.securityContext.appArmorProfile.type",
            value=profile.get("type"),
        )
    for path, c in _containers(spec):
        profile = _security(c).get("appArmorProfile") or {}
        if profile and profile.get("type") not in allowed:
            yield Violation(
                control="AppArmor",
                path=f"{path}.securityContext.appArmorProfile.type",
                value=profile.get("type"),
            )
    for key, value in annotations.items():
        if key.startswith(_APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            yield Violation(control="AppArmor", path=f"metadata.annotations[{key}]", value=value)


def selinux(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    owners = [("spec.securityContext", _security(spec))]
    owners += [(f"{path}.securityContext", _security(c)) for path, c in _containers(spec)]
    for path, security in owners:
        options = security.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            yield Violation(
                control="SELinux", path=f"{path}.seLinuxOptions.type", value=options["type"]
            )
        for key in ("user", "role"):
            if options.get(key):
                yield Violation(
                    control="SELinux", path=f"{path}.seLinuxOptions.{key}", value=options[key]
                )


def proc_mount(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        value = _security(c).get("procMount")
        if value not in (None, "Default"):
            yield Violation(
                control="/proc Mount Type", path=f"{path}.securityContext.procMount", value=value
            )


def seccomp_not_unconfined(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    owners = [("spec.securityContext", _security(spec))]
    owners += [(f"{path}.securityContext", _security(c)) for path, c in _containers(spec)]
    for path, security in owners:
        kind = (security.get("seccompProfile") or {}).get("type")
        if kind == "Unconfined":
            yield Violation(control="Seccomp", path=f"{path}.seccompProfile.type", value=kind)


def sysctls(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for index, sysctl in enumerate(_security(spec).get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield Violation(
                control="Sysctls",
                path=f"spec.securityContext.sysctls[{index}].name",
                value=sysctl.get("name"),
            )


def mount_propagation(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    """API server validation, not the page: Bidirectional only in a privileged container."""
    for path, c in _containers(spec):
        if _security(c).get("privileged"):
            continue
        for index, mount in enumerate(c.get("volumeMounts") or []):
            value = mount.get("mountPropagation")
            if value not in (None, "None", "HostToContainer"):
                yield Violation(
                    control="Mount Propagation",
                    path=f"{path}.volumeMounts[{index}].mountPropagation",
                    value=value,
                )


# --- restricted ------------------------------------------------------------------------------


def volume_types(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for index, volume in enumerate(spec.get("volumes") or []):
        sources = [k for k in volume if k != "name"]
        for source in sources:
            if source not in RESTRICTED_VOLUMES:
                yield Violation(
                    control="Volume Types", path=f"spec.volumes[{index}].{source}", value=source
                )


def privilege_escalation(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        value = _security(c).get("allowPrivilegeEscalation")
        if value is not False:
            yield Violation(
                control="Privilege Escalation",
                path=f"{path}.securityContext.allowPrivilegeEscalation",
                value=value,
            )


def run_as_non_root(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        where, value = _effective(spec, c, "runAsNonRoot")
        if value is not True:
            place = f"{path}.securityContext" if where == "securityContext" else where
            yield Violation(
                control="Running as Non-root", path=f"{place}.runAsNonRoot", value=value
            )


def run_as_user(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    if _security(spec).get("runAsUser") == 0:
        yield Violation(
            control="Running as Non-root user", path="spec.securityContext.runAsUser", value=0
        )
    for path, c in _containers(spec):
        if _security(c).get("runAsUser") == 0:
            yield Violation(
                control="Running as Non-root user",
                path=f"{path}.securityContext.runAsUser",
                value=0,
            )


def seccomp_required(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        where, profile = _effective(spec, c, "seccompProfile")
        kind = (profile or {}).get("type")
        if kind not in ("RuntimeDefault", "Localhost"):
            place = f"{path}.securityContext" if where == "securityContext" else where
            yield Violation(control="Seccomp", path=f"{place}.seccompProfile.type", value=kind)


def capabilities_dropped(spec: Mapping[str, Any], _: Mapping[str, str]) -> Iterator[Violation]:
    for path, c in _containers(spec):
        # Ephemeral containers are held to the same rule by the admission plugin.
        drop = (_security(c).get("capabilities") or {}).get("drop") or []
        if "ALL" not in drop:
            yield Violation(
                control="Capabilities", path=f"{path}.securityContext.capabilities.drop", value=drop
            )


BASELINE: Final[tuple[Check, ...]] = (
    host_process,
    host_namespaces,
    privileged,
    added_capabilities(BASELINE_CAPABILITIES),
    host_path_volumes,
    host_ports,
    apparmor,
    selinux,
    proc_mount,
    seccomp_not_unconfined,
    sysctls,
    mount_propagation,
)
RESTRICTED: Final[tuple[Check, ...]] = (
    *BASELINE,
    volume_types,
    privilege_escalation,
    run_as_non_root,
    run_as_user,
    seccomp_required,
    capabilities_dropped,
    added_capabilities(RESTRICTED_CAPABILITIES),
)


def pod_spec_of(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, str]]:
    """(pod spec, pod annotations) of a Pod, a pod template or any workload with one."""
    spec = obj.get("spec") or {}
    template = spec.get("template") if obj.get("kind") != "Pod" else None
    if isinstance(template, Mapping) and "spec" in template:
        return template["spec"], (template.get("metadata") or {}).get("annotations") or {}
    return spec, (obj.get("metadata") or {}).get("annotations") or {}


def _run(checks: tuple[Check, ...], obj: Mapping[str, Any]) -> list[Violation]:
    spec, annotations = pod_spec_of(obj)
    found: list[Violation] = []
    for check in checks:
        for violation in check(spec, annotations):
            if violation not in found:  # the restricted capability rule repeats baseline's
                found.append(violation)
    return found


def baseline(obj: Mapping[str, Any]) -> list[Violation]:
    """What the `baseline` level forbids in `obj` (a Pod, template or workload); [] if none."""
    return _run(BASELINE, obj)


def restricted(obj: Mapping[str, Any]) -> list[Violation]:
    """What the `restricted` level forbids in `obj`; [] if it passes."""
    return _run(RESTRICTED, obj)
