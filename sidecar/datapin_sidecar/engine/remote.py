"""Where missing objects come from: the `Remote` protocol the materialiser calls.

The materialiser asks a remote two things: which layout holds a revision's `.dir`, and to put
a batch of objects into the node cache. It never sees how. Batches, because a remote over a
network needs the whole list to keep many requests in flight (`s3.S3Remote`); the report says
what was fetched and what the remote lacks or serves corrupt, and the materialiser turns that
into its errors. `abort()` cancels a fetch in flight from another thread (SIGTERM), so the
build unwinds instead of the thread outliving the program. `prove(oids, layout)` answers a
third question for the CSI node plugin's proof of access (`csi.access`): does *this* remote,
read with *its* keys, hold exactly these objects? It reads, never writes the cache: the node
may already hold the bytes (another tenant fetched them), and the point is to learn whether
this tenant could have fetched them too. Implementations:
`directory.DirectoryRemote` (a DVC directory remote) and `s3.S3Remote` (S3 / Backblaze B2).

A remote is as untrusted as a bucket: a `.dir` above `MAX_DIR_BYTES` is refused by every
remote, and a remote datapin cannot read is a `RemoteError` naming it and the fix, never a
traceback or a misleading "objects missing".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.errors import RemoteCause, RemoteError

#: `Remote.fetch`'s progress callback: called now and then with how many of its objects are done.
Ticker = Callable[[int], None]

#: The largest `.dir` manifest datapin fetches from any remote (a manifest of millions of files
#: is a few hundred MB); a remote offering a bigger one is refused before it is read.
MAX_DIR_BYTES: Final = 1024 * 1024 * 1024
#: What to do about a bigger one (`check_dir_size`'s fix).
_DIR_FIX: Final = (
    "check what was pushed under this key (a DVC manifest of even millions of files is far "
    "smaller); `dvc push` the revision again from a clean cache"
)


def check_dir_size(*, remote: str, oid: str, key: str, size: int) -> None:
    """Refuse object `oid` at `key` if it is a `.dir` of more than `MAX_DIR_BYTES`, before it
    is read: every remote does, with this one message."""
    if oid.endswith(".dir") and size > MAX_DIR_BYTES:
        raise RemoteError(
            remote=remote,
            problem=f"the .dir manifest {key} is {size} bytes, more than the "
            f"{MAX_DIR_BYTES // (1024 * 1024 * 1024)} GiB datapin reads for a manifest",
            fix=_DIR_FIX,
            keys=[key],
            cause=RemoteCause.TOO_LARGE,
        )


@dataclass(slots=True)
class FetchReport:
    """What a fetch did (the materialiser's counters and, later, metrics)."""

    fetched: int = 0  # objects downloaded by this process
    fetched_bytes: int = 0
    resumed_bytes: int = 0  # bytes of partial downloads found on disk and kept
    reread_bytes: int = 0  # bytes hashed by reading them back, not as they were written
    waited: int = 0  # objects another process on the node downloaded while we waited
    present: int = 0  # objects that were already in place when claimed
    peer_objects: int = 0  # objects other agents gave instead of the remote (peers.remote)
    absent: list[str] = field(default_factory=list)  # the remote does not have them
    corrupt: list[str] = field(default_factory=list)  # failed their md5 every time
    retries: Counter[str] = field(default_factory=Counter)  # by reason


@dataclass(frozen=True, slots=True, kw_only=True)
class ProofReport:
    """What `Remote.prove` found, per object: every oid asked for is in exactly one list."""

    #: The remote holds these bytes (by the server's md5 of them, or hashed here).
    proven: tuple[str, ...] = ()
    #: The remote has no object under these keys.
    absent: tuple[str, ...] = ()
    #: The remote has an object under the key, but its bytes are not the object's.
    mismatched: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every object asked for is proven."""
        return not self.absent and not self.mismatched


class Remote(Protocol):
    """A source of DVC objects."""

    @property
    def url(self) -> str:
        """Where it is, for messages (never with credentials)."""
        ...

    def find(self, oid: str, layouts: tuple[Layout, ...]) -> Layout | None:
        """The first of `layouts` holding `oid`, or None."""
        ...

    def key(self, oid: str, layout: Layout) -> str:
        """Where `oid` is on the remote, for messages."""
        ...

    def fetch(
        self, cache: NodeCache, oids: Sequence[str], layout: Layout, progress: Ticker | None = None
    ) -> FetchReport:
        """Put `oids` into `cache`, verified; `progress(done)` now and then. Objects the
        remote lacks or serves corrupt are reported, not raised; a remote that cannot be read
        at all raises `RemoteError`."""
        ...

    def prove(
        self,
        oids: Sequence[str],
        layout: Layout,
        *,
        trust_etags: bool = True,
        sizes: Mapping[str, int] | None = None,
    ) -> ProofReport:
        """Show that the remote holds exactly these objects, without touching any cache.

        Objects whose bytes are not the object's are `mismatched`, missing ones `absent`; a
        remote that cannot be read at all (keys refused: `RemoteCause.ACCESS_DENIED`) raises
        `RemoteError`. `trust_etags`: an S3 remote may take the server's word for an object's
        md5 (its ETag); with False every object is downloaded and hashed here, which is what
        an endpoint the tenant may run itself (and so may lie) calls for. `sizes`: the sizes
        of objects where known (the node cache's copies): an object of another size on the
        remote is `mismatched` without a byte of it read, so a lying size costs nothing.
        """
        ...

    def abort(self) -> None:
        """Cancel what is in flight and refuse new calls (thread-safe; SIGTERM calls it from
        the event loop while a worker thread is in `fetch`). A no-op where nothing can be
        left in flight."""
        ...
