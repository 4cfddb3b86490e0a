"""AWS Signature Version 4 for the few S3 requests datapin makes (GET, HEAD, LIST).

Why our own signer: botocore's request pipeline (event hooks, model-driven serialisation,
response parsing) costs about 1 ms of CPU per request, which on a 2-core node caps small
objects at a few hundred per second; signing itself is three HMACs and a SHA-256 (~20 µs).
The signing key depends only on the secret, the day, the region and the service, so it is
derived once per day and reused.

What is signed: the method, the canonical path (already percent-encoded by the caller, exactly
as sent), the canonical query, and the headers `host`, `x-amz-content-sha256`, `x-amz-date`
(and `x-amz-security-token` for temporary keys). Requests have no body, so the payload hash is
the SHA-256 of the empty string, which every S3 implementation accepts over plain HTTP too
(B2 among them); `Range` is left unsigned, as botocore does. Checksum headers
(`x-amz-checksum-*`) are never sent: Backblaze B2 rejects them, and objects are verified
against their DVC md5 anyway.

The spec: https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html. The
tests check our signatures against botocore's signer and against a real S3 server.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

#: SHA-256 of an empty payload: every request we sign has no body.
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
_ALGORITHM: Final = "AWS4-HMAC-SHA256"


def canonical_query(params: Mapping[str, str]) -> str:
    """Query parameters sorted and encoded as SigV4 wants (also what we put on the URL)."""
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )


class Signer:
    """Signs requests for one region and service; caches the day's signing key."""

    __slots__ = ("_key", "_key_for", "region", "service")

    def __init__(self, *, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key_for: tuple[str, str] = ("", "")
        self._key = b""

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key_for != (secret, day):
            key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._key, self._key_for = key, (secret, day)
        return self._key

    def headers(
        self,
        *,
        method: str,
        host: str,
        path: str,
        query: str = "",
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None = None,
        now: float | None = None,
    ) -> dict[str, str]:
        """The headers that authenticate the request (add them to whatever else is sent).

        `path` and `query` must be exactly what goes on the wire: `path` percent-encoded
        (`/` kept), `query` from `canonical_query`.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        if session_token:
            canonical_headers = (
                f"host:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\n"
                f"x-amz-date:{stamp}\nx-amz-security-token:{session_token}\n"
            )
            signed = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
        else:
            canonical_headers = (
                f"host:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{stamp}\n"
            )
            signed = "host;x-amz-content-sha256;x-amz-date"
        canonical = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{EMPTY_SHA256}"
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = (
            f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._signing_key(secret_access_key, day), to_sign.encode(), "sha256"
        ).hexdigest()
        headers = {
            "x-amz-date": stamp,
            "x-amz-content-sha256": EMPTY_SHA256,
            "Authorization": f"{_ALGORITHM} Credential={access_key_id}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}",
        }
        if session_token:
            headers["x-amz-security-token"] = session_token
        return headers
