"""Adversarial: the operator against a cluster that is not as the chart would leave it.

What a real cluster showed (issue 17, finding 9), each rebuilt against the API emulator
(testkit/kubeapi.py) with the real operator (kopf and every handler) in-process:

* the operator's namespace does not exist (`datapin-operator dev` on a cluster without the
  chart): the agents' prefetch ConfigMap and credentials Secret cannot be created (404), and
  RBAC may forbid writing them (403). A Dataset still gets its whole status; one that asks for
  prefetch says why in `Prefetched` (`AgentConfigFailed`, naming the object, the namespace
  and the fix) and recovers once the cause is fixed; one that prefetches nothing is untouched.
* the Dataset CRD is installed after the operator started: it is served without a restart,
  the operator logs why nothing is served meanwhile and says so in its /healthz body.

No S3 or git here: the Datasets name their revisions (`spec.revisions`), and the remote is a
closed port, which the status reports as unreachable without holding anything up.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from datapin_operator.api.crd import CHART_CRD_PATH
from datapin_operator.settings import Settings

from testkit.kubeapi import DATASETS, Api, Emulator, emulator, events_of
from testkit.operatorrun import running_operator
from testkit.seaweed import free_ports

NS = "ml"
OPERATOR_NS = "datapin"
PIN = "3f0c5e1a9b2d4c6e8f0a1b2c3d4e5f60.dir"
SECRET_KEY = "s3cr3t-never-shown-anywhere"


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


def _dataset(name: str, *, prefetch: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "remote": {
            "url": "s3://bucket/store",
            "endpoint": "http://127.0.0.1:9",  # discard port: nothing answers
            "region": "us-east-1",
            "credentialsSecretRef": {"name": "b2"},
        },
        "revisions": {"golden": PIN},
    }
    if prefetch:
        spec["prefetch"] = {"revisions": ["golden"]}
    return {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def _settings(api: Api, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        api_server=api.url,
        namespace=OPERATOR_NS,
        webhook_mode="off",
        resync_seconds=1,
        remote_timeout_seconds=2,
        git_cache_dir=tmp_path / "git-cache",
        **overrides,
    )


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Emulator, Api]]:
    async with emulator() as (k8s, api):
        await api.create(
            "v1/secrets",
            {
                "metadata": {"name": "b2", "namespace": NS},
                "data": {
                    "AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIDEXAMPLE").decode(),
                    "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET_KEY.encode()).decode(),
                },
            },
        )
        yield k8s, api


async def test_a_missing_operator_namespace_leaves_every_status_written(
    cluster: tuple[Emulator, Api], tmp_path: Path
) -> None:
    k8s, api = cluster
    k8s.missing_namespaces.add(OPERATOR_NS)
    async with running_operator(_settings(api, tmp_path)):
        await api.create(DATASETS, _dataset("plain", prefetch=False))
        await api.create(DATASETS, _dataset("warmed", prefetch=True))

        # Nothing to prefetch: the agents' objects are none of its business.
        plain = await api.wait_for(
            DATASETS, "plain", _is("Prefetched", "True", "NothingToPrefetch"), namespace=NS
        )
        assert _condition(plain, "Resolved")["status"] == "True"
        assert _condition(plain, "RemoteReachable")["reason"] == "RemoteUnreachable"
        assert [r["pin"] for r in plain["status"]["resolved"]] == [PIN]

        # Prefetch asked for: the condition says what failed, where, and the fix.
        warmed = await api.wait_for(
            DATASETS, "warmed", _is("Prefetched", "False", "AgentConfigFailed"), namespace=NS
        )
        assert _condition(warmed, "Resolved")["status"] == "True"
        assert [r["pin"] for r in warmed["status"]["resolved"]] == [PIN]
        message = _condition(warmed, "Prefetched")["message"]
        assert "Secret datapin/datapin-agent-credentials" in message
        assert "namespace datapin does not exist" in message
        assert "--create-namespace" in message
        assert "DATAPIN_NAMESPACE" in message

        # kopf posts Events after the status patch, so wait for it rather than race it.
        async def warned() -> list[dict[str, Any]]:
            events = events_of(await api.list("v1/events", NS), kind="Dataset", name="warmed")
            seen = {(e["type"], e["reason"]) for e in events}
            return events if ("Warning", "AgentConfigFailed") in seen else []

        await api.wait_for_true(warned)
        events = await warned()
        assert SECRET_KEY not in json.dumps([warmed, events])
        assert await api.get("v1/configmaps", "datapin-prefetch", OPERATOR_NS) is None

        # The namespace appears: the next resync writes the objects and clears the condition.
        k8s.missing_namespaces.clear()
        warmed = await api.wait_for(
            DATASETS, "warmed", _is("Prefetched", "False", "NoAgents"), namespace=NS
        )
        cm = await api.get("v1/configmaps", "datapin-prefetch", OPERATOR_NS)
        assert cm is not None


@pytest.mark.parametrize(
    ("plural", "named"),
    [
        ("configmaps", "ConfigMap datapin/datapin-prefetch"),
        ("secrets", "Secret datapin/datapin-agent-credentials"),
    ],
)
async def test_rbac_refusing_the_agents_objects_is_a_condition_with_the_fix(
    cluster: tuple[Emulator, Api], tmp_path: Path, plural: str, named: str
) -> None:
    k8s, api = cluster
    k8s.refuse[(plural, OPERATOR_NS)] = 403
    async with running_operator(_settings(api, tmp_path)):
        await api.create(DATASETS, _dataset("plain", prefetch=False))
        await api.create(DATASETS, _dataset("warmed", prefetch=True))
        await api.wait_for(
            DATASETS, "plain", _is("Prefetched", "True", "NothingToPrefetch"), namespace=NS
        )
        warmed = await api.wait_for(
            DATASETS, "warmed", _is("Prefetched", "False", "AgentConfigFailed"), namespace=NS
        )
        message = _condition(warmed, "Prefetched")["message"]
        assert named in message
        assert "403 Forbidden" in message
        assert "datapin-operator rbac" in message
        assert _condition(warmed, "Resolved")["status"] == "True"
        assert SECRET_KEY not in json.dumps(warmed)
        if plural == "secrets":
            # The keys never made it: so no entry naming them may reach the agents either.
            assert await api.get("v1/configmaps", "datapin-prefetch", OPERATOR_NS) is None


async def test_nodes_the_operator_may_not_list_hold_up_no_other_dataset(
    cluster: tuple[Emulator, Api], tmp_path: Path
) -> None:
    k8s, api = cluster
    k8s.refuse[("nodes", None)] = 403
    async with running_operator(_settings(api, tmp_path)):
        await api.create(DATASETS, _dataset("warmed", prefetch=True))
        await api.create(DATASETS, _dataset("plain", prefetch=False))
        warmed = await api.wait_for(
            DATASETS, "warmed", _is("Prefetched", "False", "AgentConfigFailed"), namespace=NS
        )
        message = _condition(warmed, "Prefetched")["message"]
        assert "cannot list the nodes spec.prefetch.nodeSelector selects" in message
        assert "403 Forbidden" in message
        await api.wait_for(
            DATASETS, "plain", _is("Prefetched", "True", "NothingToPrefetch"), namespace=NS
        )
        # The lists are still written for everyone else (here: nobody prefetches anything).
        await api.wait_for("v1/configmaps", "datapin-prefetch", bool, namespace=OPERATOR_NS)


async def _served(port: int) -> str | None:
    """The `datasets` entry of the operator's /healthz body; None while it does not answer
    (kopf binds the port shortly after it reports ready)."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
    except aiohttp.ClientConnectionError:
        return None
    return str(body.get("datasets"))


async def _health_says(api: Api, port: int, prefix: str, *, within: float = 20) -> None:
    async def check() -> bool:
        return (await _served(port) or "").startswith(prefix)

    # kopf caches probe results for 10 s.
    await api.wait_for_true(check, within=within)


async def test_a_crd_installed_after_the_operator_started_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    caplog.set_level(logging.INFO, logger="datapin_operator")
    async with emulator(crd=False) as (_, api):
        settings = _settings(api, tmp_path, health_port=port)
        async with running_operator(settings):
            await api.wait_for_true(lambda: "CRD is not installed" in caplog.text, within=15)
            warning = next(r for r in caplog.records if "CRD is not installed" in r.message)
            assert warning.levelno == logging.WARNING
            assert "datapin-operator crd | kubectl apply -f -" in warning.message
            assert "no restart needed" in warning.message
            await _health_says(api, port, "missing: the API server does not serve datasets")

            crd = yaml.safe_load(CHART_CRD_PATH.read_text())
            await api.create("apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            await api.create(DATASETS, _dataset("late", prefetch=False))
            obj = await api.wait_for(
                DATASETS, "late", _is("Resolved", "True"), namespace=NS, within=30
            )
            assert _condition(obj, "RemoteReachable")["reason"] == "SecretNotFound"
            await api.wait_for_true(lambda: "serving Datasets" in caplog.text, within=15)
            await _health_says(api, port, "served")


async def test_a_crd_installed_before_the_operator_started_is_served_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    caplog.set_level(logging.INFO, logger="datapin_operator")
    async with emulator() as (_, api), running_operator(_settings(api, tmp_path, health_port=port)):
        await api.create(DATASETS, _dataset("early", prefetch=False))
        await api.wait_for(DATASETS, "early", _is("Resolved", "True"), namespace=NS)
        await _health_says(api, port, "served")
    assert "CRD is not installed" not in caplog.text
