"""Adversarial: a hostile pod acting on its own tree between switches (issue 17, findings 1, 6).

A pod whose dataset is mounted writable (`datapin.dev/writable: "true"`) can do anything to
its destination: edit files, plant symlinks to another pod's workspace or outside the volume
(another filesystem, too), FIFOs and devices, chmod directories 000, replace `.revs` or its
`current` link. Every case here does that for real on a reflink XFS node volume, then switches
revisions and checks what users depend on:

* the published tree equals the target revision exactly, file by file (bytes, 0444 files,
  0755 directories, nothing else), after every switch;
* nothing outside the attacker's own destination changed: a victim pod's workspace on the same
  volume and a victim directory on another filesystem are compared entry by entry (bytes,
  modes, link counts, symlink targets) before and after;
* nothing blocks and nothing escapes as a traceback: a switch either publishes or fails with a
  `DestinationError`.

Read-only destinations keep their O(changed) switches (spare recycling, carry-over); a second
link name never touches the tree of the first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, Result, materialize
from datapin_sidecar.engine.remote import FetchReport
from datapin_sidecar.engine.workspace import TreeInfo
from datapin_sidecar.errors import DestinationError
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit.dvcremote import S3DvcFixture
from testkit.seaweed import SeaweedServer
from testkit.sidecarproc import Pod, SidecarProcess, serving
from testkit.trees import object_name, put_revision

FILES_A = {
    "train/cat/001.jpg": b"\xff\xd8" + b"cat" * 3000,
    "train/cat/002.jpg": b"\xff\xd8" + b"cat2" * 2000,
    "train/dog/001.jpg": b"\xff\xd8" + b"dog" * 2500,
    "labels.csv": b"file,label\n001,cat\n",
    "empty.txt": b"",
    "deep/a/b/c/d.txt": b"deep",
}
FILES_B = {
    **{k: v for k, v in FILES_A.items() if k != "train/dog/001.jpg"},
    "labels.csv": b"file,label\n001,cat\n002,cat\n",
    "val/001.jpg": b"\xff\xd8" + b"val" * 100,
}
FILES_C = {
    **FILES_A,
    "train/cat/003.jpg": b"\xff\xd8" + b"cat3" * 10,
    "labels.csv": b"file,label\n001,cat\n003,cat\n",
}

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(top: Path) -> Snapshot:
    """Every entry under `top`, never following a symlink: what must not change."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("file", st.st_mode, st.st_nlink, st.st_ino, path.read_bytes())
            else:
                found[rel] = (stat.S_IFMT(st.st_mode), st.st_mode)
    return found


def assert_exact(
    dest: Path, files: dict[str, bytes], link: str = "current", *, own: bool = False
) -> Path:
    """`dest/<link>` is a `.revs/<key>` link to a tree holding exactly `files`.

    `own`: no file shares its inode with anything (a writable tree is built afresh).
    """
    target = os.readlink(dest / link)
    assert target.startswith(".revs/"), target
    assert "/" not in target.removeprefix(".revs/"), target
    tree = dest / target
    assert stat.S_ISDIR(os.lstat(tree).st_mode), f"{link} -> {target} is not a directory"
    seen: dict[str, bytes] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(tree))
            assert stat.S_ISDIR(st.st_mode), f"{rel}: not a directory"
            assert stat.S_IMODE(st.st_mode) == 0o755, f"{rel}: mode {oct(st.st_mode)}"
            dirs.add(rel)
        for name in filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(tree))
            assert stat.S_ISREG(st.st_mode), f"{rel}: not a regular file ({oct(st.st_mode)})"
            assert stat.S_IMODE(st.st_mode) == 0o444, f"{rel}: mode {oct(st.st_mode)}"
            assert not own or st.st_nlink == 1, f"{rel}: shares its inode ({st.st_nlink} links)"
            seen[rel] = path.read_bytes()
    assert seen == files
    parents = {str(Path(r).parents[i]) for r in files for i in range(len(Path(r).parts) - 1)}
    assert dirs == parents, f"extra directories: {sorted(dirs - parents)}"
    return tree


class Node:
    """A node volume with a cache, an attacker pod's workspace and a victim pod's workspace."""

    def __init__(self, volume: Path, outside: Path) -> None:
        self.root = volume / "root"
        self.cache = NodeCache(self.root / "cache")
        self.revs = {
            name: put_revision(self.cache, files)
            for name, files in (("A", FILES_A), ("B", FILES_B), ("C", FILES_C))
        }
        self.files = {"A": FILES_A, "B": FILES_B, "C": FILES_C}
        self.attacker = self.root / "workspaces" / "a7a7a7a7-0000-4000-8000-000000000001"
        self.victim = self.root / "workspaces" / "b1b1b1b1-0000-4000-8000-000000000002"
        self.dest = self.attacker / "images"
        # The victim: a published read-only tree and a spare, as any sidecar leaves them.
        self.materialize("B", pod=self.victim, writable=False)
        self.materialize("A", pod=self.victim, writable=False)
        self.victim_tree = assert_exact(self.victim / "images", FILES_A)
        # A victim directory on another filesystem (cross-device for the volume).
        self.outside = outside
        (outside / "sub").mkdir(parents=True)
        (outside / "keep.txt").write_bytes(b"precious")
        (outside / "sub" / "train").write_bytes(b"also precious")
        self.before = self.snapshots()

    def key(self, name: str) -> str:
        return self.revs[name].md5

    def materialize(
        self, name: str, *, pod: Path | None = None, writable: bool = True, **kw: Any
    ) -> Result:
        pod = pod or self.attacker
        request = Request(
            cache=self.cache,
            revision=self.revs[name],
            dest=pod / "images",
            strategy=Strategy.REFLINK,
            writable=writable,
            state=pod / ".state" / "images",
            **kw,
        )
        return bounded(lambda: materialize(request))

    def snapshots(self) -> tuple[Snapshot, Snapshot, Snapshot]:
        # The cache's objects (its `.datapin/` holds parsed manifests, a speed-up that grows).
        objects = {k: v for k, v in snapshot(self.cache.root).items() if k[:2] != ".d"}
        return snapshot(self.victim), snapshot(self.outside), objects

    def assert_untouched(self) -> None:
        victim, outside, cache = self.snapshots()
        assert victim == self.before[0], "the victim pod's workspace changed"
        assert outside == self.before[1], "a directory outside the volume changed"
        assert cache == self.before[2], "the node cache changed"
        assert_exact(self.victim / "images", FILES_A)


def bounded(call: Callable[[], Result], timeout: float = 60.0) -> Result:
    """Run `call` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "materialise blocked (a FIFO opened, a lock never free?)"
    if "error" in out:
        raise out["error"]
    result: Result = out["result"]
    return result


@pytest.fixture
def node(xfs_dir: Path, tmp_path: Path) -> Node:
    return Node(xfs_dir, tmp_path / "outside")


def _published_tree(node: Node) -> Path:
    return node.dest / os.readlink(node.dest / "current")


# -- what a pod does to its tree ----------------------------------------------------------------


def edit_files(node: Node, tree: Path, nxt: str) -> None:
    """Append, truncate, chmod, add files and symlinks, replace a file by a FIFO."""
    with open(tree / "labels.csv", "ab") as f:
        f.write(b"999,pwned\n")
    os.truncate(tree / "train/cat/001.jpg", 3)
    os.chmod(tree / "train/cat/002.jpg", 0o777)  # noqa: S103 - what a hostile pod does
    os.chmod(tree / "train", 0o777)  # noqa: S103 - what a hostile pod does
    (tree / "extra.txt").write_bytes(b"planted")
    (tree / "train" / "cat" / "extra").mkdir()
    os.symlink(node.outside / "keep.txt", tree / "train/cat/planted-link")
    os.unlink(tree / "empty.txt")
    os.mkfifo(tree / "empty.txt")


def dir_to_victim(node: Node, tree: Path, nxt: str) -> None:
    """Swap directories of its tree for symlinks into the victim's published tree."""
    os.rename(tree / "train", tree / "train-moved")
    os.symlink(node.victim_tree / "train", tree / "train")
    os.rename(tree / "deep" / "a", tree / "deep-a-moved")
    os.symlink(node.victim / "images" / ".revs", tree / "deep" / "a")


def dir_to_outside(node: Node, tree: Path, nxt: str) -> None:
    """Swap directories for symlinks to another filesystem."""
    os.rename(tree / "train", tree / "train-moved")
    os.symlink(node.outside / "sub", tree / "train")
    os.rename(tree / "deep", tree / "deep-moved")
    os.symlink(node.outside, tree / "deep")


def revs_to_victim(node: Node, tree: Path, nxt: str) -> None:
    """Replace `.revs` itself with a symlink to the victim's `.revs`."""
    os.rename(node.dest / ".revs", node.dest / f"old-revs-{secrets.token_hex(4)}")
    os.symlink(node.victim / "images" / ".revs", node.dest / ".revs")


def revs_to_outside(node: Node, tree: Path, nxt: str) -> None:
    os.rename(node.dest / ".revs", node.dest / f"old-revs-{secrets.token_hex(4)}")
    os.symlink(node.outside, node.dest / ".revs")


def plant_in_revs(node: Node, tree: Path, nxt: str) -> None:
    """Spare, target and debris names in `.revs` as symlinks to the victim's trees, a FIFO."""
    revs = node.dest / ".revs"
    victim_revs = node.victim / "images" / ".revs"
    spare = next(p for p in victim_revs.iterdir() if p.name.startswith(".spare-"))
    os.symlink(spare, revs / f".spare-{node.key(nxt)}")
    os.symlink(node.victim_tree, revs / node.key(nxt))
    os.symlink(node.victim_tree, revs / f".build-x-{secrets.token_hex(4)}")
    os.symlink(node.outside, revs / f".retired-{secrets.token_hex(4)}")
    os.mkfifo(revs / f".spare-{secrets.token_hex(16)}")
    os.symlink(node.victim_tree, node.dest / f".current.tmp-{secrets.token_hex(4)}")


def fifo_at_target(node: Node, tree: Path, nxt: str) -> None:
    """FIFOs and a device where the next tree and entries of this one go."""
    os.mkfifo(node.dest / ".revs" / node.key(nxt))
    os.mkfifo(tree / "planted-fifo")
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def chmod_000(node: Node, tree: Path, nxt: str) -> None:
    for sub in ("train/cat", "train", "deep/a/b", "deep"):
        os.chmod(tree / sub, 0)
    os.chmod(tree, 0)


def link_to_dir(node: Node, tree: Path, nxt: str) -> None:
    """Replace `current` with a directory full of files."""
    os.unlink(node.dest / "current")
    (node.dest / "current").mkdir()
    (node.dest / "current" / "labels.csv").write_bytes(b"fake")


def forge_target(node: Node, tree: Path, nxt: str) -> None:
    """Make `.revs/<next key>` a fake tree (and point `current` at it), hoping it is trusted."""
    fake = node.dest / ".revs" / node.key(nxt)
    os.rename(tree, fake)  # even the real inode of the old tree, under the new name
    (fake / "labels.csv").unlink()
    (fake / "labels.csv").write_bytes(b"forged")
    os.symlink(f".revs/{node.key(nxt)}", node.dest / "current.new")
    os.rename(node.dest / "current.new", node.dest / "current")


def huge_names(node: Node, tree: Path, nxt: str) -> None:
    """255-byte names everywhere, a 300-deep chain of directories."""
    long = secrets.token_hex(4) + "x" * 247
    (tree / long).write_bytes(b"x")
    (node.dest / long).mkdir()
    (node.dest / ".revs" / long).write_bytes(b"x")
    chain = tree / "train"
    for _ in range(300):
        chain = chain / "d"
    chain.mkdir(parents=True)
    (chain / "f").write_bytes(b"deep")


ATTACKS = {
    f.__name__: f
    for f in (
        edit_files,
        dir_to_victim,
        dir_to_outside,
        revs_to_victim,
        revs_to_outside,
        plant_in_revs,
        fifo_at_target,
        chmod_000,
        link_to_dir,
        forge_target,
        huge_names,
    )
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_switches_repair_what_the_pod_did_and_touch_nothing_else(node: Node, attack: str) -> None:
    first = node.materialize("A")
    assert first.base == "fresh"
    assert_exact(node.dest, FILES_A)
    for nxt in ("B", "A", "C"):
        ATTACKS[attack](node, _published_tree(node), nxt)
        result = node.materialize(nxt)
        # A tree the pod could write is never a base: each switch builds afresh.
        assert result.base == "fresh", f"{attack}: switch to {nxt} reused a base"
        assert_exact(node.dest, node.files[nxt], own=True)
        node.assert_untouched()
        # No spare: a tree the pod could write is never kept for recycling.
        assert not [p for p in os.listdir(node.dest / ".revs") if p.startswith(".spare-")]


def _swap_everything(node: Node, stop: Any, hits: Any) -> None:
    """The pod racing the sidecar: swap every directory it can see for a symlink.

    A real pod cannot follow a symlink out of its mount (the victim's path does not exist in
    its mount namespace), so this stand-in works by descriptors and never follows one either.
    `hits` counts swaps made inside a tree being built.
    """
    targets = [node.victim_tree, node.victim / "images" / ".revs", node.outside]
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    n = 0
    while not stop.is_set():
        n += 1
        with contextlib.suppress(OSError):
            dest = os.open(node.dest, nofollow)
            try:
                revs = os.open(".revs", nofollow, dir_fd=dest)
                try:
                    for build in os.listdir(revs):
                        if not build.startswith(".build-"):
                            continue
                        sub_fd = os.open(build, nofollow, dir_fd=revs)
                        try:
                            for sub in os.listdir(sub_fd)[:3]:
                                moved = f"moved-{n}-{sub}"
                                os.rename(sub, moved, src_dir_fd=sub_fd, dst_dir_fd=sub_fd)
                                os.symlink(targets[n % 3], sub, dir_fd=sub_fd)
                                hits.value += 1
                        finally:
                            os.close(sub_fd)
                finally:
                    os.close(revs)
                if n % 50 == 0:
                    os.rename(".revs", f"old-revs-{n}", src_dir_fd=dest, dst_dir_fd=dest)
                    os.symlink(targets[n % 3], ".revs", dir_fd=dest)
            finally:
                os.close(dest)


def test_a_pod_racing_every_build_cannot_reach_outside_its_tree(node: Node) -> None:
    """Swaps while the sidecar works (not only between switches): descriptors, not paths."""
    big = {
        name: {f"d{i % 50}/e{i % 7}/f{i}": f"{name}{i}".encode() * 50 for i in range(3000)}
        for name in ("D", "E")
    }
    for name, files in big.items():
        node.revs[name] = put_revision(node.cache, files)
        node.files[name] = files
    node.before = node.snapshots()
    ctx = multiprocessing.get_context("fork")
    stop, hits = ctx.Event(), ctx.Value("i", 0)
    racer = ctx.Process(target=_swap_everything, args=(node, stop, hits), daemon=True)
    racer.start()
    outcomes: list[str] = []
    # At least 10 switches, and more until the racer has hit builds in progress: on a loaded
    # machine it may be scheduled late (bounded, so a racer that can never hit still fails).
    deadline = time.monotonic() + 120
    try:
        i = 0
        while i < 10 or (hits.value < 3 and time.monotonic() < deadline):
            try:
                node.materialize("DE"[i % 2])
                outcomes.append("published")
            except DestinationError:
                outcomes.append("refused")
            node.assert_untouched()
            i += 1
    finally:
        stop.set()
        racer.join(10)
    assert hits.value > 0, f"the pod never raced a build ({outcomes}): the test proves nothing"
    # Once the pod stops, the next switch repairs everything.
    for name in ("D", "E"):
        node.materialize(name)
        assert_exact(node.dest, node.files[name], own=True)
    node.assert_untouched()


def test_records_are_out_of_the_pods_view(node: Node) -> None:
    node.materialize("A")
    assert sorted(os.listdir(node.dest)) == [".revs", "current"]
    assert sorted(os.listdir(node.dest / ".revs")) == [node.key("A")]
    state = node.attacker / ".state" / "images"
    assert sorted(os.listdir(state)) == [".datapin", ".lock", ".meta"]
    info = TreeInfo.from_json((state / ".meta" / f"{node.key('A')}.json").read_text())
    assert info.writable
    assert info.ino == os.lstat(node.dest / ".revs" / node.key("A")).st_ino


def test_a_planted_record_never_blocks_or_is_trusted(node: Node) -> None:
    """Records are read bounded and without following: FIFOs, /dev/zero, huge files."""
    node.materialize("B", writable=False)
    node.materialize("A", writable=False)
    meta = node.attacker / ".state" / "images" / ".meta"
    (meta / f"{node.key('A')}.json").unlink()
    os.mkfifo(meta / f"{node.key('A')}.json")
    (meta / f"{node.key('B')}.json").unlink()
    os.symlink("/dev/zero", meta / f"{node.key('B')}.json")
    result = node.materialize("A", writable=False)
    assert result.base != "noop", "a tree without a readable record was trusted"
    assert_exact(node.dest, FILES_A)
    (meta / f"{node.key('A')}.json").unlink()
    (meta / f"{node.key('A')}.json").write_bytes(b" " * (1 << 20))
    assert node.materialize("C", writable=False).base == "fresh"
    assert_exact(node.dest, FILES_C)
    node.assert_untouched()


def test_read_only_destinations_keep_their_fast_switches(node: Node) -> None:
    assert node.materialize("A", writable=False).base == "fresh"
    assert node.materialize("B", writable=False).base == "published"
    assert node.materialize("A", writable=False).base == "spare"
    assert node.materialize("A", writable=False).base == "noop"
    assert_exact(node.dest, FILES_A)


def test_retired_trees_are_purged_without_following_what_was_planted(node: Node) -> None:
    node.materialize("A", spare_grace=0.3)
    ino = _published_tree(node).stat().st_ino
    node.materialize("B", spare_grace=0.3)
    retired = [p for p in (node.dest / ".revs").iterdir() if p.name.startswith(".retired-")]
    assert len(retired) == 1
    assert retired[0].stat().st_ino == ino
    # The pod still reaches its retired tree through `.revs`: plant links in it.
    os.chmod(retired[0] / "train", 0o755)  # noqa: S103 - the pod opens its tree up
    os.rename(retired[0] / "train", retired[0] / "moved")
    os.symlink(node.victim_tree / "train", retired[0] / "train")
    os.symlink(node.outside, retired[0] / "outside")
    time.sleep(0.4)
    node.materialize("C", spare_grace=0.3)
    assert not (node.dest / ".revs" / retired[0].name).exists()
    assert_exact(node.dest, FILES_C)
    node.assert_untouched()


def test_a_destination_of_an_older_version_is_adopted(node: Node) -> None:
    """Records in `.revs` (the old layout, in the pod's view): deleted unread, trees rebuilt."""
    legacy = Request(
        cache=node.cache, revision=node.revs["A"], dest=node.dest, strategy=Strategy.REFLINK
    )
    materialize(legacy)
    revs = node.dest / ".revs"
    assert (revs / ".datapin").is_file()
    # What the pod did to the old records it could write.
    os.unlink(revs / ".lock")
    os.mkfifo(revs / ".lock")
    os.unlink(revs / ".meta" / f"{node.key('A')}.json")
    os.symlink("/dev/zero", revs / ".meta" / f"{node.key('A')}.json")
    (revs / node.key("A") / "labels.csv").chmod(0o644)
    (revs / node.key("A") / "labels.csv").write_bytes(b"edited")
    result = node.materialize("A")
    assert result.base == "fresh", "an old, pod-writable record was trusted"
    assert_exact(node.dest, FILES_A)
    assert not {".datapin", ".lock", ".meta"} & set(os.listdir(revs))
    assert node.materialize("B").base == "fresh"
    assert_exact(node.dest, FILES_B)
    node.assert_untouched()


def test_a_foreign_directory_is_still_refused(node: Node) -> None:
    (node.dest).mkdir(parents=True)
    (node.dest / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not a datapin destination"):
        node.materialize("A")
    assert (node.dest / "notes.txt").read_text() == "mine"


# -- finding 6: a second link name ------------------------------------------------------------


@pytest.mark.parametrize("state", [False, True], ids=["cli-layout", "sidecar-layout"])
def test_a_second_link_name_never_touches_the_first(node: Node, state: bool) -> None:
    dest = node.root / "multi"
    kw: dict[str, Any] = {"state": node.root / "multi-state"} if state else {}

    def run(name: str, link: str) -> Result:
        return materialize(
            Request(
                cache=node.cache,
                revision=node.revs[name],
                dest=dest,
                strategy=Strategy.REFLINK,
                link_name=link,
                **kw,
            )
        )

    run("B", "a")
    run("A", "a")  # `a` serves A, with B as the spare
    tree_a = assert_exact(dest, FILES_A, "a")
    ino_a = tree_a.stat().st_ino
    held = os.open(tree_a / "labels.csv", os.O_RDONLY)
    try:
        run("B", "b")
        run("C", "b")
        run("A", "b")  # the tree `a` serves: shared, never rebuilt or retired
        run("C", "b")
        for _ in range(2):
            assert_exact(dest, FILES_A, "a")
            assert_exact(dest, FILES_C, "b")
            assert (dest / "a").resolve().stat().st_ino == ino_a
            assert os.pread(held, 100, 0) == FILES_A["labels.csv"]
            run("C", "a")  # both serve C now: one tree
            run("A", "a")
    finally:
        os.close(held)


def test_a_writable_tree_is_not_shared_by_a_second_link(node: Node) -> None:
    node.materialize("A")
    request = Request(
        cache=node.cache,
        revision=node.revs["A"],
        dest=node.dest,
        strategy=Strategy.REFLINK,
        writable=True,
        state=node.attacker / ".state" / "images",
        link_name="other",
    )
    with pytest.raises(DestinationError, match="under one link name"):
        materialize(request)
    assert_exact(node.dest, FILES_A)


# -- finding 5: GC evicting what a build just fetched -----------------------------------------


class EvictingRemote(DirectoryRemote):
    """A real directory remote; right after each of the first `rounds` fetches, the objects
    it fetched are deleted from the cache, exactly as the agent's GC unlinks them."""

    def __init__(self, path: Path, rounds: int) -> None:
        super().__init__(path)
        self.rounds = rounds
        self.calls = 0

    def fetch(
        self,
        cache: NodeCache,
        oids: list[str],
        layout: Layout,
        progress: Callable[[int], None] | None = None,
    ) -> FetchReport:
        report = super().fetch(cache, oids, layout, progress)
        self.calls += 1
        if self.calls <= self.rounds:
            for oid in oids:
                if not oid.endswith(".dir"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(cache.path(oid, layout))
        return report


def _remote_of(node: Node, tmp: Path) -> Path:
    remote = tmp / "remote"
    for files in node.files.values():
        for data in files.values():
            oid = object_name(data)
            path = remote / "files" / "md5" / oid[:2] / oid[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return remote


@pytest.mark.parametrize("rounds", [1, 2])
def test_objects_evicted_between_fetch_and_link_are_fetched_again(
    node: Node, tmp_path: Path, rounds: int
) -> None:
    remote = EvictingRemote(_remote_of(node, tmp_path), rounds)
    for data in FILES_B.values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(node.cache.path(object_name(data), Layout.DVC3))
    result = node.materialize("B", remote=remote)
    assert remote.calls == rounds + 1
    assert result.misses == len(FILES_B)
    assert_exact(node.dest, FILES_B)


def test_objects_evicted_every_time_fail_with_a_clear_error(node: Node, tmp_path: Path) -> None:
    remote = EvictingRemote(_remote_of(node, tmp_path), 100)
    for data in FILES_B.values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(node.cache.path(object_name(data), Layout.DVC3))
    with pytest.raises(DestinationError, match="removed from the node cache each time"):
        node.materialize("B", remote=remote)
    assert not os.path.lexists(node.dest / "current")


# -- the real program: `datapin-sidecar run` with live pin switches ---------------------------


@contextlib.contextmanager
def _victim_outside(tmp_path: Path) -> Iterator[tuple[Path, Snapshot]]:
    outside = tmp_path / "victim-outside"
    (outside / "train").mkdir(parents=True)
    (outside / "train" / "keep").write_bytes(b"precious")
    yield outside, snapshot(outside)


def test_run_mode_live_switches_repair_a_hostile_writable_tree(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, b = dvc3_revisions
    victim = Pod(xfs_dir, tmp_path / "victim", a, seaweed.endpoint)
    victim.pin(a.rev, "v1")
    attacker = Pod(xfs_dir, tmp_path / "attacker", a, seaweed.endpoint)
    attacker.dataset = {**attacker.dataset, "writable": True}
    attacker.pin(a.rev, "v1")
    with (
        _victim_outside(tmp_path) as (outside, outside_before),
        SidecarProcess("once", tmp_path, victim.settings()) as once,
    ):
        assert once.wait() == 0, once.output()[-3000:]
        victim_before = snapshot(victim.current.parent)
        with SidecarProcess("run", tmp_path, attacker.settings(spare_grace_seconds="0")) as proc:
            proc.wait_until("A served", lambda: serving(proc, a.rev))
            dest = attacker.current.parent
            assert_exact(dest, a.files)
            assert sorted(os.listdir(dest)) == [".revs", "current"]
            victim_tree = victim.current.resolve()
            for i, fx in enumerate([b, a, b]):
                tree = attacker.current.resolve()
                # What a pod does between switches: edit, plant links to the victim and out.
                some = sorted(p for p in tree.rglob("*") if p.is_file())[0]
                some.chmod(0o644)
                some.write_bytes(b"edited by the pod")
                (tree / "planted").write_bytes(b"x")
                sub = next(p for p in sorted(tree.iterdir()) if p.is_dir())
                os.rename(sub, tree / "moved")
                to = victim_tree / sub.name
                os.symlink(to if to.is_dir() else outside / "train", sub)
                os.rename(dest / ".revs", dest / f"old-{i}")
                os.symlink(outside if i % 2 else victim.current.parent / ".revs", dest / ".revs")
                attacker.pin(fx.rev, f"v{i}")
                proc.wait_until(f"switch {i}", lambda fx=fx: serving(proc, fx.rev))
                assert_exact(dest, fx.files)
                assert snapshot(victim.current.parent) == victim_before
                assert snapshot(outside) == outside_before
            assert proc.stop() == 0
        assert not any('"Traceback' in line for line in proc.output().splitlines())
