"""What the two long-running programs share: the pod's `Sidecar` and the node's `Agent`.

Both are built from the same `Settings`, environment and `Metrics`, own a `NodeCache`, keep
their open remotes in `remotes`, and stop the same way: `stop()` (the signal handler, so
idempotent) sets `stopping` for the event loop and `cancel` for the worker threads, whose
synchronous materialiser or prefetch sees it at its next progress tick, and aborts every open
remote so a thread waiting on a download returns at once. A program sets up its own state in
`_setup` (so the constructor is written once) and cancels what else it has in flight (the
agent's tasks) in `_stopped`.

Both retry a failed dataset with the same exponential backoff (`backoff`), capped by
`retry_max_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.node.metrics import Metrics
from datapin_sidecar.node.settings import Settings

#: Failures past this count no longer double the delay (it is capped long before anyway).
_MAX_DOUBLINGS: Final = 16


class Program:
    """The state and the stop of a long-running program (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.environ = environ
        self.metrics = metrics
        self.clock = clock
        self.cache = NodeCache(settings.cache_dir)
        self.remotes: dict[str, Remote] = {}
        self.cancel = threading.Event()
        self.stopping = asyncio.Event()
        self._setup()

    def _setup(self) -> None:
        """The program's own state, from `settings` and `metrics` (called by the constructor)."""

    def stop(self) -> None:
        """Cancel the work in flight (signal handler; idempotent)."""
        if self.stopping.is_set():
            return
        # Logged as the program's own module, as it always was.
        logging.getLogger(type(self).__module__).info("stopping: cancelling the work in flight")
        self.stopping.set()
        self.cancel.set()
        for remote in self.remotes.values():
            remote.abort()
        self._stopped()

    def _stopped(self) -> None:
        """Cancel what else the program has in flight (called once, by `stop`)."""

    def backoff(self, failures: int) -> float:
        """Seconds to wait before retrying after `failures` consecutive failures."""
        return min(self.settings.retry_max_seconds, 2.0 ** min(failures, _MAX_DOUBLINGS))
