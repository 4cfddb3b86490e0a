"""Proof of access, per tenant: a pod gets cached bytes only if its own remote proves them.

**Threat.** Tenants share a node cache, and a pod spec can name any pin. Tenant B must never
be served tenant A's cached bytes unless B's own remote (the Dataset in B's namespace), read
with B's own keys (the Secret kubelet passes), proves that B could have fetched them itself.
Attacks this defeats: B pushes into B's bucket a `.dir` listing A's md5s (and maybe garbage
under A's object keys) to be served A's files from the cache; B uses keys that do not reach
the remote; B names a pin the node has cached but B's remote does not hold.

**The proof** (`Access.prove`), before anything cached is linked for a request:

a. The pin's object (its `.dir`, or the single file) is proven on the request's remote with
   the request's keys (`Remote.prove`: by the server's md5 of the bytes, its ETag, or by
   downloading and hashing them). A success is remembered per (credential fingerprint, remote,
   layout, pin) for `ttl` seconds (default `DEFAULT_TTL`, an injected clock for tests), so a
   burst of pods costs one request; keys the remote refuses are `Refusal.WRONG_KEYS`, a pin it
   does not hold (or holds other bytes for) `Refusal.NOT_ON_REMOTE`.
b. Every object the `.dir` names is proven on that remote (`Refusal.OBJECTS_NOT_ON_REMOTE`
   otherwise), and the success is kept as a provenance record
   `ROOT/provenance/<remote-id>/<tree-key>`: the remote-id is the SHA-256 of the remote's URL
   with its endpoint, bucket and prefix (what names the bytes, never the keys), the tree key
   is `workspace.tree_key`. A warm publish whose step (a) is remembered costs O(1); a new pod
   (another Secret, say) on the node costs step (a) only. Objects are a remote's to keep: a
   record says the remote held them when proven, which is all the proof needs (B had the
   bytes then), so records do not expire; `forget_tree` drops them with their tree (GC).

   The manifest is read from the node cache: step (a) proved the `.dir` by md5 and the cache
   md5-checks it on load, so the cached copy is the same bytes. If the cache lacks it, it is
   fetched from this remote (`engine.fetching.Fetcher`, md5-verified).

   Proof by content (ETags not trusted, below) downloads every object. Objects the node does
   not have yet are downloaded into the cache instead (the fetch md5-checks the bytes this
   remote served: that is the same proof), so a cold start costs one download per object, and
   the tree build then finds them cached; only objects already cached are downloaded to be
   hashed. If that fetch is not all this request's own (an object absent, corrupt, or fetched
   by someone else meanwhile), every object is proven the usual way.

**A part of a revision** (`engine.part`: the folders a volume's `path` names) is proven like
a revision of its own: step (a) proves the pin's `.dir` as always (the manifest is the whole
revision's, and the pod's keys must read it), step (b) the objects beneath the part's folders
only, kept as the part's own record (its tree key has the part's `-p` suffix, and the record
lists the folders). A pod asking for a part never needs the rest of the revision on its
remote, and a node never downloads the rest to prove it. Records compose within a revision on
one remote, because each says "this remote held these objects": a record of the whole
revision proves every part of it (nothing is asked of the remote), and a proof of the whole
or of another part asks only for the objects no record of that revision already proves (on
hosts whose ETags are not trusted, that is a download each: the composition is what keeps a
part and the whole on one node at one download per object). Only records the request may
accept count (see ETags below). The folders are checked against the `.dir` only here, after
step (a): a folder the revision lacks is `PathNotInRevisionError`, and a pod whose keys cannot
read the pin learns nothing of its folders. Proofs of one revision's objects on one remote
take turns (one lock per remote and revision), so concurrent part and whole proofs compose
instead of each downloading the same objects.

**Why proof by objects, and why a record per remote.** The `.dir` alone proves nothing about
the objects: anyone can write a manifest naming any md5s. Proving each object on the
requesting remote is what ties the cached bytes to B's own storage; keeping the proof per
remote (not per key) lets every pod reading that remote share it, because step (a) still runs
with each request's own keys. A key that can read a remote's `.dir` but not its objects
(a policy split inside `files/md5/`) would share a record; no store we support sets such
keys up by default, and the record is only ever for objects that remote was shown to hold.

**Whose word is taken (refined from the first design).** A LIST's ETag is the server's md5 of
the bytes it stored, which no client can choose: proof in one request per shard. But the
endpoint comes from the tenant's Dataset, and a server the tenant runs can answer any ETag. So
`trust_etags` is the caller's decision per endpoint (an admin's list of S3 services, e.g.
B2 and AWS): off, every object is downloaded from the tenant's remote and hashed here, which
a lying server cannot pass without serving the very bytes. Records say how they were proven
(`ProofMethod`); an ETag record does not count for a request that may not trust ETags.

**Records are trusted only if they are ours.** In CSI mode the agent alone writes ROOT; a
record is read without following symlinks (`safefs`), must be a regular file owned by our uid,
and must name the remote and tree it is filed under. Writes are atomic (temp file, fsync,
rename). Anything else is ignored and the proof is made again.

**Fingerprints.** `fingerprint(access_key_id, secret)` is an HMAC-SHA256 under a key made at
start-up: it tells two key pairs apart within this process, and cannot be reversed or even
checked against a guess outside it. It is never logged; messages name the remote, never keys.

Blocking work (the remote's sync calls, manifest reads, file writes) runs in threads, through
the runner the caller gives (`asyncio.to_thread` by default; the agent passes its daemon-thread
runner, so a call stuck on a remote never holds up its exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, ParamSpec, Protocol, TypeVar

from datapin_sidecar import safefs
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.fetching import Fetcher
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.remote import ProofReport, Remote
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import is_tree_key, tree_key, tree_layout, tree_md5
from datapin_sidecar.errors import (
    AccessRefusedError,
    CorruptObjectError,
    PathNotInRevisionError,
    Refusal,
    RemoteCause,
    RemoteError,
    UnsafeFileError,
    UsageError,
)

#: How long a proven (keys, remote, pin) is remembered, in seconds.
DEFAULT_TTL: Final = 300.0
#: Remembered proofs kept before expired ones are dropped.
_MEMO_PRUNE: Final = 4096
#: A record is a few hundred bytes; anything larger is not ours.
_MAX_RECORD: Final = 64 * 1024
#: Objects a message names.
_SHOWN: Final = 3
_PROCESS_KEY: Final = secrets.token_bytes(32)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class ThreadRunner(Protocol):
    """Runs a blocking call in a thread (`asyncio.to_thread`'s shape)."""

    def __call__(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Awaitable[_T]: ...


def fingerprint(access_key_id: str, secret: str) -> str:
    """A per-process keyed hash of a key pair (see the module doc); never the keys."""
    msg = f"{len(access_key_id)}:{access_key_id}:{secret}".encode()
    return hmac.new(_PROCESS_KEY, msg, hashlib.sha256).hexdigest()


def remote_id(remote: Remote) -> str:
    """The name of a remote's provenance directory: SHA-256 of its URL (endpoint included)."""
    return hashlib.sha256(remote.url.encode()).hexdigest()


class ProofMethod(enum.StrEnum):
    """How a record's objects were proven."""

    ETAG = "etag"  # the server's md5 where it matched, bytes hashed otherwise
    CONTENT = "content"  # every object downloaded and hashed here


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvenanceRecord:
    """A remote proven to hold every object of one tree (a revision, or a part of one)."""

    remote_id: str
    tree_key: str
    remote: str  # the remote's URL, for people reading the node volume
    objects: int
    method: ProofMethod
    proven_at: float  # wall-clock seconds
    #: The part's folders (`engine.part`), as in the tree key's `-p` suffix; empty: whole.
    paths: tuple[str, ...] = ()

    @property
    def part(self) -> Part:
        return Part(self.paths)

    def accepted(self, trust_etags: bool) -> bool:
        """Whether a request that may (or may not) trust ETags may rely on this record."""
        return trust_etags or self.method is ProofMethod.CONTENT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Ask:
    """One request's proof: what is asked of which remote."""

    remote: Remote
    revision: Revision
    layout: Layout
    dataset: str
    trust: bool
    run: ThreadRunner

    async def prove(self, oids: list[str], sizes: dict[str, int] | None = None) -> ProofReport:
        """`Remote.prove` in a thread; refused keys become `Refusal.WRONG_KEYS`."""
        remote = self.remote
        try:
            return await self.run(
                remote.prove, oids, self.layout, trust_etags=self.trust, sizes=sizes
            )
        except RemoteError as exc:
            if exc.cause is not RemoteCause.ACCESS_DENIED:
                raise
            raise AccessRefusedError(
                f"dataset {self.dataset!r} pin {self.revision.oid}: remote {remote.url} refused "
                f"the keys of the volume's Secret ({exc.problem}). Fix: put keys that can read "
                f"and list {remote.url} in the Secret the Dataset names for its pods "
                "(nodePublishSecretRef)",
                refusal=Refusal.WRONG_KEYS,
            ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Objects:
    """What step (b) must prove for one tree."""

    #: Every object the tree holds (the record's count).
    oids: list[str]
    #: Those no accepted record of the revision on this remote proves already.
    unproven: list[str]
    #: Sizes of the unproven objects the cache holds.
    sizes: dict[str, int]


def _objects_of(
    remote: Remote,
    cache: NodeCache,
    revision: Revision,
    layout: Layout,
    *,
    part: Part,
    proven: list[Part],
) -> _Objects:
    """The objects of `part` of the pin's `.dir`, read from the cache (fetched if absent, or
    if the cached copy fails its md5: `load_manifest` quarantined it), less those beneath the
    `proven` parts (other records of the revision), and the sizes of the rest the cache holds
    (so the remote's copy of another size is refused unread). `PathNotInRevisionError` if
    the revision lacks one of the part's folders."""
    try:
        full = cache.load_manifest(revision, layout)
    except (FileNotFoundError, CorruptObjectError):
        Fetcher(cache, remote).fetch([revision.oid], layout)
        full = cache.load_manifest(revision, layout)
    manifest = part.select(full, revision=revision.oid)
    oids = list(dict.fromkeys(manifest.md5(i) for i in range(len(manifest))))
    done: set[str] = set()
    for other in proven:
        # A record's folders were in the revision when it was written (the same .dir).
        with contextlib.suppress(PathNotInRevisionError):
            sub = other.select(full, revision=revision.oid)
            done.update(sub.md5(i) for i in range(len(sub)))
    unproven = [o for o in oids if o not in done]
    sizes: dict[str, int] = {}
    for oid in unproven:
        with contextlib.suppress(OSError):
            st = os.lstat(cache.path(oid, layout))
            if stat.S_ISREG(st.st_mode):
                sizes[oid] = st.st_size
    return _Objects(oids=oids, unproven=unproven, sizes=sizes)


def _fetched_all(remote: Remote, cache: NodeCache, oids: list[str], layout: Layout) -> bool:
    """Fetch `oids` into the cache from `remote`; whether this call downloaded every one of
    them (then each passed its md5 check on bytes `remote` served). Anything else (an object
    absent or corrupt, or put there meanwhile by someone else) is False: the caller proves
    them all the usual way, which also says which ones fail."""
    try:
        report = remote.fetch(cache, oids, layout)
    except RemoteError:
        return False  # the proof says what the remote refused
    return (
        report.fetched == len(oids)
        and not (report.present or report.waited)
        and not (report.absent or report.corrupt)
    )


class Access:
    """Proves requests' access to pins (see the module doc); one per node plugin."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
        run: ThreadRunner = asyncio.to_thread,
    ) -> None:
        self.root = Path(root)
        self.run = run
        self.dir = self.root / "provenance"
        self.ttl = ttl
        self.clock = clock
        #: (fingerprint, remote, layout, pin) -> when the proof of step (a) expires.
        self._proven: dict[tuple[str, str, Layout, str], float] = {}
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    # -- the proof ----------------------------------------------------------------------------

    async def prove(
        self,
        *,
        remote: Remote,
        credentials_fingerprint: str,
        cache: NodeCache,
        revision: Revision,
        layout: Layout,
        dataset: str,
        trust_etags: bool,
        part: Part = Part.WHOLE,
    ) -> None:
        """Return if the request's remote and keys prove access to `part` of `revision`;
        else raise `AccessRefusedError` (`PathNotInRevisionError` for a folder the revision
        lacks; a `RemoteError` other than refused keys propagates).

        `layout` is the one the pin is served in (the caller resolves `auto`); `trust_etags`
        whether the remote's endpoint may be taken at its word (see the module doc).
        """
        ask = _Ask(
            remote=remote,
            revision=revision,
            layout=layout,
            dataset=dataset,
            trust=trust_etags,
            run=self.run,
        )
        memo = (credentials_fingerprint, remote.url, layout, revision.oid)
        async with self._lock(("pin", *memo)):
            expires = self._proven.get(memo)
            if expires is None or self.clock() >= expires:
                await self._prove_pin(ask)
                self._remember(memo)
        if not revision.is_dir:
            return  # the pin is the one object: step (a) proved it all
        key = tree_key(revision.md5, layout.value, part)
        whole = tree_key(revision.md5, layout.value)
        rid = remote_id(remote)
        # Per revision, not per tree: a part's and the whole's proofs compose (module doc).
        async with self._lock(("tree", rid, whole)):
            # A warm publish reads one or two records by name (O(1)); the revision's other
            # records are listed only when objects must be proven.
            if await self.run(self._proven_tree, rid, key, whole, trust_etags):
                return  # this tree's own record, or the whole revision's
            siblings = [
                r
                for r in await self.run(self.revision_records, rid, whole)
                if r.accepted(trust_etags)
            ]
            count = await self._prove_objects(ask, cache, part, [r.part for r in siblings])
            await self.run(
                self._write,
                ProvenanceRecord(
                    remote_id=rid,
                    tree_key=key,
                    remote=remote.url,
                    objects=count,
                    method=ProofMethod.ETAG if trust_etags else ProofMethod.CONTENT,
                    proven_at=time.time(),
                    paths=part.paths,
                ),
            )

    def _proven_tree(self, rid: str, key: str, whole: str, trust_etags: bool) -> bool:
        """Whether an accepted record proves tree `key`: its own, or its whole revision's."""
        for name in dict.fromkeys((key, whole)):
            record = self.record(rid, name)
            if record is not None and record.accepted(trust_etags):
                return True
        return False

    async def _prove_pin(self, ask: _Ask) -> None:
        remote, oid, layout = ask.remote, ask.revision.oid, ask.layout
        report = await ask.prove([oid])
        if report.complete:
            return
        what = "holds other bytes under" if report.mismatched else "has no object at"
        raise AccessRefusedError(
            f"dataset {ask.dataset!r}: remote {remote.url} {what} {remote.key(oid, layout)}, "
            f"so it does not hold pin {oid} ({layout.value} layout). datapin serves a pin only "
            "to pods whose own remote, read with their own keys, holds it, even when the node "
            f"has it cached. Fix: `dvc push` the revision to {remote.url}, or correct the "
            "Dataset's remote or layout or the pod's pin",
            refusal=Refusal.NOT_ON_REMOTE,
        )

    async def _prove_objects(
        self, ask: _Ask, cache: NodeCache, part: Part, proven: list[Part]
    ) -> int:
        remote, layout = ask.remote, ask.layout
        objects = await self.run(
            _objects_of, remote, cache, ask.revision, layout, part=part, proven=proven
        )
        oids, sizes = objects.oids, objects.sizes
        asked = objects.unproven
        if not ask.trust and len(sizes) < len(asked):
            # Proof by content downloads every object; those the node lacks are downloaded
            # into the cache instead (md5-verified, with this request's remote and keys),
            # which proves them as well, so a cold start fetches each object once, not twice.
            cold = [o for o in asked if o not in sizes]
            if await self.run(_fetched_all, remote, cache, cold, layout):
                asked = [o for o in asked if o in sizes]
        report = await ask.prove(asked, sizes) if asked else ProofReport()
        if report.complete:
            return len(oids)
        lacking = [*report.absent, *report.mismatched]
        shown = ", ".join(remote.key(o, layout) for o in lacking[:_SHOWN])
        more = f" and {len(lacking) - _SHOWN} more" if len(lacking) > _SHOWN else ""
        how = (
            f"{len(report.absent)} are missing and {len(report.mismatched)} hold other bytes"
            if report.absent and report.mismatched
            else "they hold other bytes"
            if report.mismatched
            else "they are missing"
        )
        raise AccessRefusedError(
            f"dataset {ask.dataset!r} pin {ask.revision.oid}: remote {remote.url} holds the "
            f"pin's .dir but not {len(lacking)} of the {len(oids)} objects it names ({how}: "
            f"{shown}{more}). datapin serves cached objects only to pods whose own remote "
            f"holds them. Fix: `dvc push` the whole revision to {remote.url}",
            refusal=Refusal.OBJECTS_NOT_ON_REMOTE,
        )

    def _remember(self, memo: tuple[str, str, Layout, str]) -> None:
        now = self.clock()
        if len(self._proven) >= _MEMO_PRUNE:
            self._proven = {k: v for k, v in self._proven.items() if v > now}
        self._proven[memo] = now + self.ttl

    @contextlib.asynccontextmanager
    async def _lock(self, key: Hashable) -> AsyncIterator[None]:
        """One proof at a time per key: concurrent publishes of a pin wait for the first."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    # -- records ------------------------------------------------------------------------------

    def record(self, rid: str, key: str) -> ProvenanceRecord | None:
        """The record of tree `key` on remote `rid`, if there is one we wrote (module doc)."""
        try:
            top = safefs.open_dir(self.dir)
        except (FileNotFoundError, UnsafeFileError):
            return None
        try:
            sub = safefs.open_dir(rid, dir_fd=top)
        except (FileNotFoundError, UnsafeFileError, NotADirectoryError):
            return None
        finally:
            os.close(top)
        try:
            return _read_record(sub, rid, key)
        finally:
            os.close(sub)

    def revision_records(self, rid: str, whole: str) -> list[ProvenanceRecord]:
        """The records on remote `rid` of the revision whose whole tree key is `whole`: its
        own and every part's (same md5 and layout)."""
        try:
            top = safefs.open_dir(self.dir)
        except (FileNotFoundError, UnsafeFileError):
            return []
        try:
            sub = safefs.open_dir(rid, dir_fd=top)
        except (FileNotFoundError, UnsafeFileError, NotADirectoryError):
            return []
        finally:
            os.close(top)
        md5, layout = tree_md5(whole), tree_layout(whole)
        found = []
        try:
            for name in os.listdir(sub):
                if not name.startswith(md5) or not is_tree_key(name):
                    continue
                if tree_layout(name) is not layout:
                    continue
                record = _read_record(sub, rid, name)
                if record is not None:
                    found.append(record)
        finally:
            os.close(sub)
        return found

    def records(self) -> list[ProvenanceRecord]:
        """Every trusted record on the node."""
        found: list[ProvenanceRecord] = []
        for rid, sub in self._remote_dirs():
            for name in os.listdir(sub):
                record = None if name.startswith(".") else _read_record(sub, rid, name)
                if record is not None:
                    found.append(record)
        return found

    def forget_tree(self, key: str) -> int:
        """Drop every record of tree `key` (its tree was evicted); how many were dropped."""
        dropped = 0
        for _, sub in self._remote_dirs():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(key, dir_fd=sub)
                dropped += 1
        return dropped

    def _remote_dirs(self) -> Iterator[tuple[str, int]]:
        """(remote id, directory fd) of each remote's records, opened without following a
        link; each fd is closed when the walk moves on."""
        try:
            top = safefs.open_dir(self.dir)
        except (FileNotFoundError, UnsafeFileError):
            return
        try:
            for rid in os.listdir(top):
                try:
                    sub = safefs.open_dir(rid, dir_fd=top)
                except (FileNotFoundError, NotADirectoryError, UnsafeFileError):
                    continue
                try:
                    yield rid, sub
                finally:
                    os.close(sub)
        finally:
            os.close(top)

    def _write(self, record: ProvenanceRecord) -> None:
        root = safefs.open_dir(self.root)
        try:
            sub = safefs.open_dir_beneath(root, f"provenance/{record.remote_id}", create=True)
        finally:
            os.close(root)
        try:
            tmp = f".{record.tree_key}.{secrets.token_hex(6)}.tmp"
            fd = safefs.open_regular(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=sub, mode=0o644
            )
            try:
                os.write(fd, record.to_json().encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, record.tree_key, src_dir_fd=sub, dst_dir_fd=sub)
            os.fsync(sub)
        finally:
            os.close(sub)


def _read_record(dir_fd: int, rid: str, key: str) -> ProvenanceRecord | None:
    try:
        fd = safefs.open_regular(key, dir_fd=dir_fd)
    except (FileNotFoundError, UnsafeFileError):
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_size > _MAX_RECORD or not stat.S_ISREG(st.st_mode):
            return None
        data = os.read(fd, _MAX_RECORD + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
        record = ProvenanceRecord(
            remote_id=str(doc["remote_id"]),
            tree_key=str(doc["tree_key"]),
            remote=str(doc["remote"]),
            objects=int(doc["objects"]),
            method=ProofMethod(doc["method"]),
            proven_at=float(doc["proven_at"]),
            paths=Part.from_list(doc.get("paths") or None).paths,
        )
    except (ValueError, TypeError, KeyError, UsageError):
        return None
    # It must be filed where it says, and its folders be the ones its key names: a record
    # proves exactly its own tree.
    ok = (
        record.remote_id == rid
        and record.tree_key == key
        and is_tree_key(key)
        and tree_key(tree_md5(key), tree_layout(key).value, record.part) == key
        and hashlib.sha256(record.remote.encode()).hexdigest() == rid
    )
    return record if ok else None
