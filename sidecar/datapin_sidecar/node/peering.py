"""The agent's peer fetch, wired from its Settings: the server, the client, the members.

`open_peers` yields None when `DATAPIN_PEER_PORT` is 0 (peer fetch off: every object comes from
the remote, as before). Otherwise it serves the node cache to the other agents on
`peer_address:peer_port` over mutual TLS, opens the client, and yields the `Peers` that the
agent's remotes are wrapped with (`wrap`): prefetch and the node plugin's tree builds go through
the object homes; proofs of access never do. The members are refreshed by `Peers.membership`'s
loop, which `run_membership` drives until the program stops.

The sidecar never takes part: pods in tenant namespaces hold no peer certificate, and the
agent, which serves every pod of its node, is where the saving is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.errors import UsageError
from datapin_sidecar.node.metrics import Metrics
from datapin_sidecar.node.settings import Settings
from datapin_sidecar.peers import server, tls
from datapin_sidecar.peers.client import PeerClient
from datapin_sidecar.peers.exchange import Peers
from datapin_sidecar.peers.leases import Leases
from datapin_sidecar.peers.membership import Membership
from datapin_sidecar.peers.remote import PeeredRemote
from datapin_sidecar.peers.rendezvous import Member
from datapin_sidecar.peers.transfer import Committer

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_peers(
    settings: Settings, *, cache: NodeCache, metrics: Metrics
) -> AsyncIterator[Peers | None]:
    """This agent among its peers, serving and asking, or None when peer fetch is off."""
    if not settings.peer_port:
        yield None
        return
    address, tls_dir = settings.peer_address, settings.peer_tls_dir
    if address is None or tls_dir is None:  # Settings checks both; said again for the types
        raise UsageError("peer fetch needs DATAPIN_PEER_ADDRESS and DATAPIN_PEER_TLS_DIR")
    try:
        me = Member(address, settings.peer_port)
        static = [Member.parse(p, default_port=settings.peer_port) for p in settings.peers]
        server_ssl = tls.server_context(tls_dir)
        client_ssl = tls.client_context(tls_dir)
    except (ValueError, OSError) as exc:
        raise UsageError(f"peer fetch: {exc}") from None
    events = metrics.peer_events()
    leases = Leases(ttl=settings.peer_wait_seconds)
    committer = Committer()
    membership = Membership(
        me, static=static, service=settings.peer_service, interval=settings.peer_refresh_seconds
    )
    home = server.Home(cache=cache, leases=leases, committer=committer, events=events)
    runner = web.AppRunner(server.build_app(home), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address, settings.peer_port, ssl_context=server_ssl)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(
                f"peer fetch: cannot listen on {me} ({exc.strerror}). Fix: DATAPIN_PEER_ADDRESS "
                "must be this pod's IP and DATAPIN_PEER_PORT a free port"
            ) from None
        async with PeerClient(client_ssl, connections=2 * settings.jobs) as client:
            await membership.refresh()
            metrics.peer_members.set(len(membership.members()))
            log.info("peer fetch: serving on %s, %d members", me, len(membership.members()))
            yield Peers(
                membership=membership,
                client=client,
                leases=leases,
                committer=committer,
                events=events,
                wait=settings.peer_wait_seconds,
                jobs=settings.jobs,
            )
    finally:
        await runner.cleanup()


async def run_membership(peers: Peers, metrics: Metrics, stopping: asyncio.Event) -> None:
    """Refresh the members until `stopping`, keeping the gauge current."""
    membership = peers.membership
    while not stopping.is_set():
        await membership.refresh()
        metrics.peer_members.set(len(membership.members()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), membership.interval)


def wrap(peers: Peers | None, remote: Remote) -> Remote:
    """`remote` with the peers asked first (itself when peer fetch is off)."""
    if peers is None:
        return remote
    return PeeredRemote(remote, peers, loop=asyncio.get_running_loop())
