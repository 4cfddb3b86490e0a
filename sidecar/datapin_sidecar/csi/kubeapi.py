"""The agent's read-only view of the Kubernetes API: Datasets, and the pods of its node.

The node plugin needs two things from the API server and nothing else: the Dataset a volume
names (`get_dataset`, in the pod's namespace) and the `datapin.dev/pins` annotation of the pods
on its own node (`pods`/`watch_pods`, with a `spec.nodeName` field selector), to follow a
live switch. Its RBAC is exactly get/list/watch on those two resources (the chart's).

It is a small aiohttp client rather than the generated `kubernetes` client: that one is
synchronous (each call would take a worker thread, a watch one for good), and these are three
GETs. In the cluster it uses the pod's service account: the projected token is re-read every
`TOKEN_SECONDS` (kubelet rotates it), the CA from the service account directory. Tests point
it at kmock's emulator over plain HTTP.

Errors: a 404 of a Dataset is `None` (the caller says which Dataset is missing where); any
other failure is a `KubeApiError` with the status and the server's message, never the token.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from datapin_sidecar.errors import KubeApiError

#: How often the service account token is re-read (kubelet refreshes it well before expiry).
TOKEN_SECONDS: Final = 60.0
#: The Dataset resource (the operator's CRD).
DATASETS: Final = "/apis/datapin.dev/v1alpha1"
#: How long one watch request stays open before it is renewed.
WATCH_SECONDS: Final = 300
_SA_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeConfig:
    """Where the API server is and how to authenticate."""

    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str]) -> KubeConfig | None:
        """The pod's own API access (None outside a cluster)."""
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(
            url=f"https://{host}:{port}",
            token_file=_SA_DIR / "token",
            ca_file=_SA_DIR / "ca.crt",
        )


class KubeApi:
    """GETs and watches against the API server (see the module doc)."""

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._token_read = float("-inf")

    async def __aenter__(self) -> KubeApi:
        ssl_context: ssl.SSLContext | bool = True
        if self.config.ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=str(self.config.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        token_file = self.config.token_file
        if token_file is None:
            return {}
        now = time.monotonic()
        if now - self._token_read >= TOKEN_SECONDS:
            # A small file on a tmpfs kubelet projects: reading it does not block in practice.
            self._token = token_file.read_text().strip()
            self._token_read = now
        return {"Authorization": f"Bearer {self._token}"}

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET a JSON document; None for 404."""
        assert self._session is not None  # noqa: S101 - only inside `async with`
        async with self._session.get(
            self.config.url + path,
            params=dict(params or {}),
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise KubeApiError(path=path, status=resp.status, message=await _message(resp))
            return await resp.json()

    async def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Dataset `namespace/name`, or None if there is none."""
        found: dict[str, Any] | None = await self.get(
            f"{DATASETS}/namespaces/{quote(namespace, safe='')}/datasets/{quote(name, safe='')}"
        )
        return found

    async def pods(self, node: str) -> tuple[list[dict[str, Any]], str]:
        """The pods on `node` and the list's resourceVersion (to watch from)."""
        body = await self.get("/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"})
        items: list[dict[str, Any]] = list((body or {}).get("items") or [])
        return items, str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")

    async def watch_pods(
        self, node: str, resource_version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, pod) of the pods on `node` from `resource_version`, until the server
        ends the watch (the caller lists and watches again)."""
        assert self._session is not None  # noqa: S101 - only inside `async with`
        params = {
            "watch": "true",
            "fieldSelector": f"spec.nodeName={node}",
            "timeoutSeconds": str(WATCH_SECONDS),
            "allowWatchBookmarks": "true",
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        async with self._session.get(
            self.config.url + "/api/v1/pods", params=params, headers=self._headers()
        ) as resp:
            if resp.status != 200:
                raise KubeApiError(
                    path="/api/v1/pods?watch", status=resp.status, message=await _message(resp)
                )
            async for line in resp.content:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    obj = event.get("object")
                    if isinstance(obj, dict):
                        yield str(event.get("type", "")), obj


async def _message(resp: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(Exception):
        body = await resp.json(content_type=None)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])[:300]
    return resp.reason or ""
