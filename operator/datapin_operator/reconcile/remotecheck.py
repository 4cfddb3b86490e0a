"""Can the Dataset's remote be read with its Secret's keys, and are the pins there?

The check is what the sidecar will do, done early: the same S3 remote, built by the same
`remotes.opening.open_s3_remote`, the same addressing, signing and error messages, so a
Dataset that reports `RemoteReachable` is one a pod can read. One small GET of an object that
cannot exist proves the endpoint, the bucket and the keys at once (S3 answers 404 NoSuchKey
only to a request it authenticated and authorised; a wrong key, a missing bucket or a wrong
region are distinct errors). Then each resolved pin's `.dir` is looked up in its layout, so a
tag whose data was never `dvc push`ed
shows as not Resolved before any Job asks for it.

Keys are taken from the Secret's data under the names the sidecar reads them by
(`remotes.secretkeys`: the names the Dataset gives, else the AWS and B2 names) and live only in
memory for the duration of the check. A remote failure's `RemoteCause` picks the condition's
reason. `open_remote` is that opening and that error mapping, shared with the webhook's read
of a pin's `.dir` when a Job asks for folders of it (`resolve/partindex.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.errors import DatapinError, RemoteCause, RemoteError
from datapin_sidecar.remotes.credentials import Credentials, StaticCredentials
from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig
from datapin_sidecar.remotes.opening import open_s3_remote
from datapin_sidecar.remotes.secretkeys import (
    DEFAULT_ID_KEYS,
    DEFAULT_SECRET_KEYS,
    first_present,
    key_names,
)

from datapin_operator.api.models import CredentialsSecretRef, Remote
from datapin_operator.errors import RemoteCheckError, SecretError

if TYPE_CHECKING:
    from datapin_sidecar.remotes.s3 import S3Remote

#: A `.dir` no one can have pushed: its absence proves the request was accepted.
_PROBE: Final = "0" * 32 + ".dir"


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteKeys:
    """An access key pair read from a Secret; repr never shows the secret."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    #: The Secret keys they came from (for the agents' copy and for messages).
    id_key: str
    secret_key: str


def keys_from_secret(
    data: Mapping[str, str] | None, *, ref: CredentialsSecretRef, namespace: str
) -> RemoteKeys:
    """The key pair in a Secret's data, or a `SecretError` naming what is missing."""
    if data is None:
        raise SecretError(
            secret=ref.name,
            namespace=namespace,
            problem="does not exist",
            fix=f"create it: kubectl create secret generic {ref.name} -n {namespace} "
            "--from-literal=AWS_ACCESS_KEY_ID=<B2 keyID> "
            "--from-literal=AWS_SECRET_ACCESS_KEY=<B2 applicationKey>",
        )
    id_names = key_names(ref.access_key_id_key, DEFAULT_ID_KEYS)
    secret_names = key_names(ref.secret_access_key_key, DEFAULT_SECRET_KEYS)
    id_key = first_present(data, id_names)
    secret_key = first_present(data, secret_names)
    missing = [
        " or ".join(names)
        for names, found in ((id_names, id_key), (secret_names, secret_key))
        if found is None
    ]
    if id_key is None or secret_key is None:
        raise SecretError(
            secret=ref.name,
            namespace=namespace,
            problem=f"has no non-empty key {' and no '.join(missing)} (it has: "
            f"{', '.join(sorted(data)) or 'no keys'})",
            fix="add the key id and secret under those names, or name its keys in the "
            "Dataset's spec.remote.credentialsSecretRef.accessKeyIdKey/secretAccessKeyKey",
        )
    return RemoteKeys(
        access_key_id=data[id_key].strip(),
        secret_access_key=data[secret_key].strip(),
        id_key=id_key,
        secret_key=secret_key,
    )


@contextlib.asynccontextmanager
async def open_remote(
    remote: Remote,
    keys: RemoteKeys,
    *,
    where: str,
    request_timeout: float = 10.0,
    total: float | None = None,
) -> AsyncIterator[S3Remote]:
    """The Dataset's remote, opened with `keys` as the sidecar opens it; every failure inside
    the block (and `total` seconds passing, when given) is a `RemoteCheckError` whose reason
    says why (`RemoteTimeout`, `AccessDenied`, `NoSuchBucket`, `WrongRegion`, `BadRemote`,
    `RemoteUnreachable`). `where` names the Secret in messages (`Secret ns/name`)."""
    try:
        config = RemoteConfig.from_url(
            remote.url,
            endpoint_url=remote.endpoint,
            region=remote.region,
            addressing=Addressing(remote.addressing),
            remote_name=remote.url,
        )
        credentials = StaticCredentials(
            Credentials(access_key_id=keys.access_key_id, secret_access_key=keys.secret_access_key),
            source=where,
        )
    except DatapinError as exc:
        raise RemoteCheckError(str(exc), reason="BadRemote") from None
    try:
        async with asyncio.timeout(total):
            async with open_s3_remote(
                config, credentials, jobs=4, socket_timeout=request_timeout, attempts=2
            ) as s3:
                yield s3
    except TimeoutError:
        raise RemoteCheckError(
            f"{remote.url} at {config.resolved_endpoint} did not answer within "
            f"{total or request_timeout:g} s. Fix: check spec.remote.endpoint and the network "
            "path from the operator to it",
            reason="RemoteTimeout",
        ) from None
    except RemoteError as exc:
        reason = {
            RemoteCause.ACCESS_DENIED: "AccessDenied",
            RemoteCause.NO_BUCKET: "NoSuchBucket",
            RemoteCause.REGION: "WrongRegion",
        }.get(exc.cause, "RemoteUnreachable")
        raise RemoteCheckError(str(exc), reason=reason) from None
    except RemoteCheckError:
        raise
    except DatapinError as exc:
        raise RemoteCheckError(str(exc), reason="RemoteUnreachable") from None


async def check_remote(
    remote: Remote,
    keys: RemoteKeys,
    *,
    pins: Sequence[tuple[str, LayoutChoice]] = (),
    request_timeout: float = 10.0,
    where: str,
) -> list[str]:
    """Probe the remote; return the pins (of `(pin, layout)`) it does not hold.

    Raises `RemoteCheckError` when the remote cannot be read at all. `where` names the Secret
    in messages (`Secret ns/name`).
    """
    async with open_remote(
        remote, keys, where=where, request_timeout=request_timeout, total=request_timeout * 3
    ) as s3:
        await s3.afind(_PROBE, (Layout.DVC3,))
        missing = []
        for pin, layout in pins:
            if await s3.afind(pin, LayoutChoice(layout).candidates) is None:
                missing.append(pin)
        return missing
