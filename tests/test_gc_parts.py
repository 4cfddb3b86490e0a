"""The GC and parts of revisions (issue 18): what a node that serves folders of a revision keeps.

What users rely on:

* a workspace, a prefetch entry or a CSI volume that uses a part of a revision keeps that
  part's objects and the revision's `.dir` in the cache, whatever the watermarks say, while
  the revision's other objects are evicted like any object nobody uses;
* a whole revision in use still keeps every object of it, also when another pod uses a part;
* the LRU clock of a part dates the part's objects, not the rest of its revision: a node that
  serves `train` all day lets `val` (last used as a whole long ago) go before a revision used
  an hour ago;
* a record or a clock file that lies about its part is not believed, and the GC goes on.

Everything runs the real GC functions on a fresh small reflink XFS volume (`small_xfs`), as
test_gc.py does, with trees built by the real materialiser and the CSI plugin's real tree
store and volume records.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from datapin_sidecar.csi.publisher import RECORD, Publisher, VolumeRecord
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.part import Part
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.engine.workspace import tree_key
from datapin_sidecar.node.housekeeping.clock import read_parts, touch_used, used_name
from datapin_sidecar.node.housekeeping.evict import collect
from datapin_sidecar.node.housekeeping.roots import RevisionRoot, Root, roots
from datapin_sidecar.node.housekeeping.tasks import Task
from datapin_sidecar.node.housekeeping.volume import VolumeUsage, Watermarks
from datapin_sidecar.node.plugin import PluginState

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision

MiB = 1 << 20
UIDS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 10)]
TRAIN = Part.parse(["train"])


class Errors:
    """An `on_error` that records what was skipped."""

    def __init__(self) -> None:
        self.items: list[tuple[Task, str, BaseException]] = []

    def __call__(self, task: Task, path: str, exc: BaseException) -> None:
        self.items.append((task, path, exc))

    def paths(self, task: Task) -> list[str]:
        return [p for t, p, _ in self.items if t is task]


def dataset(seed: int, per_folder: int = 6, size: int = 2 * MiB) -> dict[str, bytes]:
    """`train/`, `val/` and a top-level file: distinct random bytes everywhere."""
    rng = random.Random(seed)
    files = {
        f"{folder}/{i:02d}.bin": rng.randbytes(size)
        for folder in ("train", "val")
        for i in range(per_folder)
    }
    files["README.md"] = rng.randbytes(size)
    return files


def under(files: Mapping[str, bytes], folder: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith(folder + "/")}


def present(cache: NodeCache, files: Mapping[str, bytes]) -> list[bool]:
    return [cache.present(object_name(v), Layout.DVC3) for v in files.values()]


def workspace(root: Path, cache: NodeCache, rev: Revision, uid: str, part: Part) -> Path:
    """A pod's workspace publishing `part` of `rev`, its records in `.state/` as the sidecar
    keeps them; returns the published link."""
    pod = root / "workspaces" / uid
    result = materialize(
        Request(cache=cache, revision=rev, dest=pod / "ds", state=pod / ".state" / "ds", part=part)
    )
    return Path(result.path)


def evict_all(root: Path) -> Watermarks:
    """Watermarks the volume is above, with a low one no eviction reaches: everything not in
    use goes."""
    return Watermarks(high_percent=VolumeUsage.measure(root).used_percent - 1, low_percent=1)


def marks_freeing(root: Path, need: int, *, margin: int) -> Watermarks:
    """The volume is above the high watermark; the low one is reached once `need - margin`
    bytes are freed."""
    os.sync()
    usage = VolumeUsage.measure(root)
    usable = usage.used_bytes + usage.free_bytes
    low = 100.0 * (usage.used_bytes - need + margin) / usable
    return Watermarks(high_percent=(low + usage.used_percent) / 2, low_percent=low)


# -- a part in use keeps only the part -----------------------------------------------------------


@pytest.mark.parametrize("used_by", ["workspace", "prefetch"])
def test_a_part_in_use_keeps_its_objects_and_the_rest_of_its_revision_goes(
    small_xfs: Path, used_by: str
) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = dataset(1)
    rev = put_revision(cache, files)
    prefetch: list[RevisionRoot] = []
    link = None
    if used_by == "workspace":
        link = workspace(small_xfs, cache, rev, UIDS[0], TRAIN)
    else:
        prefetch.append((rev, Layout.DVC3, TRAIN))
    errors = Errors()

    in_use = roots(small_xfs, prefetch, on_error=errors)
    assert in_use == {(rev.oid, Layout.DVC3, TRAIN)}
    report = collect(cache, in_use, evict_all(small_xfs), on_error=errors)

    assert errors.items == []
    train = under(files, "train")
    assert all(present(cache, train)), "an object of the part in use was evicted"
    assert cache.present(rev.oid, Layout.DVC3), "the part's .dir was evicted"
    rest = {k: v for k, v in files.items() if k not in train}
    assert not any(present(cache, rest)), "the rest of the revision was kept"
    assert report.evicted_objects == len(rest)
    assert report.kept_in_use_objects == len(train) + 1
    assert report.evicted_revisions == ()
    if link is not None:  # the pod still reads all of its part
        assert tree_bytes(link.resolve()) == train


@pytest.mark.parametrize("used_by", ["workspace", "prefetch", "workspace-and-a-part"])
def test_a_whole_revision_in_use_still_keeps_every_object(small_xfs: Path, used_by: str) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = dataset(2)
    rev = put_revision(cache, files)
    other = put_revision(cache, {f"o/{i}": os.urandom(MiB) for i in range(4)})
    prefetch: list[RevisionRoot] = []
    if used_by == "prefetch":
        prefetch.append((rev, Layout.DVC3))
    else:
        workspace(small_xfs, cache, rev, UIDS[0], Part.WHOLE)
    if used_by == "workspace-and-a-part":
        workspace(small_xfs, cache, rev, UIDS[1], TRAIN)

    in_use = roots(small_xfs, prefetch)
    expected: set[Root] = {(rev.oid, Layout.DVC3)}
    if used_by == "workspace-and-a-part":
        expected.add((rev.oid, Layout.DVC3, TRAIN))
    assert in_use == expected
    report = collect(cache, in_use, evict_all(small_xfs))

    assert all(present(cache, files))
    assert cache.present(rev.oid, Layout.DVC3)
    assert report.evicted_revisions == (other.oid,)
    assert report.kept_in_use_objects == len(files) + 1


# -- the LRU clock of a part ---------------------------------------------------------------------


def test_a_parts_use_dates_its_objects_not_the_rest_of_its_revision(small_xfs: Path) -> None:
    """Revision R: used whole 3 h ago, its `train` part 1 h ago (a job that just finished);
    revision Q used 2 h ago; nothing in use now. Eviction order: R's other objects, then Q,
    then `train` with R's `.dir`; with the `.dir` go the clocks of R and of its part."""
    cache = NodeCache(small_xfs / "cache")
    files = dataset(3, per_folder=4, size=4 * MiB)
    rev = put_revision(cache, files)
    q_files = {f"q/{i}.bin": os.urandom(4 * MiB) for i in range(4)}
    q = put_revision(cache, q_files)
    now = time.time()
    touch_used(cache, rev, Layout.DVC3, now=now - 3 * 3600)
    touch_used(cache, rev, Layout.DVC3, part=TRAIN, now=now - 3600)
    touch_used(cache, q, Layout.DVC3, now=now - 2 * 3600)
    used = cache.used_dir
    assert read_parts(cache, [used_name(rev, Layout.DVC3, TRAIN)]) == {
        used_name(rev, Layout.DVC3, TRAIN): TRAIN
    }
    train = under(files, "train")
    rest = {k: v for k, v in files.items() if k not in train}
    rest_bytes = sum(len(v) for v in rest.values())

    report = collect(cache, set(), marks_freeing(small_xfs, rest_bytes, margin=2 * MiB))

    assert report.target_reached
    assert not any(present(cache, rest)), "R's objects outside the part, unused for 3 h, stay"
    assert all(present(cache, q_files)), "Q (used 2 h ago) went before R's stale objects"
    assert all(present(cache, train)), "the part used 1 h ago went before older objects"
    assert cache.present(rev.oid, Layout.DVC3)

    # Once everything goes, R's `.dir` goes last, after its part, taking both clocks along.
    report = collect(cache, set(), evict_all(small_xfs))
    assert report.evicted_revisions[-1] == rev.oid
    assert not any(present(cache, train))
    assert sorted(os.listdir(used)) == []


# -- CSI trees -----------------------------------------------------------------------------------


def _volume_record(publisher: Publisher, volume: str, key: str, part: Part, pin: str) -> None:
    record = VolumeRecord(
        volume_id=volume,
        target_path=f"/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/{volume}/mount",
        pod_namespace="ns",
        pod_name=volume,
        pod_uid=UIDS[0],
        dataset="ds",
        pin=pin,
        writable=False,
        readonly=True,
        published_key=key,
        tree_key=key,
        paths=part.to_list(),
        tree_paths=part.to_list(),
        revs={key: 0.0},
    )
    directory = publisher.volume(volume)
    directory.mkdir(parents=True)
    (directory / RECORD).write_text(record.to_json())


def test_csi_trees_in_use_are_roots_of_the_part_their_record_names(small_xfs: Path) -> None:
    """The plugin's shared trees are roots by their key and, for a part, by their record: a
    volume of `train` keeps `train`; a part tree whose record is unreadable keeps all of its
    revision (the agent's own tree, in use: doubt costs space, never a pod's data)."""
    cache = NodeCache(small_xfs / "cache")
    files = dataset(4)
    rev = put_revision(cache, files)
    other_files = {f"o/{i}": os.urandom(MiB) for i in range(4)}
    other = put_revision(cache, other_files)
    publisher = Publisher(small_xfs)
    trees = TreeStore(
        small_xfs, cache, strategy=Strategy.AUTO, references=publisher.referenced_keys
    )
    built = trees.build_sync(rev, LayoutChoice.DVC3, None, TRAIN)
    assert built.key == tree_key(rev.md5, "dvc3", TRAIN)
    _volume_record(publisher, "vol-train", built.key, TRAIN, rev.oid)
    state = PluginState(trees=trees, publisher=publisher)
    errors = Errors()

    found = state.roots(on_error=errors)
    assert found == [(rev, Layout.DVC3, TRAIN)]
    assert errors.items == []
    report = collect(cache, roots(small_xfs, found), evict_all(small_xfs))
    assert all(present(cache, under(files, "train")))
    assert not any(present(cache, under(files, "val")))
    assert cache.present(rev.oid, Layout.DVC3)
    assert report.evicted_revisions == (other.oid,)
    assert tree_bytes(built.path) == under(files, "train")

    # Its record gone bad: the tree still protects its revision, whole, and it is reported.
    meta = small_xfs / "trees" / built.key / ".revs" / ".meta" / f"{built.key}.json"
    meta.write_text("{not json")
    assert state.roots(on_error=errors) == [(rev, Layout.DVC3, Part.WHOLE)]
    assert errors.paths(Task.ROOTS) == [f"trees/{built.key}"]


# -- hostile records and clocks ------------------------------------------------------------------


def test_records_and_clocks_that_lie_about_their_part_are_not_believed(small_xfs: Path) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = dataset(5, per_folder=2, size=MiB)
    rev = put_revision(cache, files)
    workspace(small_xfs, cache, rev, UIDS[0], TRAIN)
    meta = small_xfs / "workspaces" / UIDS[0] / ".state" / "ds" / ".meta"
    (record,) = meta.iterdir()
    # The record of the part's tree moved under the whole revision's key: which is true?
    lying = meta / f"{tree_key(rev.md5, 'dvc3')}.json"
    record.rename(lying)
    errors = Errors()
    assert roots(small_xfs, on_error=errors) == set()
    assert errors.paths(Task.ROOTS) == [str(lying)]
    # Paths that are no folders at all.
    data = json.loads(lying.read_text())
    lying.unlink()
    (meta / record.name).write_text(json.dumps({**data, "paths": ["../../etc"]}))
    errors = Errors()
    assert roots(small_xfs, on_error=errors) == set()
    assert errors.paths(Task.ROOTS) == [str(meta / record.name)]

    # A part used-file must hold the folders its name says, in a small regular file.
    used = cache.used_dir
    name = used_name(rev, Layout.DVC3, TRAIN)
    touch_used(cache, rev, Layout.DVC3, part=TRAIN)
    assert json.loads((used / name).read_text()) == ["train"]
    (used / name).write_text(json.dumps(["val"]))
    fifo = used_name(rev, Layout.DVC3, Part.parse(["val"]))
    os.mkfifo(used / fifo)
    assert read_parts(cache, [name, fifo]) == {}
    # ...and the GC goes on with the revision's own clock for those objects.
    errors = Errors()
    collect(cache, set(), evict_all(small_xfs), on_error=errors)
    assert not any(present(cache, files))


def test_a_root_naming_a_folder_its_revision_lacks_keeps_the_dir_and_is_reported(
    small_xfs: Path,
) -> None:
    cache = NodeCache(small_xfs / "cache")
    files = dataset(6, per_folder=2, size=MiB)
    rev = put_revision(cache, files)
    errors = Errors()
    missing = Part.parse(["test"])
    collect(cache, {(rev.oid, Layout.DVC3, missing)}, evict_all(small_xfs), on_error=errors)
    assert cache.present(rev.oid, Layout.DVC3)
    assert not any(present(cache, files))
    assert [p.endswith("(test)") for p in errors.paths(Task.ROOTS)] == [True]
