"""Open an S3 remote: the one place an `S3Remote` is built.

`open_s3_remote` is the builder every caller uses: the CLI (config from its flags or a DVC
repository, keys from a chain of sources), the node programs (`node.remotes.open_remote`) and
the operator's remote check (short timeouts, few attempts). What differs between them is passed as
keyword arguments; how `FetchOptions` are made from them, and the lazy import of the S3 client
(aiohttp costs ~100 ms of start-up that a run without an S3 remote skips), is here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from datapin_sidecar.remotes.credentials import CredentialSource
from datapin_sidecar.remotes.endpoint import RemoteConfig

if TYPE_CHECKING:  # not loaded at run time: see the module doc
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
