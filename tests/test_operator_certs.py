"""TLS of the webhook: the self-signed certificates and the two kopf webhook servers.

What users depend on is that the API server trusts the webhook: the caBundle kopf registers
must validate the certificate the server actually serves, for the name the API server dials.
So the servers are started for real (kopf's aiohttp loop, real sockets on 127.0.0.1) and a
client whose only trust anchor is the registered caBundle posts to them with hostname checking
on; a client with the system trust store must fail, which shows the check is real.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from datapin_operator.webhook.certs import (
    DevWebhookServer,
    ServiceWebhookServer,
    self_signed,
    service_hostnames,
)

ANSWER = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {}}


async def answer(request: Any, **_: Any) -> Any:
    """A trivial admission function: kopf's server serialises whatever it returns."""
    return {**ANSWER, "response": {"uid": request["request"]["uid"], "allowed": True}}


#: The wildcard address as a host *name* handed to the certificate builder (nothing binds it).
ANY_V4 = "0.0.0.0"  # noqa: S104

REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u1"}}


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = ext.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return dns, ips


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- self_signed ------------------------------------------------------------------------------


def test_self_signed_is_a_p256_ca_and_server_certificate() -> None:
    cert_pem, key_pem = self_signed(["webhook.example", "127.0.0.1"], days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()
    assert cert.subject == cert.issuer  # self-signed: the caBundle is the certificate
    cert.verify_directly_issued_by(cert)  # raises if the signature does not check out
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_self_signed_sans_split_dns_and_ips_and_skip_unspecified() -> None:
    cert_pem, _ = self_signed([ANY_V4, "::", "10.0.0.1", "svc.ns.svc", "::1", "svc.ns.svc"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    dns, ips = _sans(cert)

    assert dns == ["svc.ns.svc"]  # deduplicated; IPs are not DNS names
    assert ips == ["10.0.0.1", "::1"]  # 0.0.0.0 and :: cannot be dialled
    assert _common_name(cert) == "svc.ns.svc"  # the first DNS name, even after IPs


def test_self_signed_common_name_falls_back_to_the_first_ip() -> None:
    cert = x509.load_pem_x509_certificate(self_signed([ANY_V4, "127.0.0.1"])[0])
    assert _common_name(cert) == "127.0.0.1"
    assert _sans(cert) == ([], ["127.0.0.1"])


def test_self_signed_long_names_stay_out_of_the_common_name() -> None:
    long_name = "webhook-" + "a" * 60 + ".datapin.svc"  # longer than X.509's 64-character CN
    cert = x509.load_pem_x509_certificate(self_signed([long_name])[0])
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # RFC 5280: an empty subject needs critical SANs
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_self_signed_encrypts_the_key_with_a_password() -> None:
    _, key_pem = self_signed(["localhost"], password="s3cret")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, password=None)
    assert serialization.load_pem_private_key(key_pem, password=b"s3cret")


def test_self_signed_without_a_usable_name_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match=r"no usable host name.*Fix:"):
        self_signed([ANY_V4, "::"])


def test_service_hostnames_are_every_name_of_the_service() -> None:
    assert service_hostnames("hook", "ops") == [
        "hook",
        "hook.ops",
        "hook.ops.svc",
        "hook.ops.svc.cluster.local",
    ]


# -- the servers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(server: kopf.WebhookServer) -> AsyncIterator[kopf.WebhookClientConfig]:
    """Start kopf's serving loop as kopf does (inside `async with`) and yield the client
    config it would register; the socket is closed on exit."""
    async with server:
        configs = server(answer)
        try:
            yield await anext(configs)
        finally:
            await configs.aclose()  # type: ignore[attr-defined]


def _ca_context(config: kopf.WebhookClientConfig) -> ssl.SSLContext:
    """A client trusting nothing but the caBundle the API server would be given."""
    bundle = config.get("caBundle")
    assert bundle, f"no caBundle in {config}"
    context = ssl.create_default_context(cadata=base64.b64decode(bundle).decode("ascii"))
    assert context.check_hostname
    return context


async def test_dev_server_cabundle_validates_the_served_certificate() -> None:
    async with serving(DevWebhookServer(addr="127.0.0.1", port=0)) as config:
        url = config.get("url")
        assert url
        assert url.startswith("https://127.0.0.1:")
        assert "service" not in config

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/handler-id", json=REVIEW, ssl=_ca_context(config)) as r:
                assert r.status == 200
                assert await r.json() == {
                    **ANSWER,
                    "response": {"uid": "u1", "allowed": True},
                }

            # The system trust store does not know our CA: the check above was a real one.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.post(
                    f"{url}/handler-id", json=REVIEW, ssl=ssl.create_default_context()
                )


async def test_dev_server_certificate_names_the_address_served() -> None:
    async with serving(DevWebhookServer(addr="127.0.0.1", port=0)) as config:
        bundle = config.get("caBundle")
        assert bundle
        cert = x509.load_pem_x509_certificate(base64.b64decode(bundle))
        assert _common_name(cert) == "127.0.0.1"
        # An IP SAN, not a DNS one: Kubernetes (Go) matches an IP only against IP SANs.
        assert _sans(cert) == ([], ["127.0.0.1"])


async def test_service_server_registers_the_service_and_serves_its_names() -> None:
    port = _free_port()
    server = ServiceWebhookServer(
        service="datapin-webhook",
        namespace="datapin",
        port=443,
        listen_port=port,
        addr="127.0.0.1",  # tests listen on loopback; in-cluster the default is 0.0.0.0
        path="/hooks",
    )
    async with serving(server) as config:
        assert "url" not in config
        assert config.get("service") == {
            "namespace": "datapin",
            "name": "datapin-webhook",
            "port": 443,
            "path": "/hooks",
        }
        bundle = config.get("caBundle")
        assert bundle
        cert = x509.load_pem_x509_certificate(base64.b64decode(bundle))
        dns, _ = _sans(cert)
        assert set(service_hostnames("datapin-webhook", "datapin")) <= set(dns)
        assert _common_name(cert) == "datapin-webhook.datapin.svc"

        # What the API server does: dial the Service (here: its endpoint) by the Service's name,
        # at the path kopf registers (service.path + "/" + handler id), trusting the caBundle.
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"https://127.0.0.1:{port}/hooks/handler-id",
                json=REVIEW,
                ssl=_ca_context(config),
                server_hostname="datapin-webhook.datapin.svc",
            ) as r:
                assert r.status == 200
                assert (await r.json())["response"]["allowed"] is True
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.post(
                    f"https://127.0.0.1:{port}/hooks/handler-id",
                    json=REVIEW,
                    ssl=_ca_context(config),
                    server_hostname="elsewhere.datapin.svc",
                )


async def test_service_server_without_path_lets_kopf_append_the_handler_id() -> None:
    server = ServiceWebhookServer(
        service="hook", namespace="ops", port=_free_port(), addr="127.0.0.1"
    )
    async with serving(server) as config:
        service = config.get("service")
        assert service
        assert "path" not in service  # kopf makes it "/<handler id>"
        assert service.get("port") == server.port  # listens on the Service port by default


async def test_service_server_with_certificate_files_registers_their_ca(tmp_path: Any) -> None:
    cert_pem, key_pem = self_signed(["hook.ops.svc"])
    ca_pem, _ = self_signed(["some-ca"])
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    (tmp_path / "ca.crt").write_bytes(ca_pem)
    server = ServiceWebhookServer(
        service="hook",
        namespace="ops",
        port=_free_port(),
        addr="127.0.0.1",
        certfile=tmp_path / "tls.crt",
        pkeyfile=tmp_path / "tls.key",
        cafile=tmp_path / "ca.crt",
    )
    async with serving(server) as config:
        bundle = config.get("caBundle")
        assert bundle
        assert base64.b64decode(bundle) == ca_pem  # the files, not a self-signed certificate


def test_service_server_needs_a_real_service_port() -> None:
    with pytest.raises(ValueError, match=r"port 0 .*Fix: set DATAPIN_WEBHOOK_PORT"):
        ServiceWebhookServer(service="hook", namespace="ops", port=0)
