"""Open the remote a dataset's settings name, for the lifetime of a program.

The sidecar and the agent keep one remote per dataset open while they run (one HTTP session,
one connection pool), and close them on the way out. Keys come from the dataset's mounted
Secret directory when it has one, else from the standard environment variables, which the
program's `main()` captured and passes down (nothing here reads the environment itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from datapin_sidecar.node.settings import DatasetSettings
from datapin_sidecar.remotes.base import DirectoryRemote, Remote
from datapin_sidecar.remotes.s3config import (
    DEFAULT_ID_KEYS,
    DEFAULT_SECRET_KEYS,
    Addressing,
    CredentialSource,
    EnvCredentials,
    RemoteConfig,
    SecretDirCredentials,
)


def credentials_for(dataset: DatasetSettings, environ: Mapping[str, str]) -> CredentialSource:
    """Where the dataset's keys come from (see the module doc)."""
    if dataset.credentials_dir is not None:
        return SecretDirCredentials(
            dataset.credentials_dir,
            id_keys=(dataset.access_key_id_file,)
            if dataset.access_key_id_file
            else DEFAULT_ID_KEYS,
            secret_keys=(dataset.secret_access_key_file,)
            if dataset.secret_access_key_file
            else DEFAULT_SECRET_KEYS,
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
    from datapin_sidecar.remotes.s3 import FetchOptions, S3Remote  # noqa: PLC0415 - aiohttp only when needed

    async with S3Remote(
        config, credentials_for(dataset, environ), options=FetchOptions(jobs=jobs)
    ) as remote:
        yield remote
