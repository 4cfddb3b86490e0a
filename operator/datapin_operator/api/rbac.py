"""The RBAC of the operator (and of the node agent): least privilege for what each does, as data.

Each permission is a `Grant` with the reason it exists, so one list yields the ClusterRole and
Role rules (`cluster_rules`, `namespace_rules`), the manifests the chart ships (`build_rbac`)
and the table in docs/architecture.md (`rbac_table`): the documentation cannot drift from what
is granted, and a reviewer reads *why* next to *what*.

Principles:

* No wildcards, and reads are as narrow as the job allows. Secrets are the sharp edge: the
  operator `get`s the Secrets Datasets name (to copy keys for the node agents and to check a
  remote) but can neither `list` nor `watch` them, so it cannot enumerate a cluster's Secrets.
* Writes in other namespaces are limited to Events and the Datasets' own patches. Everything
  the operator creates lives in its own namespace (a Role, not the ClusterRole).
* `resourceNames` wherever Kubernetes honours it. It cannot restrict `create` (the name is not
  known when the request is authorised), so every object the operator creates by name has two
  rules: `create` without names and the rest with them. `list`/`watch` with resourceNames only
  work for requests that select that one name with a field selector, which is how kopf and the
  operator address their single webhook configuration and ConfigMap.
* kopf peering (`ClusterKopfPeering`, chart value operator.replicas > 1) needs its peering
  object; the grant is always there so scaling up needs no RBAC change.
* The node agent, when it is the CSI node plugin (chart value csi.enabled), has its own
  ClusterRole (`agent_grants`): read-only, the pods it serves and the Datasets they name,
  nothing else. It needs no Secrets: kubelet reads the Secret a pod's csi volume names (the
  Node authorizer lets it) and passes the keys in the NodePublishVolume request. RBAC cannot
  restrict a verb by field, so `list`/`watch` of pods is cluster-wide as far as RBAC goes; the
  narrowing to the agent's own node is the client's (a `spec.nodeName` field selector), the
  way kubelet is narrowed by the NodeRestriction admission plugin rather than by its role.
* The chart does not template these rules by hand: `chart_rules_yaml()` writes
  `charts/datapin/rbac/rules.yaml` with Helm placeholders for the names, the chart renders it
  with `tpl`, and a test keeps the file equal to this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import yaml

from datapin_operator.api.models import GROUP, PLURAL
from datapin_operator.settings import Settings

Scope = Literal["cluster", "namespace"]

_RBAC_API: Final = "rbac.authorization.k8s.io/v1"
_LABELS: Final = {"app.kubernetes.io/name": "datapin", "app.kubernetes.io/component": "operator"}


def _default(field: str) -> str:
    # Names default to the operator's own settings so the chart and the program agree.
    value = Settings.model_fields[field].default
    if not isinstance(value, str):
        raise TypeError(f"Settings.{field} has no string default. Fix: pass the name explicitly")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """One RBAC rule and the reason for it."""

    scope: Scope
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    resource_names: tuple[str, ...] = ()

    def rule(self) -> dict[str, Any]:
        """The PolicyRule as the API server takes it."""
        rule: dict[str, Any] = {
            "apiGroups": [self.api_group],
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.resource_names:
            rule["resourceNames"] = list(self.resource_names)
        return rule


def _grant(what: tuple[Scope, str, str, str], why: str, *, named: str = "") -> Grant:
    """A row of `grants`: (scope, API group, resource, verbs separated by spaces), the reason,
    and the one object the rule is limited to, if any."""
    scope, api_group, resource, verbs = what
    return Grant(
        scope=scope,
        api_group=api_group,
        resources=(resource,),
        verbs=tuple(verbs.split()),
        why=why,
        resource_names=(named,) if named else (),
    )


def grants(
    *,
    webhook_configuration: str | None = None,
    prefetch_configmap: str | None = None,
    agent_credentials_secret: str | None = None,
    webhook_tls_secret: str | None = None,
) -> list[Grant]:
    """Every permission of the operator, cluster-wide and in its own namespace."""
    webhook = webhook_configuration or _default("webhook_configuration")
    configmap = prefetch_configmap or _default("prefetch_configmap")
    secret = agent_credentials_secret or _default("agent_credentials_secret")
    tls_secret = webhook_tls_secret or _default("webhook_tls_secret")
    cluster: Scope = "cluster"
    own: Scope = "namespace"
    return [
        # -- kopf itself ---------------------------------------------------------------------
        _grant(
            (cluster, "apiextensions.k8s.io", "customresourcedefinitions", "list watch"),
            "kopf watches CRDs to learn when the Dataset resource appears or changes.",
        ),
        _grant(
            (cluster, "", "namespaces", "list watch"),
            "kopf serves every namespace and follows namespaces coming and going.",
        ),
        _grant(
            (cluster, "", "events", "create patch"),
            "Events on Datasets and admitted Jobs (kopf posts core v1 Events).",
        ),
        _grant(
            (cluster, "events.k8s.io", "events", "create patch"),
            "The same Events through the events.k8s.io API, which newer clients use.",
        ),
        # -- Datasets ------------------------------------------------------------------------
        _grant(
            (cluster, GROUP, PLURAL, "get list watch patch"),
            "The controllers watch Datasets; kopf patches its progress annotations and "
            "finalizer; the webhook lists the Datasets of a Job's namespace (a fresh read, "
            "so every replica answers alike).",
        ),
        _grant(
            (cluster, GROUP, f"{PLURAL}/status", "patch"),
            "Conditions, resolved revisions and prefetch progress.",
        ),
        # -- what the webhook and controllers read -------------------------------------------
        _grant(
            (cluster, "batch", "jobs", "list watch"),
            "Post an `Injected` Event on each admitted Job; Jobs are never written.",
        ),
        _grant(
            (cluster, "", "secrets", "get"),
            "Read the Secret a Dataset names (remote check, the agents' copy of the "
            "keys). get only: no list or watch, so Secrets cannot be enumerated.",
        ),
        _grant(
            (cluster, "", "nodes", "list watch"),
            "Match the prefetch nodeSelector of Datasets against nodes.",
        ),
        # -- the webhook configuration and kopf peering --------------------------------------
        _grant(
            (cluster, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "get patch"),
            "Keep the caBundle of the chart's webhook configuration equal to the "
            "certificate the operator serves (self-signed mode); only that one object.",
            named=webhook,
        ),
        _grant(
            (cluster, "kopf.dev", "clusterkopfpeerings", "get list watch patch"),
            "kopf peering between operator replicas: keep-alives in the peering object "
            "elect the one replica that reconciles.",
        ),
        # -- the operator's own namespace ----------------------------------------------------
        _grant(
            (own, "", "configmaps", "create"),
            "Create the agents' prefetch list on first use (create takes no resourceNames).",
        ),
        _grant(
            (own, "", "configmaps", "get patch update"),
            "Keep the per-node prefetch lists the node agents mount current.",
            named=configmap,
        ),
        _grant(
            (own, "", "secrets", "create"),
            "Create the agents' credentials Secret and the webhook's certificate Secret "
            "on first use (create takes no resourceNames).",
        ),
        _grant(
            (own, "", "secrets", "get patch update"),
            "Fill the agents' credentials Secret with the keys of prefetched Datasets.",
            named=secret,
        ),
        _grant(
            (own, "", "secrets", "get patch"),
            "The webhook's self-signed certificate, shared by the replicas and renewed "
            "before it expires (created with the create rule above).",
            named=tls_secret,
        ),
        _grant(
            (own, "", "pods", "get list watch"),
            "Find the node agents and read their /status for prefetch progress.",
        ),
    ]


def agent_grants() -> list[Grant]:
    """Every permission of the node agent as the CSI node plugin (all read-only)."""
    cluster: Scope = "cluster"
    return [
        _grant(
            (cluster, "", "pods", "get list watch"),
            "The pods on the agent's own node (the agent lists and watches with a spec.nodeName "
            "field selector; RBAC cannot restrict by field): which pin each published volume "
            "serves now, so a changed datapin.dev/pins annotation switches it.",
        ),
        _grant(
            (cluster, GROUP, PLURAL, "get list watch"),
            "The Dataset a volume names, read in the pod's own namespace: its remote decides "
            "where access is proven. No Secrets: kubelet passes the keys.",
        ),
    ]


def agent_rules() -> list[dict[str, Any]]:
    """The agent's ClusterRole rules (chart value csi.enabled)."""
    return [grant.rule() for grant in agent_grants()]


def cluster_rules(**names: str) -> list[dict[str, Any]]:
    """The ClusterRole's rules (keyword arguments as for `grants`)."""
    return [grant.rule() for grant in grants(**names) if grant.scope == "cluster"]


def namespace_rules(**names: str) -> list[dict[str, Any]]:
    """The Role's rules in the operator's own namespace (keyword arguments as for `grants`)."""
    return [grant.rule() for grant in grants(**names) if grant.scope == "namespace"]


def build_rbac(
    *, namespace: str, name: str = "datapin-operator", **names: str
) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding of the operator."""
    meta = {"name": name, "labels": dict(_LABELS)}
    subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {**meta, "namespace": namespace},
        },
        {
            "apiVersion": _RBAC_API,
            "kind": "ClusterRole",
            "metadata": dict(meta),
            "rules": cluster_rules(**names),
        },
        {
            "apiVersion": _RBAC_API,
            "kind": "ClusterRoleBinding",
            "metadata": dict(meta),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [subject],
        },
        {
            "apiVersion": _RBAC_API,
            "kind": "Role",
            "metadata": {**meta, "namespace": namespace},
            "rules": namespace_rules(**names),
        },
        {
            "apiVersion": _RBAC_API,
            "kind": "RoleBinding",
            "metadata": {**meta, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject],
        },
    ]


#: The Helm expressions of each name, as the chart's templates spell them (`_helpers.tpl`).
CHART_NAMES: Final = {
    "webhook_configuration": "{{ .Values.webhook.configurationName }}",
    "prefetch_configmap": '{{ include "datapin.prefetchConfigMap" . }}',
    "agent_credentials_secret": '{{ include "datapin.agentCredentials" . }}',
    "webhook_tls_secret": '{{ include "datapin.webhookTLSSecret" . }}',
}
#: Where the chart keeps the rules (rendered with `tpl` by templates/rbac.yaml).
CHART_RULES_FILE: Final = "rbac/rules.yaml"


def chart_rules_yaml() -> str:
    """`charts/datapin/rbac/rules.yaml`: the rules with Helm expressions for the names."""
    header = (
        "# Generated from datapin_operator/api/rbac.py (chart_rules_yaml); do not edit. The chart\n"
        "# renders it with `tpl`, so the names below become the release's object names.\n"
    )
    body = {
        "cluster": cluster_rules(**CHART_NAMES),
        "namespace": namespace_rules(**CHART_NAMES),
        "agent": agent_rules(),
    }
    return header + yaml.safe_dump(body, sort_keys=False, width=1000)


def _cell(values: Sequence[str]) -> str:
    return ", ".join(f"`{value}`" for value in values)


def rbac_table(**names: str) -> str:
    """The grants as a Markdown table (resource, verbs, scope, why) for docs/architecture.md."""
    return _table(grants(**names))


def agent_rbac_table() -> str:
    """The agent's grants (CSI node plugin) as a Markdown table, like `rbac_table`."""
    return _table(agent_grants())


def _table(rows: Sequence[Grant]) -> str:
    lines = [
        "| Resource | Verbs | Scope | Why |",
        "| --- | --- | --- | --- |",
    ]
    for grant in rows:
        resources = f"{_cell(grant.resources)} ({grant.api_group or 'core'})"
        if grant.resource_names:
            resources += f" named {_cell(grant.resource_names)}"
        scope = "cluster-wide" if grant.scope == "cluster" else "operator namespace"
        lines.append(f"| {resources} | {_cell(grant.verbs)} | {scope} | {grant.why} |")
    return "\n".join(lines) + "\n"
