"""What the peer ends report, for the node program's metrics to count.

The peers package owns no metrics (the registry belongs to the program's app factory); it calls
a `PeerEvents` it is given. `Direction` is the closed set of ways an object crosses between
agents, the `direction` label of `datapin_peer_bytes_total`: only `received` bytes are egress
saved (an asker got from its home what it would have downloaded); `delivered` and `stored` are
the lease holder's copy to the home, the price of that saving.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Direction(StrEnum):
    """Which way an object crossed between agents: the `direction` label of the metrics."""

    RECEIVED = "received"  # an asker got it from its home: one remote download saved
    SERVED = "served"  # a home sent it to an asker
    DELIVERED = "delivered"  # a lease holder sent it to the object's home
    STORED = "stored"  # a home took it from the lease holder


class PeerEvents(Protocol):
    """What the peer ends report (the agent's metrics implement it)."""

    def moved(self, direction: Direction, nbytes: int) -> None:
        """An object of `nbytes` crossed between agents."""

    def error(self, reason: str) -> None:
        """A peer exchange failed (the remote was used instead)."""


class NoEvents:
    def moved(self, direction: Direction, nbytes: int) -> None:
        pass

    def error(self, reason: str) -> None:
        pass
