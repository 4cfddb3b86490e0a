"""Prefetch: bring a revision's objects into the node cache without building a tree.

The agent keeps the revisions on its list warm so that a pod scheduled on the node later
starts at warm-start cost (metadata only). Building a tree would cost a link per file for
nothing and would make the revision look "in use" to the GC; the prefetch list protects it
from the GC instead (see `housekeeping.roots`).

The same plan as the materialiser, minus the tree: find the layout, get the `.dir`, list what
the cache lacks (one `lstat` per distinct object), fetch that in one batch (`fetching`: once
per node, whoever else is fetching), and report. Synchronous like the materialiser: the agent
runs it in a worker thread, and cancellation reaches it through `S3Remote.abort()`.

A prefetch of a part (`engine.part`) fetches the `.dir` and the objects beneath the part's
folders only: the node keeps that part warm, not the revision.

The whole run is registered with `NodeCache.building` before the first lookup, so a GC running
meanwhile keeps every object of the revision that is already in the cache: an object found
present is never evicted before the prefetch reports the revision warm.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.fetching import Fetcher, layouts_to_try
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import Remote
from datapin_sidecar.engine.revision import Revision


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefetchResult:
    revision: str
    layout: str
    paths: tuple[str, ...]  # the part's folders; empty: the whole revision
    objects: int  # distinct objects the revision needs (its .dir included)
    present: int  # already in the cache
    fetched_objects: int
    fetched_bytes: int
    waited_objects: int
    retries: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def prefetch(
    cache: NodeCache,
    revision: Revision,
    remote: Remote,
    *,
    layout: Layout | None = None,
    part: Part = Part.WHOLE,
) -> PrefetchResult:
    """Make every object of `revision` (of `part` of it) present in `cache`; raise if the
    remote lacks some, or the revision lacks one of the part's folders."""
    with cache.building(revision.oid):
        return _prefetch(cache, revision, remote, layout=layout, part=part)


def _prefetch(
    cache: NodeCache, revision: Revision, remote: Remote, *, layout: Layout | None, part: Part
) -> PrefetchResult:
    started = time.monotonic()
    fetcher = Fetcher(cache, remote)
    layouts = layouts_to_try(layout)
    found = cache.find(revision.oid, layouts) or remote.find(revision.oid, layouts)
    if found is None:
        raise fetcher.not_found(revision.oid, layouts)
    needed = [revision.oid]
    dir_fetched = not cache.present(revision.oid, found)
    if dir_fetched:
        fetcher.fetch([revision.oid], found)
    if revision.is_dir:
        manifest = part.select(cache.load_manifest(revision, found), revision=revision.oid)
        needed += sorted({manifest.md5(i) for i in range(len(manifest))})
    missing = [oid for oid in needed if not os.path.lexists(cache.path(oid, found))]
    if missing:
        fetcher.fetch(missing, found)
    return PrefetchResult(
        revision=revision.oid,
        layout=str(found),
        paths=part.paths,
        objects=len(needed),
        present=len(needed) - len(missing) - int(dir_fetched),
        fetched_objects=fetcher.fetched_objects,
        fetched_bytes=fetcher.fetched_bytes,
        waited_objects=fetcher.waited_objects,
        retries=dict(fetcher.retries),
        seconds=time.monotonic() - started,
    )
