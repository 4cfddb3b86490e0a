"""A dataset's remote, from its settings, for the lifetime of a node program.

The sidecar and the agent keep one remote per dataset open while they run (one HTTP session,
one connection pool), and close them on the way out (`open_remote`). Keys come from the
dataset's mounted Secret directory when it has one (under the names `secretkeys.key_names`
picks), else from the standard environment variables, which the program's `main()` captured
and passes down (nothing here reads the environment itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.node.settings import DatasetSettings
from datapin_sidecar.remotes.credentials import (
    CredentialSource,
    EnvCredentials,
    SecretDirCredentials,
)
from datapin_sidecar.remotes.directory import DirectoryRemote
from datapin_sidecar.remotes.endpoint import Addressing, RemoteConfig
from datapin_sidecar.remotes.opening import open_s3_remote
from datapin_sidecar.remotes.secretkeys import DEFAULT_ID_KEYS, DEFAULT_SECRET_KEYS, key_names


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
