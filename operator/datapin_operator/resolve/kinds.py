"""`RevisionKind`: what a revision turned out to be.

Its own module because two layers name it: the resolver, which decides it, and the operator's
metrics (`datapin_operator.metrics`), which label resolve latency with it and which the
resolver itself imports; here neither imports the other to reach it.
"""

from __future__ import annotations

from enum import StrEnum


class RevisionKind(StrEnum):
    """What a revision turned out to be, in the order they are tried."""

    PIN = "pin"
    NAMED = "named"
    GIT = "git"
