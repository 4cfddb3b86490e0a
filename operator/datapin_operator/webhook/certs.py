"""TLS for the admission webhook: self-signed certificates and the two kopf webhook servers.

The API server only calls webhooks over HTTPS and checks the certificate against the
`caBundle` of the webhook configuration. kopf can generate a self-signed certificate, but its
generator needs certbuilder and oscrypto, and oscrypto cannot parse OpenSSL 3.x version
strings; `self_signed` does the same job with PyCA's cryptography (already in the tree). The
certificate is its own CA (CA:true, keyCertSign) *and* the server's certificate (serverAuth,
digitalSignature), so the caBundle kopf registers is exactly the certificate served: nothing
else to distribute. EC P-256 keeps generation instant (RSA-2048 takes ~100 ms and more CPU on
every restart) and is accepted by every API server and by Python's ssl.

Two servers, both reusing kopf's serving loop (aiohttp, certificate-file renewal, the handler
id in the path) rather than reimplementing it:

* `DevWebhookServer`: kopf's server with our certificate builder. For running the operator
  from a laptop: it serves on 127.0.0.1 (or any `addr`) and registers `clientConfig.url`.
* `ServiceWebhookServer`: in-cluster. It serves on 0.0.0.0 and registers
  `clientConfig.service` (namespace/name/port/path) instead of a URL, because the API server
  reaches in-cluster webhooks through their Service. It rewrites each client configuration the
  parent yields (a new one each time the certificate files change); kopf then appends the
  handler id to `service.path` as it would to a URL. A self-signed certificate carries every
  name the API server may dial: `<service>`, `<service>.<namespace>`,
  `<service>.<namespace>.svc` (what it actually uses) and the `.cluster.local` form.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any, Final

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: X.509 caps a CommonName at 64 characters; longer names live in the SANs only.
_MAX_CN: Final = 64
#: Certificates start slightly in the past: an API server whose clock runs a little behind
#: ours must not see a certificate that is not valid yet.
_BACKDATE: Final = datetime.timedelta(minutes=5)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _split(hostnames: Sequence[str]) -> tuple[list[str], list[IPAddress]]:
    """DNS names and IP addresses (normalised), deduplicated in order; 0.0.0.0/:: dropped."""
    names: list[str] = []
    ips: list[IPAddress] = []
    for hostname in hostnames:
        try:
            ip = ipaddress.ip_address(hostname)
        except ValueError:
            if hostname and hostname not in names:
                names.append(hostname)
            continue
        # A bind-everything address is not one anybody can connect to.
        if not ip.is_unspecified and ip not in ips:
            ips.append(ip)
    return names, ips


def self_signed(
    hostnames: Sequence[str],
    *,
    days: int = 365,
    password: str | None = None,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed CA+server certificate for `hostnames`, as (certificate PEM, key PEM).

    DNS names and IP addresses become SANs of their kind; the CommonName is the first DNS name
    (else the first IP). `password` encrypts the key (kopf passes its server's password).
    Valid from `now` (default: the clock) minus a few minutes, for `days`.
    """
    names, ips = _split(hostnames)
    if not names and not ips:
        raise ValueError(
            f"self_signed: no usable host name in {list(hostnames)!r} (0.0.0.0 and :: cannot "
            "be connected to). Fix: pass the DNS name or IP address clients connect to"
        )
    if days < 1:
        raise ValueError(f"self_signed: days={days} must be at least 1. Fix: pass days >= 1")
    common = [name for name in names if len(name) <= _MAX_CN] + [str(ip) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[0])] if common else [])
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    sans += [x509.IPAddress(ip) for ip in ips]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # RFC 5280: with an empty subject the SANs are the identity and must be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not common)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def service_hostnames(service: str, namespace: str) -> list[str]:
    """Every DNS name of a Service the API server may dial, most specific last."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


class DevWebhookServer(kopf.WebhookServer):
    """kopf's server with our certificate builder (kopf's needs certbuilder/oscrypto)."""

    @staticmethod
    def build_certificate(
        hostnames: Collection[str], password: str | None = None
    ) -> tuple[bytes, bytes]:
        """A self-signed certificate for `hostnames` (see `self_signed`)."""
        return self_signed(list(hostnames), password=password)


class ServiceWebhookServer(DevWebhookServer):
    """Serves on 0.0.0.0 and registers `clientConfig.service` (namespace/name/port/path)
    instead of a URL, for in-cluster use behind the webhook Service.

    `port` is the Service's port, which the API server dials; the server listens on it too
    unless `listen_port` (the Service's targetPort) differs. Without `certfile`/`pkeyfile` the
    certificate is self-signed for the Service's names; `cafile` overrides the caBundle
    registered for provided certificates (default: the certificate itself). Other keywords go
    to `kopf.WebhookServer` (e.g. `path`, `addr`).
    """

    def __init__(
        self,
        *,
        service: str,
        namespace: str,
        port: int,
        listen_port: int | None = None,
        certfile: str | Path | None = None,
        pkeyfile: str | Path | None = None,
        cafile: str | Path | None = None,
        **kw: Any,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(
                f"webhook Service port {port} is not a port the API server can dial. Fix: set "
                "DATAPIN_WEBHOOK_PORT to the webhook Service's port (1-65535)"
            )
        names = service_hostnames(service, namespace)
        kw.setdefault("addr", "0.0.0.0")  # noqa: S104 - in-cluster: the Service routes to us
        extra = [*names, *kw.pop("extra_sans", ())]
        super().__init__(
            port=port if listen_port is None else listen_port,
            # The name the API server uses: the self-signed certificate's CommonName.
            host=names[2],
            certfile=certfile,
            pkeyfile=pkeyfile,
            cafile=cafile,
            extra_sans=extra,
            **kw,
        )
        self.service = service
        self.namespace = namespace
        self.service_port = port

    def _service_config(self, config: kopf.WebhookClientConfig) -> kopf.WebhookClientConfig:
        service = kopf.WebhookClientConfigService(
            namespace=self.namespace, name=self.service, port=self.service_port
        )
        path = (self.path or "").rstrip("/")
        if path:
            service["path"] = path
        out = kopf.WebhookClientConfig(service=service)
        if config.get("caBundle"):
            out["caBundle"] = config["caBundle"]
        return out

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        # The parent serves and yields URL configs (again after each certificate renewal).
        # Its serving generator is stopped by kopf's `async with` on the server; closing the
        # parent's iterator here as well ends it promptly when only this one is closed.
        configs = super().__call__(fn)
        try:
            async for config in configs:
                yield self._service_config(config)
        finally:
            if isinstance(configs, AsyncGenerator):  # kopf types it as a mere iterator
                await configs.aclose()


__all__ = [
    "DevWebhookServer",
    "ServiceWebhookServer",
    "self_signed",
    "service_hostnames",
]
