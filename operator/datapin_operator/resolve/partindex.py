"""Does a revision hold the folders a Job asks for? Answered at admission, from the pin's `.dir`.

A Job that names folders (`datapin.dev/path`, a named revision `<md5>.dir:<folders>`, a
prefetch entry `v2:images/train`) must be refused at `kubectl apply` when a folder is not in
the revision or names a file, with the sidecar's own message (`PathNotInRevisionError`: the
folders next to where it looked and the revision's top-level folders), not fail minutes later
on a node. The only place that says which folders a revision holds is its `.dir` in the
Dataset's remote, so the webhook reads it, with the Dataset's keys, through the same opening
and error mapping as the controller's remote check (`reconcile.remotecheck.open_remote`), the
same fetch (`S3Remote.afetch`, md5-checked into a scratch `NodeCache`) and the same parser
(`NodeCache.load_manifest`). Only Jobs that name folders pay for it.

**What is kept: a folder index, not the manifest.** Pins are content-addressed, so what a
`.dir` says never changes and is cached per (remote, pin) in a least-recently-used map bounded
by bytes (`DATAPIN_PART_INDEX_CACHE_MIB`). The questions asked of it are "is this a folder?",
"is it a file?" and "which folders are inside that one?", never "which object is that file?".
So `FolderIndex` keeps every folder (`<folder>/`, sorted as the manifest sorts paths, so a
folder's descendants are one binary-searched run; hints list names sorted, as the sidecar's)
and one 64-bit hash per file (sorted, for "is it a file"). A manifest costs ~25 bytes
plus the path per file; the index 8 bytes per file plus its folders, which are few: a
1 GiB `.dir` (about 15 million files) is ~120 MB of index instead of ~700 MB of manifest, so
the cache holds many revisions, not one. The file hashes are Python's per-process `hash` of
the path's bytes: collisions among 15 million 64-bit hashes are about one in 10^5, and one
would only turn "has no folder X" into "X is a file" in a refusal that happens either way.

**Cost, once per (remote, pin).** The `.dir` is downloaded into a scratch directory
(`DATAPIN_PART_INDEX_DIR`, removed after), parsed and indexed in worker threads (never on the
event loop), and dropped: its memory peak is the `.dir`'s bytes plus their manifest, so a
`.dir` above `DATAPIN_PART_INDEX_MAX_DIR_MIB` is refused with the setting as the fix rather
than risking the operator's memory limit. Concurrent admissions of one pin share one read
(single flight), and the read is a task of its own: when it takes longer than an admission
may wait (`DATAPIN_PART_INDEX_WAIT_SECONDS`, below the webhook's timeout), that admission is
refused with "still reading, apply again shortly" while the read goes on, and the next
attempt is answered from memory. A failed read is not cached: the next admission tries again.

**Access is proven per key pair.** The index is shared by every Dataset on the same remote,
but the folder names in a refusal are the revision's contents, so a Job learns them only if
its Dataset's keys can read the `.dir`: a key pair not seen for an entry yet (its SHA-256
fingerprint, never the key) pays one HEAD of the `.dir` before the index answers.

**Errors** follow the webhook's other remote failures: an unreachable remote, refused keys,
a timeout or a `.dir` that is not pushed is a `RemoteCheckError` (a rejection: the Job would
fail on its node anyway) whose message says what and how to fix it; a folder that is not in
the revision is a `PathNotInRevisionError` from the sidecar's error hierarchy, which callers
wrap with the Dataset, the revision and the annotation that named it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import shutil
import tempfile
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import DatapinError, PathNotInRevisionError

from datapin_operator.api.models import Remote
from datapin_operator.errors import RemoteCheckError
from datapin_operator.reconcile.remotecheck import RemoteKeys, open_remote

log = logging.getLogger(__name__)

#: How many folder names a hint lists before "and N more" (the sidecar's `engine.part` rule).
_HINT: Final = 20
#: Bytes a Python bytes object costs beyond its contents, plus its slot in the tuple.
_OBJECT_OVERHEAD: Final = 41
_MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FolderIndex:
    """The folders of one revision and a hash per file: what `Part` checks need (see the
    module doc). Build with `of`; immutable."""

    #: Every folder as `<relpath>/` (UTF-8), sorted: the manifest's order of their contents.
    folders: tuple[bytes, ...]
    #: `hash()` of every file's relpath bytes, sorted.
    files: array[int]

    @classmethod
    def of(cls, manifest: Manifest) -> FolderIndex:
        """Index a manifest: O(n) over its paths, plus sorting the file hashes."""
        paths, _, _ = manifest.buffers()
        names = paths.split(b"\0")[: len(manifest)]  # each relpath is NUL-terminated
        parents = {name.rpartition(b"/")[0] for name in names}
        parents.discard(b"")
        folders = set(parents)
        for parent in parents:  # ancestors of folders that hold only folders
            above = parent
            while b"/" in above:
                above = above.rpartition(b"/")[0]
                if above in folders:
                    break
                folders.add(above)
        return cls(
            folders=tuple(sorted(f + b"/" for f in folders)),
            files=array("q", sorted(map(hash, names))),
        )

    @property
    def nbytes(self) -> int:
        """Memory held, roughly: what the cache's bound counts."""
        return (
            sum(len(f) + _OBJECT_OVERHEAD for f in self.folders)
            + self.files.itemsize * len(self.files)
            + 64
        )

    def check(self, part: Part, *, revision: str) -> None:
        """Raise `PathNotInRevisionError` (the sidecar's message) for the first folder of
        `part` that is not a folder of the revision."""
        for path in part.paths:
            if not self._is_folder(path.encode("utf-8")):
                raise self._not_in_revision(path, revision)

    def children(self, parent: str = "") -> list[str]:
        """The folders directly inside `parent` ("" = the root), sorted by their names'
        UTF-8 bytes, as the sidecar's hints list them (`engine.part.folders`)."""
        prefix = f"{parent}/".encode() if parent else b""
        end = bisect.bisect_left(self.folders, parent.encode() + b"0") if parent else None
        # `bisect_right`: past `parent/` itself, which is the first key of its own run.
        i = bisect.bisect_right(self.folders, prefix)
        stop = len(self.folders) if end is None else end
        found: list[str] = []
        while i < stop:
            name = self.folders[i][len(prefix) :].partition(b"/")[0]
            found.append(name.decode("utf-8"))
            # Past this child's own run (`<child>/...`): `0` follows `/`.
            i = bisect.bisect_left(self.folders, prefix + name + b"0", i + 1, stop)
        # The keys' order puts `a-b/` before `a/`; names are listed in their own order.
        return sorted(found, key=lambda name: name.encode("utf-8", "surrogatepass"))

    def _is_folder(self, raw: bytes) -> bool:
        key = raw + b"/"
        i = bisect.bisect_left(self.folders, key)
        return i < len(self.folders) and self.folders[i] == key

    def _is_file(self, raw: bytes) -> bool:
        wanted = hash(raw)
        i = bisect.bisect_left(self.files, wanted)
        return i < len(self.files) and self.files[i] == wanted

    def _not_in_revision(self, path: str, revision: str) -> PathNotInRevisionError:
        parent = path
        while True:
            parent = parent.rpartition("/")[0]
            if not parent or self._is_folder(parent.encode("utf-8")):
                break
        return PathNotInRevisionError(
            revision=revision,
            path=path,
            is_file=self._is_file(path.encode("utf-8")),
            parent=parent,
            siblings=_some(self.children(parent)) if parent else (),
            top=_some(self.children()),
        )


def _some(names: Sequence[str]) -> tuple[str, ...]:
    if len(names) <= _HINT:
        return tuple(names)
    return (*names[:_HINT], f"and {len(names) - _HINT} more")


def fingerprint(keys: RemoteKeys) -> str:
    """A key pair's identity for the proven-access sets (the keys themselves are not kept)."""
    raw = f"{keys.access_key_id}\0{keys.secret_access_key}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(slots=True, kw_only=True)
class _Entry:
    index: FolderIndex
    #: Fingerprints of the key pairs that have read (or HEADed) this `.dir` on this remote.
    proven: set[str] = field(default_factory=set)


RemoteId = tuple[str, str]  # (url, endpoint or "")
_Key = tuple[str, str, str]  # (url, endpoint, pin)


class PartIndex:
    """Folder indexes of pins, per (remote, pin): read once, kept in a bounded LRU."""

    def __init__(
        self,
        *,
        scratch: Path,
        max_bytes: int,
        max_dir_bytes: int,
        request_timeout: float = 10.0,
        read_timeout: float = 300.0,
    ) -> None:
        self.scratch = scratch
        self.max_bytes = max_bytes
        self.max_dir_bytes = max_dir_bytes
        self.request_timeout = request_timeout
        self.read_timeout = read_timeout
        self._cache: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        #: Reads in flight, shared by every admission of the same pin (single flight).
        self._reads: dict[_Key, asyncio.Task[_Entry]] = {}

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def cached(self, remote: Remote, pin: str) -> bool:
        return _key(remote, pin) in self._cache

    async def check(
        self,
        *,
        remote: Remote,
        keys: RemoteKeys,
        pin: str,
        layout: LayoutChoice,
        part: Part,
        where: str,
        wait: float | None = None,
    ) -> None:
        """Raise `PathNotInRevisionError` if `part` is not in `pin`, `RemoteCheckError` if the
        `.dir` cannot be read with `keys` (or is still being read after `wait` seconds; None:
        wait for the read). `where` names the Secret in messages."""
        if part.whole:
            return
        entry = await self._entry(remote, keys, pin, layout, where=where, wait=wait)
        mine = fingerprint(keys)
        if mine not in entry.proven:
            await self._prove(remote, keys, pin, layout, where=where)
            entry.proven.add(mine)
        entry.index.check(part, revision=pin)

    async def _entry(
        self,
        remote: Remote,
        keys: RemoteKeys,
        pin: str,
        layout: LayoutChoice,
        *,
        where: str,
        wait: float | None,
    ) -> _Entry:
        key = _key(remote, pin)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry
        task = self._reads.get(key)
        if task is None:
            task = asyncio.create_task(self._read(key, remote, keys, pin, layout, where=where))
            self._reads[key] = task
            task.add_done_callback(lambda done: self._read_done(key, done))
        try:
            # Shielded: an admission giving up (its deadline, a client gone) must not cancel
            # the read the next attempt will be answered from.
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            raise RemoteCheckError(
                f"the operator is still reading {pin} (the revision's list of files) from "
                f"{remote.url} to check the folders asked for; it took more than {wait:g} s "
                "and goes on in the background. Fix: apply again in a minute; the folders are "
                "then checked from memory",
                reason="RemoteTimeout",
            ) from None

    def _read_done(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        self._reads.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here, so a read every waiter gave up on is logged, not warned about.
            log.info("reading %s for its folders failed: %s", key[2], task.exception())

    async def _read(
        self,
        key: _Key,
        remote: Remote,
        keys: RemoteKeys,
        pin: str,
        layout: LayoutChoice,
        *,
        where: str,
    ) -> _Entry:
        await asyncio.to_thread(self.scratch.mkdir, parents=True, exist_ok=True)
        scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self.scratch, prefix="dir-"))
        try:
            async with open_remote(
                remote,
                keys,
                where=where,
                request_timeout=self.request_timeout,
                total=self.read_timeout,
            ) as s3:
                found = await s3.afind(pin, LayoutChoice(layout).candidates)
                if found is None:
                    raise _not_pushed(remote, pin, layout)
                cache = NodeCache(scratch)
                report = await s3.afetch(cache, [pin], found)
                if report.absent or report.corrupt:
                    what = "is gone" if report.absent else "fails its md5 every time it is read"
                    raise RemoteCheckError(
                        f"{pin} in {remote.url} {what}. Fix: `dvc push` the revision again",
                        reason="NotPushed",
                    )
            entry = _Entry(
                index=await asyncio.to_thread(self._index, cache, pin, found),
                proven={fingerprint(keys)},
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        self._keep(key, entry)
        return entry

    def _index(self, cache: NodeCache, pin: str, layout: Layout) -> FolderIndex:
        """In a worker thread: the `.dir` parsed (md5-checked) and indexed."""
        size = os.stat(cache.path(pin, layout)).st_size
        if size > self.max_dir_bytes:
            raise RemoteCheckError(
                f"{pin} (the revision's list of files) is {size / _MIB:.0f} MiB, more than the "
                f"{self.max_dir_bytes / _MIB:.0f} MiB the operator reads to check folders. "
                "Fix: ask the admin to raise DATAPIN_PART_INDEX_MAX_DIR_MIB (and the "
                "operator's memory limit with it: reading takes about twice the size), or "
                "leave datapin.dev/path out to mount the whole revision",
                reason="DirTooLarge",
            )
        try:
            manifest = cache.load_manifest(Revision.parse(pin), layout)
        except DatapinError as exc:
            raise RemoteCheckError(
                f"{pin} cannot be read as a revision: {exc}", reason="BadManifest"
            ) from None
        return FolderIndex.of(manifest)

    def _keep(self, key: _Key, entry: _Entry) -> None:
        size = entry.index.nbytes
        if size > self.max_bytes:
            log.info(
                "the folder index of %s (%d bytes) is larger than the cache (%d): not kept",
                key[2],
                size,
                self.max_bytes,
            )
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= old.index.nbytes
        self._cache[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= evicted.index.nbytes

    async def _prove(
        self, remote: Remote, keys: RemoteKeys, pin: str, layout: LayoutChoice, *, where: str
    ) -> None:
        async with open_remote(
            remote,
            keys,
            where=where,
            request_timeout=self.request_timeout,
            total=self.request_timeout * 3,
        ) as s3:
            if await s3.afind(pin, LayoutChoice(layout).candidates) is None:
                raise _not_pushed(remote, pin, layout)


def _key(remote: Remote, pin: str) -> _Key:
    return (remote.url, remote.endpoint or "", pin)


def _not_pushed(remote: Remote, pin: str, layout: LayoutChoice) -> RemoteCheckError:
    return RemoteCheckError(
        f"the remote {remote.url} has no {pin} (looked in the {LayoutChoice(layout).value} "
        "layout). Fix: `dvc push` that revision to the remote, or check spec.remote.url and "
        "layout",
        reason="NotPushed",
    )
