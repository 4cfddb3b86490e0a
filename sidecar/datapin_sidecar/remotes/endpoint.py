"""Where an S3-compatible DVC remote is: `RemoteConfig`, resolved once, trusted after.

The S3 client signs its own requests (SigV4 over aiohttp), so everything that decides *what*
it signs and sends is computed here, as plain values it can trust without re-checking.
`RemoteConfig` is a DVC S3 remote (`s3://bucket/prefix`) resolved against its endpoint: the
SigV4 region, path- or virtual-hosted addressing (`Addressing`), the Host header and the exact
encoded path to sign. All of it is computed once and validated at construction (`from_url`
normalises user input; `__post_init__` re-checks the invariants, so even `dataclasses.replace`
cannot make an inconsistent config). A bad value fails at start-up with a message naming it
and the fix, not as a `403 SignatureDoesNotMatch` halfway through a download.

URLs containing `@` are refused without being echoed, as they may embed `key:secret@`. No
networking here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.errors import UsageError

__all__ = ["URL_SCHEME", "Addressing", "RemoteConfig", "shown_url"]


class Addressing(StrEnum):
    """How the bucket is put into requests: `https://host/bucket/key` or `https://bucket.host/key`."""

    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_B2_HOST: Final = re.compile(r"s3\.([a-z0-9-]+)\.backblazeb2\.com")
#: An AWS region as it appears in an endpoint host label: us-east-1, eu-central-2, us-gov-west-1.
_AWS_REGION: Final = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
#: Regions go into the SigV4 credential scope `<date>/<region>/s3/aws4_request`.
_REGION: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A DNS host name; underscores allowed (docker-compose service names such as `minio_1`).
_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
URL_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def shown_url(url: str) -> str:
    """`url` as it may appear in a message: nothing with `@`, no query or fragment."""
    if "@" in url:
        return "<URL not shown: it contains '@' and may embed credentials>"
    return re.split(r"[?#]", url, maxsplit=1)[0]


def _is_aws(host: str) -> bool:
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn")) or host == "amazonaws.com"


def _endpoint_region(host: str) -> str | None:
    """The region an endpoint host names (B2 and regional AWS endpoints), else None."""
    b2 = _B2_HOST.fullmatch(host)
    if b2 is not None:
        return b2.group(1)
    if _is_aws(host):
        for label in host.split("."):
            candidate = label.removeprefix("s3-")
            if candidate == "external-1":  # s3-external-1.amazonaws.com is us-east-1
                return "us-east-1"
            if _AWS_REGION.fullmatch(candidate):
                return candidate
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Endpoint:
    scheme: str
    host: str  # lower case; an IPv6 address in brackets
    port: int | None  # None when it is the scheme's default
    is_ip: bool

    @property
    def netloc(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def wildcard_tls(self) -> bool:
        """Served under a wildcard certificate for `<bucket>.<host>` (AWS, B2)."""
        return _is_aws(self.host) or self.host.endswith(".backblazeb2.com")


def _parse_endpoint(endpoint_url: str) -> _Endpoint:
    shown = shown_url(endpoint_url)
    example = "https://s3.us-west-002.backblazeb2.com"
    if "@" in endpoint_url:
        raise UsageError(
            f"endpoint URL: {shown}. Fix: write the endpoint as scheme://host[:port] "
            f"(e.g. {example}) and give the keys as credentials, never in a URL"
        )
    if URL_SCHEME.match(endpoint_url) is None:
        raise UsageError(
            f"endpoint URL {shown!r} has no scheme. Fix: write it as "
            f"'https://{shown.strip('/')}' (or http:// for a local test server)"
        )
    try:
        parts = urlsplit(endpoint_url)
        port = parts.port
    except ValueError:
        raise UsageError(
            f"endpoint URL {shown!r} is not a valid URL (bad port or address). Fix: write it "
            f"as scheme://host[:port], e.g. {example}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UsageError(
            f"endpoint URL {shown!r} uses {scheme}://, but an S3 endpoint is https:// "
            f"(or http:// for a local test server). Fix: use e.g. {example}"
        )
    if parts.path not in ("", "/"):
        raise UsageError(
            f"endpoint URL {shown!r} has a path ({parts.path}): an endpoint is only "
            f"scheme://host[:port]. Fix: use {scheme}://{parts.netloc} and put the bucket "
            "and prefix in the remote URL (s3://bucket/prefix)"
        )
    if parts.query or parts.fragment or endpoint_url.rstrip().endswith(("?", "#")):
        raise UsageError(
            f"endpoint URL {shown!r} has a query or fragment (?... or #...). Fix: use "
            f"{scheme}://{parts.netloc}"
        )
    host = parts.hostname or ""
    if not host:
        raise UsageError(f"endpoint URL {shown!r} has no host. Fix: use e.g. {example}")
    if port == 0:
        raise UsageError(f"endpoint URL {shown!r} has port 0. Fix: give the server's port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if _HOSTNAME.fullmatch(host) is None:
            raise UsageError(
                f"endpoint URL {shown!r}: {host!r} is not a valid host name. Fix: use e.g. "
                f"{example}"
            ) from None
        is_ip = False
    else:
        is_ip = True
        if address.version == 6:
            host = f"[{host}]"
    if port == _DEFAULT_PORTS[scheme]:
        port = None
    return _Endpoint(scheme=scheme, host=host, port=port, is_ip=is_ip)


def _aws_endpoint(region: str) -> _Endpoint:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return _Endpoint(scheme="https", host=f"s3.{region}.{suffix}", port=None, is_ip=False)


def _bucket_problems(bucket: str) -> list[str]:
    problems = []
    if not 3 <= len(bucket) <= 63:
        problems.append(f"it has {len(bucket)} characters (3 to 63 are allowed)")
    bad = sorted({c for c in bucket if not (c.isascii() and (c.isalnum() or c in "._-"))})
    if bad:
        problems.append(
            f"it contains {', '.join(repr(c) for c in bad)} (only lowercase letters, digits, "
            "dots and hyphens are allowed)"
        )
    elif bucket and not (bucket[0].isalnum() and bucket[-1].isalnum()):
        problems.append("it must begin and end with a letter or digit")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        problems.append("it has two dots, or a dot and a hyphen, next to each other")
    if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", bucket):
        problems.append("it is formatted as an IP address")
    return problems


def _check_bucket(bucket: str) -> None:
    problems = _bucket_problems(bucket)
    if problems:
        raise UsageError(
            f"bucket name {bucket!r} is invalid: {'; '.join(problems)}. Fix: use the bucket's "
            "name exactly as the S3/B2 console shows it, in s3://BUCKET/prefix"
        )


def _dns_problem(bucket: str, endpoint: _Endpoint) -> str | None:
    """Why `bucket` cannot be a host name label under `endpoint`, or None if it can."""
    # Legacy names (B2 allows mixed case; AWS us-east-1 once allowed upper case and
    # underscores) are valid buckets but not host names: only path style reaches them.
    if bucket != bucket.lower() or "_" in bucket:
        return f"bucket {bucket!r} has upper case letters or underscores, invalid in a host name"
    if "." in bucket and endpoint.scheme == "https":
        return (
            f"bucket {bucket!r} has dots, so {bucket}.{endpoint.host} does not match the "
            "server's TLS certificate"
        )
    return None


def _check_prefix(prefix: str) -> None:
    if prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must not start or end with '/': {prefix!r}")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise UsageError(
            f"remote prefix {prefix!r} has an empty, '.' or '..' path segment: S3 keys are "
            "taken literally, so it would not name the objects `dvc push` wrote. Fix: write "
            "the URL as s3://bucket/prefix with single slashes"
        )


def _format_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of a DVC S3 remote URL, validated."""
    form = "DVC's S3 and Backblaze B2 remotes are written s3://bucket/prefix"
    url = url.strip()
    if not url:
        raise UsageError(f"the remote URL is empty: {form}. Fix: give the remote's URL")
    if "@" in url:
        raise UsageError(
            f"the remote URL contains '@' (not shown: it may embed credentials); {form}. "
            "Fix: remove 'key:secret@' from the URL and give the keys as credentials"
        )
    scheme = URL_SCHEME.match(url)
    if scheme is None or scheme.group(1).lower() != "s3":
        what = f"uses {scheme.group(1)}://" if scheme else "is not a URL"
        raise UsageError(
            f"remote URL {shown_url(url)!r} {what}: {form} (the endpoint, e.g. "
            "https://s3.us-west-002.backblazeb2.com, is given separately). Fix: write it as "
            "s3://bucket/prefix"
        )
    rest = url[scheme.end() :]
    if "?" in rest or "#" in rest:
        raise UsageError(
            f"remote URL {shown_url(url)!r} has a query or fragment (?... or #...): {form}. "
            "Fix: remove it"
        )
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise UsageError(f"remote URL {url!r} has no bucket: {form}. Fix: name the bucket")
    if ":" in bucket:
        raise UsageError(
            f"remote URL {url!r} has a port or ':' after the bucket: {form}. Fix: put the "
            "server in the endpoint URL (https://host:port) and only the bucket in the s3:// URL"
        )
    _check_bucket(bucket)
    prefix = path.strip("/")
    _check_prefix(prefix)
    return bucket, prefix


def _quote_key(key: str) -> str:
    # SigV4's canonical URI for S3: every byte of the UTF-8 key percent-encoded except the
    # unreserved A-Za-z0-9-._~ and '/', encoded once (S3 is the one service not encoded twice).
    return quote(key, safe="/")


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteConfig:
    """An S3-compatible DVC remote: bucket and prefix at an endpoint, ready for signing.

    Build it with `from_url`, which normalises and derives; the constructor only validates.
    Invalid values raise `UsageError` naming the value and the fix; an inconsistent direct
    construction (url not matching bucket and prefix) raises `ValueError`.
    """

    url: str
    """`s3://bucket/prefix` (or `s3://bucket`), no trailing slash."""
    bucket: str
    prefix: str = ""
    """Key prefix without leading or trailing slash; may be empty."""
    endpoint_url: str | None = None
    """`scheme://host[:port]`; None means AWS, `https://s3.<region>.amazonaws.com`."""
    region: str
    """The SigV4 region. Must equal the one a B2 or regional AWS endpoint names."""
    addressing: Addressing = Addressing.AUTO
    """As requested; `resolved_addressing` is what is used."""
    verify_tls: bool = True
    ca_bundle: Path | None = None
    """A PEM file of CA certificates to trust instead of the system's."""
    remote_name: str | None = None
    """The DVC remote's name when read from a repository."""

    _endpoint: _Endpoint = field(init=False, repr=False, compare=False)
    _virtual: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bucket(self.bucket)
        _check_prefix(self.prefix)
        if self.url != _format_url(self.bucket, self.prefix):
            raise ValueError(
                f"RemoteConfig url {self.url!r} does not match bucket {self.bucket!r} and "
                f"prefix {self.prefix!r}: build it with RemoteConfig.from_url"
            )
        if _REGION.fullmatch(self.region) is None:
            raise UsageError(
                f"region {self.region!r} is not a region name. Fix: give the store's region "
                "(e.g. us-west-002 for B2, eu-west-1 for AWS) or leave it out"
            )
        endpoint = (
            _aws_endpoint(self.region)
            if self.endpoint_url is None
            else _parse_endpoint(self.endpoint_url)
        )
        named = _endpoint_region(endpoint.host)
        if named is not None and named != self.region:
            store = "Backblaze B2" if _B2_HOST.fullmatch(endpoint.host) else "AWS"
            raise UsageError(
                f"region {self.region!r} does not match the {store} endpoint "
                f"{endpoint.origin}, which is in region {named!r}: {store} checks the SigV4 "
                "signature against the endpoint's own region, so they must agree. Fix: leave "
                f"the region out (datapin takes it from the endpoint) or set it to {named!r}"
            )
        if self.ca_bundle is not None:
            if not self.verify_tls:
                raise UsageError(
                    f"a CA bundle ({self.ca_bundle}) is given but TLS verification is off. "
                    "Fix: choose one: the CA bundle (verify with it) or no verification"
                )
            if not self.ca_bundle.is_file():
                what = "is not a file" if self.ca_bundle.exists() else "does not exist"
                raise UsageError(
                    f"CA bundle {self.ca_bundle} {what}. Fix: give the path of a PEM file "
                    "of CA certificates (e.g. mounted from a ConfigMap), or leave it out to "
                    "use the system's"
                )
        object.__setattr__(self, "_endpoint", endpoint)
        object.__setattr__(self, "_virtual", self._resolve_addressing(endpoint))

    def _resolve_addressing(self, endpoint: _Endpoint) -> bool:
        """True for virtual-hosted style."""
        problem = _dns_problem(self.bucket, endpoint)
        if self.addressing is Addressing.PATH:
            return False
        if self.addressing is Addressing.AUTO:
            return problem is None and (self.endpoint_url is None or endpoint.wildcard_tls)
        if endpoint.is_ip:
            problem = f"the endpoint {endpoint.origin} is an IP address, not a host name"
        if problem is not None:
            raise UsageError(
                f"virtual-hosted addressing cannot reach {self.url}: {problem}. Fix: use "
                "path addressing (or auto, which chooses it)"
            )
        return True

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing: Addressing | str = Addressing.AUTO,
        verify_tls: bool = True,
        ca_bundle: Path | None = None,
        remote_name: str | None = None,
    ) -> RemoteConfig:
        """Validate and normalise a DVC remote URL and its options.

        The region, when not given, comes from a B2 (`s3.<region>.backblazeb2.com`) or
        regional AWS endpoint, else is `us-east-1`.
        """
        bucket, prefix = _parse_s3_url(url)
        endpoint = _parse_endpoint(endpoint_url) if endpoint_url is not None else None
        if not region:
            region = (_endpoint_region(endpoint.host) if endpoint else None) or "us-east-1"
        try:
            how = Addressing(addressing)
        except ValueError:
            raise UsageError(
                f"addressing {addressing!r} is not one of auto, path, virtual. Fix: use auto "
                "unless the server needs one style"
            ) from None
        return cls(
            url=_format_url(bucket, prefix),
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint.origin if endpoint else None,
            region=region,
            addressing=how,
            verify_tls=verify_tls,
            ca_bundle=ca_bundle,
            remote_name=remote_name,
        )

    @property
    def resolved_endpoint(self) -> str:
        """`scheme://host[:port]` requests go to (before any bucket host prefix)."""
        return self._endpoint.origin

    @property
    def resolved_addressing(self) -> Addressing:
        """`Addressing.PATH` or `Addressing.VIRTUAL`, never AUTO."""
        return Addressing.VIRTUAL if self._virtual else Addressing.PATH

    @property
    def scheme(self) -> str:
        return self._endpoint.scheme

    @property
    def signing_host(self) -> str:
        """The Host header (and signed `host`): host[:port], the port only if not default."""
        netloc = self._endpoint.netloc
        return f"{self.bucket}.{netloc}" if self._virtual else netloc

    @property
    def base_url(self) -> str:
        """URL prefix object keys are appended to (encoded): `.../bucket/` or `bucket.host/`."""
        bucket = "" if self._virtual else f"{self.bucket}/"
        return f"{self.scheme}://{self.signing_host}/{bucket}"

    def object_key(self, oid: str, layout: Layout) -> str:
        """The key of object `oid` stored in `layout` (`<prefix>/files/md5/ab/cdef...`)."""
        return self.key(f"{layout.prefix()}{oid[:2]}/{oid[2:]}")

    def key(self, relative: str) -> str:
        """The object key of `relative` (e.g. `files/md5/ab/cdef...`) under the prefix."""
        if not relative or relative.startswith("/"):
            raise ValueError(f"relative key must be non-empty and not start with '/': {relative!r}")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def canonical_path(self, key: str) -> str:
        """The encoded URL path to send and sign for `key`; `""` addresses the bucket itself
        (ListObjectsV2): `/bucket` path style, `/` virtual."""
        if self._virtual:
            return "/" + _quote_key(key)
        return f"/{self.bucket}/{_quote_key(key)}" if key else f"/{self.bucket}"

    def object_url(self, key: str) -> str:
        """Full URL of `key` (a complete key, see `key()`), encoded as SigV4 signs it."""
        return f"{self.scheme}://{self.signing_host}{self.canonical_path(key)}"

    def describe(self) -> str:
        """`s3://bucket/prefix at https://endpoint`, for messages (no credentials exist here)."""
        return f"{self.url} at {self.resolved_endpoint}"

    def __str__(self) -> str:
        return self.describe()
