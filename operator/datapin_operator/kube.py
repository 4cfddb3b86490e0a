"""The few Kubernetes API calls the operator makes itself, beside kopf's.

kopf watches, patches the Datasets it handles and posts Events; everything else goes through
this one class: reading a Secret a Dataset names (`get` only: the operator cannot list
Secrets), keeping the agents' prefetch ConfigMap and credentials Secret current, and listing
nodes and agent pods. It wraps the official `kubernetes` client, whose calls block, in
`asyncio.to_thread`, so handlers stay async; the same client configuration is handed to kopf
(`connection_info`), so both talk to the same server with the same identity: in-cluster, a
kubeconfig (the laptop development mode), or a bare URL (tests against kmock).

Writes are "apply if different": read, compare, then create or merge-patch. The patch carries
the resourceVersion read, so two operator replicas racing cannot silently undo each other: the
loser gets 409 (`Conflict` where the caller must know) and retries. Patches always name their
content type (`application/merge-patch+json`): the generated client would otherwise send a
dict as a JSON Patch, which a real API server refuses.

Also here: the webhook certificate Secret (`webhooktls.py`), the caBundle of the chart's
webhook configuration, and the Datasets of a namespace (specs and statuses, one list call), read
fresh for each admission so that every replica (kopf peering pauses the watches of all but one)
answers alike.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import kopf
import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from datapin_operator.api.models import GROUP, PLURAL, VERSION
from datapin_operator.errors import Conflict
from datapin_operator.settings import Settings

#: Who wrote an object: the label on everything the operator creates.
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "datapin-operator"}


#: The patch type of every write: a JSON merge patch (RFC 7386).
MERGE_PATCH: Final = "application/merge-patch+json"

#: What a call to the API server may raise: its answer, or no answer at all.
API_ERRORS: Final = (ApiException, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRead:
    """A Secret's data as text, and the resourceVersion it was read at."""

    data: dict[str, str]
    resource_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetListing:
    """The Datasets of one namespace as one list call returned them, by name: each spec, and
    each status (the webhook reads the agents' warm nodes there; a Dataset not reconciled yet
    has none)."""

    specs: Mapping[str, Mapping[str, Any]]
    statuses: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentPod:
    name: str
    node: str
    ip: str | None
    phase: str


class Kube:
    """Async access to the API server (see the module doc)."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api
        # Any: the client's models are optional-everywhere; we read what the API guarantees.
        self.core: Any = kubernetes.client.CoreV1Api(api)
        self.admission: Any = kubernetes.client.AdmissionregistrationV1Api(api)
        self.custom: Any = kubernetes.client.CustomObjectsApi(api)

    @classmethod
    def from_settings(cls, settings: Settings) -> Kube:
        """In-cluster config when in a pod; else the kubeconfig; `api_server` overrides both."""
        config = kubernetes.client.Configuration()
        if settings.api_server is not None:
            config.host = settings.api_server.rstrip("/")
        else:
            try:
                kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
                    context=settings.context,
                    client_configuration=config,
                )
        return cls(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def connection_info(self) -> kopf.ConnectionInfo:
        """kopf's credentials, from the same configuration (re-read on each login)."""
        config: Any = self.api.configuration
        if config.refresh_api_key_hook is not None:
            config.refresh_api_key_hook(config)  # in-cluster tokens rotate
        token = config.api_key.get("authorization") or config.api_key.get("BearerToken")
        scheme, _, value = (token or "").partition(" ")
        return kopf.ConnectionInfo(
            server=config.host,
            ca_path=config.ssl_ca_cert,
            insecure=not config.verify_ssl,
            scheme=scheme or None,
            token=value or None,
            certificate_path=config.cert_file,
            private_key_path=config.key_file,
            default_namespace=None,
        )

    # -- reads ----------------------------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded as UTF-8 text; None if it does not exist."""
        read = await self.read_secret(namespace, name)
        return None if read is None else read.data

    async def read_secret(self, namespace: str, name: str) -> SecretRead | None:
        """The Secret's text data and resourceVersion; None if it does not exist."""
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, str] = {}
        for key, value in (secret.data or {}).items():
            try:
                data[key] = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue  # a binary key cannot be a key id or a password: ignore it
        return SecretRead(data=data, resource_version=str(secret.metadata.resource_version))

    async def list_datasets(self, namespace: str) -> DatasetListing:
        """The Datasets of `namespace` (not being deleted): specs and statuses by name."""
        listed: Any = await asyncio.to_thread(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
        )
        items = [
            item
            for item in listed.get("items") or []
            if not (item.get("metadata") or {}).get("deletionTimestamp")
        ]
        return DatasetListing(
            specs={item["metadata"]["name"]: dict(item.get("spec") or {}) for item in items},
            statuses={
                item["metadata"]["name"]: dict(item["status"])
                for item in items
                if isinstance(item.get("status"), dict)
            },
        )

    async def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `group/version` (discovery, which every
        authenticated client may read: no RBAC needed)."""
        try:
            found: Any = await asyncio.to_thread(self.custom.get_api_resources, group, version)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.name == plural for r in (found.resources or []) if found is not None)

    async def list_nodes(self, selector: Mapping[str, str]) -> list[NodeInfo]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        nodes: Any = await asyncio.to_thread(
            self.core.list_node, label_selector=label_selector or None
        )
        # Also matched here: the server's selection is an optimisation, this is the contract.
        return [
            NodeInfo(name=n.metadata.name, labels=dict(n.metadata.labels or {}))
            for n in nodes.items
            if _matches(n.metadata.labels, selector)
        ]

    async def list_agent_pods(self, namespace: str, selector: str) -> list[AgentPod]:
        pods: Any = await asyncio.to_thread(
            self.core.list_namespaced_pod, namespace, label_selector=selector
        )
        return [
            AgentPod(
                name=p.metadata.name,
                node=(p.spec.node_name if p.spec else None) or "",
                ip=p.status.pod_ip if p.status else None,
                phase=(p.status.phase if p.status else None) or "Unknown",
            )
            for p in pods.items
            if _matches(p.metadata.labels, _parse_selector(selector))
        ]

    # -- writes ---------------------------------------------------------------------------------

    async def post_event(
        self, involved: Mapping[str, Any], *, type_: str, reason: str, message: str
    ) -> None:
        """An Event about `involved` (apiVersion, kind, metadata.name/namespace/uid).

        kopf's `kopf.event` needs kopf's own task context, which admission handlers lack;
        the webhook posts its Events through here instead.
        """
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "datapin-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                **({"uid": meta["uid"]} if meta.get("uid") else {}),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "datapin-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await asyncio.to_thread(self.core.create_namespaced_event, namespace, body)

    async def apply_configmap(self, namespace: str, name: str, data: Mapping[str, str]) -> bool:
        """Make the ConfigMap hold exactly `data`; True if anything was written."""
        return await self._apply("config_map", namespace, name, dict(data), encode=False)

    async def apply_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> bool:
        """Make the Secret hold exactly `data` (given as text); True if anything was written."""
        return await self._apply("secret", namespace, name, _encoded(data), encode=True)

    async def _apply(
        self, kind: str, namespace: str, name: str, data: dict[str, str], *, encode: bool
    ) -> bool:
        read = getattr(self.core, f"read_namespaced_{kind}")
        try:
            current = await asyncio.to_thread(read, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret" if encode else "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "data": data,
        }
        if encode:
            body["type"] = "Opaque"
        if current is None:
            create = getattr(self.core, f"create_namespaced_{kind}")
            await asyncio.to_thread(create, namespace, body)
            return True
        old = dict(current.data or {})
        if old == data:
            return False
        # A merge patch (not a replace): removed keys become nulls, and the resourceVersion
        # read is a precondition, so a concurrent writer makes this one fail (409) and retry.
        patch = {
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "data": {**{k: None for k in old if k not in data}, **data},
        }
        update = getattr(self.core, f"patch_namespaced_{kind}")
        await asyncio.to_thread(update, name, namespace, patch, _content_type=MERGE_PATCH)
        return True

    # -- the webhook's certificate ----------------------------------------------------------

    async def create_tls_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        """Create a `kubernetes.io/tls` Secret; `Conflict` if it exists already."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "type": "kubernetes.io/tls",
            "data": _encoded(data),
        }
        try:
            await asyncio.to_thread(self.core.create_namespaced_secret, namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(name) from None
            raise

    async def write_tls_secret(
        self, namespace: str, name: str, data: Mapping[str, str], *, resource_version: str
    ) -> None:
        """Replace the Secret's data if it is still at `resource_version`, else `Conflict`."""
        patch = {"metadata": {"resourceVersion": resource_version}, "data": _encoded(data)}
        try:
            await asyncio.to_thread(
                self.core.patch_namespaced_secret, name, namespace, patch,
                _content_type=MERGE_PATCH,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status in {404, 409}:
                raise Conflict(name) from None
            raise

    async def set_ca_bundle(self, configuration: str, ca_bundle: str) -> bool:
        """Make every webhook of the MutatingWebhookConfiguration trust `ca_bundle` (base64);
        True if it was written. The whole `webhooks` list is sent (a merge patch replaces
        lists), with the resourceVersion read as precondition (helm may be upgrading it)."""
        for _ in range(3):
            try:
                current: Any = await asyncio.to_thread(
                    self.admission.read_mutating_webhook_configuration, configuration
                )
            except ApiException as exc:
                if exc.status == 404:
                    raise LookupError(
                        f"MutatingWebhookConfiguration {configuration} does not exist; the "
                        "chart creates it. Fix: `helm upgrade` the datapin release, or set "
                        "DATAPIN_WEBHOOK_CONFIGURATION to the configuration's name"
                    ) from None
                raise
            raw: Any = self.api.sanitize_for_serialization(current)  # type: ignore[no-untyped-call]
            webhooks = raw.get("webhooks") or []
            if all((w.get("clientConfig") or {}).get("caBundle") == ca_bundle for w in webhooks):
                return False
            for webhook in webhooks:
                webhook.setdefault("clientConfig", {})["caBundle"] = ca_bundle
            patch = {
                "metadata": {"resourceVersion": raw["metadata"]["resourceVersion"]},
                "webhooks": webhooks,
            }
            try:
                await asyncio.to_thread(
                    self.admission.patch_mutating_webhook_configuration, configuration, patch,
                    _content_type=MERGE_PATCH,
                )  # fmt: skip
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
            return True
        raise Conflict(configuration)


def _encoded(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def _parse_selector(selector: str) -> dict[str, str]:
    """An equality-based label selector, `k=v,k2=v2` (all the settings accept)."""
    pairs = (part.split("=", 1) for part in selector.split(",") if part.strip())
    return {k.strip(): v.strip() for k, v in pairs}


def _matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    have = labels or {}
    return all(have.get(k) == v for k, v in selector.items())
