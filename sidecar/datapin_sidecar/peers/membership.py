"""Which agents take part: the members rendezvous hashing ranks.

The chart's headless Service of the agents is the membership: its DNS name resolves to the
pod IP of every ready agent (the EndpointSlices, without an API watch or any RBAC), re-read
every `interval` seconds. Static members (`DATAPIN_PEERS`) are added as they are (tests, or
agents outside the cluster). The agent itself is always a member, ready or not in DNS, so its
own home objects never depend on the resolver.

Agents may briefly disagree (one resolved a new agent, another not yet): they then pick
different homes for some objects, which can cost a duplicate download from the remote, never
a wrong byte. A failed lookup keeps the last members (a DNS hiccup must not make every agent
its own island and multiply the egress); at 1,000 agents an answer is ~16 KiB, which resolvers
serve over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from datapin_sidecar.peers.rendezvous import Member

log = logging.getLogger(__name__)

#: `loop.getaddrinfo`'s shape: (host, port, family, type) -> [(family, type, proto, name, addr)]
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]


class Membership:
    """The current members (see the module doc)."""

    def __init__(
        self,
        me: Member,
        *,
        static: Iterable[Member] = (),
        service: str | None = None,
        interval: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.me = me
        self.static = frozenset(static)
        self.service = service
        self.interval = interval
        self._resolver = resolver
        self._resolved: frozenset[Member] = frozenset()
        self._members = tuple(sorted({me, *self.static}))

    def members(self) -> tuple[Member, ...]:
        return self._members

    async def refresh(self) -> None:
        """Re-read the Service's addresses; on failure keep the last ones."""
        if self.service is None:
            return
        resolver = self._resolver or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await resolver(self.service, self.me.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.info(
                "peers: cannot resolve %s (%s); keeping %d members",
                self.service,
                exc,
                len(self._members),
            )
            return
        resolved = frozenset(Member(str(info[4][0]), self.me.port) for info in infos)
        if resolved != self._resolved:
            log.info("peers: %s lists %d agents", self.service, len(resolved))
        self._resolved = resolved
        self._members = tuple(sorted({self.me, *self.static, *resolved}))
