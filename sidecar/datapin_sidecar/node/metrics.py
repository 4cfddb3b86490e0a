"""Prometheus metrics of the sidecar and the node agent, on an injected registry.

Design:

* No global metrics. `Metrics(registry)` creates every family on the registry it is given; the
  program's app factory makes one `CollectorRegistry` and hands it to the HTTP server and to
  whoever observes. Tests build as many independent programs as they like in one process.
* Names follow the Prometheus conventions: `datapin_` prefix (written out in each declaration,
  so a name copied from a dashboard finds its family here), base units (`_bytes`, `_seconds`),
  `_total` on counters, `_info` gauges set to 1 carrying labels, ratios in 0..1.
* The per-dataset counters of a `Result` are one table (`TALLIES`, by `Result` field), which
  declares them, creates their series and adds a result up.
* Labels are bounded: `dataset` (a Dataset name), `mode` (reflink, hardlink, copy, none),
  `result` (success, noop, error), `reason` (a short fixed label from `errors.py` or the S3
  client, never request data). The node is *not* a label we set: it is a property of the scrape
  target, added by the PodMonitor's relabelling (`__meta_kubernetes_pod_node_name` -> `node`),
  which is what the dashboard groups by.
* Series that a dashboard divides or sums are created at zero when a dataset is first seen
  (`dataset()`), so "no errors yet" reads as 0, not as "no data", and a hit ratio exists from
  the first materialise on.
* Secrets cannot reach a metric: no label takes a value that came from a credential source.

Sidecar metrics come from `Result` (what a materialise did) and from the error that ended one;
node metrics from the agent's statvfs and GC reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from datapin_sidecar.csi.volume import PublishResult
from datapin_sidecar.engine.materialize import Result
from datapin_sidecar.errors import DatapinError, Refusal, RemoteCause, RemoteError
from datapin_sidecar.peers.events import Direction

#: Error reasons created at zero for every dataset (the `reason` of each error class, and the
#: `cause` of `RemoteError`s, which is the more useful label for remote failures: the labelled
#: `RemoteCause`s, `remote` among them).
ERROR_REASONS: Final = (
    "usage",
    "revision",
    "manifest",
    "missing",
    "corrupt",
    "destination",
    "link",
    *(cause.value for cause in RemoteCause if cause.labelled),
    "stopped",
    "error",
)
#: Retry reasons created at zero: the client's own labels and the S3 codes B2 sends most.
RETRY_REASONS: Final = (
    "timeout",
    "connection",
    "truncated",
    "md5_mismatch",
    "credentials_rotated",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
)
LINK_MODES: Final = ("reflink", "hardlink", "copy")
#: Why a peer exchange failed (`peers.client`, `peers.transfer`), created at zero.
PEER_ERROR_REASONS: Final = (
    "connection",
    "timeout",
    "tls",
    "http_4xx",
    "http_5xx",
    "protocol",
    "truncated",
    "overlong",
    "corrupt",
)
#: The agent's tasks, the `task` label of `datapin_agent_item_errors_total` (housekeeping `Task`).
AGENT_TASKS: Final = ("roots", "collect", "slots", "reap", "scan", "builds", "prefetch")
#: Materialise latency: a no-op is ~1 ms, a warm start of a large revision seconds, a cold one
#: minutes.
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
#: NodePublishVolume latency: a warm publish (two bind mounts) takes milliseconds whatever the
#: tree's size; building a tree seconds to minutes.
PUBLISH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, *DURATION_BUCKETS[4:])


def error_reason(exc: BaseException) -> str:
    """The `reason` label of an error that ended a materialise."""
    if isinstance(exc, RemoteError):
        return exc.cause.value if exc.cause.labelled else RemoteCause.REMOTE.value
    if isinstance(exc, DatapinError):
        return exc.reason
    return "error"


#: What `observe` adds up per dataset: the `Result` field each counter counts, and the counter's
#: name and help.
TALLIES: Final = {
    "hits": (
        "datapin_cache_hit_objects_total",
        "Files linked from objects already in the node cache.",
    ),
    "hit_bytes": (
        "datapin_cache_hit_bytes_total",
        "Bytes of files linked from objects already in the node cache.",
    ),
    "misses": (
        "datapin_cache_miss_objects_total",
        "Files whose object was not in the node cache and had to be fetched.",
    ),
    "miss_bytes": (
        "datapin_cache_miss_bytes_total",
        "Bytes of files whose object was not in the node cache.",
    ),
    "fetched_objects": (
        "datapin_remote_fetched_objects_total",
        "Objects downloaded from the remote (S3 / B2) by this process.",
    ),
    "fetched_bytes": (
        "datapin_remote_fetched_bytes_total",
        "Bytes downloaded from the remote (S3 / B2) by this process: the egress bill.",
    ),
    "waited_objects": (
        "datapin_remote_waited_objects_total",
        "Objects another process on the node was downloading, waited for instead.",
    ),
}


@dataclass(frozen=True, slots=True)
class _Families:
    """Declares metric families on one registry (None: created but never exported)."""

    registry: CollectorRegistry | None

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, *labels: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)


class Metrics:
    """Every metric datapin exports. The node families (volume, cache, GC, prefetch) are only
    registered for the agent: from a sidecar they would be zeros next to the agent's values.
    """

    def __init__(self, registry: CollectorRegistry, *, role: str = "sidecar") -> None:
        self.registry = registry
        pod = _Families(registry)
        # -- per dataset: what materialising and prefetching did --------------------------------
        #: The `TALLIES` counters, by `Result` field.
        self.tallies = {
            field: pod.counter(name, doc, "dataset") for field, (name, doc) in TALLIES.items()
        }
        self.errors = pod.counter(
            "datapin_fetch_errors_total",
            "Materialises or prefetches that failed, by reason.",
            "dataset",
            "reason",
        )
        self.retries = pod.counter(
            "datapin_remote_retries_total",
            "Remote requests retried, by reason.",
            "dataset",
            "reason",
        )
        self.linked = pod.counter(
            "datapin_objects_linked_total",
            "Files placed into trees, by link mode.",
            "dataset",
            "mode",
        )
        self.duration = pod.histogram(
            "datapin_materialize_duration_seconds",
            "Time to materialise a revision, by main link mode and result.",
            "dataset",
            "mode",
            "result",
            buckets=DURATION_BUCKETS,
        )
        self.revision = pod.gauge(
            "datapin_revision_info",
            "The revision served (1): the ref the user asked for, the pin it resolved to, and "
            "the folders of it served (path; empty: all of it).",
            "dataset",
            "revision",
            "pin",
            "path",
        )
        self.last_success = pod.gauge(
            "datapin_last_success_timestamp_seconds",
            "Unix time of the last successful materialise or prefetch.",
            "dataset",
        )
        self.ready = pod.gauge(
            "datapin_ready",
            "1 once every dataset of the pod is published (the startupProbe's answer).",
        )
        self.annotation_errors = pod.counter(
            "datapin_annotations_errors_total",
            "Times the annotations file could not be read or parsed (previous pins kept).",
        )
        # -- per node: the cache and its volume (agent) -----------------------------------------
        node = _Families(registry if role == "agent" else None)
        self.cache_bytes = node.gauge("datapin_cache_bytes", "Bytes of objects in the node cache.")
        self.cache_objects = node.gauge("datapin_cache_objects", "Objects in the node cache.")
        self.volume_size = node.gauge("datapin_volume_size_bytes", "Size of the node volume.")
        self.volume_used = node.gauge(
            "datapin_volume_used_bytes", "Bytes used on the node volume (cache and workspaces)."
        )
        self.volume_free = node.gauge("datapin_volume_free_bytes", "Bytes free on the node volume.")
        self.volume_inodes = node.gauge("datapin_volume_inodes", "Inodes of the node volume.")
        self.volume_inodes_used = node.gauge(
            "datapin_volume_inodes_used", "Inodes used on the node volume."
        )
        self.watermark = node.gauge(
            "datapin_gc_watermark_ratio",
            "GC watermarks as a fraction of the volume (kind: bytes|inodes, level: high|low).",
            "kind",
            "level",
        )
        self.evicted_objects = node.counter(
            "datapin_cache_evictions_total", "Objects evicted from the node cache by the GC."
        )
        self.evicted_bytes = node.counter(
            "datapin_cache_evicted_bytes_total",
            "Bytes of objects evicted from the node cache by the GC.",
        )
        self.gc_runs = node.counter(
            "datapin_gc_runs_total",
            "GC passes that had to evict, by result (reached: down to the low watermark; "
            "short: everything left is in use; error).",
            "result",
        )
        self.workspaces_removed = node.counter(
            "datapin_workspaces_removed_total",
            "Workspaces of pods no longer on the node, removed by the agent.",
        )
        self.slots_removed = node.counter(
            "datapin_download_slots_removed_total",
            "Abandoned partial downloads removed by the agent.",
        )
        self.prefetch = node.gauge(
            "datapin_prefetch_revisions",
            "Revisions on the agent's prefetch list, by state (warm, pending, failed).",
            "state",
        )
        self.item_errors = node.counter(
            "datapin_agent_item_errors_total",
            "Items (a file, a directory, a workspace, a prefetch entry) the agent skipped "
            "because they could not be handled, by task; the rest of the work went on.",
            "task",
        )
        # -- the node plugin (agent in CSI mode) ---------------------------------------------
        self.publish_seconds = node.histogram(
            "datapin_csi_publish_seconds",
            "NodePublishVolume latency, by result: warm (the shared tree was built), built (it "
            "was built for this call), refused (access not proven, bad request), failed.",
            "result",
            buckets=PUBLISH_BUCKETS,
        )
        self.refusals = node.counter(
            "datapin_csi_refusals_total",
            "Volumes the node plugin refused, by reason.",
            "reason",
        )
        self.shared_trees = node.gauge(
            "datapin_csi_shared_trees", "Shared read-only trees built on the node."
        )
        self.published_volumes = node.gauge(
            "datapin_csi_published_volumes", "CSI volumes published into pods on the node."
        )
        self.switches = node.counter(
            "datapin_csi_switches_total",
            "Live switches of a published volume to a new pin, by result (ok, failed).",
            "result",
        )
        # -- peer fetch (agent) ------------------------------------------------------------------
        self.peer_bytes = node.counter(
            "datapin_peer_bytes_total",
            "Bytes of objects that crossed between agents, by direction: received (from the "
            "object's home instead of the remote: egress saved), served (to an asker), delivered "
            "and stored (a lease holder's copy to the object's home).",
            "direction",
        )
        self.peer_objects = node.counter(
            "datapin_peer_objects_total",
            "Objects that crossed between agents, by direction (as datapin_peer_bytes_total).",
            "direction",
        )
        self.peer_errors = node.counter(
            "datapin_peer_errors_total",
            "Peer exchanges that failed, by reason; their objects came from the remote instead.",
            "reason",
        )
        self.peer_members = node.gauge(
            "datapin_peer_members", "Agents taking part in peer fetch, this one included."
        )
        if role == "agent":
            for direction in Direction:
                self.peer_bytes.labels(direction.value)
                self.peer_objects.labels(direction.value)
            for reason in PEER_ERROR_REASONS:
                self.peer_errors.labels(reason)
            for published in PublishResult:
                self.publish_seconds.labels(published.value)
            for refusal in Refusal:
                self.refusals.labels(refusal.value)
            for result_name in ("ok", "failed"):
                self.switches.labels(result_name)
            for task in AGENT_TASKS:
                self.item_errors.labels(task)
            for result in ("reached", "short", "error"):
                self.gc_runs.labels(result)
            for state in ("warm", "pending", "failed"):
                self.prefetch.labels(state).set(0)
        self._known: set[str] = set()
        self._pins: dict[str, tuple[str, str, str]] = {}

    # -- sidecar ------------------------------------------------------------------------------

    def dataset(self, name: str) -> None:
        """Create the dataset's series at zero (see the module doc)."""
        if name in self._known:
            return
        self._known.add(name)
        for family in self.tallies.values():
            family.labels(name)
        for reason in ERROR_REASONS:
            self.errors.labels(name, reason)
        for reason in RETRY_REASONS:
            self.retries.labels(name, reason)
        for mode in LINK_MODES:
            self.linked.labels(name, mode)
            for outcome in ("success", "noop"):
                self.duration.labels(name, mode, outcome)
        self.duration.labels(name, "none", "noop")
        self.duration.labels(name, "none", "error")

    def tally(self, dataset: str, counts: Mapping[str, int]) -> None:
        """Add `counts` (by `Result` field, a subset of `TALLIES`) to the dataset's counters."""
        self.dataset(dataset)
        for field, n in counts.items():
            self.tallies[field].labels(dataset).inc(n)

    def observe(self, dataset: str, result: Result, *, now: float) -> None:
        """Count what one successful materialise (or prefetch) did."""
        self.tally(dataset, {field: getattr(result, field) for field in TALLIES})
        self._retries(dataset, result.retries.items())
        for mode, n in result.modes.items():
            self.linked.labels(dataset, mode).inc(n)
        outcome = "noop" if result.noop else "success"
        self.duration.labels(dataset, result.mode, outcome).observe(result.seconds)
        self.last_success.labels(dataset).set(now)

    def observe_failure(self, dataset: str, exc: BaseException, *, seconds: float) -> None:
        self.dataset(dataset)
        self.errors.labels(dataset, error_reason(exc)).inc()
        self.duration.labels(dataset, "none", "error").observe(seconds)

    def _retries(self, dataset: str, items: Iterable[tuple[str, int]]) -> None:
        for reason, n in items:
            self.retries.labels(dataset, reason).inc(n)

    def serving(self, dataset: str, *, ref: str, pin: str, path: str = "") -> None:
        """`datapin_revision_info`: one series per dataset, the one being served. The part
        (`path`, a comma list of folders) is a label here only: counters stay per dataset."""
        old = self._pins.get(dataset)
        if old == (ref, pin, path):
            return
        if old is not None:
            self.revision.remove(dataset, *old)
        self.revision.labels(dataset, ref, pin, path).set(1)
        self._pins[dataset] = (ref, pin, path)

    # -- peer fetch -------------------------------------------------------------------------

    def peer_events(self) -> PeerCounters:
        """What the peer ends report, counted here (`peers.events.PeerEvents`)."""
        return PeerCounters(self)


@dataclass(frozen=True, slots=True)
class PeerCounters:
    """`peers.events.PeerEvents` on the agent's metrics."""

    metrics: Metrics

    def moved(self, direction: Direction, nbytes: int) -> None:
        self.metrics.peer_bytes.labels(direction.value).inc(nbytes)
        self.metrics.peer_objects.labels(direction.value).inc()

    def error(self, reason: str) -> None:
        self.metrics.peer_errors.labels(reason).inc()
