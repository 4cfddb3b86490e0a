"""The webhook in cluster mode: the shared self-signed certificate, its rotation, and the
chart's webhook configuration served by the real operator over real HTTPS.

What users depend on:

* Every replica serves a certificate the configuration's caBundle trusts: the first replica
  issues it into the Secret, the others adopt it (also when they race to create it).
* Renewal before expiry never breaks a call: the new certificate is served while the old one
  stays in the caBundle until it expires, then drops out.
* A Secret that cannot be served (garbage, a key of another certificate, names of a renamed
  Service) is replaced, never served.
* The operator in cluster mode against the configuration *the chart renders* (helm-python-sdk)
  fills in the caBundle, leaves the rest alone (kopf does not take the configuration over), and
  answers AdmissionReviews at the chart's paths, verified with that caBundle and the Service's
  DNS name, as the API server would.
* The client's writes are merge patches a real API server accepts (the generated client would
  send a dict as a JSON Patch by default; the test API refuses that as the API server does).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest
import yaml
from cryptography import x509
from datapin_operator.kube import Kube
from datapin_operator.settings import Settings
from datapin_operator.webhook.certs import service_hostnames
from datapin_operator.webhook.tls import (
    CA,
    CERT,
    CURRENT,
    KEY,
    TLSKeeper,
    assess,
    issue,
    prune,
    publish,
)

from testkit.kubeapi import Api, admission_review, emulator
from testkit.operatorrun import running_operator
from testkit.seaweed import free_ports
from tests.conftest import REPO_ROOT

NS = "datapin"
SERVICE = "datapin-webhook"
SECRET = "datapin-webhook-tls"
CONFIGURATION = "datapin.dev"
NAMES = service_hostnames(SERVICE, NS)
RENEW = datetime.timedelta(days=30)
MWC = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _bundle_certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def chart_webhook_configuration(namespace: str = NS) -> dict[str, Any]:
    """The MutatingWebhookConfiguration exactly as the chart renders it (defaults)."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
    chart = helm.Chart.load(REPO_ROOT / "charts" / "datapin")
    rendered = chart.render({}, name="datapin", namespace=namespace)
    for path, text in rendered.items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "MutatingWebhookConfiguration":
                return doc
    raise AssertionError("the chart renders no MutatingWebhookConfiguration")


# --- the pure decisions --------------------------------------------------------------------


def test_an_issued_certificate_is_served_as_it_is() -> None:
    now = _now()
    bundle = issue(names=NAMES, days=365, previous=None, now=now)
    assert assess(bundle.as_data(), names=NAMES, now=now, renew_before=RENEW) is None
    assert bundle.ca == bundle.cert  # its own CA: nothing else to distribute


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: None, "there is no certificate yet"),
        (lambda d: {**d, CERT: "garbage"}, "not one PEM certificate"),
        (lambda d: {**d, KEY: "garbage"}, "not an unencrypted PEM private key"),
        (lambda d: {**d, CA: ""}, "does not contain"),
    ],
)
def test_a_secret_that_cannot_be_served_is_reissued(damage: Any, reason: str) -> None:
    now = _now()
    data = issue(names=NAMES, days=365, previous=None, now=now).as_data()
    why = assess(damage(data), names=NAMES, now=now, renew_before=RENEW)
    assert why is not None
    assert reason in why


def test_a_key_of_another_certificate_is_refused() -> None:
    now = _now()
    a = issue(names=NAMES, days=365, previous=None, now=now).as_data()
    b = issue(names=NAMES, days=365, previous=None, now=now).as_data()
    why = assess({**a, KEY: b[KEY]}, names=NAMES, now=now, renew_before=RENEW)
    assert why == f"{KEY} does not belong to {CERT}"


def test_a_renamed_service_gets_a_certificate_with_its_names() -> None:
    now = _now()
    data = issue(names=service_hostnames("old-hook", NS), days=365, previous=None, now=now)
    why = assess(data.as_data(), names=NAMES, now=now, renew_before=RENEW)
    assert why is not None
    assert f"{SERVICE}.{NS}.svc" in why


def test_renewal_starts_renew_before_the_expiry_and_keeps_the_old_ca() -> None:
    now = _now()
    old = issue(names=NAMES, days=365, previous=None, now=now)
    expiry = _cert(old.cert).not_valid_after_utc
    assert assess(old.as_data(), names=NAMES, now=expiry - RENEW - datetime.timedelta(hours=1),
                  renew_before=RENEW) is None  # fmt: skip
    later = expiry - RENEW + datetime.timedelta(hours=1)
    why = assess(old.as_data(), names=NAMES, now=later, renew_before=RENEW)
    assert why is not None
    assert "expires" in why
    new = issue(names=NAMES, days=365, previous=old.as_data(), now=later)
    ca = _bundle_certs(new.ca)
    assert ca == [_cert(new.cert), _cert(old.cert)]  # the API server trusts both meanwhile
    # Once the old one has expired it drops out of the bundle; the served one never does.
    after = expiry + datetime.timedelta(minutes=1)
    assert _bundle_certs(prune(new.as_data(), now=after)[CA]) == [_cert(new.cert)]
    assert prune(new.as_data(), now=later) == new.as_data()


def test_files_are_published_as_one_generation(tmp_path: Path) -> None:
    now = _now()
    first = issue(names=NAMES, days=365, previous=None, now=now)
    assert publish(tmp_path, first)
    link = tmp_path / CURRENT
    assert link.is_symlink()
    assert not os.readlink(link).startswith("/")  # relative: valid wherever it is mounted
    assert (link / CERT).read_text() == first.cert
    assert (link / KEY).stat().st_mode & 0o077 == 0  # the key is readable by us only
    assert not publish(tmp_path, first)  # unchanged: nothing written, nothing restarted
    second = issue(names=NAMES, days=365, previous=first.as_data(), now=now)
    assert publish(tmp_path, second)
    assert (link / CERT).read_text() == second.cert
    assert (link / KEY).read_text() == second.key
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("gen-")] == [
        os.readlink(link)
    ]  # the old generation is gone


# --- the keeper against the API ------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as (_, api):
        await api.create(MWC, chart_webhook_configuration())
        yield api


def _keeper(api: Api, directory: Path) -> TLSKeeper:
    kube = Kube.from_settings(Settings(api_server=api.url))
    return TLSKeeper(
        kube=kube,
        namespace=NS,
        secret=SECRET,
        service=SERVICE,
        configuration=CONFIGURATION,
        directory=directory,
        days=365,
        renew_days=30,
    )


async def _secret(api: Api) -> dict[str, str]:
    found = await api.get("v1/secrets", SECRET, NS)
    assert found is not None
    assert found["type"] == "kubernetes.io/tls"
    return {k: base64.b64decode(v).decode() for k, v in found["data"].items()}


async def _ca_bundles(api: Api) -> list[str]:
    mwc = await api.get(MWC, CONFIGURATION)
    return [base64.b64decode(w["clientConfig"]["caBundle"]).decode() for w in mwc["webhooks"]]


async def test_replicas_share_one_certificate_and_the_ca_bundle(api: Api, tmp_path: Path) -> None:
    one, two = _keeper(api, tmp_path / "one"), _keeper(api, tmp_path / "two")
    try:
        # Both start at once on an empty cluster: one creates, the other gets 409 and adopts.
        a, b = await asyncio.gather(one.ensure(), two.ensure())
        assert a == b
        stored = await _secret(api)
        assert stored == a.as_data()
        assert one.certfile.read_text() == two.certfile.read_text() == stored[CERT]
        assert await _ca_bundles(api) == [stored[CA], stored[CA]]  # jobs and pods webhooks
        # The rest of the chart's configuration is untouched.
        chart = chart_webhook_configuration()
        mwc = await api.get(MWC, CONFIGURATION)
        for ours, theirs in zip(mwc["webhooks"], chart["webhooks"], strict=True):
            assert {**ours, "clientConfig": {"service": ours["clientConfig"]["service"]}} == theirs
        # A restart of either replica changes nothing.
        assert await one.ensure() == a
        assert await _secret(api) == stored
    finally:
        one.kube.close()
        two.kube.close()


async def test_rotation_serves_the_new_certificate_and_trusts_both(
    api: Api, tmp_path: Path
) -> None:
    one, two = _keeper(api, tmp_path / "one"), _keeper(api, tmp_path / "two")
    try:
        first = await one.ensure()
        await two.ensure()
        expiry = _cert(first.cert).not_valid_after_utc
        later = expiry - RENEW + datetime.timedelta(hours=1)
        renewed = await one.ensure(now=later)
        assert renewed.cert != first.cert
        # The other replica adopts the renewal instead of issuing one more.
        assert await two.ensure(now=later) == renewed
        assert two.certfile.read_text() == renewed.cert
        ca = _bundle_certs((await _secret(api))[CA])
        assert ca == [_cert(renewed.cert), _cert(first.cert)]
        for bundle in await _ca_bundles(api):
            assert _bundle_certs(bundle) == ca
        # After the old certificate expired, the next check prunes it everywhere.
        after = expiry + datetime.timedelta(minutes=1)
        pruned = await two.ensure(now=after)
        assert _bundle_certs(pruned.ca) == [_cert(renewed.cert)]
        assert await _ca_bundles(api) == [pruned.ca, pruned.ca]
    finally:
        one.kube.close()
        two.kube.close()


async def test_a_broken_secret_is_replaced_not_served(api: Api, tmp_path: Path) -> None:
    await api.create(
        "v1/secrets",
        {
            "metadata": {"name": SECRET, "namespace": NS},
            "type": "kubernetes.io/tls",
            "data": {CERT: base64.b64encode(b"nope").decode(), KEY: ""},
        },
    )
    keeper = _keeper(api, tmp_path)
    try:
        bundle = await keeper.ensure()
        assert _cert(bundle.cert)  # parses: a real certificate now
        assert await _secret(api) == bundle.as_data()
    finally:
        keeper.kube.close()


async def test_writes_are_merge_patches_a_real_api_server_accepts(api: Api) -> None:
    kube = Kube.from_settings(Settings(api_server=api.url))
    try:
        assert await kube.apply_configmap(NS, "prefetch", {"a.json": "1", "b.json": "2"})
        assert await kube.apply_configmap(NS, "prefetch", {"a.json": "3"})
        found = await api.get("v1/configmaps", "prefetch", NS)
        assert found["data"] == {"a.json": "3"}
        assert not await kube.apply_configmap(NS, "prefetch", {"a.json": "3"})
    finally:
        kube.close()


async def test_a_missing_configuration_names_the_fix(tmp_path: Path) -> None:
    async with emulator() as (_, api):
        keeper = _keeper(api, tmp_path)
        try:
            with pytest.raises(LookupError, match=r"chart creates it\. Fix: `helm upgrade`"):
                await keeper.ensure()
        finally:
            keeper.kube.close()


# --- the operator in cluster mode, with the chart's configuration ---------------------------


async def test_operator_serves_the_charts_webhook_configuration(api: Api, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    settings = Settings(
        api_server=api.url,
        namespace=NS,
        webhook_mode="cluster",
        webhook_port=port,
        webhook_service=SERVICE,
        webhook_tls_secret=SECRET,
        webhook_configuration=CONFIGURATION,
        webhook_cert_dir=tmp_path / "tls",
        git_cache_dir=tmp_path / "git",
        resync_seconds=30,
    )
    async with running_operator(settings), aiohttp.ClientSession() as http:
        mwc = await api.get(MWC, CONFIGURATION)
        # The chart's configuration, caBundle added and nothing else changed: kopf did not take
        # it over (it would drop the matchConditions and namespaceSelector).
        chart = chart_webhook_configuration()
        for ours, theirs in zip(mwc["webhooks"], chart["webhooks"], strict=True):
            assert {**ours, "clientConfig": {"service": ours["clientConfig"]["service"]}} == theirs
        for webhook in mwc["webhooks"]:
            config = webhook["clientConfig"]
            ca = base64.b64decode(config["caBundle"]).decode()
            context = ssl.create_default_context(cadata=ca)
            service = config["service"]
            assert (service["name"], service["namespace"]) == (SERVICE, NS)
            kind = "Job" if webhook["name"].startswith("jobs") else "Pod"
            obj: dict[str, Any] = {
                "apiVersion": "batch/v1" if kind == "Job" else "v1",
                "kind": kind,
                "metadata": {"name": "plain", "namespace": "team"},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}
                if kind == "Pod"
                else {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
            }
            # Dial the operator on 127.0.0.1 (in a cluster: the Service's port, which the chart
            # sets to the same number) but verify the name the API server uses.
            url = f"https://{SERVICE}.{NS}.svc:{port}{service['path']}"
            review = await _post_when_up(url, context, admission_review(obj, namespace="team"))
            assert review["response"]["allowed"] is True
            assert "patch" not in review["response"]  # not ours: admitted unchanged
        # The certificate served is the one in the Secret.
        stored = await _secret(api)
        assert (
            stored[CA] == base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"]).decode()
        )
        del http


async def _post_when_up(url: str, context: ssl.SSLContext, body: Any) -> Any:
    """POST once the server listens (kopf starts it shortly after it reports ready)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        connector = aiohttp.TCPConnector(ssl=context, resolver=_Loopback())
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(url, json=body) as resp,
            ):
                assert resp.status == 200, await resp.text()
                return await resp.json()
        except aiohttp.ClientConnectorError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


class _Loopback(aiohttp.abc.AbstractResolver):
    """Resolves every name to 127.0.0.1, so TLS verifies the Service's DNS name."""

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": 2,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None
