"""The webhook's certificate in cluster mode: one self-signed certificate in a Secret, shared
by every replica, renewed before it expires, its CA kept in the webhook configuration.

Why a Secret: the API server dials the webhook Service, which may route to any replica, and
checks the certificate against the configuration's one `caBundle`. Per-process certificates
(what kopf does by default) only work with one replica; cert-manager is the other way
(`webhook.tls.mode: certManager` in the chart, certificate files instead of this module).

The contract (Secret `DATAPIN_WEBHOOK_TLS_SECRET` in the operator's namespace, type
`kubernetes.io/tls`):

    tls.crt   the serving certificate, self-signed (its own CA), for every name of the Service
    tls.key   its private key (PKCS#8 PEM)
    ca.crt    what the API server must trust: the current certificate, plus the previous one
              while it is still valid

Rotation without a failed call: a renewal writes a new certificate and keeps the old one in
`ca.crt`. Every replica re-reads the Secret every `check` seconds, swaps its files in (kopf's
server restarts on changed files) and writes `ca.crt` into the configuration's `caBundle`;
the API server trusts old and new alike until the old one expires and drops out of the bundle.

Served files are published git-sync style: the three files go into a directory named by
their digest, then a relative symlink `current` is swapped over atomically, so the server
never reads a certificate of one generation with the key of another.

Concurrency and crashes: the Secret is the source of truth and always written first. Replicas
race to create it (409: read the winner's) or renew it (a merge patch with the
resourceVersion read as a precondition: the loser gets 409 and re-reads). A crash after the
Secret but before the files or the caBundle leaves a state the next check repairs, because
each check compares all three with the Secret. A Secret that is not ours to parse (garbage,
wrong names after the Service was renamed) is replaced, never served.

The decisions are pure (`assess`, `issue`); `TLSKeeper` does the I/O through `Kube`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from datapin_operator.errors import Conflict
from datapin_operator.kube import Kube
from datapin_operator.webhook.certs import self_signed, service_hostnames

log = logging.getLogger(__name__)

CERT: Final = "tls.crt"
KEY: Final = "tls.key"
CA: Final = "ca.crt"
#: The symlink the server's file paths go through.
CURRENT: Final = "current"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """The three PEM texts of the contract."""

    cert: str
    key: str
    ca: str

    def as_data(self) -> dict[str, str]:
        return {CERT: self.cert, KEY: self.key, CA: self.ca}

    def digest(self) -> str:
        return hashlib.sha256((self.cert + self.key + self.ca).encode()).hexdigest()[:16]


def _certificates(pem: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return []


def _names(certificate: x509.Certificate) -> set[str]:
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(ext.value.get_values_for_type(x509.DNSName))


def assess(  # noqa: PLR0911 - one return per reason, in the order they are checked
    data: dict[str, str] | None,
    *,
    names: Sequence[str],
    now: datetime.datetime,
    renew_before: datetime.timedelta,
) -> str | None:
    """Why the Secret's certificate must be (re)issued, or None if it can be served as it is."""
    if data is None:
        return "there is no certificate yet"
    cert, key, ca = data.get(CERT, ""), data.get(KEY, ""), data.get(CA, "")
    certs = _certificates(cert)
    if len(certs) != 1:
        return f"{CERT} is not one PEM certificate"
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError):
        return f"{KEY} is not an unencrypted PEM private key"
    served = certs[0]
    public = served.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ours = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != ours:
        return f"{KEY} does not belong to {CERT}"
    if served not in _certificates(ca):
        return f"{CA} does not contain {CERT}"
    missing = set(names) - _names(served)
    if missing:
        return f"the certificate does not name {', '.join(sorted(missing))}"
    if served.not_valid_after_utc - renew_before <= now:
        return f"the certificate expires at {served.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def issue(
    *,
    names: Sequence[str],
    days: int,
    previous: dict[str, str] | None,
    now: datetime.datetime,
) -> Bundle:
    """A new certificate; `ca.crt` also keeps the previous certificates still valid at `now`."""
    cert_pem, key_pem = self_signed(list(names), days=days, now=now)
    cert = cert_pem.decode()
    keep = [
        c
        for c in _certificates((previous or {}).get(CA, ""))
        if c.not_valid_after_utc > now and c.not_valid_before_utc <= now
    ]
    older = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in keep)
    return Bundle(cert=cert, key=key_pem.decode(), ca=cert + older)


def prune(data: dict[str, str], *, now: datetime.datetime) -> dict[str, str]:
    """`data` with expired certificates dropped from `ca.crt` (the served one stays)."""
    served = _certificates(data.get(CERT, ""))
    kept = [
        c for c in _certificates(data.get(CA, "")) if c.not_valid_after_utc > now or c in served
    ]
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in kept)
    return {**data, CA: pem}


def publish(directory: Path, bundle: Bundle) -> bool:
    """Write the bundle under `directory/current/` atomically; True if anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"gen-{bundle.digest()}"
    link = directory / CURRENT
    if link.is_symlink() and os.readlink(link) == name:
        return False
    generation = directory / name
    generation.mkdir(mode=0o700, exist_ok=True)
    for filename, text in bundle.as_data().items():
        path = generation / filename
        tmp = generation / f".{filename}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(text)
        tmp.replace(path)
    temp_link = directory / f".{CURRENT}.tmp"
    temp_link.unlink(missing_ok=True)
    temp_link.symlink_to(name)  # relative: the directory can be mounted anywhere
    temp_link.replace(link)
    for old in directory.glob("gen-*"):
        if old.name != name:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()
    return True


class TLSKeeper:
    """Keeps the Secret, this replica's files and the webhook configuration in step."""

    def __init__(
        self,
        *,
        kube: Kube,
        namespace: str,
        secret: str,
        service: str,
        configuration: str,
        directory: Path,
        days: int,
        renew_days: int,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.secret = secret
        self.names = service_hostnames(service, namespace)
        self.configuration = configuration
        self.directory = directory
        self.days = days
        self.renew_before = datetime.timedelta(days=renew_days)

    @property
    def certfile(self) -> Path:
        return self.directory / CURRENT / CERT

    @property
    def keyfile(self) -> Path:
        return self.directory / CURRENT / KEY

    @property
    def cafile(self) -> Path:
        return self.directory / CURRENT / CA

    async def ensure(self, *, now: datetime.datetime | None = None) -> Bundle:
        """One check: the Secret valid (issued or renewed if not), files and caBundle equal."""
        for _ in range(5):  # conflicts with other replicas: re-read and decide again
            moment = now or datetime.datetime.now(datetime.UTC)
            found = await self.kube.read_secret(self.namespace, self.secret)
            data, version = (found.data, found.resource_version) if found else (None, None)
            why = assess(data, names=self.names, now=moment, renew_before=self.renew_before)
            try:
                if why is not None or data is None:
                    bundle = issue(names=self.names, days=self.days, previous=data, now=moment)
                    await self._store(bundle, version)
                    log.info("webhook certificate issued in Secret %s: %s", self.secret, why)
                else:
                    pruned = prune(data, now=moment)
                    if pruned != data and version is not None:
                        await self.kube.write_tls_secret(
                            self.namespace, self.secret, pruned, resource_version=version
                        )
                    bundle = Bundle(cert=pruned[CERT], key=pruned[KEY], ca=pruned[CA])
            except Conflict:
                log.info("webhook certificate Secret %s changed meanwhile; re-reading", self.secret)
                continue
            if publish(self.directory, bundle):
                log.info("webhook certificate files updated in %s", self.directory)
            await self._ca_bundle(bundle.ca)
            return bundle
        raise RuntimeError(
            f"Secret {self.namespace}/{self.secret} kept changing under the operator; is "
            "another program writing it? Fix: leave it to the operator, or set "
            "DATAPIN_WEBHOOK_CERT_FILE/KEY_FILE/CA_FILE to certificates of your own"
        )

    async def _store(self, bundle: Bundle, version: str | None) -> None:
        if version is None:
            await self.kube.create_tls_secret(self.namespace, self.secret, bundle.as_data())
        else:
            await self.kube.write_tls_secret(
                self.namespace, self.secret, bundle.as_data(), resource_version=version
            )

    async def _ca_bundle(self, ca: str) -> None:
        encoded = base64.b64encode(ca.encode()).decode()
        changed = await self.kube.set_ca_bundle(self.configuration, encoded)
        if changed:
            log.info("caBundle of webhook configuration %s updated", self.configuration)

    async def run(self, *, interval: float, stop: asyncio.Event) -> None:
        """`ensure` every `interval` seconds until `stop`; failures are logged and retried."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set():
                return
            try:
                await self.ensure()
            except Exception as exc:  # the API server away for a moment: the next check
                log.warning("webhook certificate check failed: %s", exc)


__all__ = ["Bundle", "TLSKeeper", "assess", "issue", "prune", "publish"]
