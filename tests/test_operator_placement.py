"""Cache-aware placement (webhook/placement.py): Dataset statuses in, preferred node affinity out.

What users depend on: a pod pinned to revisions some nodes hold warm prefers those nodes, as a
preference the scheduler may ignore (never a requirement); nothing is added when no node is
warm; whatever the pod already says about placement is kept; the result is a valid pod spec
(kubernetes-validate, strict, oldest supported and newest Kubernetes). The end-to-end path,
through the real webhook over HTTPS, is in test_operator_webhook.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from datapin_operator.kube import DatasetListing
from datapin_operator.resolve.gitsource import GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings
from datapin_operator.webhook.admission import Admission
from datapin_operator.webhook.placement import (
    MAX_NODES,
    PREFERRED,
    WarmNodes,
    prefer,
    preferred_terms,
    warm_nodes,
)

VERSIONS = ("1.29", kubernetes_validate.latest_version())
PIN_A = "a" * 32 + ".dir"
PIN_B = "b" * 32 + ".dir"


def _status(*nodes: tuple[str, list[str]]) -> dict[str, Any]:
    """A Dataset status as the operator writes it, nodes with their warm pins."""
    return {
        "prefetch": {
            "summary": "n/a",
            "warmNodes": 0,
            "totalNodes": len(nodes),
            "nodes": [
                {
                    "node": name,
                    "warm": len(pins),
                    "total": 2,
                    "failed": [],
                    "warmRevisions": pins,
                }
                for name, pins in nodes
            ],
        }
    }


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


def _valid(spec: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(_pod(spec), version, strict=True)


SPEC: dict[str, Any] = {"containers": [{"name": "train", "image": "python:3.12-slim"}]}


def test_a_pod_prefers_the_nodes_its_pin_is_warm_on() -> None:
    status = _status(("gpu-2", [PIN_A]), ("gpu-1", [PIN_A, PIN_B]), ("gpu-3", [PIN_B]))
    warm = warm_nodes(status, dataset="images", pin=PIN_A)
    assert warm == WarmNodes(dataset="images", pin=PIN_A, nodes=("gpu-1", "gpu-2"))
    spec = prefer(SPEC, preferred_terms([warm], weight=50))
    _valid(spec)
    assert spec["affinity"] == {
        "nodeAffinity": {
            PREFERRED: [
                {
                    "weight": 50,
                    "preference": {
                        "matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": ["gpu-1", "gpu-2"]}
                        ]
                    },
                }
            ]
        }
    }
    # A preference only: nothing the scheduler must honour.
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spec["affinity"]["nodeAffinity"]
    assert SPEC == {"containers": [{"name": "train", "image": "python:3.12-slim"}]}  # not mutated


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(None, id="no-status-yet"),
        pytest.param({}, id="no-prefetch"),
        pytest.param(_status(("gpu-1", [PIN_B])), id="other-pin-warm"),
        pytest.param(_status(("gpu-1", [])), id="nothing-warm"),
        # An operator older than warmRevisions wrote only the counts.
        pytest.param(
            {"prefetch": {"nodes": [{"node": "gpu-1", "warm": 1, "total": 1}]}},
            id="older-operator",
        ),
        pytest.param({"prefetch": {"nodes": "garbage"}}, id="garbage"),
        pytest.param({"prefetch": {"nodes": [{"warmRevisions": [PIN_A]}]}}, id="no-node-name"),
    ],
)
def test_no_affinity_when_nothing_is_warm(status: dict[str, Any] | None) -> None:
    warm = warm_nodes(status, dataset="images", pin=PIN_A)
    assert warm.nodes == ()
    assert preferred_terms([warm], weight=50) == []
    assert prefer(SPEC, []) == SPEC


def test_the_pods_own_affinity_is_kept() -> None:
    own: dict[str, Any] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
                ]
            },
            PREFERRED: [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [{"key": "zone", "operator": "In", "values": ["eu-1a"]}]
                    },
                }
            ],
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app": "train"}},
                    },
                }
            ]
        },
    }
    spec = {**SPEC, "affinity": copy.deepcopy(own)}
    warm = warm_nodes(_status(("gpu-1", [PIN_A])), dataset="images", pin=PIN_A)
    preferred = prefer(spec, preferred_terms([warm], weight=50))
    _valid(preferred)
    node_affinity = preferred["affinity"]["nodeAffinity"]
    assert (
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]
        == (own["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"])
    )
    assert node_affinity[PREFERRED][0] == own["nodeAffinity"][PREFERRED][0]
    assert node_affinity[PREFERRED][1]["preference"]["matchFields"][0]["values"] == ["gpu-1"]
    assert len(node_affinity[PREFERRED]) == 2
    assert preferred["affinity"]["podAntiAffinity"] == own["podAntiAffinity"]


def test_several_datasets_share_the_weight_so_nodes_warm_for_all_win() -> None:
    status_images = _status(("gpu-1", [PIN_A]), ("gpu-2", [PIN_A]))
    status_labels = _status(("gpu-2", [PIN_B]), ("gpu-3", [PIN_B]))
    warm = [
        warm_nodes(status_images, dataset="images", pin=PIN_A),
        warm_nodes(status_labels, dataset="labels", pin=PIN_B),
        warm_nodes(None, dataset="cold", pin=PIN_A),  # warm nowhere: no term
    ]
    terms = preferred_terms(warm, weight=51)
    _valid(prefer(SPEC, terms))
    assert [t["weight"] for t in terms] == [25, 25]  # at most the weight in all
    score = {
        node: sum(t["weight"] for t in terms if node in t["preference"]["matchFields"][0]["values"])
        for node in ("gpu-1", "gpu-2", "gpu-3", "gpu-4")
    }
    assert score == {"gpu-1": 25, "gpu-2": 50, "gpu-3": 25, "gpu-4": 0}
    # Never a zero weight (the API server refuses it), however many datasets.
    many = [WarmNodes(dataset=f"d{i}", pin=PIN_A, nodes=("n",)) for i in range(7)]
    assert {t["weight"] for t in preferred_terms(many, weight=3)} == {1}


def test_a_term_names_at_most_max_nodes_the_same_ones_every_time() -> None:
    names = [f"node-{i:04d}" for i in range(MAX_NODES * 3)]
    status = _status(*((n, [PIN_A]) for n in reversed(names)))
    warm = warm_nodes(status, dataset="images", pin=PIN_A)
    assert warm.nodes == tuple(names[:MAX_NODES])
    _valid(prefer(SPEC, preferred_terms([warm], weight=50)))


def test_a_pod_bound_to_a_node_gets_nothing() -> None:
    warm = warm_nodes(_status(("gpu-1", [PIN_A])), dataset="images", pin=PIN_A)
    spec = {**SPEC, "nodeName": "gpu-9"}
    assert prefer(spec, preferred_terms([warm], weight=50)) == spec


# -- the switch: DATAPIN_PREFER_WARM_NODES ------------------------------------------------------


async def _admit(tmp_path: Path, *, prefer_warm_nodes: bool) -> dict[str, Any]:
    """A Job pinned to PIN_A by the real Admission, with a Dataset whose status says PIN_A is
    warm on gpu-1 (the listing as `Kube.list_datasets` returns it)."""
    settings = Settings(
        api_server="http://127.0.0.1:9",  # never dialled: the listing and Secret are given
        git_cache_dir=tmp_path / "git",
        prefer_warm_nodes=prefer_warm_nodes,
    )
    spec = {"remote": {"url": "s3://bucket/store", "credentialsSecretRef": {"name": "b2"}}}
    listing = DatasetListing(
        specs={"images": spec}, statuses={"images": _status(("gpu-1", [PIN_A]))}
    )

    async def datasets(namespace: str) -> DatasetListing:
        assert namespace == "ml"
        return listing

    async def secrets(namespace: str, name: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}

    git = GitSource(cache_dir=tmp_path / "git", timeout=5, ref_ttl=0, allow_protocols=("https",))
    admission = Admission(
        settings=settings,
        secrets=secrets,
        datasets=datasets,
        resolver=Resolver(git, secrets=secrets),
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "train",
            "namespace": "ml",
            "annotations": {"datapin.dev/dataset": "images", "datapin.dev/revision": PIN_A},
        },
        "spec": {"template": {"metadata": {}, "spec": {**SPEC, "restartPolicy": "Never"}}},
    }
    admitted = await admission.admit(job, namespace="ml")
    assert admitted is not None
    for version in VERSIONS:
        kubernetes_validate.validate(admitted.obj, version, strict=True)
    return admitted.obj


async def test_on_by_default_and_a_setting_turns_it_off(tmp_path: Path) -> None:
    assert Settings.model_fields["prefer_warm_nodes"].default is True
    on = await _admit(tmp_path / "on", prefer_warm_nodes=True)
    [term] = on["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][PREFERRED]
    assert term["preference"]["matchFields"][0]["values"] == ["gpu-1"]
    off = await _admit(tmp_path / "off", prefer_warm_nodes=False)
    assert "affinity" not in off["spec"]["template"]["spec"]
