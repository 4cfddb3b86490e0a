"""A dataset's remote, from its settings, for the lifetime of a node program.

The sidecar and the agent keep one remote per dataset open while they run (one HTTP session,
one connection pool), and close them on the way out (`open_remote`). Keys come from the
dataset's mounted Secret directory when it has one (under the names `secretkeys.key_names`
picks), else from the standard environment variables, which the program's `main()` captured
and passes down (nothing here reads the environment itself).

An S3 remote is opened at its first use, not at start (`LazyRemote`): a pod starting on a node
that already holds its revision never reads the remote, and opening one costs the import of the
HTTP client (aiohttp) and, for https, a TLS context loaded with the system's CAs, about 0.1 s of
every warm start. The remote's URL and settings are still checked at start (`RemoteConfig`),
so a bad one fails the pod at once; what waits for the first use is only what needs the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport, ProofReport, Remote, Ticker
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

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager


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
    credentials = credentials_for(dataset, environ)
    async with contextlib.AsyncExitStack() as stack:
        yield LazyRemote(
            config,
            lambda: open_s3_remote(config, credentials, jobs=jobs),
            loop=asyncio.get_running_loop(),
            stack=stack,
        )


class LazyRemote:
    """An S3 remote opened on the program's loop at its first use (see the module doc).

    The materialiser calls the `Remote` protocol from a worker thread, as it calls `S3Remote`;
    the first call that needs the network opens the remote on `loop` (into `stack`, which closes
    it when the program's remotes close) and waits for it. `url` and `key` need no network.
    """

    def __init__(
        self,
        config: RemoteConfig,
        opener: Callable[[], AbstractAsyncContextManager[Remote]],
        *,
        loop: asyncio.AbstractEventLoop,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.config = config
        self._opener = opener
        self._loop = loop
        self._stack = stack
        self._lock = threading.Lock()
        self._remote: Remote | None = None
        self._opening: concurrent.futures.Future[Remote] | None = None
        self._aborted = False

    @property
    def url(self) -> str:
        return self.config.describe()

    def key(self, oid: str, layout: Layout) -> str:
        return self.config.object_key(oid, layout)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self._opened().find(oid, layouts)

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        return self._opened().fetch(cache, oids, layout, progress)

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        return self._opened().prove(oids, layout, trust_etags=trust_etags, sizes=sizes)

    def abort(self) -> None:
        """As `S3Remote.abort`; before the first use, no call will open the remote. Never
        waits for an opening (SIGTERM calls it on the loop that an opening needs)."""
        with self._lock:
            self._aborted = True
            remote = self._remote
        if remote is not None:
            remote.abort()

    def _opened(self) -> Remote:
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                raise RuntimeError("sync remote call on its own loop: use asyncio.to_thread")
        with self._lock:  # one opening, however many threads ask at once
            if self._aborted:
                raise asyncio.CancelledError("remote aborted")
            if self._remote is not None:
                return self._remote
            if self._opening is None:
                self._opening = asyncio.run_coroutine_threadsafe(
                    self._stack.enter_async_context(self._opener()), self._loop
                )
            opening = self._opening
        try:
            remote = opening.result()  # not under the lock: `abort` must never wait for it
        except BaseException:
            with self._lock:  # the next use tries again (a pod may follow pins for days)
                if self._opening is opening:
                    self._opening = None
            raise
        with self._lock:
            self._remote = remote
            aborted = self._aborted
        if aborted:
            remote.abort()
            raise asyncio.CancelledError("remote aborted")
        return remote
