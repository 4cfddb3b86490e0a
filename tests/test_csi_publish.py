"""CSI mode on disk: shared trees built once, published into pods by mounts, switched live.

Everything is real: a reflink XFS volume, a node cache filled by the engine from a directory
remote, mount(2) binds and overlays, /proc/self/mountinfo, processes killed with SIGKILL and a
reader in a slave mount namespace (what a container with `HostToContainer` is). The node
fixture lazily unmounts everything below it even when a test fails.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapin_sidecar.csi import mounts
from datapin_sidecar.csi.publisher import Publisher
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, LayoutChoice
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import BadVolumeError, MountError, VolumeConflictError
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit import REPO_ROOT
from testkit.csinode import CsiNode, md5_files, md5_tree
from testkit.trees import object_name, put_revision
from testkit.xfs import shared_extents


def _files(seed: int, n: int = 120) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        f"d{i % 7}/sub{i % 3}/f{i:03d}.bin": rng.randbytes(rng.randint(0, 9000)) for i in range(n)
    }
    files["labels.csv"] = f"seed,{seed}\n".encode()
    files["dup-a"] = files["dup-b"] = b"same bytes"
    files["espace dans le nom.txt"] = b"octal escapes in mountinfo"
    return files


FILES_A = _files(1)
FILES_B = _files(2)


@pytest.fixture
def node(xfs_dir: Path) -> Iterator[CsiNode]:
    csi = CsiNode(xfs_dir)
    try:
        yield csi
    finally:
        csi.close()


@pytest.fixture
def remote(xfs_dir: Path) -> tuple[DirectoryRemote, Revision, Revision]:
    path = xfs_dir / "remote"
    a = put_revision(NodeCache(path), FILES_A)
    b = put_revision(NodeCache(path), FILES_B)
    return DirectoryRemote(path), a, b


def _objects(files: dict[str, bytes]) -> int:
    return len({object_name(v) for v in files.values()})


def _store(node: CsiNode, publisher: Publisher | None = None) -> TreeStore:
    refs = publisher.referenced_keys if publisher is not None else frozenset
    return TreeStore(node.root, node.cache, references=refs)


def _publish(node: CsiNode, remote: DirectoryRemote, rev: Revision, **kw: bool) -> tuple:
    publisher = Publisher(node.root)
    store = _store(node, publisher)
    request = node.request(rev, **kw)
    tree = asyncio.run(store.ensure(rev, LayoutChoice.AUTO, remote))
    asyncio.run(publisher.publish(request, tree))
    return publisher, store, request, tree


def test_publish_shows_every_file_read_only(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    publisher, store, request, _tree = _publish(node, directory, a)
    target = request.target_path
    assert md5_tree(target / "current") == md5_files(FILES_A)
    assert os.readlink(target / "current") == f".revs/{a.md5}"
    table = mounts.mountinfo()
    at_target = mounts.mounts_at(target, table)
    assert len(at_target) == 1
    assert at_target[0].read_only
    assert {"nosuid", "nodev"} <= at_target[0].options
    below = mounts.mounts_under(target, table, include_self=False)
    assert [m.mount_point for m in below] == [str(target / ".revs" / a.md5)]
    assert below[0].read_only
    # Nothing a pod does through the target can write: not a file, not beside `current`.
    with pytest.raises(OSError, match="Read-only file system") as exc:
        (target / "current" / "labels.csv").open("ab")
    assert exc.value.errno == errno.EROFS
    for path in (target / "planted", target / "current" / "planted"):
        with pytest.raises(OSError, match="Read-only file system") as exc:
            path.write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
    # The record and the overlay layers are not in the pod's view.
    assert sorted(os.listdir(target)) == [".revs", "current"]
    [record] = publisher.published()
    assert (record.tree_key, record.target_path, record.pod_uid) == (
        a.md5,
        str(target),
        request.pod.uid,
    )
    assert store.mounted() == {a.md5: 2}  # the view's bind and its copy under the target


def test_writable_overlay_keeps_the_shared_tree_and_cache_intact(
    node: CsiNode, remote: tuple
) -> None:
    directory, a, _ = remote
    publisher, _s, request, tree = _publish(node, directory, a, writable=True)
    before_tree = md5_tree(tree)
    cache_objects = {v: node.cache.path(object_name(v), Layout.DVC3) for v in set(FILES_A.values())}
    current = request.target_path / "current"
    with (current / "labels.csv").open("ab") as f:
        f.write(b"appended by the pod\n")
    (current / "d1" / "new.bin").write_bytes(b"a new file")
    os.unlink(current / "dup-a")
    assert (current / "labels.csv").read_bytes() == FILES_A["labels.csv"] + b"appended by the pod\n"
    assert not (current / "dup-a").exists()
    # The shared tree and the cache are byte-identical to before.
    assert md5_tree(tree) == before_tree == md5_files(FILES_A)
    for data, path in cache_objects.items():
        assert Path(path).read_bytes() == data
    # The copy-up went to this volume's upper layer, as a reflink of the shared tree's file.
    upper = publisher.volume(request.volume_id) / "upper" / a.md5
    big_name = max(FILES_A, key=lambda k: len(FILES_A[k]))
    with (current / big_name).open("r+b") as f:
        f.write(b"!")
    assert shared_extents(upper / big_name)
    assert (tree / big_name).read_bytes() == FILES_A[big_name]
    mount = mounts.mounts_at(request.target_path / ".revs" / a.md5)[-1]
    assert mount.fstype == "overlay"
    assert not mount.read_only
    asyncio.run(publisher.unpublish(volume_id=request.volume_id, target_path=request.target_path))
    assert not publisher.volume(request.volume_id).exists()
    assert md5_tree(tree) == md5_files(FILES_A)


def test_publish_twice_is_idempotent_and_a_different_request_is_refused(
    node: CsiNode, remote: tuple
) -> None:
    directory, a, b = remote
    publisher, store, request, tree = _publish(node, directory, a)
    ids = [m.mount_id for m in mounts.mounts_under(request.target_path)]
    asyncio.run(publisher.publish(request, tree))
    assert [m.mount_id for m in mounts.mounts_under(request.target_path)] == ids
    tree_b = asyncio.run(store.ensure(b, LayoutChoice.AUTO, directory))
    with pytest.raises(VolumeConflictError, match="differs in revision"):
        asyncio.run(publisher.publish(request, tree_b))
    other = node.request(a, pod_uid=request.pod.uid, volume="data", writable=True)
    with pytest.raises(VolumeConflictError, match="writable"):
        asyncio.run(publisher.publish(other, tree))
    # A target left writable by a crash between bind and remount is repaired.
    mounts._mount(
        None, request.target_path, None, mounts.Flag.REMOUNT | mounts.Flag.BIND, None, call="t"
    )
    assert not mounts.mounts_at(request.target_path)[-1].read_only
    asyncio.run(publisher.publish(request, tree))
    assert mounts.mounts_at(request.target_path)[-1].read_only
    for _ in range(2):  # unpublish is idempotent too
        asyncio.run(
            publisher.unpublish(volume_id=request.volume_id, target_path=request.target_path)
        )
        assert not request.target_path.exists()
        assert not mounts.mounts_under(node.root / "csi")


def test_two_volumes_share_one_tree_built_once(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    publisher = Publisher(node.root)
    store = _store(node, publisher)
    first = asyncio.run(store.build(a, LayoutChoice.AUTO, directory))
    second = asyncio.run(store.build(a, LayoutChoice.AUTO, directory))
    assert first.result is not None
    assert first.result.files == len(FILES_A)
    assert second.result is None
    assert second.path == first.path
    assert first.fetched_objects == _objects(FILES_A) + 1  # and the `.dir`
    one, two = node.request(a), node.request(a)
    for req in (one, two):
        asyncio.run(publisher.publish(req, first.path))
    ino = {os.stat(r.target_path / "current" / "labels.csv").st_ino for r in (one, two)}
    assert ino == {os.stat(first.path / "labels.csv").st_ino}
    assert store.keys() == [a.md5]
    assert store.mounted() == {a.md5: 4}
    assert store.in_use() == {a.md5}
    # Removal refuses a tree in use; once nothing uses it, it goes.
    assert not asyncio.run(store.remove(a.md5))
    for req in (one, two):
        asyncio.run(publisher.unpublish(volume_id=req.volume_id, target_path=req.target_path))
    assert asyncio.run(store.remove(a.md5))
    assert store.keys() == []
    assert not (store.dir / a.md5).exists()
    rebuilt = asyncio.run(store.build(a, LayoutChoice.AUTO, directory))
    assert rebuilt.result is not None
    assert rebuilt.fetched_objects == 0


def test_concurrent_cold_ensure_in_threads_builds_once(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    store = _store(node)
    results = []
    barrier = threading.Barrier(4)

    def build() -> None:
        barrier.wait()
        results.append(store.build_sync(a, LayoutChoice.AUTO, DirectoryRemote(directory.root)))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert len({r.path for r in results}) == 1
    assert sum(r.result is not None for r in results) == 1
    assert sum(r.fetched_objects for r in results) == _objects(FILES_A) + 1
    assert md5_tree(results[0].path) == md5_files(FILES_A)


_BUILD = """
import json, sys
from pathlib import Path
from datapin_sidecar.csi.trees import TreeStore
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.remotes.directory import DirectoryRemote
root, remote, rev = sys.argv[1:4]
sys.stdin.readline()  # start together
store = TreeStore(Path(root), NodeCache(Path(root) / "cache"))
b = store.build_sync(Revision.parse(rev), LayoutChoice.AUTO, DirectoryRemote(remote))
out = {"built": b.result is not None, "fetched": b.fetched_objects, "path": str(b.path)}
print(json.dumps(out))
"""


def _python(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'sidecar'}:{REPO_ROOT}"}
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def test_concurrent_cold_ensure_in_processes_builds_once(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    procs = [_python(_BUILD, str(node.root), str(directory.root), a.oid) for _ in range(2)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["built"] for o in outs) == [False, True]
    assert sum(o["fetched"] for o in outs) == _objects(FILES_A) + 1
    assert md5_tree(Path(outs[0]["path"])) == md5_files(FILES_A)


def test_a_crashed_build_is_repaired_by_the_next(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    store = _store(node)
    revs = store.dir / a.md5 / ".revs"
    revs.mkdir(parents=True)
    (revs / ".meta").mkdir()
    (revs / ".datapin").write_text("datapin workspace 1\n")
    (revs / f".build-{a.md5}-dead").mkdir()
    (revs / f".build-{a.md5}-dead" / "half.bin").write_bytes(b"half")
    assert store.find_key(a.md5) is None  # no `current`: not a tree yet
    built = store.build_sync(a, LayoutChoice.AUTO, directory)
    assert built.result is not None
    assert a.md5 in built.result.recovered[0]
    assert sorted(os.listdir(revs)) == [".datapin", ".lock", ".meta", a.md5]
    assert md5_tree(built.path) == md5_files(FILES_A)


_PUBLISH = """
import asyncio, os, signal, sys
from pathlib import Path
from datapin_sidecar.csi import mounts, publisher as pub
from datapin_sidecar.csi.volume import parse_publish
root, tree, crash, *request = sys.argv[1:]
vid, target, kubelet, context = request
import json
req = parse_publish(volume_id=vid, target_path=target, readonly=False,
                    context=json.loads(context), secrets={}, kubelet_dir=Path(kubelet))
if crash == "before-target":
    real = mounts.bind_read_only
    def bind_read_only(source, target, *, recursive=False):
        if recursive:
            os.kill(os.getpid(), signal.SIGKILL)
        real(source, target, recursive=recursive)
    mounts.bind_read_only = bind_read_only
asyncio.run(pub.Publisher(Path(root)).publish(req, Path(tree)))
print("published", flush=True)
sys.stdin.readline()
"""


def _publish_in_child(node: CsiNode, tree: Path, rev: Revision, crash: str = "") -> tuple:
    request = node.request(rev)
    context = {
        "dataset": request.dataset,
        "pin": rev.oid,
        "csi.storage.k8s.io/pod.namespace": request.pod.namespace,
        "csi.storage.k8s.io/pod.name": request.pod.name,
        "csi.storage.k8s.io/pod.uid": request.pod.uid,
    }
    proc = _python(
        _PUBLISH,
        str(node.root),
        str(tree),
        crash or "none",
        request.volume_id,
        str(request.target_path),
        str(node.kubelet),
        json.dumps(context),
    )
    return proc, request


def test_unpublish_after_kill_9_leaves_nothing(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    tree = asyncio.run(_store(node).ensure(a, LayoutChoice.AUTO, directory))
    proc, request = _publish_in_child(node, tree, a)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "published"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert md5_tree(request.target_path / "current") == md5_files(FILES_A)
    fresh = Publisher(node.root)
    asyncio.run(fresh.unpublish(volume_id=request.volume_id, target_path=request.target_path))
    assert not mounts.mounts_under(request.target_path)
    assert not mounts.mounts_under(node.root / "csi")
    assert not request.target_path.exists()
    assert not fresh.volume(request.volume_id).exists()
    assert md5_tree(tree) == md5_files(FILES_A)


def test_recover_removes_crashed_publishes_and_keeps_live_targets(
    node: CsiNode, remote: tuple
) -> None:
    directory, a, _ = remote
    publisher, _s, live, tree = _publish(node, directory, a)
    proc, crashed = _publish_in_child(node, tree, a, crash="before-target")
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    debris = publisher.volume(crashed.volume_id)
    assert mounts.mounts_under(debris)  # the view and its tree were mounted when it died
    fresh = Publisher(node.root)
    recovered = asyncio.run(fresh.recover())
    assert recovered.kept == (live.volume_id,)
    assert recovered.removed == (crashed.volume_id,)
    assert not debris.exists()
    assert not mounts.mounts_under(debris)
    assert mounts.is_mount(live.target_path)
    assert md5_tree(live.target_path / "current") == md5_files(FILES_A)
    # kubelet retries the crashed publish: it now succeeds.
    asyncio.run(fresh.publish(crashed, tree))
    assert md5_tree(crashed.target_path / "current") == md5_files(FILES_A)


_READER = """
import hashlib, os, sys
for line in sys.stdin:
    path = line.strip()
    if path.startswith("fd:"):
        fd = int(path[3:])
        os.lseek(fd, 0, 0)
        data = os.read(fd, 1 << 20)
    elif path.startswith("open:"):
        fd = os.open(path[5:], os.O_RDONLY)
        print(fd, flush=True)
        continue
    else:
        data = open(path, "rb").read()
    print(hashlib.md5(data).hexdigest(), flush=True)
"""


def test_switch_reaches_a_reader_in_a_slave_namespace_without_remount(
    node: CsiNode, remote: tuple
) -> None:
    directory, a, b = remote
    publisher = Publisher(node.root, grace=3600)
    store = _store(node, publisher)
    request = node.request(a)
    tree_a = asyncio.run(store.ensure(a, LayoutChoice.AUTO, directory))
    tree_b = asyncio.run(store.ensure(b, LayoutChoice.AUTO, directory))
    asyncio.run(publisher.publish(request, tree_a))
    target_id = mounts.mounts_at(request.target_path)[-1].mount_id
    env = {**os.environ}
    reader = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "slave", sys.executable, "-c", _READER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )

    def ask(line: str) -> str:
        assert reader.stdin is not None
        assert reader.stdout is not None
        reader.stdin.write(line + "\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()

    try:
        labels = request.target_path / "current" / "labels.csv"
        md5 = md5_files({"a": FILES_A["labels.csv"], "b": FILES_B["labels.csv"]})
        assert ask(str(labels)) == md5["a"]
        held = ask(f"open:{labels}")  # a reader with the old revision open
        assert asyncio.run(publisher.switch(request.volume_id, b.md5, tree_b))
        assert ask(str(labels)) == md5["b"]
        assert ask(f"fd:{held}") == md5["a"]
        assert md5_tree(request.target_path / "current") == md5_files(FILES_B)
        # The target was not remounted; the old tree stays mounted for the grace.
        assert mounts.mounts_at(request.target_path)[-1].mount_id == target_id
        assert mounts.is_mount(request.target_path / ".revs" / a.md5)
        [record] = publisher.published()
        assert record.tree_key == b.md5
        assert record.revs[a.md5] > 0
        assert store.in_use() == {a.md5, b.md5}
        # After the grace the old tree is unmounted, here and in the reader's namespace.
        purged = asyncio.run(publisher.purge_retired(now=record.revs[a.md5] + 3600))
        assert purged == [f"{request.volume_id}/{a.md5}"]
        assert not mounts.is_mount(request.target_path / ".revs" / a.md5)
        assert ask(str(labels)) == md5["b"]
        assert sorted(os.listdir(request.target_path / ".revs")) == [b.md5]
        assert store.in_use() == {b.md5}
        assert not asyncio.run(publisher.switch(request.volume_id, b.md5, tree_b))
    finally:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait(timeout=30)


def test_mountinfo_parser_decodes_escapes() -> None:
    line = (
        r"42 27 0:50 /a\040b /mnt/x\040y\011z rw,nosuid shared:7 master:3 - overlay overlay "
        r"rw,lowerdir=/l\134x,upperdir=/u,workdir=/w"
    )
    [m] = mounts.parse_mountinfo(line + "\nnot a mountinfo line\n")
    assert (m.mount_id, m.parent_id, m.device, m.root) == (42, 27, "0:50", "/a b")
    assert m.mount_point == "/mnt/x y\tz"
    assert m.shared
    assert not m.read_only
    assert m.super_option("lowerdir") == "/l\\x"
    assert m.fstype == "overlay"


@pytest.mark.parametrize("bad", ["/a,b", "/a:b", "relative", "/a\\b"])
def test_overlay_paths_that_options_cannot_carry_are_refused(bad: str) -> None:
    with pytest.raises(MountError, match="overlay paths must be absolute"):
        mounts.overlay_options(lower=Path(bad), upper=Path("/u"), work=Path("/w"))


def test_a_failed_publish_is_a_clear_error_and_leaves_nothing(node: CsiNode, remote: tuple) -> None:
    directory, a, _ = remote
    publisher = Publisher(node.root)
    tree = asyncio.run(_store(node, publisher).ensure(a, LayoutChoice.AUTO, directory))
    request = node.request(a)
    request.target_path.parent.rmdir()  # kubelet has not made the volume's directory
    with pytest.raises(MountError, match=r"ENOENT .*kubelet retries"):
        asyncio.run(publisher.publish(request, tree))
    assert not publisher.volume(request.volume_id).exists()
    assert not mounts.mounts_under(node.root / "csi")
    assert publisher.published() == []
    with pytest.raises(BadVolumeError, match="not a tree of the node's tree store"):
        asyncio.run(publisher.publish(node.request(a), directory.root))


def test_every_propagated_copy_is_read_only_after_publish_and_switch(
    node: CsiNode, remote: tuple
) -> None:
    """kubelet's directory is shared with the host (Bidirectional): the copies propagation
    makes there, where the pod's container is built from, must be read-only as well, for the
    target and for a tree mounted later by a switch (a remount would change the one mount)."""
    directory, a, b = remote
    publisher = Publisher(node.root, grace=3600)
    store = _store(node, publisher)
    request = node.request(a)
    tree_a = asyncio.run(store.ensure(a, LayoutChoice.AUTO, directory))
    tree_b = asyncio.run(store.ensure(b, LayoutChoice.AUTO, directory))
    peer = node.base / "host-view-of-kubelet"
    peer.mkdir()
    mounts.bind(node.kubelet, peer)  # a bind of a shared mount: a peer, as the host's is
    copy = peer / request.target_path.relative_to(node.kubelet)
    asyncio.run(publisher.publish(request, tree_a))
    asyncio.run(publisher.switch(request.volume_id, b.md5, tree_b))
    for base in (request.target_path, copy):
        found = mounts.mounts_under(base)
        assert [m.mount_point for m in found] == [
            str(base),
            str(base / ".revs" / a.md5),
            str(base / ".revs" / b.md5),
        ]
        writable = [m.mount_point for m in found if not m.read_only]
        assert writable == [], f"writable copies: {writable}"
    assert md5_tree(copy / "current") == md5_files(FILES_B)
    asyncio.run(publisher.unpublish(volume_id=request.volume_id, target_path=request.target_path))
    assert mounts.mounts_under(copy) == []
