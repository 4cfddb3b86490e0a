"""A home agent's table of who is fetching which object from the remote.

The home hands out at most one live lease per object: the first asker (a peer, or the home's
own fetch) gets it and fetches from the remote; everyone else asking meanwhile is told *busy*
and waits for the lease to end. A lease ends when its holder delivers (`finish(ok=True)`, the
object now in the home's cache), gives it back (`ok=False`: waiters fall back to the remote),
or expires (its holder died or hung): then the next asker gets a fresh lease. Expiry is checked
when the table is asked, so nothing runs in the background.

The table is in memory: a restarted home forgets its leases, so holders' PUTs are refused (409)
and their waiters fall back to the remote. That costs a duplicate download, never a wrong byte.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from datapin_sidecar.engine.hashing import Layout

Key = tuple[Layout, str]


class Claim(Enum):
    """The answer to `Leases.take`."""

    GRANTED = "granted"  # the asker fetches the object
    BUSY = "busy"  # someone else is fetching it


@dataclass(slots=True, eq=False, kw_only=True)
class Lease:
    """One holder's right and duty to fetch one object."""

    token: str
    holder: str
    expires: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: bool = False


class Leases:
    """The table (see the module doc). Used on the agent's event loop only."""

    def __init__(self, *, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._live: dict[Key, Lease] = {}

    def __len__(self) -> int:
        return len(self._live)

    def take(self, key: Key, *, holder: str) -> tuple[Claim, Lease]:
        """A new lease for `holder`, or the live one someone else holds."""
        lease = self._live.get(key)
        now = self._clock()
        if lease is not None and lease.expires <= now:
            self._end(key, lease, delivered=False)
            lease = None
        if lease is not None:
            return Claim.BUSY, lease
        lease = Lease(token=secrets.token_urlsafe(18), holder=holder, expires=now + self.ttl)
        self._live[key] = lease
        return Claim.GRANTED, lease

    def current(self, key: Key) -> Lease | None:
        """The live lease of `key`, if any."""
        lease = self._live.get(key)
        if lease is not None and lease.expires <= self._clock():
            self._end(key, lease, delivered=False)
            return None
        return lease

    def holds(self, key: Key, token: str) -> bool:
        """Whether `token` is the live lease of `key` (a PUT may deliver)."""
        lease = self._live.get(key)
        return lease is not None and lease.token == token and lease.expires > self._clock()

    def finish(self, key: Key, token: str, *, delivered: bool) -> bool:
        """End the lease `token` of `key`; False when it is not the live one."""
        lease = self._live.get(key)
        if lease is None or lease.token != token:
            return False
        self._end(key, lease, delivered=delivered)
        return True

    async def wait(self, lease: Lease, seconds: float) -> bool:
        """Wait up to `seconds` (and never past the lease's expiry) for `lease` to end;
        whether it ended delivered."""
        left = min(seconds, lease.expires - self._clock())
        if left > 0 and not lease.ended.is_set():
            try:
                await asyncio.wait_for(lease.ended.wait(), left)
            except TimeoutError:
                return False
        return lease.delivered

    def _end(self, key: Key, lease: Lease, *, delivered: bool) -> None:
        if self._live.get(key) is lease:
            del self._live[key]
        lease.delivered = delivered
        lease.ended.set()
