"""Where an S3-compatible DVC remote is and with which keys to read it. No networking here.

The S3 client (issue 3) signs its own requests (SigV4 over aiohttp), so everything that decides
*what* it signs and sends lives here, as plain values it can trust without re-checking:

* `RemoteConfig` is a DVC S3 remote (`s3://bucket/prefix`) resolved against its endpoint: the
  SigV4 region, path- or virtual-hosted addressing, the Host header and the exact encoded path
  to sign. All of it is computed once and validated at construction (`from_url` normalises
  user input; `__post_init__` re-checks the invariants, so even `dataclasses.replace` cannot
  make an inconsistent config). A bad value fails at start-up with a message naming it and the
  fix, not as a `403 SignatureDoesNotMatch` halfway through a download.
* `read_dvc_remote` reads the remote the way DVC does, from the repository's `.dvc/config` and
  `.dvc/config.local` (local overrides per key). Only those two levels: the sidecar runs in a
  pod, and reading a user's `~/.config/dvc` would make the result depend on the machine. DVC
  writes configobj syntax; we parse it with configparser after removing indentation (configobj
  ignores it, configparser would take an indented line for a continuation) and apply
  configobj's value rules ourselves: quotes, triple quotes, `#` comments, an unquoted comma
  making a list (which DVC then rejects, and so do we). No interpolation. Options that would
  change which keys or which bytes we get (`profile`, `credentialpath`, SSE-C keys,
  version-aware remotes, anonymous access) are refused with what to do instead, rather than
  ignored into a confusing 403; options that only matter to uploads or to DVC itself are
  ignored. A directory remote comes back as a path for the existing `DirectoryRemote`.
* Credentials come from `CredentialSource`s: the environment (AWS names, then the B2 CLI's),
  a mounted Kubernetes Secret, or keys read from `.dvc/config.local`, tried in order by
  `ChainCredentials`. A source with nothing configured raises `NoCredentialsError` and the
  chain moves on; a source that is *half* configured (a key id without its secret) raises a
  plain `UsageError` and stops the chain, because the user clearly meant that source and
  falling through to another key would be a surprise. A Secret volume is re-read when kubelet
  swaps its `..data` symlink (how Secret updates arrive), checked at most once per interval so
  a hot download loop does not stat per request; the client calls `refresh()` after a 403.

Secrets never leave this module in text: `Credentials.__repr__` masks them, no message or log
line includes a value read from a key file, an env file or a config file (messages name the
key and the file, and line numbers instead of lines), and exceptions from parsers that quote
their input are replaced (`from None`), not chained. URLs containing `@` are refused without
being echoed, as they may embed `key:secret@`.

The key *id* is treated as a secret too. It is not one by itself, but people paste the secret
into the key-id file (or the key id into the secret's), and nothing can tell the two apart
reliably, so no value of either is ever shown: `repr` and the rotation log give
`Credentials.fingerprint`, the first 8 hex digits of the SHA-256 of the key id (enough to tell
two keys apart, `printf %s KEYID | sha256sum | cut -c1-8` to check which one; 32 bits of a
hash of a 20-40 character key cannot be turned back into it). As a net for what the S3 server
sends back or what another module quotes, every `Credentials` built registers its values and
`redact()` replaces them by `[redacted]`; the CLI's error line, the sidecar's termination
message and every log line go through it. Names that look like keys (the key-file names a
dataset configures, what a Secret directory holds) are shown only when they look like names
(`shown_name`).
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote, urlsplit

from datapin_sidecar.errors import UnsafeFileError, UsageError
from datapin_sidecar.safefs import read_regular

__all__ = [
    "DEFAULT_ID_KEYS",
    "DEFAULT_SECRET_KEYS",
    "DEFAULT_TOKEN_KEYS",
    "Addressing",
    "ChainCredentials",
    "CredentialSource",
    "Credentials",
    "DvcRemote",
    "EnvCredentials",
    "NoCredentialsError",
    "RemoteConfig",
    "SecretDirCredentials",
    "StaticCredentials",
    "credentials_from_env_file",
    "read_dvc_remote",
    "read_env_file",
    "redact",
    "shown_name",
]

log = logging.getLogger(__name__)

#: The fix for "no keys anywhere", in the words of the two places users put them.
_KEYS_FIX: Final = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the application key's keyID and "
    "applicationKey (Backblaze B2) or an access key (AWS), or mount a Secret created with "
    "`kubectl create secret generic datapin-s3 --from-literal=AWS_ACCESS_KEY_ID=<keyID> "
    "--from-literal=AWS_SECRET_ACCESS_KEY=<applicationKey>`"
)


class NoCredentialsError(UsageError):
    """A credential source has nothing configured (not even half of a key pair).

    Distinct from a plain `UsageError`, which a source raises for something half configured:
    `ChainCredentials` skips a source raising this one and stops at any other error.
    """

    reason = "credentials"

    def __init__(self, *, source: str, looked: str, fix: str = _KEYS_FIX) -> None:
        self.source = source
        self.looked = looked
        super().__init__(f"no S3 credentials in {source}: {looked}. Fix: {fix}")


# --------------------------------------------------------------------------------------------
# Where the remote is
# --------------------------------------------------------------------------------------------


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
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _shown(url: str) -> str:
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
    shown = _shown(endpoint_url)
    example = "https://s3.us-west-002.backblazeb2.com"
    if "@" in endpoint_url:
        raise UsageError(
            f"endpoint URL: {shown}. Fix: write the endpoint as scheme://host[:port] "
            f"(e.g. {example}) and give the keys as credentials, never in a URL"
        )
    if _SCHEME.match(endpoint_url) is None:
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
    scheme = _SCHEME.match(url)
    if scheme is None or scheme.group(1).lower() != "s3":
        what = f"uses {scheme.group(1)}://" if scheme else "is not a URL"
        raise UsageError(
            f"remote URL {_shown(url)!r} {what}: {form} (the endpoint, e.g. "
            "https://s3.us-west-002.backblazeb2.com, is given separately). Fix: write it as "
            "s3://bucket/prefix"
        )
    rest = url[scheme.end() :]
    if "?" in rest or "#" in rest:
        raise UsageError(
            f"remote URL {_shown(url)!r} has a query or fragment (?... or #...): {form}. "
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


# --------------------------------------------------------------------------------------------
# With which keys
# --------------------------------------------------------------------------------------------

#: Values `redact` hides: every key id, secret and token a `Credentials` was built with,
#: longest first. Replaced whole, never mutated, so a thread formatting a log line while
#: another reads a rotated Secret iterates a consistent tuple.
_REGISTERED: tuple[str, ...] = ()
_REGISTERING: Final = threading.Lock()
#: Shorter values are not registered: hiding every "abc" would garble messages, and a key
#: that short is refused by every store anyway.
_MIN_REDACTED: Final = 6
_REDACTED: Final = "[redacted]"


def _register(value: str | None) -> None:
    global _REGISTERED  # noqa: PLW0603 - the one registry of the process, see above
    if value is None or len(value) < _MIN_REDACTED:
        return
    # Also as json.dumps writes it (`"` and `\` escaped), for JSON log lines.
    forms = {value, json.dumps(value)[1:-1]}
    with _REGISTERING:
        if forms.issubset(_REGISTERED):
            return
        _REGISTERED = tuple(sorted(forms.union(_REGISTERED), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every key value datapin has read replaced by `[redacted]`."""
    for value in _REGISTERED:
        if value in text:
            text = text.replace(value, _REDACTED)
    return text


#: A run of 16+ letters and digits with a digit or mixed case in it looks like a key
#: (AWS key ids are 20, B2's 25, secrets 31-40), not like a file name such as `keyID`.
_KEY_LIKE: Final = re.compile(r"[A-Za-z0-9+/=]{16,}")
#: What Kubernetes allows as a Secret (and ConfigMap) key.
SECRET_KEY_NAME: Final = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def shown_name(name: str) -> str:
    """`name` (a Secret key or file name) as a message may show it: not if it looks like a
    key value someone pasted where the name goes."""
    if name in _DEFAULT_NAMES:
        return name
    for run in _KEY_LIKE.findall(name):
        if any(c.isdigit() for c in run) or (run.lower() != run and run.upper() != run):
            return "<a name that looks like a key, not shown>"
    if SECRET_KEY_NAME.fullmatch(name) is None:
        return "<a name with characters a Secret key cannot have, not shown>"
    return name


#: Printable ASCII without spaces: what access key ids, secrets and session tokens are made of.
#: The id and token go into HTTP headers, where a stray newline would break the request.
_KEY_TEXT: Final = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """An access key (a B2 application key: keyID and applicationKey). repr masks the secret."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Registered before validation: a value that fails it is not shown either.
        for value in (self.access_key_id, self.secret_access_key, self.session_token):
            _register(value)
        for label, value in (
            ("access key id", self.access_key_id),
            ("secret access key", self.secret_access_key),
            ("session token", self.session_token),
        ):
            if value is None:
                continue
            if not value:
                raise UsageError(f"the {label} is empty. Fix: give the whole key")
            if _KEY_TEXT.fullmatch(value) is None:
                raise UsageError(
                    f"the {label} contains spaces, control or non-ASCII characters (not "
                    "shown). Fix: copy the key again without surrounding text or line breaks"
                )

    @property
    def fingerprint(self) -> str:
        """`sha256:` and 8 hex digits of the key id: tells keys apart, reveals nothing."""
        digest = hashlib.sha256(self.access_key_id.encode()).hexdigest()
        return f"sha256:{digest[:8]}"

    def __repr__(self) -> str:
        token = ", session_token=***" if self.session_token is not None else ""
        return f"Credentials(key id {self.fingerprint}, secret=***{token})"

    def __str__(self) -> str:
        return self.__repr__()


def _credentials(key_id: str, secret: str, token: str | None, *, where: str) -> Credentials:
    try:
        return Credentials(access_key_id=key_id, secret_access_key=secret, session_token=token)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


class CredentialSource(Protocol):
    """Where the S3 client gets its keys."""

    def get(self) -> Credentials:
        """The current keys; cheap enough to call per request (sources cache)."""
        ...

    def refresh(self) -> Credentials:
        """Read the keys again now (after a 403: the Secret may have been rotated)."""
        ...

    def describe(self) -> str:
        """Where the keys come from, for messages; never a value."""
        ...


class StaticCredentials:
    """Fixed keys, e.g. from `.dvc/config.local`; `source` says where they came from."""

    def __init__(self, credentials: Credentials, *, source: str) -> None:
        self._credentials = credentials
        self._source = source

    def get(self) -> Credentials:
        return self._credentials

    def refresh(self) -> Credentials:
        return self._credentials

    def describe(self) -> str:
        return self._source

    def __repr__(self) -> str:
        return f"StaticCredentials({self._credentials!r}, source={self._source!r})"


#: (key id, secret, session token) variable names, in priority order: AWS's, then the B2 CLI's.
_ENV_SETS: Final = (
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY", None),
)


class EnvCredentials:
    """Keys from environment variables: `AWS_*` first, then the B2 CLI's `B2_APPLICATION_KEY*`.

    `environ` is read on every call (it is the caller's mapping, usually `os.environ`). Empty
    variables count as unset. Any half-set pair is an error, even if the other pair is complete:
    which key was meant is then a guess.
    """

    def __init__(self, environ: Mapping[str, str], *, origin: str | None = None) -> None:
        self._environ = environ
        self._origin = origin

    def describe(self) -> str:
        names = (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or B2_APPLICATION_KEY_ID/B2_APPLICATION_KEY)"
        )
        return (
            f"environment variables {names}"
            if self._origin is None
            else f"{names} in {self._origin}"
        )

    def get(self) -> Credentials:
        found: Credentials | None = None
        where = "" if self._origin is None else f" in {self._origin}"
        for id_var, secret_var, token_var in _ENV_SETS:
            key_id = self._environ.get(id_var) or None
            secret = self._environ.get(secret_var) or None
            token = (self._environ.get(token_var) or None) if token_var else None
            if key_id and secret:
                if found is None:
                    label = f"{id_var}/{secret_var}{where}"
                    found = _credentials(key_id, secret, token, where=label)
                continue
            pair = ((id_var, key_id), (secret_var, secret), (token_var, token))
            present = [name for name, value in pair if name and value]
            if present:
                missing = [name for name, value in pair[:2] if not value]
                raise UsageError(
                    f"environment variable {' and '.join(present)} set{where} but "
                    f"{' and '.join(missing)} not: {id_var} and {secret_var} go together. "
                    f"Fix: set {' and '.join(missing)} as well, or unset {' and '.join(present)}"
                )
        if found is None:
            looked = ", ".join(var for env_set in _ENV_SETS for var in env_set[:2])
            raise NoCredentialsError(source=self.describe(), looked=f"none of {looked} is set")
        return found

    def refresh(self) -> Credentials:
        return self.get()


DEFAULT_ID_KEYS: Final = (
    "AWS_ACCESS_KEY_ID",
    "access_key_id",
    "keyID",
    "B2_APPLICATION_KEY_ID",
    "applicationKeyId",
)
DEFAULT_SECRET_KEYS: Final = (
    "AWS_SECRET_ACCESS_KEY",
    "secret_access_key",
    "applicationKey",
    "B2_APPLICATION_KEY",
)
DEFAULT_TOKEN_KEYS: Final = ("AWS_SESSION_TOKEN", "session_token")
_DEFAULT_NAMES: Final = frozenset((*DEFAULT_ID_KEYS, *DEFAULT_SECRET_KEYS, *DEFAULT_TOKEN_KEYS))

#: A key file larger than this is not a key (a mounted dataset, a certificate chain...).
_MAX_KEY_FILE: Final = 16 * 1024


class _Vanished(Exception):  # noqa: N818 - internal signal, never escapes
    """The directory `..data` pointed to went away while we read it (kubelet swapped again)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _SecretRead:
    credentials: Credentials
    fingerprint: tuple[object, ...]


class SecretDirCredentials:
    """Keys from a mounted Kubernetes Secret: one file per key, trailing whitespace stripped.

    For each role the first existing file among the candidate names wins (defaults cover the
    AWS names, DVC's option names and B2's keyID/applicationKey). kubelet updates a Secret
    volume by writing a new `..<timestamp>` directory and renaming a `..data` symlink over the
    old one; the key names are symlinks through `..data`. So all files are read through one
    `readlink("..data")`, never a mix of two versions, and `get()` re-reads when that target or
    any candidate file's (inode, mtime, size) changed, looking at most once per
    `min_check_interval` seconds of `clock`. `refresh()` re-reads unconditionally.

    Not locked: concurrent callers may both re-read, and each sees a complete snapshot.
    """

    def __init__(
        self,
        directory: Path,
        *,
        id_keys: Sequence[str] = DEFAULT_ID_KEYS,
        secret_keys: Sequence[str] = DEFAULT_SECRET_KEYS,
        token_keys: Sequence[str] = DEFAULT_TOKEN_KEYS,
        min_check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for names in (id_keys, secret_keys):
            if not names:
                raise ValueError("SecretDirCredentials needs at least one key name per role")
        for name in (*id_keys, *secret_keys, *token_keys):
            if SECRET_KEY_NAME.fullmatch(name) is None or name.startswith(".."):
                raise UsageError(
                    f"{shown_name(name)!r} is not a Secret key name (letters, digits, '-', "
                    "'_' and '.'; the name is not shown if it looks like a key). Fix: name "
                    "the Secret's keys, not their values"
                )
        self._dir = Path(directory)
        self._id_keys = tuple(id_keys)
        self._secret_keys = tuple(secret_keys)
        self._token_keys = tuple(token_keys)
        self._interval = min_check_interval
        self._clock = clock
        self._read: _SecretRead | None = None
        self._checked_at = 0.0

    @property
    def directory(self) -> Path:
        return self._dir

    def describe(self) -> str:
        ids, secret_names = shown_name(self._id_keys[0]), shown_name(self._secret_keys[0])
        return f"Secret files in {self._dir} ({ids}, {secret_names})"

    def get(self) -> Credentials:
        now = self._clock()
        last = self._read
        if last is not None:
            if now - self._checked_at < self._interval:
                return last.credentials
            if self._fingerprint(*self._snapshot()) == last.fingerprint:
                self._checked_at = now
                return last.credentials
        return self._reload(now)

    def refresh(self) -> Credentials:
        return self._reload(self._clock())

    def _reload(self, now: float) -> Credentials:
        # A failed read leaves _checked_at alone, so the next get() looks again instead of
        # serving the old keys for another interval as if all were well.
        new = self._load()
        last = self._read
        if last is not None and new.credentials != last.credentials:
            log.info(
                "S3 credentials changed in %s (the Secret was updated); the keys changed, "
                "now key id %s",
                self._dir,
                new.credentials.fingerprint,
            )
        self._read = new
        self._checked_at = now
        return new.credentials

    def _snapshot(self) -> tuple[Path, str | None]:
        """The directory to read files from, and the `..data` target it came from (if any)."""
        try:
            target = os.readlink(self._dir / "..data")
        except OSError:  # no ..data (a plain directory) or not a symlink
            return self._dir, None
        return self._dir / target, target

    def _names(self) -> tuple[str, ...]:
        return (*self._id_keys, *self._secret_keys, *self._token_keys)

    def _fingerprint(self, base: Path, target: str | None) -> tuple[object, ...]:
        stats: list[object] = [target]
        for name in self._names():
            try:
                st = (base / name).stat()
            except OSError:
                stats.append(None)
            else:
                stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stats)

    def _load(self) -> _SecretRead:
        for _ in range(5):
            base, target = self._snapshot()
            try:
                return self._load_from(base, target)
            except _Vanished:
                continue
        raise UsageError(
            f"{self.describe()}: the Secret changed five times while being read. Fix: check "
            "what keeps updating it"
        )

    def _load_from(self, base: Path, target: str | None) -> _SecretRead:
        try:
            held = sorted(name for name in os.listdir(base) if not name.startswith(".."))
        except FileNotFoundError:
            if target is not None and self._dir.is_dir():
                raise _Vanished from None
            raise NoCredentialsError(
                source=self.describe(),
                looked=f"{self._dir} does not exist",
                fix=f"{_KEYS_FIX}, mounted at {self._dir}",
            ) from None
        except NotADirectoryError:
            raise NoCredentialsError(
                source=self.describe(),
                looked=f"{self._dir} is not a directory",
                fix=f"{_KEYS_FIX}, mounted at {self._dir}",
            ) from None
        except OSError as exc:
            raise UsageError(
                f"cannot read the Secret directory {self._dir}: {exc.strerror}. Fix: make the "
                "Secret volume readable by the sidecar (defaultMode, fsGroup)"
            ) from None
        fingerprint = self._fingerprint(base, target)
        key_id = self._first(base, target, self._id_keys)
        secret = self._first(base, target, self._secret_keys)
        token = self._first(base, target, self._token_keys)
        if key_id is None and secret is None and token is None:
            shown = [shown_name(name) for name in held]
            raise NoCredentialsError(
                source=self.describe(),
                looked=(
                    f"{self._dir} holds none of {_names(self._id_keys)} nor "
                    f"{_names(self._secret_keys)}; it holds: "
                    f"{', '.join(shown) if shown else 'nothing'}"
                ),
                fix=f"{_KEYS_FIX} (or rename the Secret's keys to those names)",
            )
        if key_id is None or secret is None:
            present = [found[0] for found in (key_id, secret, token) if found is not None]
            missing = self._id_keys if key_id is None else self._secret_keys
            raise UsageError(
                f"{self.describe()}: {_names(present)} is there but none of "
                f"{_names(missing)} is. Fix: add the missing key to the Secret: {_KEYS_FIX}"
            )
        where = f"{self.describe()}: {shown_name(key_id[0])}/{shown_name(secret[0])}"
        creds = _credentials(key_id[1], secret[1], token[1] if token else None, where=where)
        return _SecretRead(credentials=creds, fingerprint=fingerprint)

    def _first(
        self, base: Path, target: str | None, names: Sequence[str]
    ) -> tuple[str, str] | None:
        """(name, stripped text) of the first file among `names` in `base`, or None.

        Key files are symlinks through `..data` (kubelet's layout), so the link is resolved
        first; what it points to must be a regular file (never a FIFO or a device, which
        would block or never end) of at most `_MAX_KEY_FILE` bytes.
        """
        for name in names:
            shown = self._dir / shown_name(name)
            try:
                data = read_regular(os.path.realpath(base / name), limit=_MAX_KEY_FILE)
            except FileNotFoundError:
                if target is not None and not base.is_dir():
                    raise _Vanished from None
                continue
            except UnsafeFileError as exc:
                too_big = exc.problem.startswith("is larger")
                raise UsageError(
                    f"Secret file {shown} is over {_MAX_KEY_FILE} bytes, too big for a key. "
                    "Fix: put only the key in it"
                    if too_big
                    else f"Secret file {shown} is not a regular file (a directory, FIFO or "
                    "device). Fix: mount a Secret whose keys are the key id and the secret"
                ) from None
            except OSError as exc:
                raise UsageError(
                    f"cannot read Secret file {shown}: {exc.strerror}. Fix: make "
                    "the Secret volume readable by the sidecar (defaultMode, fsGroup)"
                ) from None
            try:
                text = data.rstrip().decode("ascii")
            except UnicodeDecodeError:
                raise UsageError(
                    f"Secret file {shown} is not ASCII text (not shown). Fix: "
                    "store the key itself, e.g. with --from-literal"
                ) from None
            if not text:
                raise UsageError(f"Secret file {shown} is empty. Fix: put the key in it")
            return name, text
        return None


def _names(names: Sequence[str]) -> str:
    return ", ".join(shown_name(name) for name in names)


class ChainCredentials:
    """The first source that has keys, in order.

    A source raising `NoCredentialsError` is skipped; any other error stops the chain (a half
    configured source is a mistake to report, not a reason to try the next). `get()` sticks
    to the source that answered last (cheap), falling back to the whole chain if that source
    loses its keys; `refresh()` walks the chain again from the start.
    """

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        if not sources:
            raise ValueError("ChainCredentials needs at least one source")
        self._sources = tuple(sources)
        self._current: CredentialSource | None = None

    @property
    def current(self) -> CredentialSource | None:
        """The source the last keys came from, for messages (e.g. after a 403)."""
        return self._current

    def describe(self) -> str:
        return "; then ".join(source.describe() for source in self._sources)

    def get(self) -> Credentials:
        if self._current is not None:
            try:
                return self._current.get()
            except NoCredentialsError:
                self._current = None
        return self._walk(refresh=False)

    def refresh(self) -> Credentials:
        self._current = None
        return self._walk(refresh=True)

    def _walk(self, *, refresh: bool) -> Credentials:
        looked: list[str] = []
        for source in self._sources:
            try:
                creds = source.refresh() if refresh else source.get()
            except NoCredentialsError as exc:
                looked.append(f"{len(looked) + 1}) {exc.source}: {exc.looked}")
                continue
            self._current = source
            return creds
        raise NoCredentialsError(
            source=f"any of the {len(looked)} places datapin looks",
            looked="; ".join(looked),
        )


#: A `.env` file is a few lines; anything larger is the wrong file.
_MAX_ENV_FILE: Final = 1024 * 1024
_ENV_ASSIGNMENT: Final = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")


def _env_value(text: str) -> str | None:
    """The value of `KEY=<text>` in a dotenv file, or None if badly quoted."""
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end < 0:
            return None
        tail = text[end + 1 :].strip()
        return text[1:end] if not tail or tail.startswith("#") else None
    comment = re.search(r"\s#", text)
    return (text[: comment.start()] if comment else text).strip()


def read_env_file(path: Path) -> dict[str, str]:
    """Variables of a dotenv file, as the B2 + DVC tutorial's `.env`.

    `KEY=VALUE` lines, optional `export `, `#` comment lines and ` #` trailing comments, blank
    lines, values optionally in single or double quotes (taken literally: no escapes, no
    `$VAR` interpolation, no multi-line values). A later line wins. A malformed line is
    reported by number, never shown, as it may hold a secret.
    """
    try:
        # The user named this path: a symlink to the real file is fine, a FIFO, a device or
        # a huge file is not (it would block, never end, or fill memory).
        text = read_regular(os.path.realpath(path), limit=_MAX_ENV_FILE).decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(
            f"env file {path} does not exist. Fix: give the path of the .env file with "
            "AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"env file {path} is not UTF-8 text. Fix: save it as UTF-8") from None
    except UnsafeFileError as exc:
        what = (
            f"is larger than {_MAX_ENV_FILE} bytes"
            if exc.problem.startswith("is larger")
            else "is not a regular file (a directory, FIFO or device)"
        )
        raise UsageError(
            f"env file {path} {what}. Fix: give the path of the .env file with "
            "AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot read env file {path}: {exc.strerror}. Fix: make it readable by the user "
            "datapin runs as"
        ) from None
    result: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_ASSIGNMENT.fullmatch(stripped)
        value = _env_value(match.group(2)) if match else None
        if match is None or value is None:
            what = f"the value of {match.group(1)} is badly quoted" if match else "not KEY=VALUE"
            raise UsageError(
                f"env file {path}, line {lineno}: {what} (the line is not shown: it may hold "
                "a secret). Fix: write KEY=VALUE, quoting a value that has spaces or ' #' in "
                "single quotes"
            )
        result[match.group(1)] = value
    return result


def credentials_from_env_file(path: Path) -> EnvCredentials:
    """Keys from a dotenv file (see `read_env_file`), read now so a bad file fails at start.

    A missing or malformed file is a `UsageError` (it was named on purpose); a file without
    the key variables is a source with nothing configured (`NoCredentialsError` on `get()`).
    """
    return EnvCredentials(read_env_file(path), origin=f"env file {path}")


# --------------------------------------------------------------------------------------------
# A DVC repository's remote
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DvcRemote:
    """The remote a DVC repository names: an S3 `config`, or a `directory` remote."""

    name: str
    config: RemoteConfig | None = None
    directory: Path | None = None
    """Absolute path of a directory remote (for `remote.DirectoryRemote`); may not exist."""
    credentials: Credentials | None = None
    """Keys written in the remote's section (normally `.dvc/config.local`)."""
    credentials_file: Path | None = None
    """The file `credentials` came from."""

    def __post_init__(self) -> None:
        if (self.config is None) == (self.directory is None):
            raise ValueError("DvcRemote has exactly one of config and directory")

    def credential_source(self) -> StaticCredentials | None:
        """The remote's own keys as a source for `ChainCredentials`, or None.

        DVC itself prefers these to the environment (they are passed to botocore explicitly).
        """
        if self.credentials is None:
            return None
        return StaticCredentials(
            self.credentials,
            source=f"access_key_id/secret_access_key of DVC remote {self.name!r} in "
            f"{self.credentials_file}",
        )

    def describe(self) -> str:
        where = self.config.describe() if self.config is not None else str(self.directory)
        return f"DVC remote {self.name!r} ({where})"


#: DVC's own section-name rule (dvc/config.py `_parse_named`), applied after lower-casing.
_NAMED_SECTION: Final = re.compile(r'\s*remote\s*"(.*)"\s*')
_TRIPLE_QUOTED: Final = re.compile(r"""('''|\"\"\")(.*?)\1\s*(?:#.*)?""", re.DOTALL)
#: One quoted value: the quote does not occur inside (DVC then picks the other quote).
_QUOTED: Final = re.compile(r"""(?:'([^']*)'|"([^"]*)")\s*(?:#.*)?""")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Option:
    raw: str = field(repr=False)
    file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class _ConfigFile:
    core: dict[str, _Option]
    remotes: dict[str, dict[str, _Option]]


def _configobj_value(raw: str) -> str | None:
    """A value as configobj reads it (quotes, `#` comment), or None if a list or malformed."""
    if raw.startswith(("'''", '"""')):
        triple = _TRIPLE_QUOTED.fullmatch(raw)
        return triple.group(2) if triple else None
    if raw.startswith(("'", '"')):
        quoted = _QUOTED.fullmatch(raw)
        return (quoted.group(1) or quoted.group(2) or "") if quoted else None
    value = raw.split("#", 1)[0].rstrip()
    return None if "," in value else value


def _unquote_name(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return name[1:-1]
    return name


def _read_config_file(path: Path) -> _ConfigFile | None:
    """Sections `core` and `remote "NAME"` of one DVC config file; None if it is absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UsageError(f"DVC config {path} is not UTF-8 text. Fix: save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read DVC config {path}: {exc.strerror}") from None
    parser = configparser.ConfigParser(
        delimiters=("=",),
        comment_prefixes=("#",),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
        default_section="\0no default section",
    )
    # configobj ignores indentation; configparser would read a deeper-indented line as the
    # continuation of the value above it. Line numbers are kept.
    dedented = "\n".join(line.lstrip() for line in text.splitlines())
    fix = "Fix: rewrite it with `dvc remote add` / `dvc remote modify`, or repair it by hand"
    try:
        parser.read_string(dedented, source=str(path))
    except configparser.DuplicateOptionError as exc:
        raise UsageError(
            f"DVC config {path}, line {exc.lineno}: option {exc.option!r} appears twice in "
            f"section [{exc.section}]. {fix}"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise UsageError(
            f"DVC config {path}, line {exc.lineno}: section [{exc.section}] appears twice. {fix}"
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise UsageError(
            f"DVC config {path}, line {exc.lineno}: an option before any [section] (the line "
            f"is not shown: it may hold a secret). {fix}"
        ) from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        raise UsageError(
            f"DVC config {path}: cannot parse line(s) {lines}, expected `key = value` or "
            f"`[section]` (lines not shown: they may hold secrets). {fix}"
        ) from None
    core: dict[str, _Option] = {}
    remotes: dict[str, dict[str, _Option]] = {}
    for section in parser.sections():
        # DVC lower-cases section names and keys when it loads a config (`_lower_keys`).
        normal = _unquote_name(section).lower()
        named = _NAMED_SECTION.fullmatch(normal)
        if named is None and normal != "core":
            continue
        target = remotes.setdefault(named.group(1), {}) if named else core
        if target:
            raise UsageError(
                f"DVC config {path}: section [{section}] appears twice (with and without "
                f"quotes). {fix}"
            )
        for raw_key, raw in parser.items(section):
            key = _unquote_name(raw_key).lower()
            if key in target:
                raise UsageError(
                    f"DVC config {path}: option {key!r} appears twice in [{section}]. {fix}"
                )
            target[key] = _Option(raw=raw, file=path)
    return _ConfigFile(core=core, remotes=remotes)


def _choose_remote(
    name: str | None, core: dict[str, _Option], remotes: Collection[str], where: str
) -> str:
    names = ", ".join(sorted(remotes)) or "none"
    if name is not None:
        if name.lower() in remotes:
            return name.lower()
        raise UsageError(
            f"no DVC remote named {name!r} in {where} (remotes: {names}). Fix: pass one of "
            f"those, or add it with `dvc remote add {name} s3://bucket/prefix`"
        )
    default = core.get("remote")
    if default is not None:
        chosen = _option_value(default, "remote", "core").lower()
        if chosen in remotes:
            return chosen
        raise UsageError(
            f"the default remote (core.remote in {default.file}) is {chosen!r}, which is not "
            f"defined in {where} (remotes: {names}). Fix: `dvc remote default NAME` with one "
            "of them, or pass the remote's name"
        )
    if len(remotes) == 1:
        return next(iter(remotes))
    if not remotes:
        raise UsageError(
            f"no DVC remote is configured in {where}. Fix: `dvc remote add -d NAME "
            "s3://bucket/prefix` (for B2 also `dvc remote modify NAME endpointurl "
            "https://s3.<region>.backblazeb2.com`)"
        )
    raise UsageError(
        f"{len(remotes)} DVC remotes are configured in {where} ({names}) and none is the "
        "default. Fix: pass the remote's name, or run `dvc remote default NAME` in the "
        "repository"
    )


def _option_value(option: _Option, key: str, section: str) -> str:
    value = _configobj_value(option.raw)
    if value is None:
        raise UsageError(
            f"DVC config {option.file}: [{section}] {key} is badly quoted or is a list (an "
            "unquoted comma), which DVC rejects too; the value is not shown. Fix: set it "
            f"again with `dvc remote modify` (or `dvc config`), which quotes it"
        )
    return value


#: Options whose effect datapin cannot reproduce, so reading without them would fetch with other
#: keys or other bytes than DVC: refused when set, with what to do instead.
_UNSUPPORTED: Final = {
    "profile": "AWS profiles live in ~/.aws files, which datapin does not read",
    "credentialpath": "datapin does not read AWS credentials files",
    "configpath": "datapin does not read AWS config files",
    "sse_customer_key": "reading SSE-C encrypted objects (customer-provided keys) is not supported",
    "sse_customer_algorithm": "reading SSE-C encrypted objects is not supported",
}
#: Boolean options that are refused only when true, and why.
_UNSUPPORTED_IF_TRUE: Final = {
    "version_aware": "a version-aware remote stores files by path, not by md5, so datapin "
    "cannot find objects in it",
    "worktree": "a worktree remote stores files by path, not by md5, so datapin cannot find "
    "objects in it",
    "allow_anonymous_login": "datapin signs every request and needs keys",
}
#: Options that only concern uploads or DVC's own behaviour: nothing to do when reading.
_IGNORED: Final = frozenset(
    {
        "jobs",
        "checksum_jobs",
        "verify",
        "listobjects",
        "no_traverse",
        "cache_regions",
        "read_timeout",
        "connect_timeout",
        "sse",
        "sse_kms_key_id",
        "acl",
        "grant_read",
        "grant_read_acp",
        "grant_write_acp",
        "grant_full_control",
        "slow_link_warning",
        "type",
        "protected",
        "shared",
    }
)
_USED: Final = frozenset(
    {
        "url",
        "endpointurl",
        "region",
        "ssl_verify",
        "use_ssl",
        "access_key_id",
        "secret_access_key",
        "session_token",
    }
)


def _dvc_bool(value: str, key: str, origin: Path) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise UsageError(
            f"DVC config {origin}: {key} must be true or false. Fix: `dvc remote modify "
            f"NAME {key} true` (or false)"
        )
    return lowered == "true"


def _local_remote_path(url: str, dvc_dir: Path, name: str) -> Path:
    if url.startswith("~"):
        raise UsageError(
            f"DVC remote {name!r} is a directory under a home directory ({url}); the "
            "sidecar has no home directory. Fix: use an absolute path"
        )
    path = Path(url)
    # DVC resolves a relative remote path against the config file's directory (.dvc).
    return path if path.is_absolute() else Path(os.path.normpath(dvc_dir / path))


def read_dvc_remote(repo: Path, name: str | None = None) -> DvcRemote:
    """The remote `name` (else the default, else the only one) of the DVC repository `repo`.

    Reads `repo/.dvc/config` then `repo/.dvc/config.local`, the latter overriding per key,
    as DVC does. Raises `UsageError` for anything datapin cannot read as DVC would.
    """
    repo = Path(repo).absolute()
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise UsageError(
            f"{repo} is not a DVC repository: it has no .dvc directory. Fix: pass the "
            "repository's root (where `dvc init` was run)"
        )
    core: dict[str, _Option] = {}
    remotes: dict[str, dict[str, _Option]] = {}
    for path in (dvc_dir / "config", dvc_dir / "config.local"):
        parsed = _read_config_file(path)
        if parsed is None:
            continue
        core.update(parsed.core)
        for remote, options in parsed.remotes.items():
            remotes.setdefault(remote, {}).update(options)
    where = f"{dvc_dir / 'config'} and config.local"
    chosen = _choose_remote(name, core, remotes.keys(), where)
    return _remote_from_options(chosen, remotes[chosen], repo)


def _remote_from_options(name: str, options: dict[str, _Option], repo: Path) -> DvcRemote:
    dvc_dir = repo / ".dvc"
    section = f'remote "{name}"'

    def value(key: str) -> str | None:
        option = options.get(key)
        if option is None:
            return None
        return _option_value(option, key, section) or None  # DVC passes "" on as unset

    url = value("url")
    if url is None:
        raise UsageError(
            f"DVC remote {name!r} has no url in {dvc_dir / 'config'} or config.local. Fix: "
            f"`dvc remote modify {name} url s3://bucket/prefix`"
        )
    scheme = _SCHEME.match(url)
    if scheme is None:
        if re.match(r"s3:/?[^/]", url, re.IGNORECASE):
            raise UsageError(
                f"DVC remote {name!r} has url {url!r}. Fix: write it as s3://bucket/prefix"
            )
        return DvcRemote(name=name, directory=_local_remote_path(url, dvc_dir, name))
    kind = scheme.group(1).lower()
    if kind == "file" and url[scheme.end() :].startswith("/"):
        return DvcRemote(name=name, directory=Path(url[scheme.end() :]))
    if kind != "s3":
        raise UsageError(
            f"DVC remote {name!r} uses {kind}:// ({_shown(url)}): datapin reads s3:// "
            "remotes (Amazon S3, Backblaze B2 and other S3-compatible stores) and directory "
            f"remotes. Fix: push the data to one (`dvc remote add NAME s3://bucket/prefix`, "
            "`dvc push -r NAME`) and name that remote"
        )

    for key, option in options.items():
        if key in _UNSUPPORTED:
            raise UsageError(
                f"DVC remote {name!r} sets {key} (in {option.file}): {_UNSUPPORTED[key]}. Fix: "
                f"remove it (`dvc remote modify --unset {name} {key}`) and put the keys in "
                f".dvc/config.local (`dvc remote modify --local {name} access_key_id ...`), "
                "in the environment or in a Secret"
            )
        if key in _UNSUPPORTED_IF_TRUE and _dvc_bool(value(key) or "false", key, option.file):
            raise UsageError(
                f"DVC remote {name!r} sets {key} = true (in {option.file}): "
                f"{_UNSUPPORTED_IF_TRUE[key]}. Fix: use a remote without it"
            )
        if key not in _USED and key not in _IGNORED and key not in _UNSUPPORTED_IF_TRUE:
            log.warning("DVC remote %r: ignoring unknown option %r in %s", name, key, option.file)

    endpoint = value("endpointurl")
    use_ssl = value("use_ssl")
    # With an endpoint URL, its scheme decides (botocore ignores use_ssl then, too).
    ssl_off = use_ssl is not None and not _dvc_bool(use_ssl, "use_ssl", options["use_ssl"].file)
    if ssl_off and endpoint is None:
        raise UsageError(
            f"DVC remote {name!r} sets use_ssl = false without an endpointurl: datapin "
            "talks to AWS over https only. Fix: remove use_ssl, or give an http:// "
            "endpointurl for a server without TLS"
        )

    verify_tls, ca_bundle = True, None
    ssl_verify = value("ssl_verify")
    if ssl_verify is not None:
        if ssl_verify.lower() in ("true", "false"):
            verify_tls = ssl_verify.lower() == "true"
        elif ssl_verify.startswith("~"):
            raise UsageError(
                f"DVC remote {name!r}: ssl_verify names a CA bundle under a home directory "
                f"({ssl_verify}); the sidecar has no home directory. Fix: use an absolute path "
                "or one relative to the repository root"
            )
        else:
            # DVC hands ssl_verify to botocore unchanged, so a relative path is relative to
            # where dvc runs: the repository root, normally.
            ca_bundle = repo / ssl_verify

    try:
        config = RemoteConfig.from_url(
            url,
            endpoint_url=endpoint,
            region=value("region"),
            verify_tls=verify_tls,
            ca_bundle=ca_bundle,
            remote_name=name,
        )
    except UsageError as exc:
        files = sorted({str(option.file) for option in options.values()})
        raise UsageError(f"DVC remote {name!r} (in {' and '.join(files)}): {exc}") from None

    credentials, credentials_file = _dvc_credentials(name, options, value)
    return DvcRemote(
        name=name, config=config, credentials=credentials, credentials_file=credentials_file
    )


def _dvc_credentials(
    name: str, options: dict[str, _Option], value: Callable[[str], str | None]
) -> tuple[Credentials | None, Path | None]:
    key_id, secret = value("access_key_id"), value("secret_access_key")
    token = value("session_token")
    if key_id is None and secret is None:
        if token is not None:
            raise UsageError(
                f"DVC remote {name!r} has a session_token but no access_key_id and "
                f"secret_access_key. Fix: `dvc remote modify --local {name} access_key_id "
                f"<keyID>` and `... secret_access_key <applicationKey>`, or remove the token"
            )
        return None, None
    if key_id is None or secret is None:
        present, missing = (
            ("access_key_id", "secret_access_key")
            if secret is None
            else ("secret_access_key", "access_key_id")
        )
        raise UsageError(
            f"DVC remote {name!r} has {present} (in {options[present].file}) but no {missing}. "
            f"Fix: `dvc remote modify --local {name} {missing} <value>`"
        )
    origin = options["secret_access_key"].file
    if origin.name == "config":
        log.warning(
            "DVC remote %r keeps its secret_access_key in %s, which git tracks: anyone with "
            "the repository has the key. Move it to config.local: `dvc remote modify --local "
            "%s secret_access_key ...` and `dvc remote modify --unset %s secret_access_key`",
            name,
            origin,
            name,
            name,
        )
    where = f"DVC remote {name!r} (in {origin})"
    return _credentials(key_id, secret, token, where=where), origin
