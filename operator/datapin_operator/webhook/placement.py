"""Cache-aware placement: prefer the nodes that already hold a pod's pinned revisions.

A pod whose revision is in its node's cache starts in the time of a few hundred thousand
metadata operations; on a cold node it first downloads the revision. The node agents report
which prefetched pins they hold, and the operator writes that into each Dataset's status
(`status.prefetch.nodes[].warmRevisions`, `reconcile/fleet.summarise`). The webhook already
lists the namespace's Datasets for every admission, so this module only turns those statuses
into scheduling preferences: pure functions, a status and pins in, affinity terms out.

The choices, and why:

* **Preferred, never required.** A `preferredDuringSchedulingIgnoredDuringExecution` term only
  adds to a node's score; a pod whose warm nodes are full or gone is scheduled elsewhere and
  fetches what it lacks, exactly as without datapin's hint.
* **Node names, not the hostname label.** Agents report `spec.nodeName`; the term matches
  `matchFields: metadata.name`, which is that name by definition, whereas the
  `kubernetes.io/hostname` label differs from the node name on some clouds.
* **One term per dataset, the weight split between them.** A node warm for every dataset of
  the pod gets every term's weight, one warm for some of them a part: the scheduler prefers the
  nodes warm for all without an intersection that is often empty. The terms together weigh at
  most the configured weight (`DATAPIN_WARM_NODE_WEIGHT`, 1-100), so datapin's hint never
  outweighs more of the pod's own preferences than the admin chose, however many datasets.
* **At most `MAX_NODES` names per term** (the first by name, so the same status always gives
  the same spec). The pod template is stored with the Job and copied into every Pod; a few
  thousand node names would make each of them kilobytes larger and slow every scheduling pass
  that reads them, while preferring a hundred warm nodes is as good a hint as preferring all.
* **Kept:** everything the pod already says about placement (required node affinity, its own
  preferred terms, pod affinity and anti-affinity); the terms are appended. A pod with
  `spec.nodeName` set is not scheduled at all and gets nothing.
* **Parts.** Agents report a whole revision as `<pin>` and part of one as
  `<pin>:<folders>` (`Part.label`). A pod that asks for the whole pin prefers nodes warm for
  `<pin>`, never a part of it (the rest would still be fetched). A pod that asks for folders X
  of the pin prefers nodes warm for the whole pin, for exactly X, or for any part holding all
  of X (warm for `images`, asked for `images/train`): their caches hold every object it needs.
* **Tolerant reading.** The status may come from an older or newer operator: anything not
  shaped as expected counts as "nothing warm", never as a rejection.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from datapin_sidecar.engine.part import Part
from datapin_sidecar.errors import DatapinError

#: The most node names one term lists (see the module doc).
MAX_NODES: Final = 100
#: The node field a term matches: the node's name, which agents report.
NODE_NAME_FIELD: Final = "metadata.name"
PREFERRED: Final = "preferredDuringSchedulingIgnoredDuringExecution"


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmNodes:
    """The nodes whose agents report one dataset's pin (or its part) warm (sorted, at most
    `MAX_NODES`)."""

    dataset: str
    pin: str
    nodes: tuple[str, ...]
    part: Part = Part.WHOLE


def serves(reported: object, *, pin: str, part: Part) -> bool:
    """Whether a node warm for `reported` (a `warmRevisions` item) holds `part` of `pin`."""
    if not isinstance(reported, str):
        return False
    warm_pin, sep, label = reported.partition(":")
    if warm_pin != pin:
        return False
    if not sep:
        return True  # the whole pin serves any part of it
    if part.whole:
        return False
    try:
        held = Part.parse([label])
    except DatapinError:
        return False  # a newer agent's spelling: nothing warm, never a rejection
    return all(any(p == h or p.startswith(f"{h}/") for h in held.paths) for p in part.paths)


def warm_nodes(
    status: Mapping[str, Any] | None, *, dataset: str, pin: str, part: Part = Part.WHOLE
) -> WarmNodes:
    """The nodes a Dataset's status reports `pin` (or, for a part, one holding it) warm on."""
    prefetch = (status or {}).get("prefetch") if isinstance(status, Mapping) else None
    reported = prefetch.get("nodes") if isinstance(prefetch, Mapping) else None
    names = {
        str(node["node"])
        for node in (reported if isinstance(reported, list) else [])
        if isinstance(node, Mapping)
        and node.get("node")
        and isinstance(node.get("warmRevisions"), list)
        and any(serves(item, pin=pin, part=part) for item in node["warmRevisions"])
    }
    return WarmNodes(dataset=dataset, pin=pin, part=part, nodes=tuple(sorted(names)[:MAX_NODES]))


def preferred_terms(warm: Sequence[WarmNodes], *, weight: int) -> list[dict[str, Any]]:
    """One preferred node-affinity term per dataset warm somewhere; none if none is."""
    found = [w for w in warm if w.nodes]
    if not found:
        return []
    share = max(1, weight // len(found))
    return [
        {
            "weight": share,
            "preference": {
                "matchFields": [{"key": NODE_NAME_FIELD, "operator": "In", "values": list(w.nodes)}]
            },
        }
        for w in found
    ]


def prefer(pod_spec: Mapping[str, Any], terms: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A copy of `pod_spec` with `terms` appended to its preferred node affinity; everything
    else it says about placement kept. Unchanged without terms or with `nodeName` set."""
    spec = copy.deepcopy(dict(pod_spec))
    if not terms or spec.get("nodeName"):
        return spec
    affinity = spec.get("affinity") or {}
    node_affinity = affinity.get("nodeAffinity") or {}
    spec["affinity"] = {
        **affinity,
        "nodeAffinity": {
            **node_affinity,
            PREFERRED: [*(node_affinity.get(PREFERRED) or []), *copy.deepcopy(list(terms))],
        },
    }
    return spec
