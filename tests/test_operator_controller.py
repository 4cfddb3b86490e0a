"""The Dataset controller, end to end: the real operator (kopf) against the kmock API server.

Real pieces: kopf with every handler of the operator, a SeaweedFS S3 server holding two
revisions `dvc push`ed by real DVC 3, a git repository whose tags name them, and a real node
agent (`datapin-sidecar agent` on an XFS volume) fed the prefetch list the operator wrote,
whose `/status` the operator reads back. The API server is kmock's emulator (there is no
cluster here); the test plays kubelet's part by copying the ConfigMap and Secret the operator
wrote into the agent's files.

What users depend on: a Dataset's conditions tell the truth and say how to fix what is wrong
(a missing Secret, wrong keys, a revision never pushed), they turn True once it is fixed, the
prefetch list holds exactly the selected nodes' revisions, the status shows the agents'
progress ("1/1 nodes warm") within seconds of the agents reporting it (not at the next
resync), Events mark each change, and a deleted Dataset leaves the lists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from datapin_operator.settings import Settings

from testkit.dvcremote import S3DvcFixture
from testkit.k8svolume import kubelet_update
from testkit.kubeapi import Api, emulator, events_of
from testkit.operatorrun import running_operator, tagged_repo
from testkit.seaweed import SeaweedServer
from testkit.sidecarproc import SidecarProcess

pytestmark = [pytest.mark.s3, pytest.mark.dvc]

NS = "ml"
OPERATOR_NS = "datapin"
AGENT_LABELS = {"app.kubernetes.io/name": "datapin", "app.kubernetes.io/component": "agent"}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == ctype:
            return dict(c)
    return {}


def _is(ctype: str, status: str, reason: str | None = None) -> Any:
    def check(obj: dict[str, Any]) -> bool:
        c = _condition(obj, ctype)
        return c.get("status") == status and (reason is None or c.get("reason") == reason)

    return check


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as (_, client):
        yield client


def _dataset(
    name: str, fx: S3DvcFixture, seaweed: SeaweedServer, repo: Path, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "remote": {
                "url": fx.remote_url,
                "endpoint": seaweed.endpoint,
                "region": "us-east-1",
                "credentialsSecretRef": {"name": "b2"},
            },
            "source": {"repo": f"file://{repo}", "path": "data.dvc"},
            **spec,
        },
    }


async def test_dataset_lifecycle_conditions_prefetch_and_events(
    api: Api,
    tmp_path: Path,
    xfs_dir: Path,
    seaweed: SeaweedServer,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
) -> None:
    a, b = dvc3_revisions
    repo, _, commit_v2 = tagged_repo(tmp_path, a, b)
    for node, pool in (("node-a", "gpu"), ("node-b", "cpu")):
        await api.create("v1/nodes", {"metadata": {"name": node, "labels": {"pool": pool}}})
    # The agent's files, where kubelet would project the ConfigMap and the Secret.
    prefetch_file = tmp_path / "prefetch" / "node-a.json"
    prefetch_file.parent.mkdir()
    credentials_dir = tmp_path / "agent-credentials"
    agent = SidecarProcess(
        "agent",
        tmp_path,
        {
            "root": str(xfs_dir),
            "prefetch_file": str(prefetch_file),
            "prefetch_interval_seconds": "0.2",
            "gc_interval_seconds": "5",
            "node_name": "node-a",
            "log_format": "json",
        },
    )
    await api.create(
        "v1/pods",
        {
            "metadata": {"name": "agent-a", "namespace": OPERATOR_NS, "labels": AGENT_LABELS},
            "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        },
    )
    settings = Settings(
        api_server=api.url,
        namespace=OPERATOR_NS,
        webhook_mode="off",
        resync_seconds=1,
        agent_port=agent.port,
        agent_credentials_dir=str(credentials_dir),
        git_cache_dir=tmp_path / "git-cache",
        git_allow_protocols=["file"],  # the test repositories are local
        git_ref_ttl_seconds=0,
    )
    dataset = _dataset(
        "images",
        a,
        seaweed,
        repo,
        revisions={"golden": a.dvc.rev},
        prefetch={"revisions": ["v2"], "nodeSelector": {"pool": "gpu"}},
    )
    async with running_operator(settings) as app:
        # 1. No Secret yet: not reachable, not ready, and the message says how to fix it.
        await api.create("datapin.dev/v1alpha1/datasets", dataset)
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets",
            "images",
            _is("RemoteReachable", "False", "SecretNotFound"),
            namespace=NS,
        )
        assert _condition(obj, "Ready")["status"] == "False"
        assert "kubectl create secret generic b2 -n ml" in _condition(obj, "Ready")["message"]
        # Resolution does not need the Secret: both revisions are already pinned.
        assert _condition(obj, "Resolved")["status"] == "True"

        # 2. The Secret arrives: the next resync reaches the remote and finds both pins.
        await api.create(
            "v1/secrets",
            {
                "metadata": {"name": "b2", "namespace": NS},
                "data": {
                    "AWS_ACCESS_KEY_ID": _b64(seaweed.access_key),
                    "AWS_SECRET_ACCESS_KEY": _b64(seaweed.secret_key),
                },
            },
        )
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets", "images", _is("Ready", "True"), namespace=NS
        )
        resolved = {r["ref"]: r for r in obj["status"]["resolved"]}
        assert resolved["golden"]["pin"] == a.dvc.rev
        assert resolved["v2"]["pin"] == b.dvc.rev
        assert resolved["v2"]["commit"] == commit_v2
        assert resolved["v2"]["layout"] == "dvc3"

        # 3. The prefetch list: node-a only (the selector), with the agent's copy of the keys.
        cm = await api.wait_for(
            "v1/configmaps",
            "datapin-prefetch",
            lambda o: "node-a.json" in (o.get("data") or {}),
            namespace=OPERATOR_NS,
        )
        assert set(cm["data"]) == {"node-a.json"}
        entries = json.loads(cm["data"]["node-a.json"])["revisions"]
        assert [(e["name"], e["pin"], e["ref"]) for e in entries] == [
            ("ml.images", b.dvc.rev, "v2")
        ]
        assert seaweed.secret_key not in cm["data"]["node-a.json"]
        secret = await api.get("v1/secrets", "datapin-agent-credentials", namespace=OPERATOR_NS)
        keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert keys == {
            "ml.images.access_key_id": seaweed.access_key,
            "ml.images.secret_access_key": seaweed.secret_key,
        }
        # Not warm yet: the agent has not run.
        assert _condition(obj, "Prefetched")["status"] == "False"

        # 4. kubelet's part: project both into the agent's files; start the real agent.
        kubelet_update(credentials_dir, keys, "2026_11_22_10_00_00.1")
        prefetch_file.write_text(cm["data"]["node-a.json"])
        with agent:
            obj = await api.wait_for(
                "datapin.dev/v1alpha1/datasets",
                "images",
                _is("Prefetched", "True", "Warm"),
                namespace=NS,
                within=60,
            )
        assert obj["status"]["prefetch"]["summary"] == "1/1 nodes warm"
        assert obj["status"]["prefetch"]["nodes"] == [
            {"node": "node-a", "warm": 1, "total": 1, "failed": [], "warmRevisions": [b.dvc.rev]}
        ]
        assert all(c["observedGeneration"] == 1 for c in obj["status"]["conditions"])

        # 5. Events: one per change, the failure as a Warning with its reason.
        events = events_of(await api.list("v1/events", NS), kind="Dataset", name="images")
        seen = {(e["type"], e["reason"]) for e in events}
        assert ("Warning", "SecretNotFound") in seen
        assert ("Normal", "Reachable") in seen
        assert ("Normal", "Warm") in seen
        assert all(seaweed.secret_key not in json.dumps(e) for e in events)

        # The operator's metrics saw the same: the reconcile that found no Secret, the agent
        # that answered. (Exact counts depend on kopf's retries; at least once each.)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in app.registry.collect()
            for s in family.samples
        }
        reconcile_errors = (
            "datapin_operator_reconcile_errors_total",
            (("reason", "SecretNotFound"),),
        )
        assert samples[reconcile_errors] >= 1
        assert samples[("datapin_operator_reconciles_total", ())] >= 2
        assert samples[("datapin_operator_agent_reports_total", (("result", "ok"),))] >= 1
        # One agent pod listed (reporting, or silent if read again after it stopped).
        agents = [
            samples[("datapin_operator_agents", (("state", st),))] for st in ("reporting", "silent")
        ]
        assert sum(agents) == 1

        # 6. Deleting the Dataset empties the agents' lists.
        await api.delete("datapin.dev/v1alpha1/datasets", "images", namespace=NS)
        await api.wait_for(
            "v1/configmaps",
            "datapin-prefetch",
            lambda o: not (o.get("data") or {}),
            namespace=OPERATOR_NS,
        )


async def test_wrong_keys_and_unpushed_revisions_are_reported_with_a_fix(
    api: Api,
    tmp_path: Path,
    seaweed: SeaweedServer,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
) -> None:
    a, b = dvc3_revisions
    repo, _, _ = tagged_repo(tmp_path, a, b)
    settings = Settings(
        api_server=api.url,
        namespace=OPERATOR_NS,
        webhook_mode="off",
        resync_seconds=1,
        git_cache_dir=tmp_path / "git-cache",
        git_allow_protocols=["file"],  # the test repositories are local
    )
    await api.create(
        "v1/secrets",
        {
            "metadata": {"name": "b2", "namespace": NS},
            "data": {"keyID": _b64(seaweed.access_key), "applicationKey": _b64("wrong-secret")},
        },
    )
    never_pushed = "0123456789abcdef0123456789abcdef.dir"
    async with running_operator(settings):
        await api.create(
            "datapin.dev/v1alpha1/datasets",
            _dataset("wrongkeys", a, seaweed, repo),
        )
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets",
            "wrongkeys",
            _is("RemoteReachable", "False", "AccessDenied"),
            namespace=NS,
        )
        message = _condition(obj, "RemoteReachable")["message"]
        assert "SignatureDoesNotMatch" in message
        assert "Fix:" in message
        assert "wrong-secret" not in json.dumps(obj)

        # Right keys (B2's names), but a named revision nobody pushed, and a tag that is not.
        await api.patch(
            "v1/secrets",
            "b2",
            {"data": {"applicationKey": _b64(seaweed.secret_key)}},
            namespace=NS,
        )
        await api.create(
            "datapin.dev/v1alpha1/datasets",
            _dataset("unpushed", a, seaweed, repo, revisions={"ghost": never_pushed}),
        )
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets",
            "unpushed",
            _is("Resolved", "False", "NotPushed"),
            namespace=NS,
        )
        assert _condition(obj, "RemoteReachable")["status"] == "True"
        assert never_pushed in _condition(obj, "Resolved")["message"]
        assert "dvc push" in _condition(obj, "Resolved")["message"]

        await api.create(
            "datapin.dev/v1alpha1/datasets",
            _dataset("badtag", a, seaweed, repo, prefetch={"revisions": ["v9"]}),
        )
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets",
            "badtag",
            _is("Resolved", "False", "GitFailed"),
            namespace=NS,
        )
        assert "v9" in _condition(obj, "Resolved")["message"]
        assert _condition(obj, "Ready")["status"] == "False"


async def test_prefetch_shows_warm_within_seconds_not_at_the_resync(
    api: Api,
    tmp_path: Path,
    xfs_dir: Path,
    seaweed: SeaweedServer,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fresh install: the list is written, the agent gets it later (kubelet projects
    ConfigMaps late) and warms up; the Dataset must say so within 30 s of that, not at the
    next resync (here 10 minutes away)."""
    a, b = dvc3_revisions
    repo, _, _ = tagged_repo(tmp_path, a, b)
    await api.create("v1/nodes", {"metadata": {"name": "node-a"}})
    prefetch_file = tmp_path / "prefetch" / "node-a.json"
    prefetch_file.parent.mkdir()
    credentials_dir = tmp_path / "agent-credentials"
    agent = SidecarProcess(
        "agent",
        tmp_path,
        {
            "root": str(xfs_dir),
            "prefetch_file": str(prefetch_file),
            "prefetch_interval_seconds": "0.2",
            "gc_interval_seconds": "5",
            "node_name": "node-a",
            "log_format": "json",
        },
    )
    await api.create(
        "v1/pods",
        {
            "metadata": {"name": "agent-a", "namespace": OPERATOR_NS, "labels": AGENT_LABELS},
            "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        },
    )
    await api.create(
        "v1/secrets",
        {
            "metadata": {"name": "b2", "namespace": NS},
            "data": {
                "AWS_ACCESS_KEY_ID": _b64(seaweed.access_key),
                "AWS_SECRET_ACCESS_KEY": _b64(seaweed.secret_key),
            },
        },
    )
    settings = Settings(
        api_server=api.url,
        namespace=OPERATOR_NS,
        webhook_mode="off",
        resync_seconds=600,  # the resync cannot be what reports warm here
        agent_port=agent.port,
        agent_credentials_dir=str(credentials_dir),
        git_cache_dir=tmp_path / "git-cache",
        git_allow_protocols=["file"],
    )
    dataset = _dataset("fresh", a, seaweed, repo, prefetch={"revisions": ["v2"]})
    caplog.set_level(logging.INFO, logger="kopf")
    async with running_operator(settings):
        await api.create("datapin.dev/v1alpha1/datasets", dataset)
        obj = await api.wait_for(
            "datapin.dev/v1alpha1/datasets",
            "fresh",
            _is("Prefetched", "False", "Prefetching"),
            namespace=NS,
        )
        assert obj["status"]["prefetch"]["summary"] == "0/1 nodes warm"
        cm = await api.get("v1/configmaps", "datapin-prefetch", namespace=OPERATOR_NS)
        secret = await api.get("v1/secrets", "datapin-agent-credentials", namespace=OPERATOR_NS)
        keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

        # kubelet projects the objects a while later; only then can the agent start its work.
        await asyncio.sleep(8)
        kubelet_update(credentials_dir, keys, "2026_11_22_10_00_00.1")
        prefetch_file.write_text(cm["data"]["node-a.json"])
        with agent:
            started = time.monotonic()
            obj = await api.wait_for(
                "datapin.dev/v1alpha1/datasets",
                "fresh",
                _is("Prefetched", "True", "Warm"),
                namespace=NS,
                within=30,
            )
            assert time.monotonic() - started <= 30
        assert obj["status"]["prefetch"]["summary"] == "1/1 nodes warm"
        assert _condition(obj, "Ready")["status"] == "True"

        # kopf posts Events after the status patch, so wait for it rather than race it.
        async def warm_event() -> bool:
            events = events_of(await api.list("v1/events", NS), kind="Dataset", name="fresh")
            return ("Normal", "Warm") in {(e["type"], e["reason"]) for e in events}

        await api.wait_for_true(warm_event, within=10)
    # The polling timer fired every few seconds: none of that is in the log.
    assert not [r for r in caplog.records if "'prefetch-progress' succeeded" in r.getMessage()]
