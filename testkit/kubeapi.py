"""A Kubernetes API for operator tests: kmock's emulator on 127.0.0.1, plus a tiny client.

kmock (the mock server kopf's own tests use) keeps objects in memory and serves list, watch,
get, create, merge-patch and delete for the resources declared here. Unlike a real API server
it does not default `metadata.namespace` from the URL, set uids, generations or
resourceVersions, or run admission, so the helpers below fill `namespace` in, and the
webhook is called by the tests themselves with real AdmissionReview bodies.

For the faults a real cluster shows, the emulator can refuse requests (`refuse`: 403 as RBAC
does), fail creates in a namespace that does not exist (`missing_namespaces`, 404 as the API
server answers), and start without the Dataset CRD (`emulator(crd=False)`): creating the CRD
object then makes Datasets served, discovery included, as on a real server.

`running_operator()` runs the real operator (`datapin_operator.main.run`) in-process against
it and stops it on exit, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kmock

#: (api path prefix, plural) -> (kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, bool, list[str]]] = {
    "v1/namespaces": ("Namespace", False, []),
    "v1/nodes": ("Node", False, []),
    "v1/pods": ("Pod", True, ["status"]),
    "v1/secrets": ("Secret", True, []),
    "v1/configmaps": ("ConfigMap", True, []),
    "v1/events": ("Event", True, []),
    "batch/v1/jobs": ("Job", True, ["status"]),
    "datapin.dev/v1alpha1/datasets": ("Dataset", True, ["status"]),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": (
        "MutatingWebhookConfiguration",
        False,
        [],
    ),
    "admissionregistration.k8s.io/v1/validatingwebhookconfigurations": (
        "ValidatingWebhookConfiguration",
        False,
        [],
    ),
}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server does that the operator relies on.

    On create: `generateName` (kopf's Events use it), `metadata.namespace` from the URL, a
    uid, and a resourceVersion (kopf's JSON patches test it). On a merge patch of an object
    that carries `metadata.resourceVersion`: the precondition is checked (409 Conflict when
    stale, as the API server does) and the version is bumped. And a patch whose body is an
    object sent as `application/json-patch+json` is refused with 400 as the API server
    refuses it (the generated client's default content type; kmock would accept it).
    """

    #: Namespaces that do not exist: creates in them fail with 404 as on a real server (kmock
    #: itself has no namespaces, and most tests never create theirs).
    missing_namespaces: set[str]
    #: (plural, namespace) -> HTTP status every request for it gets (e.g. 403 for RBAC).
    refuse: dict[tuple[str, str | None], int]

    async def _handle(self, request: Any) -> Any:
        data = request.data if request.resource is not None else None
        if request.resource is not None:
            self._refusal(request)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            self._served_when_defined(request, data)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(4)
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
        if request.action == kmock.action.UPDATE and request.method == "PATCH":
            content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type == "application/json-patch+json" and not isinstance(data, list):
                raise kmock.KubernetesError(
                    status=400,
                    reason="BadRequest",
                    message="json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                )
            if isinstance(data, dict):
                self._precondition(request, data)
        return await super()._handle(request)

    def _refusal(self, request: Any) -> None:
        status = getattr(self, "refuse", {}).get((request.resource.plural, request.namespace))
        if status is not None:
            reason = {401: "Unauthorized", 403: "Forbidden"}.get(status, "InternalError")
            raise kmock.KubernetesError(
                status=status,
                reason=reason,
                message=f"{request.resource.plural} is refused here ({status} {reason})",
            )
        namespace = request.namespace
        if request.action == kmock.action.CREATE and namespace in getattr(
            self, "missing_namespaces", set()
        ):
            raise kmock.KubernetesError(
                status=404,
                reason="NotFound",
                message=f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    def _served_when_defined(self, request: Any, crd: dict[str, Any]) -> None:
        """A created CRD's resource is served (discovery, list, watch) from then on, as the
        API server does once a CRD is established."""
        if request.resource.plural != "customresourcedefinitions":
            return
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            resource = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.resources[resource] = {
                "kind": names.get("kind"),
                "namespaced": spec.get("scope") == "Namespaced",
                "subresources": sorted((version.get("subresources") or {}).keys()),
                "verbs": ["list", "watch", "get", "create", "patch", "update", "delete"],
            }

    def _precondition(self, request: Any, data: dict[str, Any]) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return  # kmock answers 404 itself
        current = self._objects[key]
        have = (current.get("metadata") or {}).get("resourceVersion")
        if have is None:
            return
        asked = (data.get("metadata") or {}).get("resourceVersion")
        if asked is not None and str(asked) != str(have):
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message=f"the object has been modified (resourceVersion {asked} != {have})",
            )
        bumped = str(int(have) + 1) if str(have).isdigit() else have
        data.setdefault("metadata", {})["resourceVersion"] = bumped


def _path(resource: str, namespace: str | None, name: str | None = None) -> str:
    group_version, plural = resource.rsplit("/", 1)
    root = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{root}{ns}/{plural}" + (f"/{name}" if name else "")


class Api:
    """create/get/patch/list against the emulator, as JSON."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def create(self, resource: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = dict(obj.get("metadata") or {})
        kind, namespaced, _ = RESOURCES[resource]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("resourceVersion", "1")  # kopf's JSON patches test it
        body = {**obj, "metadata": meta}
        body.setdefault("kind", kind)
        namespace = meta.get("namespace") if namespaced else None
        async with self.session.post(self.url + _path(resource, namespace), json=body) as resp:
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    async def get(self, resource: str, name: str, namespace: str | None = None) -> Any:
        async with self.session.get(self.url + _path(resource, namespace, name)) as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            return await resp.json()

    async def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        async with self.session.get(self.url + _path(resource, namespace)) as resp:
            resp.raise_for_status()
            items: list[dict[str, Any]] = (await resp.json()).get("items", [])
            return items

    async def patch(
        self, resource: str, name: str, patch: Mapping[str, Any], namespace: str | None = None
    ) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"}
        url = self.url + _path(resource, namespace, name)
        async with self.session.patch(url, json=patch, headers=headers) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def delete(self, resource: str, name: str, namespace: str | None = None) -> None:
        async with self.session.delete(self.url + _path(resource, namespace, name)) as resp:
            resp.raise_for_status()

    async def wait_for(
        self,
        resource: str,
        name: str,
        check: Any,
        *,
        namespace: str | None = None,
        within: float = 30.0,
    ) -> Any:
        """Poll until `check(obj)` is truthy; the object. On timeout: AssertionError with it."""
        obj = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            obj = await self.get(resource, name, namespace)
            if obj is not None and check(obj):
                return obj
            await asyncio.sleep(0.1)
        raise AssertionError(f"{resource} {namespace}/{name} never passed the check: {obj}")

    async def wait_for_true(self, check: Any, *, within: float = 30.0) -> None:
        """Poll until `check()` (plain or async) is truthy; AssertionError on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never true within {within} s: {check}")


#: The resource a Dataset CRD defines (left out by `emulator(crd=False)`).
DATASETS = "datapin.dev/v1alpha1/datasets"


@contextlib.asynccontextmanager
async def emulator(*, crd: bool = True) -> AsyncIterator[tuple[Emulator, Api]]:
    """The emulator and a client. `crd=False`: Datasets are not served until a test creates
    their CustomResourceDefinition (as `kubectl apply` of the chart's CRD would)."""
    async with (
        Emulator() as k8s,
        kmock.Server(k8s),
        aiohttp.ClientSession() as session,
    ):
        k8s.refuse, k8s.missing_namespaces = {}, set()
        for resource, (kind, namespaced, subresources) in RESOURCES.items():
            if resource == DATASETS and not crd:
                continue
            k8s.resources[resource] = {
                "kind": kind,
                "namespaced": namespaced,
                "subresources": subresources,
                "verbs": ["list", "watch", "get", "create", "patch", "update", "delete"],
            }
        yield k8s, Api(str(k8s.url).rstrip("/"), session)


def events_of(events: list[dict[str, Any]], *, kind: str, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if (e.get("involvedObject") or {}).get("kind") == kind
        and (e.get("involvedObject") or {}).get("name") == name
    ]


def admission_review(
    obj: Mapping[str, Any], *, namespace: str, dry_run: bool = False
) -> dict[str, Any]:
    """A real AdmissionReview v1 request for creating `obj`, as the API server sends it."""
    kind = str(obj["kind"])
    group, _, version = str(obj["apiVersion"]).rpartition("/")
    plural = {"Job": "jobs", "Pod": "pods"}[kind]
    gvk = {"group": group, "version": version, "kind": kind}
    gvr = {"group": group, "version": version, "resource": plural}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": (obj.get("metadata") or {}).get("name", ""),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def call_webhook(
    session: aiohttp.ClientSession, webhook: Mapping[str, Any], review: Mapping[str, Any]
) -> dict[str, Any]:
    """POST `review` to a registered webhook as the API server would: HTTPS, verifying the
    server against the configuration's caBundle (and its hostname)."""
    import base64  # noqa: PLC0415

    config = webhook["clientConfig"]
    context = ssl.create_default_context(cadata=base64.b64decode(config["caBundle"]).decode())
    async with session.post(config["url"], json=review, ssl=context) as resp:
        resp.raise_for_status()
        result: dict[str, Any] = await resp.json()
        return result
