"""Which event loop a program runs on: uvloop on the data path, asyncio's own in the agent.

A cold pull of many small objects is bound by the one thread that runs the event loop: every
request is a few callbacks, a socket write and read, and a hand-off to the I/O threads. uvloop
(libuv under asyncio's API, maintained by MagicStack) runs those callbacks in compiled code; on
the project's 2-core machines it cut the client's CPU per object of a cold 20,000 x 64 KiB pull
by 5-9% (docs/benchmarks.md, issue 15). Nothing else changes: the code is asyncio's, and a loop
is a loop to aiohttp, `asyncio.timeout` and `to_thread`.

`run` is what the CLI's S3 fetch and the sidecar's `once` and `run` modes call. The node agent
keeps asyncio's default loop (`run(..., fast=False)`): it serves CSI with grpc.aio, which its
authors test on that loop only (grpc/grpc#22753 tracks uvloop), and a pod's volume must not
ride on a combination nobody tests.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, fast: bool = True) -> T:
    """`asyncio.run(main)`, on uvloop when `fast`."""
    if fast:
        import uvloop  # noqa: PLC0415 - only a program that runs a loop pays for its import

        return uvloop.run(main)
    import asyncio  # noqa: PLC0415

    return asyncio.run(main)
