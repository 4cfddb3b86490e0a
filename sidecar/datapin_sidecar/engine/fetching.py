"""Bringing a revision's objects into the node cache from its remote, for the materialiser
and the prefetcher alike.

Both do the same three things: find the layout the revision was pushed in (`resolve_layout`:
the cache first, then the remote, whose `.dir` is fetched at once since the manifest is needed
next), fetch a batch of objects the cache lacks (`Fetcher.fetch`: once per node, whoever else
is fetching, every object md5-checked by the remote), and turn what the remote could not supply
into the error that names the objects, where they were looked for and the fix (`missing`).
`Fetcher` tallies every fetch of one run for its report and metrics.

Synchronous like its callers: they run in worker threads, and cancellation reaches a fetch
through `S3Remote.abort()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.remote import FetchReport, Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import CorruptObjectError, DatapinError, ObjectsMissingError

#: How many of the objects the remote lacks are named with their remote keys in an error.
_KEYS_SHOWN = 5


def layouts_to_try(layout: Layout | None) -> tuple[Layout, ...]:
    """The layout the caller knows, or both (DVC 3 first) when it does not."""
    return (layout,) if layout else (Layout.DVC3, Layout.LEGACY)


class Fetcher:
    """The fetches of one run from `remote` into `cache`, and their tally."""

    def __init__(self, cache: NodeCache, remote: Remote | None) -> None:
        self.cache = cache
        self.remote = remote
        self.fetched_objects = 0
        self.fetched_bytes = 0
        self.waited_objects = 0
        self.retries: Counter[str] = Counter()

    def resolve_layout(self, revision: Revision, layouts: tuple[Layout, ...]) -> Layout:
        """The first of `layouts` holding `revision`, in the cache or else on the remote.

        A directory revision found only on the remote has its `.dir` fetched now.
        """
        oid = revision.oid
        layout = self.cache.find(oid, layouts)
        remote = self.remote
        if layout is None and remote is not None:
            layout = remote.find(oid, layouts)
            if layout is not None and revision.is_dir:
                self.fetch([oid], layout)
        if layout is None:
            raise self.not_found(oid, layouts)
        return layout

    def not_found(self, oid: str, layouts: tuple[Layout, ...]) -> ObjectsMissingError:
        """The error for a revision in none of `layouts`, in the cache or on the remote."""
        remote = self.remote
        return ObjectsMissingError(
            oids=[oid],
            cache=str(self.cache.root),
            remote=remote.url if remote else None,
            keys=[remote.key(oid, lay) for lay in layouts] if remote else (),
        )

    def fetch(
        self,
        oids: Sequence[str],
        layout: Layout,
        progress: Callable[[int], None] | None = None,
        *,
        quarantined: Sequence[str] = (),
    ) -> None:
        """Put `oids` into the cache; raise (`missing`) if the remote cannot supply them all.

        `quarantined`: objects this run found corrupt in the cache, so that an object the
        remote then lacks is reported as corrupt rather than missing.
        """
        if self.remote is None:
            raise self.missing(list(oids), [], layout, quarantined=quarantined)
        report = self.remote.fetch(self.cache, oids, layout, progress)
        self.count(report)
        if report.absent or report.corrupt:
            raise self.missing(report.absent, report.corrupt, layout, quarantined=quarantined)

    def count(self, report: FetchReport) -> None:
        self.fetched_objects += report.fetched
        self.fetched_bytes += report.fetched_bytes
        self.waited_objects += report.waited
        self.retries.update(report.retries)

    def missing(
        self,
        absent: Sequence[str],
        corrupt: Sequence[str],
        layout: Layout,
        *,
        quarantined: Sequence[str] = (),
    ) -> DatapinError:
        """The error for objects the remote lacks (`absent`) or serves corrupt."""
        remote = self.remote
        cache = str(self.cache.root)
        if corrupt and remote is not None:
            return CorruptObjectError(
                oids=corrupt,
                cache=cache,
                remote=remote.url,
                keys=[remote.key(o, layout) for o in corrupt[:_KEYS_SHOWN]],
            )
        bad = [o for o in quarantined if o in set(absent)] + list(corrupt)
        if bad:
            return CorruptObjectError(
                oids=bad,
                cache=cache,
                detail="md5 mismatch"
                + (f"; remote {remote.url} has no good copy" if remote else ""),
            )
        return ObjectsMissingError(
            oids=absent,
            cache=cache,
            remote=remote.url if remote else None,
            keys=[remote.key(o, layout) for o in absent[:_KEYS_SHOWN]] if remote else (),
        )
