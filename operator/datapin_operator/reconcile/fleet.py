"""The node agents: what they keep warm, and what they say they hold.

Agents never talk to the API server (they run on every node, so their RBAC would be the
cluster's widest). The operator writes, and the agents read files kubelet projects:

* ConfigMap `<prefetch_configmap>` in the operator's namespace, one key per node,
  `<node>.json` = `{"revisions": [<DatasetSettings with a pin>, ...]}` (the agent's
  `DATAPIN_PREFETCH_FILE`, `agent.read_prefetch_list`). A node with nothing to prefetch has no
  key; the agent reads a missing file as an empty list. Entries are named
  `<namespace>.<dataset>` (namespaces hold no dots, so the name is unambiguous). An entry for
  part of a revision (a prefetch entry `v2:images/train`, a named revision with folders)
  carries `paths` (the part's folders); the whole revision has none.
* Secret `<agent_credentials_secret>`: a copy of each prefetched Dataset's key pair under
  `<namespace>.<dataset>.access_key_id` / `.secret_access_key`, which the entries name through
  `credentials_dir` + `access_key_id_file`/`secret_access_key_file`. The copy is needed because
  a pod can only mount Secrets of its own namespace; it holds only Datasets with prefetch.

Reports flow back by pull: the operator lists the agent pods and GETs each one's `/status`
(`prefetch: {"<name>@<pin>[:<folders>]": {"state": "warm"|"pending"|"failed", "last_error":
...}}`: `<name>@<pin>` for a whole revision, `<name>@<pin>:<Part.label>` for a part),
cached for a few seconds so reconciling many Datasets costs one round. Each round is counted
(`datapin_operator_agent_reports_total` by result, `datapin_operator_agents` by state).

The lists are written only once every Dataset the operator knows of has been reconciled since
start, so a restart never publishes a list that forgets another Dataset's revisions.

Writing them may fail for reasons that are the cluster's, not a Dataset's: the operator's
namespace does not exist (`datapin-operator dev` against a cluster without the chart), RBAC
forbids it, the API server is away. `sync` then raises `AgentConfigError` naming the object,
the namespace and the fix; the controller reports it only on Datasets that ask for prefetch
(`Prefetched=False`, `AgentConfigFailed`) and still writes every other part of their status.
The Secret is written before the ConfigMap and a failed Secret write stops there, so an agent
never reads an entry whose keys are not in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.part import Part
from datapin_sidecar.node.settings import DatasetSettings
from kubernetes.client.exceptions import ApiException

from datapin_operator.api.models import NodePrefetch, PrefetchStatus, Remote
from datapin_operator.errors import AgentConfigError
from datapin_operator.kube import API_ERRORS, Kube
from datapin_operator.metrics import OperatorMetrics
from datapin_operator.reconcile.remotecheck import RemoteKeys
from datapin_operator.settings import Settings

log = logging.getLogger(__name__)

DatasetKey = tuple[str, str]  # (namespace, name)
#: How long agent reports are reused across Datasets' reconciles.
_REPORT_TTL: Final = 3.0


def agent_name(namespace: str, dataset: str) -> str:
    return f"{namespace}.{dataset}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefetchEntry:
    """One revision of one Dataset to keep warm on some nodes."""

    namespace: str
    dataset: str
    pin: str
    layout: LayoutChoice
    ref: str
    remote: Remote
    keys: RemoteKeys = field(repr=False)
    nodes: frozenset[str]
    #: The folders to keep warm; `Part.WHOLE`: the whole revision.
    part: Part = Part.WHOLE

    @property
    def name(self) -> str:
        return agent_name(self.namespace, self.dataset)

    @property
    def revision(self) -> str:
        """The revision as agents report it and `warmRevisions` lists it: `<pin>` for the
        whole, `<pin>:<folders>` for a part."""
        return f"{self.pin}:{self.part.label}" if not self.part.whole else self.pin

    @property
    def report_key(self) -> str:
        """The key of this entry in an agent's `/status` `prefetch` map."""
        return f"{self.name}@{self.revision}"


def render(
    entries: Iterable[PrefetchEntry], *, credentials_dir: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(ConfigMap data, Secret data) for all entries: pure, deterministic."""
    per_node: dict[str, list[dict[str, Any]]] = {}
    secret: dict[str, str] = {}
    for e in sorted(entries, key=lambda e: (e.namespace, e.dataset, e.pin, e.part.paths)):
        id_file, secret_file = f"{e.name}.access_key_id", f"{e.name}.secret_access_key"
        secret[id_file] = e.keys.access_key_id
        secret[secret_file] = e.keys.secret_access_key
        item = DatasetSettings(
            name=e.name,
            remote=e.remote.url,
            endpoint_url=e.remote.endpoint,
            region=e.remote.region,
            addressing=e.remote.addressing,
            layout=e.layout,
            credentials_dir=credentials_dir,  # type: ignore[arg-type]
            access_key_id_file=id_file,
            secret_access_key_file=secret_file,
            pin=e.pin,
            ref=e.ref,
            paths=e.part.to_list(),
        ).model_dump(mode="json", exclude_none=True)
        if not item["paths"]:
            del item["paths"]  # the whole revision: entries read as they did before parts
        for node in sorted(e.nodes):
            per_node.setdefault(node, []).append(item)
    data = {
        f"{node}.json": json.dumps({"revisions": items}, sort_keys=True, separators=(",", ":"))
        for node, items in per_node.items()
    }
    return data, secret


class Fleet:
    """The prefetch lists of all Datasets, and the agents' reports."""

    def __init__(
        self, kube: Kube, settings: Settings, *, metrics: OperatorMetrics | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self._entries: dict[DatasetKey, list[PrefetchEntry]] = {}
        self._lock = asyncio.Lock()
        self._reports: dict[str, dict[str, dict[str, str]]] = {}
        self._agents: dict[str, str] = {}  # node -> agent pod phase
        self._reports_at = -_REPORT_TTL
        self._last_error: str | None = None  # logged once per distinct failure

    def set(self, key: DatasetKey, entries: list[PrefetchEntry]) -> None:
        self._entries[key] = entries

    def knows(self, key: DatasetKey) -> bool:
        return key in self._entries

    def drop(self, key: DatasetKey) -> None:
        self._entries.pop(key, None)

    async def sync(self, known: Iterable[DatasetKey]) -> bool:
        """Write the lists if every known Dataset has been seen; True if anything changed."""
        waiting = set(known) - set(self._entries)
        if waiting:
            log.debug("prefetch list: waiting for %d Dataset(s) to reconcile", len(waiting))
            return False
        async with self._lock:
            data, secret = render(
                (e for entries in self._entries.values() for e in entries),
                credentials_dir=self.settings.agent_credentials_dir,
            )
            ns = self.settings.namespace
            # The Secret first: an agent must never read an entry whose keys are not there yet.
            name = self.settings.agent_credentials_secret
            try:
                wrote = await self.kube.apply_secret(ns, name, secret)
                name = self.settings.prefetch_configmap
                wrote |= await self.kube.apply_configmap(ns, name, data)
            except API_ERRORS as exc:
                kind = "Secret" if name == self.settings.agent_credentials_secret else "ConfigMap"
                what = f"cannot write {kind} {ns}/{name}, which the node agents read"
                error = agent_config_error(exc, what=what, namespace=ns)
                if error.message != self._last_error:
                    log.warning("%s", error.message)
                self._last_error = error.message
                raise error from None
            if self._last_error is not None:
                log.info("the node agents' prefetch list and credentials are written again")
            self._last_error = None
            return wrote

    async def reports(self) -> tuple[dict[str, str], dict[str, dict[str, dict[str, str]]]]:
        """(node -> agent phase, node -> {"<name>@<pin>": {"state", "last_error"}})."""
        now = time.monotonic()
        if now - self._reports_at < _REPORT_TTL:
            return self._agents, self._reports
        pods = await self.kube.list_agent_pods(
            self.settings.namespace, self.settings.agent_selector
        )
        agents = {p.node: p.phase for p in pods if p.node}
        reports: dict[str, dict[str, dict[str, str]]] = {}
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def one(node: str, ip: str) -> None:
                url = f"http://{ip}:{self.settings.agent_port}/status"
                try:
                    async with http.get(url) as resp:
                        body = await resp.json(content_type=None)
                    reports[node] = dict(body.get("prefetch") or {})
                except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
                    log.info("agent on %s (%s) did not report: %s", node, url, exc)

            async with asyncio.TaskGroup() as tg:
                for p in pods:
                    if p.ip and p.node and p.phase == "Running":
                        tg.create_task(one(p.node, p.ip))
        failed = sum(1 for p in pods if p.ip and p.node and p.phase == "Running") - len(reports)
        self.metrics.reported(
            ok=len(reports), failed=max(failed, 0), silent=max(len(agents) - len(reports), 0)
        )
        self._agents, self._reports, self._reports_at = agents, reports, time.monotonic()
        return agents, reports


def agent_config_error(exc: BaseException, *, what: str, namespace: str) -> AgentConfigError:
    """The failure `what` (e.g. "cannot write ConfigMap datapin/datapin-prefetch ...") said
    with its fix; `namespace` is the operator's. The server's own message is not echoed
    beyond its status: it could quote the object's data."""
    status = exc.status if isinstance(exc, ApiException) else None
    if isinstance(exc, ApiException) and status == 404 and _missing_namespace(exc):
        return AgentConfigError(
            f"{what}: namespace {namespace} does not exist. Fix: install the datapin chart "
            f"into it (helm install datapin charts/datapin -n {namespace} --create-namespace), "
            "or set DATAPIN_NAMESPACE to the namespace the node agents run in"
        )
    if status in {401, 403}:
        said = "403 Forbidden" if status == 403 else "401 Unauthorized"
        return AgentConfigError(
            f"{what}: the operator may not ({said}). Fix: grant the operator its RBAC "
            "(helm upgrade the datapin release, or "
            f"`DATAPIN_NAMESPACE={namespace} datapin-operator rbac | kubectl apply -f -`)"
        )
    said = f"HTTP {status}" if status is not None else type(exc).__name__
    return AgentConfigError(
        f"{what}: the API server answered {said}. Fix: check the API server and the operator's "
        "logs; the write is retried at every resync"
    )


def _missing_namespace(exc: ApiException) -> bool:
    """A 404 on create means the namespace is missing (the API server's details say so)."""
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return True
    details = body.get("details") if isinstance(body, dict) else None
    kind = details.get("kind") if isinstance(details, dict) else None
    return kind in {None, "namespaces"}


def summarise(
    entries: list[PrefetchEntry],
    *,
    agents: Mapping[str, str],
    reports: Mapping[str, Mapping[str, Mapping[str, str]]],
) -> PrefetchStatus:
    """One Dataset's progress: a node is warm when its agent reports every pin warm.

    Each node also lists the revisions its agent reports warm (`warmRevisions`: `<pin>`, or
    `<pin>:<folders>` for a part): the webhook reads them to prefer, for a Job pinned to one,
    the nodes that already hold it (placement.py).

    The nodes counted are those the selector chose *and* that run an agent: a node without
    one can run no datapin pod, so it is not waited for.
    """
    targets = sorted({n for e in entries for n in e.nodes if n in agents})
    nodes = []
    for node in targets:
        report = reports.get(node, {})
        mine = [e for e in entries if node in e.nodes]
        states = {e: report.get(e.report_key, {}) for e in mine}
        warm = sum(1 for s in states.values() if s.get("state") == "warm")
        failed = [
            f"{e.ref}{_folders(e.part)} ({e.pin}): {s.get('last_error') or 'failed'}"
            for e, s in states.items()
            if s.get("state") == "failed"
        ]
        warm_pins = sorted({e.revision for e, s in states.items() if s.get("state") == "warm"})
        nodes.append(
            NodePrefetch(
                node=node, warm=warm, total=len(mine), failed=failed, warm_revisions=warm_pins
            )
        )
    warm_nodes = sum(1 for n in nodes if n.warm == n.total)
    return PrefetchStatus(
        summary=f"{warm_nodes}/{len(nodes)} nodes warm",
        warm_nodes=warm_nodes,
        total_nodes=len(nodes),
        nodes=nodes,
    )


def _folders(part: Part) -> str:
    return f" folders {part.label}" if not part.whole else ""
