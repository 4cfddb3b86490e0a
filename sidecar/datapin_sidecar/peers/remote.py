"""`PeeredRemote`: a dataset's remote, with the cluster's agents asked first.

It implements the engine's `Remote` protocol around the real remote (`inner`), so the
materialiser, the prefetcher and the node plugin's tree builds use peers without knowing.
`find` and `prove` go to the remote itself: the layout a revision was pushed in is the remote's
to say, and a proof of access is about what *this tenant's* remote holds (the node plugin proves
with the raw remote, never this one). `fetch` runs the steps of `exchange` (plan; the remote
fetch of our share while the objects homes have stream in; deliveries; the waits), then fetches
from the remote whatever no peer gave.

The remote fetch of our share goes in chunks of `CHUNK` objects, each chunk's deliveries
running while the next is fetched: a home's waiters get an object minutes before a batch of
20,000 ends, and a lease is delivered well within its expiry.

The materialiser calls `fetch` from a worker thread, as it calls `S3Remote`; the peer steps
run on the program's loop (`loop`), and `abort()` cancels them with the remote's own calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Mapping, Sequence
from typing import Final, TypeVar

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport, ProofReport, Remote, Ticker
from datapin_sidecar.peers.exchange import Peers, Plan
from datapin_sidecar.remotes.loopcalls import LoopCalls

T = TypeVar("T")

#: Objects of our own share fetched from the remote per call (see the module doc).
CHUNK: Final = 1024


class PeeredRemote:
    """`inner`, with `peers` asked first for what `fetch` needs (see the module doc)."""

    def __init__(self, inner: Remote, peers: Peers, *, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self.peers = peers
        self._calls = LoopCalls("PeeredRemote", loop)

    @property
    def url(self) -> str:
        return self.inner.url

    def key(self, oid: str, layout: Layout) -> str:
        return self.inner.key(oid, layout)

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        return self.inner.find(oid, layouts)

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        return self.inner.prove(oids, layout, trust_etags=trust_etags, sizes=sizes)

    def abort(self) -> None:
        self._calls.abort()
        self.inner.abort()

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        peers = self.peers
        if not peers.active():
            return self.inner.fetch(cache, oids, layout, progress)
        plan = self._calls.call(peers.plan(oids, layout))
        report = FetchReport()
        arriving = self._calls.submit(peers.collect(cache, plan.have, layout, wait=0))
        try:
            self._fetch_own(cache, plan, layout, progress, report)
        except BaseException:
            arriving.cancel()  # the claims it holds are released as it unwinds
            raise
        got = arriving.result()
        got |= self._calls.call(peers.collect(cache, plan.busy, layout, wait=peers.wait))
        rest = [oid for oid in (*plan.have, *plan.busy) if oid not in got]
        report.peer_objects = len(got)
        if rest:
            _add(report, self.inner.fetch(cache, rest, layout, progress))
        return report

    def _fetch_own(
        self,
        cache: NodeCache,
        plan: Plan,
        layout: Layout,
        progress: Ticker | None,
        report: FetchReport,
    ) -> None:
        """Our share from the remote, in chunks; each chunk's leases settled (delivered, or
        given back so that nobody waits for an expiry) while the next is fetched."""
        deliveries: list[concurrent.futures.Future[None]] = []
        own = plan.own()
        try:
            for start in range(0, len(own), CHUNK):
                chunk = own[start : start + CHUNK]
                try:
                    _add(report, self.inner.fetch(cache, chunk, layout, progress))
                finally:
                    with contextlib.suppress(asyncio.CancelledError):  # aborted: leases expire
                        deliveries.append(
                            self._calls.submit(self.peers.settle(cache, plan, layout, chunk))
                        )
        finally:
            for future in deliveries:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    future.result()


def _add(report: FetchReport, more: FetchReport) -> None:
    """`more` added into `report`."""
    report.fetched += more.fetched
    report.fetched_bytes += more.fetched_bytes
    report.resumed_bytes += more.resumed_bytes
    report.reread_bytes += more.reread_bytes
    report.waited += more.waited
    report.present += more.present
    report.absent.extend(more.absent)
    report.corrupt.extend(more.corrupt)
    report.retries.update(more.retries)


__all__ = ["PeeredRemote", "Plan"]
