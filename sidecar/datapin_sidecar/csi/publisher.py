"""Publishing a shared tree into a pod: the per-volume workspace and its mounts.

One directory per published volume, made and removed only by the agent (root)::

    ROOT/csi/<volume-id>/volume.json      the record (`VolumeRecord`), written atomically
                                          (the tree keys in it may carry a part's `-p<16 hex>`
                                          suffix, `engine.part`; its folders are `paths`)
    ROOT/csi/<volume-id>/view/            a shared mount (bound onto itself), bound onto
                                          kubelet's target path: what the pod sees
    ROOT/csi/<volume-id>/view/current -> .revs/<key>    relative symlink, swapped by rename
    ROOT/csi/<volume-id>/view/.revs/<key> a read-only bind of the shared tree (`trees`), or
                                          for a writable volume an overlay: lower = the shared
                                          tree, upper and work below, so writes never reach
                                          the shared tree or the cache (on XFS the copy-up is
                                          a reflink)
    ROOT/csi/<volume-id>/upper/<key>/, work/<key>/      the overlay's layers (writable only)

Why a `view/` below the volume directory: the pod must not see the record, nor the overlay's
upper and work directories (writing there while the overlay is mounted is undefined). The
target is the view bound recursively and read-only (nosuid, nodev), whatever the volume: the
pod can never rename `current` or plant entries beside it, even as root; only the
`.revs/<key>` mount below it decides whether the data is writable. Every read-only mount is
made read-only *before* it is attached (`mounts.bind_read_only`): the view is shared and the
target is in kubelet's Bidirectional directory, so a mount made there is copied to the host
(and the pod) at once, and a remount afterwards would change the agent's copy only.

**Publish** (`publish`), in this order, so a crash at any point leaves a state `unpublish` and
`recover` undo from the record and /proc/self/mountinfo alone: the record first (it names the
tree key before anything shows it, which the tree store's removal relies on), `view` bound onto
itself and made shared (its own peer group), the tree mounted at `.revs/<key>`, `current`
created, the target directory made (kubelet made its parent) and the view bound onto it. A
failure undoes what this call did. Publishing the same request again is a no-op (and repairs a
target left writable by a crash between the bind and the read-only remount, on a kernel
without the new mount API); the same volume id with a different request (target, pod,
dataset, pin, path, writable, readOnly) is a `VolumeConflictError`. kubelet's republish
sends the pod's attributes as they were (a pod spec is immutable), so the request is compared
with what was published, not with what a live switch put in `current` since.

**Ownership.** Everything here and every tree is root's (the agent); tree files are 0444 and
directories 0755. An overlay keeps the lower layer's owners and modes on copy-up, so a writable
volume is writable where those allow: a pod running as a non-root uid can read everything but
write only what it creates where it may. (Mapping the tree to the pod's uid needs an idmapped
mount and the pod's `runAsUser`, which the request does not carry.)

**Switch** (`switch`), REFERENCE.md's recipe: mount the new tree at `.revs/<new>` (the view is
shared, so the mount propagates to the target and, through the host, into the pod's containers
with `HostToContainer`), then rename a fresh symlink over `current`. The target is never
remounted. The old `.revs/<old>` stays mounted for `grace` seconds (the sidecar's
`spare_grace_seconds` rule: a reader that resolved `current` before the switch keeps all of
its revision), then is lazily unmounted and removed (`purge_retired`). Retirement times are in
the record, so a restarted agent honours them.

**Unpublish** unmounts everything at and below the target, removes the target directory,
unmounts everything below the volume directory and deletes it (only once no mount is left
below it: `safefs.remove_tree` would otherwise walk into a mounted tree). Nothing there is fine.

**Recover** (at start) deletes volume directories no mount outside them shows (a publish that
crashed before binding the target, or whose pod is gone with the node's mounts): a volume
whose view is still shown anywhere (a target a pod may use) is never touched.

The agent is the only writer (one per node), so the per-volume lock is in-process. Public
methods are coroutines that run the blocking work in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from datapin_sidecar import safefs
from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.volume import VolumeRequest, check_volume_id
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.workspace import is_tree_key, tree_key, tree_layout, tree_md5
from datapin_sidecar.errors import (
    BadVolumeError,
    MountError,
    UsageError,
    VolumeConflictError,
    os_error,
)

log = logging.getLogger(__name__)

RECORD: Final = "volume.json"
VIEW: Final = "view"
LINK: Final = "current"
_RECORD_LIMIT: Final = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeRecord:
    """What one published volume is, as the agent left it on disk."""

    volume_id: str
    target_path: str
    pod_namespace: str
    pod_name: str
    pod_uid: str
    dataset: str
    pin: str
    writable: bool
    readonly: bool
    #: The key `publish` bound (the request's); `tree_key` is what `current` names now.
    published_key: str
    tree_key: str
    #: The folders the request asked for (`engine.part`; empty: the whole revision), and
    #: those of the tree `current` names now (a switch may change them with the pin).
    paths: list[str] = field(default_factory=list)
    tree_paths: list[str] = field(default_factory=list)
    #: Every key mounted (or being mounted) under `.revs`: 0 for the current one, else the
    #: time it left `current` (unmounted once `grace` has passed).
    revs: dict[str, float] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes) -> VolumeRecord:
        data: dict[str, Any] = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names})
        keys = [record.published_key, record.tree_key, *record.revs]
        if not all(isinstance(k, str) and is_tree_key(k) for k in keys):
            raise ValueError("a tree key of the record is not one")
        try:
            # Each key's part suffix must be its folders' (`workspace.tree_key`).
            if not (
                _keyed(record.published_key, record.part)
                and _keyed(record.tree_key, record.tree_part)
            ):
                raise ValueError("the record's paths are not its tree keys'")
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return record

    @property
    def part(self) -> Part:
        """The part the request asked for (`paths`)."""
        return Part.from_list(self.paths or None, what="a volume record's paths")

    @property
    def tree_part(self) -> Part:
        """The part `current` shows now (`tree_paths`)."""
        return Part.from_list(self.tree_paths or None, what="a volume record's tree paths")

    def summary(self) -> dict[str, object]:
        """What /status shows of the volume: whose, which dataset, what `current` serves
        (`path`: the part's folders as the attribute writes them, "" for the whole)."""
        return {
            "volume_id": self.volume_id,
            "pod": f"{self.pod_namespace}/{self.pod_name}",
            "dataset": self.dataset,
            "pin": tree_md5(self.tree_key) + (".dir" if self.pin.endswith(".dir") else ""),
            "path": self.tree_part.label,
            "tree": self.tree_key,
            "writable": self.writable,
        }

    @property
    def keys(self) -> set[str]:
        """The trees this volume mounts (`published_key` only matters for idempotency)."""
        return {self.tree_key, *self.revs}


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """What `recover` found: volumes kept (shown at a target) and debris removed."""

    kept: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    purged: tuple[str, ...] = ()


class Publisher:
    """The per-volume workspaces under `root/csi` (see the module doc)."""

    def __init__(self, root: Path, *, grace: float = 0.0) -> None:
        self.root = Path(root).absolute()
        self.dir = self.root / "csi"
        self.trees = self.root / "trees"
        self.grace = grace
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._timers: set[asyncio.Task[None]] = set()

    # -- paths and records --------------------------------------------------------------------

    def volume(self, volume_id: str) -> Path:
        return self.dir / check_volume_id(volume_id)

    def view(self, volume_id: str) -> Path:
        return self.volume(volume_id) / VIEW

    @contextlib.contextmanager
    def _lock(self, volume_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(volume_id, threading.Lock())
        with lock:
            yield

    def record(self, volume_id: str) -> VolumeRecord | None:
        """The volume's record; None if there is none (or it is damaged)."""
        try:
            raw = safefs.read_regular(self.volume(volume_id) / RECORD, limit=_RECORD_LIMIT)
            return VolumeRecord.from_json(raw)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def _write(self, record: VolumeRecord) -> None:
        vol = self.volume(record.volume_id)
        tmp = vol / f".{RECORD}.tmp-{secrets.token_hex(4)}"
        # No fsync: a record matters only while its mounts exist, and a reboot drops both; a
        # record lost to a crash reads as absent, and `recover` goes by the mount table then.
        fd = safefs.open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode=0o600)
        try:
            os.write(fd, record.to_json().encode())
        finally:
            os.close(fd)
        os.rename(tmp, vol / RECORD)

    def published(self) -> list[VolumeRecord]:
        """Every volume with a record (for /status, metrics and the GC's roots)."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            with contextlib.suppress(BadVolumeError):
                record = self.record(name)
                if record is not None:
                    records.append(record)
        return records

    def referenced_keys(self) -> set[str]:
        """Every tree key a volume record names (the tree store's `references`)."""
        return {key for record in self.published() for key in record.keys}

    # -- publish ------------------------------------------------------------------------------

    async def publish(self, request: VolumeRequest, tree: Path) -> None:
        """Show `tree` (a shared tree, `TreeStore.ensure`) at `request.target_path`."""
        await asyncio.to_thread(self.publish_sync, request, tree)

    def publish_sync(self, request: VolumeRequest, tree: Path) -> None:
        try:
            self._publish(request, tree)
        except OSError as exc:
            raise _error(exc, "publish") from exc

    def _publish(self, request: VolumeRequest, tree: Path) -> None:
        key = self._check_tree(tree)
        vid = request.volume_id
        with self._lock(vid):
            record = self.record(vid)
            if record is not None:
                self._check_same(record, request, key)
                if mounts.is_mount(request.target_path):
                    # Published already; a crash may have come before the read-only remount.
                    if not mounts.mounts_at(request.target_path)[-1].read_only:
                        mounts.remount_read_only(request.target_path)
                    return
            if self.volume(vid).exists():
                self._teardown(vid)  # a publish that crashed half-way: start over
            record = VolumeRecord(
                volume_id=vid,
                target_path=str(request.target_path),
                pod_namespace=request.pod.namespace,
                pod_name=request.pod.name,
                pod_uid=request.pod.uid,
                dataset=request.dataset,
                pin=request.pin,
                writable=request.writable,
                readonly=request.readonly,
                published_key=key,
                tree_key=key,
                paths=request.part.to_list(),
                tree_paths=request.part.to_list(),
                revs={key: 0.0},
                created=time.time(),
            )
            try:
                self._setup(record, tree)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._undo(record)
                raise

    def _check_tree(self, tree: Path) -> str:
        key = tree.name
        if (
            not is_tree_key(key)
            or tree.parent.parent.name != key
            or tree.parent.parent.parent != self.trees
        ):
            raise BadVolumeError(f"{tree} is not a tree of the node's tree store {self.trees}")
        return key

    @staticmethod
    def _check_same(record: VolumeRecord, request: VolumeRequest, key: str) -> None:
        differs = [
            name
            for name, same in (
                ("target path", record.target_path == str(request.target_path)),
                ("pod", record.pod_uid == request.pod.uid),
                ("dataset", record.dataset == request.dataset),
                ("pin", record.pin == request.pin),
                ("path", record.part == request.part),
                ("writable", record.writable == request.writable),
                ("readOnly", record.readonly == request.readonly),
                ("revision", key in {record.published_key, record.tree_key}),
            )
            if not same
        ]
        if differs:
            raise VolumeConflictError(
                f"volume {record.volume_id} is already published on this node for dataset "
                f"{record.dataset!r} of pod {record.pod_namespace}/{record.pod_name} at "
                f"{record.target_path}; this request differs in {', '.join(differs)}. Fix: "
                "this is kubelet's volume id; unpublish it first, or use a new pod"
            )

    def _setup(self, record: VolumeRecord, tree: Path) -> None:
        vid = record.volume_id
        vol, view = self.volume(vid), self.view(vid)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        vol.mkdir(mode=0o700)
        self._write(record)
        # The pod reads through the view (its root is the target's root): 0755, root-owned.
        os.mkdir(view, 0o755)
        os.mkdir(view / ".revs", 0o755)
        mounts.bind(view, view)
        # Out of whatever peer group the node directory is in, then a group of its own: the
        # target joins it, so mounts made under the view later reach the pod.
        mounts.set_propagation(view, mounts.Propagation.PRIVATE)
        mounts.set_propagation(view, mounts.Propagation.SHARED)
        self._mount_rev(record, record.tree_key, tree, view)
        self._point(view, record.tree_key)
        target = Path(record.target_path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(target, 0o750)
        if not safefs.is_dir(target):
            raise MountError(
                call="mkdir of the target",
                path=str(target),
                code=errno.ENOTDIR,
                fix="kubelet's target path holds something that is not a directory",
            )
        # Read-only before it is attached: the copies kubelet's directory propagates to the
        # host (where the pod's container is made) are read-only too.
        mounts.bind_read_only(view, target, recursive=True)

    def _mount_rev(self, record: VolumeRecord, key: str, tree: Path, base: Path) -> None:
        """Mount `tree` at `<base>/.revs/<key>`: read-only bind, or overlay if writable."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.view(record.volume_id) / ".revs" / key, 0o755)
        point = base / ".revs" / key
        if record.writable:
            vol = self.volume(record.volume_id)
            upper, work = vol / "upper" / key, vol / "work" / key
            upper.mkdir(mode=0o755, parents=True, exist_ok=True)
            work.mkdir(mode=0o700, parents=True, exist_ok=True)
            mounts.overlay(lower=tree, upper=upper, work=work, target=point)
        else:
            mounts.bind_read_only(tree, point)

    @staticmethod
    def _point(view: Path, key: str) -> None:
        """Swap `current` to `.revs/<key>` atomically (a fresh symlink renamed over it)."""
        tmp = view / f".{LINK}.tmp-{secrets.token_hex(4)}"
        os.symlink(f".revs/{key}", tmp)
        os.rename(tmp, view / LINK)

    def _undo(self, record: VolumeRecord) -> None:
        """Undo a publish that failed in this call (its target too: no pod has it yet)."""
        target = Path(record.target_path)
        mounts.unmount_under(target)
        with contextlib.suppress(FileNotFoundError, OSError):
            target.rmdir()
        self._teardown(record.volume_id)

    # -- unpublish ----------------------------------------------------------------------------

    async def unpublish(self, *, volume_id: str, target_path: Path) -> None:
        """Undo what `publish` did (see the module doc); nothing there is fine."""
        await asyncio.to_thread(self.unpublish_sync, volume_id=volume_id, target_path=target_path)

    def unpublish_sync(self, *, volume_id: str, target_path: Path) -> None:
        try:
            self._unpublish(volume_id=volume_id, target_path=target_path)
        except OSError as exc:
            raise _error(exc, "unpublish") from exc

    def _unpublish(self, *, volume_id: str, target_path: Path) -> None:
        vid = check_volume_id(volume_id)
        with self._lock(vid):
            record = self.record(vid)
            if record is not None and record.target_path != str(target_path):
                raise VolumeConflictError(
                    f"volume {vid} is published at {record.target_path}, not at "
                    f"{target_path}. Fix: this is kubelet's request; nothing was unmounted"
                )
            if record is not None or self._ours(vid, target_path):
                mounts.unmount_under(target_path)
            if not mounts.is_mount(target_path):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(target_path)
            self._teardown(vid)

    def _ours(self, volume_id: str, target: Path) -> bool:
        """Whether the mount at `target` shows this volume's view (when the record is gone)."""
        table = mounts.mountinfo()
        base = mounts.fs_path(self.view(volume_id), table)
        return base is not None and any(
            mounts.shows(m, base) == "" for m in mounts.mounts_at(target, table)
        )

    def _teardown(self, volume_id: str) -> None:
        """Unmount everything below the volume directory, then delete it."""
        vol = self.volume(volume_id)
        mounts.unmount_under(vol)
        if mounts.mounts_under(vol):
            raise MountError(
                call="umount (volume directory)",
                path=str(vol),
                code=errno.EBUSY,
                fix="something keeps mounting there; it is retried",
            )
        safefs.remove_tree(vol)

    # -- switch -------------------------------------------------------------------------------

    async def switch(
        self, volume_id: str, tree_key: str, tree: Path, *, part: Part = Part.WHOLE
    ) -> bool:
        """Point the volume's `current` at `tree` (of `part` of its revision: the record
        keeps the folders, see the module doc); whether it changed.

        The old tree stays mounted for `grace` seconds, then `purge_retired` removes it (a
        timer is started here; a restarted agent's `recover` purges what is due).
        """
        changed = await asyncio.to_thread(self.switch_sync, volume_id, tree_key, tree, part=part)
        if changed:
            if self.grace <= 0:
                await self.purge_retired()
            else:
                task = asyncio.create_task(self._purge_later(self.grace))
                self._timers.add(task)
                task.add_done_callback(self._timers.discard)
        return changed

    async def _purge_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.purge_retired()
        except Exception:
            log.exception("removing retired trees failed; the next switch or restart retries")

    def switch_sync(
        self, volume_id: str, tree_key: str, tree: Path, *, part: Part = Part.WHOLE
    ) -> bool:
        key = self._check_tree(tree)
        if key != tree_key or not _keyed(key, part):
            raise BadVolumeError(f"tree {tree} is not the tree of key {tree_key} ({part})")
        vid = check_volume_id(volume_id)
        with self._lock(vid):
            record = self.record(vid)
            if record is None:
                raise BadVolumeError(f"volume {vid} is not published on this node")
            if record.tree_key == key:
                return False
            table = mounts.mountinfo()
            base = self._base(record, table)
            point = self.view(vid) / ".revs" / key
            if key not in record.revs or not mounts.mounts_under(base / ".revs" / key, table):
                record = dataclasses.replace(record, revs={**record.revs, key: 0.0})
                self._write(record)
                self._mount_rev(record, key, tree, base)
            self._point(self.view(vid), key)
            now = time.time()
            revs = {**record.revs, key: 0.0, record.tree_key: now}
            self._write(
                dataclasses.replace(record, tree_key=key, tree_paths=part.to_list(), revs=revs)
            )
            log.info("volume %s switched to %s (%s)", vid, key, point)
            return True

    def _base(self, record: VolumeRecord, table: list[mounts.Mount]) -> Path:
        """Where new trees are mounted: the view if the target is in its peer group, else the
        target (what the pod's container copies).

        After an agent restart in a new mount namespace (a container restart), the view's
        self-bind may be gone, or be the copy the node volume's Bidirectional propagation made
        of it when it was created, which is in the node volume's peer group and not the
        target's: a tree mounted there would never reach the pod.
        """
        view = self.view(record.volume_id)
        target = Path(record.target_path)
        if not mounts.is_mount(target, table):
            return view
        if mounts.is_mount(view, table) and _peer_group(view, table) == _peer_group(target, table):
            return view
        return target

    async def purge_retired(self, *, now: float | None = None) -> list[str]:
        """Unmount and delete trees that left `current` more than `grace` ago; `vid/key`s."""
        return await asyncio.to_thread(self.purge_retired_sync, now=now)

    def purge_retired_sync(self, *, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        done = []
        for record in self.published():
            due = [k for k, t in record.revs.items() if t > 0 and now - t >= self.grace]
            if not due:
                continue
            with self._lock(record.volume_id):
                fresh = self.record(record.volume_id)
                if fresh is None:
                    continue
                for key in due:
                    if key == fresh.tree_key or key not in fresh.revs:
                        continue
                    self._drop_rev(fresh, key)
                    fresh = dataclasses.replace(
                        fresh, revs={k: t for k, t in fresh.revs.items() if k != key}
                    )
                    self._write(fresh)
                    done.append(f"{fresh.volume_id}/{key}")
        return done

    def _drop_rev(self, record: VolumeRecord, key: str) -> None:
        # Lazily: a reader past its grace still holding a file keeps it; nothing new can.
        for base in (self.view(record.volume_id), Path(record.target_path)):
            mounts.unmount_under(base / ".revs" / key, detach=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(self.view(record.volume_id) / ".revs" / key)
        vol = self.volume(record.volume_id)
        for layer in ("upper", "work"):
            safefs.remove_tree(vol / layer / key)

    # -- restart ------------------------------------------------------------------------------

    async def recover(self) -> Recovered:
        """Remove the debris of crashed publishes; never touch a volume a target shows."""
        return await asyncio.to_thread(self.recover_sync)

    def recover_sync(self) -> Recovered:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return Recovered()
        kept, removed = [], []
        for name in names:
            try:
                check_volume_id(name)
            except BadVolumeError:
                continue  # a temp file of ours, or something no volume id names
            with self._lock(name):
                if self._shown(name):
                    kept.append(name)
                    continue
                self._teardown(name)
                removed.append(name)
        purged = self.purge_retired_sync()
        return Recovered(kept=tuple(kept), removed=tuple(removed), purged=tuple(purged))

    def _shown(self, volume_id: str) -> bool:
        """Whether a mount outside the volume directory shows its view (a pod's target)."""
        table = mounts.mountinfo()
        base = mounts.fs_path(self.view(volume_id), table)
        if base is None:
            return False
        inside = mounts.canonical(self.volume(volume_id)) + "/"
        return any(
            mounts.shows(m, base) is not None and not (m.mount_point + "/").startswith(inside)
            for m in table
        )


def _error(exc: OSError, what: str) -> Exception:
    """A `MountError` naming the path for an OSError met while publishing or unpublishing."""
    err = os_error(str(exc.filename or "?"), exc, volume="node volume")
    if err is not exc:
        return err
    return MountError(
        call=f"{what} ({exc.strerror or exc})",
        path=os.fsdecode(exc.filename or "?"),
        code=exc.errno or errno.EIO,
        fix="kubelet retries; if it persists, check the node directory and kubelet's pods "
        "directory on this node",
    )


def _keyed(key: str, part: Part) -> bool:
    """Whether tree key `key` is the key of `part` (of its revision, in its layout)."""
    return tree_key(tree_md5(key), tree_layout(key), part) == key


def _peer_group(path: Path, table: list[mounts.Mount]) -> str | None:
    """The `shared:N` tag of the top mount at `path` (None if it is not shared)."""
    found = mounts.mounts_at(path, table)
    if not found:
        return None
    return next((t for t in found[-1].tags if t.startswith("shared:")), None)
