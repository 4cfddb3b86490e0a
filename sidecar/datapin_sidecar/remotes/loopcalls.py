"""Sync `Remote` calls from worker threads, run as coroutines on the program's loop.

The materialiser calls a remote's `find`, `fetch` and `prove` from a worker thread; remotes
that talk to the network (`s3.S3Remote`, `peers.remote.PeeredRemote`) do their work on the
program's event loop. `LoopCalls` is that bridge, once: it submits a coroutine to the loop,
tracks it until it is done, and `abort()` cancels every call in flight and refuses new ones
(SIGTERM calls it on the loop while a worker thread waits in `fetch`), so the build unwinds
instead of the thread outliving the program. A sync call made on the loop itself would wait for
itself forever: it is refused with the fix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopCalls:
    """Coroutines submitted from threads to `loop` (None until the owner is entered)."""

    def __init__(self, owner: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.owner = owner  # for messages: "S3Remote"
        self.loop = loop
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._aborted = False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the loop; its future, tracked until done."""
        loop = self.loop
        if loop is None:
            coro.close()
            raise RuntimeError(f"{self.owner} used outside `async with`")
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                coro.close()
                raise RuntimeError(f"sync {self.owner} call on its own loop: use asyncio.to_thread")
        with self._lock:
            if self._aborted:
                coro.close()  # never awaited: say so to the coroutine, not to the warnings filter
                raise asyncio.CancelledError(f"{self.owner} aborted")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
            self._calls.add(future)
        future.add_done_callback(self._forget)
        return future

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (from a worker thread)."""
        return self.submit(coro).result()

    def abort(self) -> None:
        """Cancel every call in flight and refuse new ones (thread-safe)."""
        with self._lock:
            self._aborted = True
            calls = list(self._calls)
        for future in calls:
            future.cancel()

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._calls.discard(future)
