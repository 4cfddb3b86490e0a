"""The peer protocol: what one agent asks another, on the wire (HTTPS with mutual TLS).

An object's *home* (`rendezvous.home`) is the one agent the cluster reads it from the remote
through. Three questions:

* `POST /datapin-peer/v1/claims` `{"layout": "dvc3", "oids": [...]}` (at most `MAX_CLAIMS`)
  -> `{"have": [...], "leases": {oid: token}, "busy": [...]}`. Per object: the home *has* it
  (GET it), or grants the asker a *lease* (nobody is fetching it: the asker fetches it from the
  remote, then PUTs it here with the token), or it is *busy* (someone holds a lease: GET with
  `wait` later). One round trip per home and batch, not per object: 20,000 small objects cost
  20 requests to learn who does what.
* `GET /datapin-peer/v1/objects/<layout>/<oid>?wait=<seconds>` -> 200 and the bytes, or 404.
  While a lease is held the home waits up to `wait` (capped at `MAX_WAIT`) for it to end.
* `POST /datapin-peer/v1/bundle` `{"layout", "oids": [...], "wait": <s>}` (at most
  `MAX_BUNDLE`): many small objects in one answer, for the objects a home has (or gets within
  `wait`): one line of JSON `{"objects": [[oid, size], ...]}`, then their bytes in that order.
  Objects left out (large, absent, still leased) are asked for one by one. A small object's
  request costs more CPU than its bytes, so 20,000 of them cost ~80 bundles, not 20,000 GETs.
* `PUT` the same path with header `Datapin-Lease: <token>` and the bytes -> 204 once verified
  into the home's cache; 409 if the lease is not (or no longer) the asker's; 422 if the bytes
  are not the object. `DELETE` with the token gives a lease back (the fetch failed), so the
  waiters fall back to the remote at once instead of at the lease's expiry.

No tenant credential is ever sent: a lease says "you fetch it", and the asker fetches with its
own keys. Every body is the object's bytes and nothing else, checked against its name (md5)
by whoever receives it, so a peer can waste time but never put a wrong byte in a cache.
Object names and layouts are validated here before any path is built from them.
"""

from __future__ import annotations

import json
import re
from typing import Final

from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.peers.transfer import SMALL

PREFIX: Final = "/datapin-peer/v1"
CLAIMS: Final = f"{PREFIX}/claims"
OBJECTS: Final = f"{PREFIX}/objects"
BUNDLE: Final = f"{PREFIX}/bundle"
LEASE_HEADER: Final = "Datapin-Lease"
#: Objects per bundle request, and the most bytes of objects one bundle answer carries.
MAX_BUNDLE: Final = 256
BUNDLE_BYTES: Final = 16 * 1024 * 1024
#: The longest a bundle answer's JSON line may be (256 entries of ~50 bytes, with room).
MAX_BUNDLE_HEAD: Final = 64 * 1024
#: Objects per claims request (the body stays under ~60 KiB).
MAX_CLAIMS: Final = 1024
#: The longest a GET may ask the home to wait for a lease to end.
MAX_WAIT: Final = 900.0

_OID: Final = re.compile(r"[0-9a-f]{32}(?:\.dir)?")
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")


def object_path(layout: Layout, oid: str) -> str:
    return f"{OBJECTS}/{layout.value}/{oid}"


def parse_object(layout: str, oid: str) -> tuple[Layout, str]:
    """A request's layout and object name, or ValueError: nothing else may become a path."""
    try:
        parsed = Layout(layout)
    except ValueError:
        raise ValueError(f"unknown layout {layout[:40]!r}") from None
    if not _OID.fullmatch(oid):
        raise ValueError(f"{oid[:80]!r} is not an object name (32 hex digits, maybe .dir)")
    return parsed, oid


def parse_bundle_head(line: bytes, asked: set[str]) -> list[tuple[str, int]]:
    """A bundle answer's first line: (oid, size) of each object that follows, or ValueError:
    only objects asked for, each once, each a small object's size, within the byte budget."""
    head = json.loads(line)
    entries = [(str(o), int(n)) for o, n in head["objects"]]
    oids = [o for o, _ in entries]
    if len(set(oids)) != len(oids) or not set(oids) <= asked:
        raise ValueError("a bundle names objects nobody asked for, or one twice")
    if any(not 0 <= n <= SMALL for _, n in entries) or sum(n for _, n in entries) > BUNDLE_BYTES:
        raise ValueError("a bundle announces sizes no bundle may carry")
    return entries


def parse_token(token: str | None) -> str:
    if token is None or not _TOKEN.fullmatch(token):
        raise ValueError(f"a {LEASE_HEADER} header with a lease token is required")
    return token


def parse_wait(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        wait = float(text)
    except ValueError:
        raise ValueError(f"wait={text[:20]!r} is not a number of seconds") from None
    if not wait >= 0:  # also NaN
        raise ValueError(f"wait={text[:20]!r} must be >= 0")
    return min(wait, MAX_WAIT)
