"""Open a remote: the one place an `S3Remote` is built, and the remote a dataset names.

`open_s3_remote` is the builder every caller uses: the CLI (config from its flags or a DVC
repository, keys from a chain of sources), the node programs (`open_remote`, below) and the
operator's remote check (short timeouts, few attempts). What differs between them is passed as
keyword arguments; how `FetchOptions` are made from them, and the lazy import of the S3 client
(aiohttp costs ~100 ms of start-up that a run without an S3 remote skips), is here once.

The sidecar and the agent keep one remote per dataset open while they run (one HTTP session,
one connection pool), and close them on the way out (`open_remote`). Keys come from the
dataset's mounted Secret directory when it has one (under the names `secretkeys.key_names`
picks), else from the standard environment variables, which the program's `main()` captured
and passes down (nothing here reads the environment itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from datapin_sidecar.remotes.base import Remote
from datapin_sidecar.remotes.credentials import (
    CredentialSource,
    EnvCredentials,
    SecretDirCredentials,
)
from datapin_sidecar.remotes.directory import DirectoryRemote
from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig
from datapin_sidecar.remotes.secretkeys import DEFAULT_ID_KEYS, DEFAULT_SECRET_KEYS, key_names

if TYPE_CHECKING:  # neither is loaded at run time: see the module doc
    from datapin_sidecar.node.settings import DatasetSettings
    from datapin_sidecar.remotes.s3 import S3Remote


@contextlib.asynccontextmanager
async def open_s3_remote(
    config: RemoteConfig,
    credentials: CredentialSource,
    *,
    jobs: int,
    socket_timeout: float | None = None,
    attempts: int | None = None,
) -> AsyncIterator[S3Remote]:
    """An `S3Remote`, opened (its session closed on exit).

    `socket_timeout` bounds connecting and each wait for a byte (the defaults otherwise), `attempts`
    the tries per request: a quick check wants both small, a fetch the defaults.
    """
    from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote  # noqa: PLC0415 - see module doc

    options = FetchOptions(jobs=jobs)
    if socket_timeout is not None:
        options = dataclasses.replace(
            options, connect_timeout=socket_timeout, read_timeout=socket_timeout
        )
    if attempts is not None:
        options = dataclasses.replace(options, attempts=attempts)
    async with S3Remote(config, credentials, options=options) as remote:
        yield remote


def credentials_for(dataset: DatasetSettings, environ: Mapping[str, str]) -> CredentialSource:
    """Where the dataset's keys come from (see the module doc)."""
    if dataset.credentials_dir is not None:
        return SecretDirCredentials(
            dataset.credentials_dir,
            id_keys=key_names(dataset.access_key_id_file, DEFAULT_ID_KEYS),
            secret_keys=key_names(dataset.secret_access_key_file, DEFAULT_SECRET_KEYS),
        )
    return EnvCredentials(environ, origin="the sidecar's environment")


@contextlib.asynccontextmanager
async def open_remote(
    dataset: DatasetSettings, *, jobs: int, environ: Mapping[str, str]
) -> AsyncIterator[Remote]:
    """The dataset's remote, opened; S3 sessions are closed on exit."""
    if not dataset.remote.startswith("s3://"):
        yield DirectoryRemote(dataset.remote)
        return
    config = RemoteConfig.from_url(
        dataset.remote,
        endpoint_url=dataset.endpoint_url,
        region=dataset.region,
        addressing=Addressing(dataset.addressing),
        verify_tls=dataset.verify_tls,
        ca_bundle=dataset.ca_bundle,
        remote_name=dataset.name,
    )
    async with open_s3_remote(config, credentials_for(dataset, environ), jobs=jobs) as remote:
        yield remote
