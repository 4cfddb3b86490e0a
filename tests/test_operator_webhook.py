"""The mutating webhook over real HTTPS, with real AdmissionReview v1 bodies.

The real operator runs in its development mode against the kmock API: kopf serves the webhook
on 127.0.0.1 with our self-signed certificate and registers a MutatingWebhookConfiguration
pointing at it. The test reads that configuration back and calls the webhook exactly as an API
server would: HTTPS verified against the registered caBundle, AdmissionReview v1 in and out,
then applies the returned JSONPatch and validates the result against the Kubernetes 1.29
schema and the newest shipped (kubernetes-validate, strict).

What users depend on: an annotated Job is admitted with its revision pinned on the Job and its
pod template and its data injected (csi volumes by default, the sidecar when asked for); the
Pods the Job controller then creates keep that pin even after the tag moved; a second pass
changes nothing; no Secret value is anywhere in what is admitted; and each kind of mistake is
refused at `kubectl apply` with a message that says what is wrong and how to fix it, plus
Events on the Job and the Dataset.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
from datapin_operator.settings import Settings
from prometheus_client.parser import text_string_to_metric_families

from testkit import podsecurity
from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import run_git
from testkit.kubeapi import Api, admission_review, call_webhook, emulator, events_of
from testkit.operatorrun import running_operator, tagged_repo
from testkit.seaweed import SeaweedServer, free_ports

pytestmark = [pytest.mark.s3, pytest.mark.dvc]

NS = "ml"
DATASETS = "datapin.dev/v1alpha1/datasets"
VERSIONS = ("1.29", kubernetes_validate.latest_version())


@dataclass
class World:
    api: Api
    http: aiohttp.ClientSession
    webhooks: dict[str, dict[str, Any]]  # resource -> webhook entry
    repo: Path
    a: S3DvcFixture
    b: S3DvcFixture
    commit_v1: str
    commit_v2: str
    seaweed: SeaweedServer
    metrics_url: str  # the operator's /metrics

    async def review(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        resource = {"Job": "jobs", "Pod": "pods"}[obj["kind"]]
        answer = await call_webhook(
            self.http, self.webhooks[resource], admission_review(obj, namespace=NS, dry_run=dry_run)
        )
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        return dict(answer["response"])

    async def admit(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as the API server would store it after our webhook."""
        response = await self.review(obj)
        assert response["allowed"], response
        if "patch" not in response:
            return copy.deepcopy(obj)
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        return dict(jsonpatch.apply_patch(obj, ops))

    async def reject(self, obj: dict[str, Any]) -> str:
        response = await self.review(obj)
        assert not response["allowed"], f"admitted: {response}"
        assert response["status"]["code"] == 400
        return str(response["status"]["message"])


def _job(name: str, annotations: dict[str, str], **pod: Any) -> dict[str, Any]:
    spec = {
        "restartPolicy": "Never",
        "containers": [
            {"name": "train", "image": "python:3.12-slim", "command": ["python", "train.py"]}
        ],
        **pod,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {"backoffLimit": 0, "template": {"metadata": {}, "spec": spec}},
    }


def _pod_of(job: dict[str, Any], name: str) -> dict[str, Any]:
    """The Pod the Job controller creates: the template, with generated metadata."""
    template = copy.deepcopy(job["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template.get("metadata", {}),
            "name": name,
            "namespace": NS,
            "labels": {
                **template["metadata"].get("labels", {}),
                "job-name": job["metadata"]["name"],
            },
        },
        "spec": template["spec"],
    }


def _validate(obj: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _pins(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(obj["metadata"]["annotations"]["datapin.dev/pins"]))


@pytest.fixture
async def world(
    tmp_path: Path, seaweed: SeaweedServer, dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture]
) -> AsyncIterator[World]:
    a, b = dvc3_revisions
    repo, commit_v1, commit_v2 = tagged_repo(tmp_path, a, b)
    webhook_port, metrics_port = free_ports(2)
    settings = Settings(
        api_server="http://unused.invalid",  # replaced below, once kmock has a port
        namespace="datapin",
        webhook_mode="dev",
        webhook_host="127.0.0.1",
        webhook_port=webhook_port,
        metrics_port=metrics_port,
        # No resync during a test: the Dataset statuses a test writes stay as it wrote them,
        # and every resolve the metrics count is one the test made.
        resync_seconds=600,
        git_cache_dir=tmp_path / "git-cache",
        git_allow_protocols=["file"],  # the test repositories are local
        git_ref_ttl_seconds=0,
        sidecar_image="ghcr.io/datapin/datapin:test",
    )
    async with emulator() as (_, api), aiohttp.ClientSession() as http:
        settings = settings.model_copy(update={"api_server": api.url})
        await api.create(
            "v1/secrets",
            {
                "metadata": {"name": "b2", "namespace": NS},
                "data": {
                    "AWS_ACCESS_KEY_ID": base64.b64encode(seaweed.access_key.encode()).decode(),
                    "AWS_SECRET_ACCESS_KEY": base64.b64encode(seaweed.secret_key.encode()).decode(),
                },
            },
        )
        remote = {
            "url": a.remote_url,
            "endpoint": seaweed.endpoint,
            "region": "us-east-1",
            "credentialsSecretRef": {"name": "b2"},
        }
        for name, spec in (
            (
                "images",
                {
                    "remote": remote,
                    "source": {"repo": f"file://{repo}", "path": "data.dvc"},
                    "revisions": {"golden": a.dvc.rev},
                },
            ),
            ("labels", {"remote": remote, "revisions": {"golden": b.dvc.rev}}),
            ("nosecret", {"remote": {**remote, "credentialsSecretRef": {"name": "missing"}}}),
            (
                "gitgone",
                {"remote": remote, "source": {"repo": f"file://{tmp_path}/gone", "path": "d.dvc"}},
            ),
        ):
            await api.create(
                "datapin.dev/v1alpha1/datasets",
                {
                    "apiVersion": "datapin.dev/v1alpha1",
                    "kind": "Dataset",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": spec,
                },
            )
        async with running_operator(settings):
            config = await api.wait_for(
                "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                "datapin.dev",
                lambda o: len(o.get("webhooks") or []) == 2,
            )
            webhooks = {w["rules"][0]["resources"][0]: w for w in config["webhooks"]}
            # Every Dataset reconciled once: no reconcile runs during the test after this.
            for name in ("images", "labels", "nosecret", "gitgone"):
                await api.wait_for(
                    DATASETS,
                    name,
                    lambda o: bool((o.get("status") or {}).get("conditions")),
                    namespace=NS,
                )
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            yield World(api, http, webhooks, repo, a, b, commit_v1, commit_v2, seaweed, metrics_url)


async def test_the_registered_webhook_configuration_is_served_over_verified_https(
    world: World,
) -> None:
    jobs, pods = world.webhooks["jobs"], world.webhooks["pods"]
    assert jobs["clientConfig"]["url"].startswith("https://127.0.0.1:")
    assert jobs["rules"][0]["operations"] == ["CREATE"]
    assert jobs["rules"][0]["apiGroups"] == ["batch"]
    assert jobs["failurePolicy"] == "Fail"
    assert pods["rules"][0]["apiGroups"] == [""]
    assert pods["failurePolicy"] == "Ignore"  # the default: an outage must not stop every Pod
    assert "v1" in jobs["admissionReviewVersions"]
    # Not ours: admitted unchanged (no patch at all).
    response = await world.review(_job("plain", {}))
    assert response["allowed"]
    assert "patch" not in response


async def test_job_is_pinned_injected_and_valid_and_its_pods_keep_the_pin(world: World) -> None:
    job = _job(
        "train",
        {
            "datapin.dev/dataset": "images",
            "datapin.dev/revision": "v1",
            "datapin.dev/mount-path": "/data/images",
            "datapin.dev/mode": "sidecar",
        },
    )
    admitted = await world.admit(job)
    _validate(admitted)
    pins = _pins(admitted)
    assert pins["images"]["pin"] == world.a.dvc.rev
    assert pins["images"]["ref"] == "v1"
    template = admitted["spec"]["template"]
    assert _pins(template) == pins
    assert json.loads(template["metadata"]["annotations"]["datapin.dev/commits"]) == {
        "images": world.commit_v1
    }
    sidecar = template["spec"]["initContainers"][0]
    assert sidecar["name"] == "datapin"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["image"] == "ghcr.io/datapin/datapin:test"
    train = template["spec"]["containers"][0]
    mount = next(m for m in train["volumeMounts"] if m["mountPath"] == "/data/images")
    assert mount["readOnly"] is True
    assert mount["subPathExpr"] == "workspaces/$(DATAPIN_POD_UID)/images"

    # No Secret value anywhere: credentials travel only as a Secret reference.
    text = json.dumps(admitted)
    assert world.seaweed.secret_key not in text
    assert world.seaweed.access_key not in text
    secret_volumes = [v for v in template["spec"]["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_volumes] == ["b2"]

    # A second pass (reinvocation) changes nothing.
    assert await world.admit(admitted) == admitted

    # The tag moves to the v2 commit after admission ...
    run_git(world.repo, "tag", "-f", "v1", world.commit_v2)
    # ... the Pods the Job controller creates from the admitted template keep the v1 pin ...
    pod = _pod_of(admitted, "train-abcde")
    pod_admitted = await world.admit(pod)
    assert pod_admitted == pod
    assert _pins(pod_admitted)["images"]["pin"] == world.a.dvc.rev
    _validate(pod_admitted)
    # ... while a new Job naming v1 now gets the moved tag's pin.
    later = await world.admit(_job("train-later", dict(job["metadata"]["annotations"])))
    assert _pins(later)["images"]["pin"] == world.b.dvc.rev

    # The Job, once created, gets an Injected Event.
    await world.api.create("batch/v1/jobs", admitted)
    await world.api.wait_for("batch/v1/jobs", "train", lambda _: True, namespace=NS)
    for _ in range(100):
        events = events_of(await world.api.list("v1/events", NS), kind="Job", name="train")
        if any(e["reason"] == "Injected" for e in events):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"no Injected event: {events}")
    assert world.a.dvc.rev in next(e for e in events if e["reason"] == "Injected")["message"]


async def test_pods_annotated_directly_and_several_datasets(world: World) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "notebook",
            "namespace": NS,
            "annotations": {
                "datapin.dev/dataset": "images, labels",
                "datapin.dev/revision": "golden",
                "datapin.dev/revision.images": world.commit_v2[:10],
                "datapin.dev/mount-path.labels": "/labels",
                "datapin.dev/mode": "init",
            },
        },
        "spec": {
            "containers": [{"name": "lab", "image": "jupyter/base-notebook"}],
        },
    }
    admitted = await world.admit(pod)
    _validate(admitted)
    pins = _pins(admitted)
    assert pins["images"]["pin"] == world.b.dvc.rev  # the abbreviated commit of v2
    assert pins["labels"]["pin"] == world.b.dvc.rev  # the named revision `golden` of labels
    init = admitted["spec"]["initContainers"][0]
    assert init["name"] == "datapin"
    assert "restartPolicy" not in init  # a plain init container: `once`
    assert init["args"] == ["once"]
    paths = {m["mountPath"] for m in admitted["spec"]["containers"][0]["volumeMounts"]}
    assert {"/data/images", "/labels"} <= paths
    assert await world.admit(admitted) == admitted


async def test_without_a_mode_a_job_gets_csi_volumes_and_stays_restricted(world: World) -> None:
    """The default mode: no hostPath, no container; a pod that passes the restricted Pod
    Security level before injection still does after it."""
    restricted_pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        "containers": [
            {
                "name": "train",
                "image": "python:3.12-slim",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
            }
        ],
    }
    job = _job(
        "train-csi",
        {"datapin.dev/dataset": "images, labels", "datapin.dev/revision": "golden"},
        **restricted_pod,
    )
    assert podsecurity.restricted(job) == []
    admitted = await world.admit(job)
    _validate(admitted)
    assert podsecurity.restricted(admitted) == []
    template = admitted["spec"]["template"]
    assert "initContainers" not in template["spec"]
    assert "hostPath" not in json.dumps(admitted)
    volumes = template["spec"]["volumes"]
    assert [v["csi"]["driver"] for v in volumes] == ["datapin.dev", "datapin.dev"]
    assert [v["csi"]["nodePublishSecretRef"] for v in volumes] == [{"name": "b2"}] * 2
    attributes = {
        v["csi"]["volumeAttributes"]["dataset"]: v["csi"]["volumeAttributes"] for v in volumes
    }
    pins = _pins(admitted)
    for dataset in ("images", "labels"):
        assert attributes[dataset]["pin"] == pins[dataset]["pin"]
        assert attributes[dataset]["ref"] == "golden"
        assert attributes[dataset]["writable"] == "false"
    train = template["spec"]["containers"][0]
    assert [
        (m["mountPath"], m["readOnly"], m["mountPropagation"]) for m in train["volumeMounts"]
    ] == [
        ("/data/images", True, "HostToContainer"),
        ("/data/labels", True, "HostToContainer"),
    ]
    assert world.seaweed.secret_key not in json.dumps(admitted)
    # A second pass, and the Pods the Job controller creates, are admitted unchanged.
    assert await world.admit(admitted) == admitted
    pod = _pod_of(admitted, "train-csi-abcde")
    assert await world.admit(pod) == pod
    assert podsecurity.restricted(pod) == []


@pytest.mark.parametrize(
    ("annotations", "pod", "expected"),
    [
        pytest.param(
            {"datapin.dev/dataset": "imagez", "datapin.dev/revision": "v1"},
            {},
            ["'imagez' does not exist", "gitgone, images, labels, nosecret", "Fix:"],
            id="unknown-dataset",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/revison": "v1"},
            {},
            ["datapin.dev/revison", "Fix:"],
            id="typo-in-key",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images"},
            {},
            ["revision", "Fix:"],
            id="no-revision",
        ),
        pytest.param(
            {"datapin.dev/dataset": "images", "datapin.dev/revision": "v9"},
            {},
            ["v9", "v1", "v2", "Fix:"],
            id="unknown-tag",
        ),
        pytest.param(
            {"datapin.dev/dataset": "gitgone", "datapin.dev/revision": "v1"},
            {},
            ["gone", "Fix:"],
            id="git-unreachable",
        ),
        pytest.param(
            {"datapin.dev/dataset": "nosecret", "datapin.dev/revision": "0" * 32 + ".dir"},
            {},
            ["Secret ml/missing", "does not exist", "Fix:"],
            id="missing-secret",
        ),
        pytest.param(
            {"datapin.dev/dataset": "labels", "datapin.dev/revision": "golden"},
            {
                "containers": [
                    {
                        "name": "train",
                        "image": "python:3.12-slim",
                        "volumeMounts": [{"name": "scratch", "mountPath": "/data/labels"}],
                    }
                ],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
            ["/data/labels", "train", "Fix:"],
            id="colliding-mount-path",
        ),
        pytest.param(
            {
                "datapin.dev/dataset": "images, labels",
                "datapin.dev/revision": "golden",
                "datapin.dev/mount-path.images": "/data",
                "datapin.dev/mount-path.labels": "/data/labels",
            },
            {},
            ["/data", "Fix:"],
            id="nested-mount-paths",
        ),
        pytest.param(
            {
                "datapin.dev/dataset": "images",
                "datapin.dev/revision": "golden",
                "datapin.dev/mount-path": "data",
            },
            {},
            ["absolute", "Fix:"],
            id="relative-mount-path",
        ),
    ],
)
async def test_mistakes_are_rejected_with_what_and_how_to_fix(
    world: World, annotations: dict[str, str], pod: dict[str, Any], expected: list[str]
) -> None:
    message = await world.reject(_job("bad", annotations, **pod))
    for part in expected:
        assert part in message, message
    assert world.seaweed.secret_key not in message


async def test_rejections_post_events_on_the_job_and_the_dataset(world: World) -> None:
    await world.reject(
        _job("badtag", {"datapin.dev/dataset": "images", "datapin.dev/revision": "v9"})
    )
    for _ in range(100):
        events = await world.api.list("v1/events", NS)
        on_job = events_of(events, kind="Job", name="badtag")
        on_dataset = events_of(events, kind="Dataset", name="images")
        if on_job and any(e["reason"] == "AdmissionRejected" for e in on_dataset):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"missing events: {events}")
    assert on_job[0]["type"] == "Warning"
    assert on_job[0]["reason"] == "InjectionFailed"
    assert "v9" in on_job[0]["message"]
    # A dry run (kubectl apply --dry-run=server) is answered the same but posts nothing.
    response = await world.review(
        _job("dry", {"datapin.dev/dataset": "images", "datapin.dev/revision": "v9"}),
        dry_run=True,
    )
    assert not response["allowed"]
    await asyncio.sleep(1)  # as long as the real rejection's Events took, at most
    events = await world.api.list("v1/events", NS)
    assert events_of(events, kind="Job", name="dry") == []
    assert not any("dry" in e["message"] for e in events_of(events, kind="Dataset", name="images"))


# -- cache-aware placement (issue 16) -------------------------------------------------------

PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"


def _warm_status(*nodes: tuple[str, list[str]]) -> dict[str, Any]:
    """status.prefetch as the operator writes it from its agents' reports."""
    return {
        "prefetch": {
            "summary": f"0/{len(nodes)} nodes warm",
            "warmNodes": 0,
            "totalNodes": len(nodes),
            "nodes": [
                {"node": n, "warm": len(p), "total": 2, "failed": [], "warmRevisions": p}
                for n, p in nodes
            ],
        }
    }


async def test_admitted_jobs_prefer_the_nodes_their_pins_are_warm_on(world: World) -> None:
    """The webhook reads the warm nodes from the Dataset's status (listed fresh, as every
    replica does) and adds a preference for them, never a requirement; the user's own
    affinity stays; the Job's Pods are not changed again; nothing warm, nothing added."""
    # labels' golden is B; gpu-1 holds B, gpu-2 only A.
    status = _warm_status(("gpu-2", [world.a.dvc.rev]), ("gpu-1", [world.b.dvc.rev]))
    await world.api.patch(DATASETS, "labels", {"status": status}, namespace=NS)
    own = {
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
                        "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]
                    },
                }
            ],
        },
        "podAffinity": {
            PREFERRED: [
                {
                    "weight": 5,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"team": "ml"}},
                    },
                }
            ]
        },
    }
    job = _job(
        "warm",
        {"datapin.dev/dataset": "labels", "datapin.dev/revision": "golden"},
        affinity=copy.deepcopy(own),
    )
    admitted = await world.admit(job)
    _validate(admitted)
    affinity = admitted["spec"]["template"]["spec"]["affinity"]
    preferred = affinity["nodeAffinity"][PREFERRED]
    assert preferred[0] == own["nodeAffinity"][PREFERRED][0]
    assert preferred[1] == {
        "weight": Settings().warm_node_weight,
        "preference": {
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]
        },
    }
    assert len(preferred) == 2
    assert (
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        == (own["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"])
    )
    assert affinity["podAffinity"] == own["podAffinity"]
    # The Job controller's Pods carry the template's preference and are not mutated again.
    pod = _pod_of(admitted, "warm-abcde")
    assert await world.admit(pod) == pod
    _validate(pod)

    # images is warm nowhere (its status has no prefetch): no affinity at all.
    cold = await world.admit(
        _job("cold", {"datapin.dev/dataset": "images", "datapin.dev/revision": "golden"})
    )
    _validate(cold)
    assert "affinity" not in cold["spec"]["template"]["spec"]


# -- the operator's metrics (issue 16) --------------------------------------------------------


async def _scrape(world: World) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The operator's /metrics over HTTP: (text, (sample name, labels) -> value)."""
    async with world.http.get(world.metrics_url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def _delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
) -> dict[frozenset[tuple[str, str]], float]:
    """The series of `name` that moved, by labels."""
    moved = {}
    for (sample, labels), value in after.items():
        if sample == name and value != before.get((sample, labels), 0.0):
            moved[labels] = value - before.get((sample, labels), 0.0)
    return moved


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def test_operator_metrics_count_what_the_webhook_did(world: World, promtool: Path) -> None:
    """Real admissions through the HTTPS webhook, then the operator's own /metrics: promtool
    accepts the exposition, and the counters moved by exactly what happened."""
    _, before = await _scrape(world)
    plain = {"datapin.dev/dataset": "images"}
    admitted = await world.admit(_job("by-tag", {**plain, "datapin.dev/revision": "v1"}))
    await world.admit(_job("by-name", {**plain, "datapin.dev/revision": "golden"}))
    await world.admit(_job("by-pin", {**plain, "datapin.dev/revision": world.a.dvc.rev}))
    await world.reject(
        _job("no-such", {"datapin.dev/dataset": "imagez", "datapin.dev/revision": "v1"})
    )
    await world.reject(_job("bad-tag", {**plain, "datapin.dev/revision": "v9"}))
    await world.admit(_job("plain", {}))  # not ours
    await world.admit(admitted)  # injected already
    text, after = await _scrape(world)

    proc = await asyncio.create_subprocess_exec(
        str(promtool),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
    assert (proc.returncode, out.decode()) == (0, "")

    assert _delta(before, after, "datapin_operator_admissions_total") == {
        _labels(result="admitted", reason="Pinned"): 3,
        _labels(result="rejected", reason="UnknownDataset"): 1,
        _labels(result="rejected", reason="GitFailed"): 1,
        _labels(result="skipped", reason="NotAnnotated"): 1,
        _labels(result="skipped", reason="AlreadyInjected"): 1,
    }
    assert _delta(before, after, "datapin_operator_admission_seconds_count") == {
        _labels(result="admitted"): 3,
        _labels(result="rejected"): 2,
        _labels(result="skipped"): 2,
    }
    # One resolve of each kind admitted, and the unknown tag failing as git.
    assert _delta(before, after, "datapin_operator_resolve_seconds_count") == {
        _labels(kind="git", result="ok"): 1,
        _labels(kind="named", result="ok"): 1,
        _labels(kind="pin", result="ok"): 1,
        _labels(kind="git", result="failed"): 1,
    }
    assert _delta(before, after, "datapin_operator_resolve_errors_total") == {
        _labels(reason="GitFailed"): 1
    }
    # images is warm nowhere: three injected pods without a preference.
    assert _delta(before, after, "datapin_operator_placements_total") == {_labels(result="none"): 3}
    # Bounded labels only: no dataset, namespace or Job name, and no key, anywhere.
    for secret in (world.seaweed.secret_key, world.seaweed.access_key):
        assert secret not in text
    for name in ("images", "imagez", "by-tag", NS):
        assert f'"{name}"' not in text
