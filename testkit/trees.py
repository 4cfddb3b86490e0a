"""Put a dict of files into a node cache as a DVC revision, the way `dvc add` would.

Tests and benchmarks need revisions without running DVC every time: this writes each object
through the cache's own verified insert and the `.dir` manifest in DVC's exact bytes, so the
result is indistinguishable from a DVC-made cache (the DVC interop tests prove that part).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, ObjectHasher
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.revision import Revision


def object_name(data: bytes, layout: Layout = Layout.DVC3) -> str:
    hasher = ObjectHasher(layout)
    hasher.update(data)
    return hasher.hexdigest()


def put_revision(
    cache: NodeCache,
    files: Mapping[str, bytes],
    *,
    layout: Layout = Layout.DVC3,
    objects: bool = True,
) -> Revision:
    """Insert `files` (relpath -> bytes) and their `.dir`; return the revision.

    With `objects=False` only the manifest is inserted (to test missing objects).
    """
    entries = []
    for relpath, data in files.items():
        oid = object_name(data, layout)
        entries.append((relpath, oid))
        if objects and cache.find(oid, (layout,)) is None:
            cache.insert_bytes(data, oid, layout)
    manifest = Manifest.from_entries(entries, source="test")
    raw = manifest.dumps()
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    rev = Revision(md5=md5, is_dir=True)
    if cache.find(rev.oid, (layout,)) is None:
        cache.insert_bytes(raw, rev.oid, layout)
    return rev
