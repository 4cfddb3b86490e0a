"""Crash safety: `kill -9` a materialise anywhere, and the next run must put things right.

The contract under test (sidecar/datapin_sidecar/engine/workspace.py and cache.py):

* A reader that resolves ``DEST/current`` sees all of one revision or nothing: never a partial
  or mixed tree, whatever instant the materialiser died at.
* An object at its final path in the node cache always hashes to its name (temp file, verify,
  fsync, ``link``), so a crash mid-fetch can leave temp files but never a short object.
* Whoever takes the destination lock next treats ``.build-*`` directories, ``.<link>.tmp-*``
  symlinks and cache temp files of dead writers as debris and removes them; a complete but
  unpublished tree becomes the spare; at most one spare survives and it is a complete tree of
  the revision its name and meta file claim (the next switch edits it in place, trusting that).

How the tests kill:

1. ``test_kill9_loop`` is the blunt instrument: start the real CLI (``python -m
   datapin_sidecar.cli materialize``) against a few thousand files, sleep a random (seeded)
   delay spread over a measured normal run, SIGKILL it, check the invariants *while crashed*,
   rerun to completion and check the settled state. Half the kills are timed from the moment
   the child holds the destination lock instead (the parent polls the flock), because a warm
   switch does its work in tens of ms after a ~0.1 s interpreter start-up that would otherwise
   absorb most kills. Targets alternate between revisions A and B (plus, now and then, a third
   revision C, so that a spare of another revision is recycled or thrown away),
   ``--no-spare`` is toggled, and the cache starts empty and is partly evicted before some
   runs so that kills land in fetches (the insert path) too. Random delays find windows nobody
   thought of, but they cannot promise to hit a narrow one.
2. ``test_kill_at_named_point`` is the scalpel: a tiny driver wraps one ``os`` function
   (``rename``, ``link``, ``mkdir``, ``unlink``, ``rmdir``) and SIGKILLs the process just
   *before* the n-th call whose path argument contains a marker string, e.g. "before the
   rename of the temp symlink over ``current``" or "in the middle of deleting the retired
   tree". Every state transition of the publish protocol gets a case, deterministically.
   After the crash and the rerun, follow-up switches to every other revision check that no
   latent damage (a partial spare trusted as complete) was left behind to surface later. The
   driver asserts that the process really died at the point (exit by SIGKILL), so a point
   that silently stops matching after a refactor fails instead of passing vacuously.
3. ``test_recover_hand_made_debris`` lays out each kind of debris by hand (no timing at all);
   ``test_clean_temp_spares_live_writers`` checks the flock rule of ``NodeCache.clean_temp``
   with a writer in another process, alive and then dead.

The named points found four recovery bugs when first run (a half-made claim refused forever,
a half-deleted tree trusted as the spare, ``Result.recovered`` always empty, an untrusted spare
costing the complete unpublished tree); they stay as regression tests. A bug still open is
pinned by an ``xfail(strict=True)`` case whose reason says what breaks: a fix makes it XPASS,
which fails the run until the marker is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit import rmtree_robust
from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision

LINK = "current"
CLI = (sys.executable, "-m", "datapin_sidecar.cli", "materialize")
RUN_TIMEOUT = 120.0
# A directory every revision holds with identical contents: a recycled tree never removes it,
# so an `rmdir` of it can only be the deletion of a whole tree (a kill point, see below).
MARKER_DIR = "zz-marker-dir"

Files = dict[str, bytes]


# -- datasets ---------------------------------------------------------------------------------


def make_revisions(seed: int, *, dirs: int, subdirs: int, per_dir: int) -> dict[str, Files]:
    """Revisions A, B and C of one dataset, as relpath -> bytes.

    A: ``dirs * subdirs * per_dir`` small files (0-700 B, some zero-byte, some sharing bytes).
    B: ~10 % of A's files changed, ~5 % removed, one whole leaf directory removed (its parents
    must go too), ~5 % added (some in new directories), and ``switch/node`` turned from a file
    into a directory. C: a few % of A changed plus a directory of its own.
    """
    rng = random.Random(seed)
    shared = [rng.randbytes(rng.randint(1, 300)) for _ in range(16)]

    def content() -> bytes:
        roll = rng.random()
        if roll < 0.03:
            return b""
        if roll < 0.15:
            return rng.choice(shared)
        return rng.randbytes(rng.randint(1, 700))

    a: Files = {
        f"d{i}/s{j}/f{k:03d}.bin": content()
        for i in range(dirs)
        for j in range(subdirs)
        for k in range(per_dir)
    }
    a["switch/node"] = b"a file in A, a directory in B\n"
    a["top.txt"] = b"top level\n"
    a["x/a"] = b"a"  # 'a' vs 'a-b' vs 'a.b': '-' and '.' sort before '/'
    a["x/a-b"] = b"a-b"
    a["x/a.b"] = b"a.b"
    for n in range(4):
        a[f"keep/{MARKER_DIR}/{n}.bin"] = f"marker {n}\n".encode()

    b = dict(a)
    body = sorted(p for p in a if p.startswith("d"))
    picked = rng.sample(body, len(body) // 5)
    for p in picked[: len(picked) // 2]:
        b[p] = b"B" + rng.randbytes(rng.randint(0, 500))  # starts with B: differs from A
    for p in picked[len(picked) // 2 :]:
        del b[p]
    leaf = f"d{dirs - 1}/s{subdirs - 1}/"
    for p in [p for p in b if p.startswith(leaf)]:
        del b[p]
    for n in range(len(body) // 20):
        where = f"d{rng.randrange(dirs)}/s{rng.randrange(subdirs)}" if n % 2 else f"new/n{n % 7}"
        b[f"{where}/added{n:03d}.bin"] = content()
    del b["switch/node"]
    b["switch/node/inner.bin"] = b"now a directory\n"
    b["switch/node/deeper/x.bin"] = b"deeper\n"
    del b["x/a-b"]

    c = dict(a)
    for p in rng.sample(body, max(1, len(body) // 30)):
        c[p] = b"C" + rng.randbytes(rng.randint(0, 200))
    c["only-c/readme"] = b"only in C\n"
    del c["x/a"]
    return {"A": a, "B": b, "C": c}


@dataclass
class World:
    """A remote holding every revision, an initially empty cache, and one destination."""

    base: Path
    revs: dict[str, Revision]  # name -> revision
    files: dict[str, Files]  # md5 -> files
    names: dict[str, str]  # md5 -> name, for messages

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def remote(self) -> Path:
        return self.base / "remote"

    @property
    def dest(self) -> Path:
        return self.base / "dest"

    def request(
        self, name: str, *, keep_spare: bool = True, strategy: Strategy = Strategy.AUTO
    ) -> Request:
        return Request(
            cache=NodeCache(self.cache),
            revision=self.revs[name],
            dest=self.dest,
            remote=DirectoryRemote(self.remote),
            keep_spare=keep_spare,
            strategy=strategy,
        )

    def argv(
        self, name: str, *, keep_spare: bool = True, strategy: Strategy = Strategy.AUTO
    ) -> list[str]:
        argv = [
            "--link",
            strategy.value,
            "--cache",
            str(self.cache),
            "--rev",
            self.revs[name].oid,
            "--dest",
            str(self.dest),
            "--remote",
            str(self.remote),
            "--json",
            "--quiet",
        ]
        return argv if keep_spare else [*argv, "--no-spare"]


def make_world(base: Path, datasets: Mapping[str, Files], *, warm: bool = False) -> World:
    """Put every revision on a directory remote (and, if `warm`, into the cache too).

    `put_revision` goes through the cache's verified insert, which fsyncs every object; that
    durability is the materialiser's business, not the fixture's, and on a loop-mounted XFS it
    costs ~3 ms an object, so it is switched off while the fixture is written.
    """
    roots = [base / "remote", *([base / "cache"] if warm else [])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        for root in roots:
            revs = {name: put_revision(NodeCache(root), files) for name, files in datasets.items()}
    (base / "cache").mkdir(exist_ok=True)
    return World(
        base=base,
        revs=revs,
        files={revs[n].md5: f for n, f in datasets.items()},
        names={revs[n].md5: n for n in datasets},
    )


# -- invariants -------------------------------------------------------------------------------


def tree_problems(root: Path, expected: Files) -> list[str]:
    """Differences between the tree at `root` and `expected`, briefly (no 3000-entry diffs)."""
    got = tree_bytes(root)
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    wrong = sorted(p for p in expected.keys() & got.keys() if got[p] != expected[p])
    problems = [
        f"{label} {len(paths)}: {paths[:5]}"
        for label, paths in (("missing", missing), ("extra", extra), ("wrong bytes", wrong))
        if paths
    ]
    for dirpath, dirs, names in os.walk(root):
        if not dirs and not names and dirpath != str(root):
            problems.append(f"empty directory {dirpath} (DVC trees have none)")
        for name in names:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, name)).st_mode)
            if mode != 0o444:
                problems.append(f"mode {oct(mode)}: {os.path.join(dirpath, name)}")
                break
    return problems


def published(world: World) -> str | None:
    """The md5 `current` names (checking the link is `.revs/<md5>`), or None if absent."""
    link = world.dest / LINK
    if not os.path.lexists(link):
        return None
    target = os.readlink(link)
    md5 = target.removeprefix(".revs/")
    assert target == f".revs/{md5}", f"{LINK} -> {target!r}: not a relative .revs/<md5> link"
    assert md5 in world.files, f"{LINK} -> {target!r}: not one of the revisions"
    return md5


def cache_problems(cache: Path) -> list[str]:
    """Objects at final DVC-3 paths whose bytes do not hash to their name, or not 0444."""
    problems = []
    objects = cache / "files" / "md5"
    for prefix in sorted(os.listdir(objects)) if objects.is_dir() else []:
        for rest in sorted(os.listdir(objects / prefix)):
            path = objects / prefix / rest
            oid = prefix + rest
            data = path.read_bytes()
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != oid.removesuffix(".dir"):
                problems.append(f"object {oid} holds {len(data)} bytes that do not hash to it")
            if stat.S_IMODE(path.stat().st_mode) != 0o444:
                problems.append(f"object {oid} has mode {oct(path.stat().st_mode)}")
    return problems


def check_crashed(world: World) -> str | None:
    """What must hold at any instant, even right after a SIGKILL. Returns the published md5."""
    md5 = published(world)
    if md5 is not None:
        tree = world.dest / ".revs" / md5
        assert tree.is_dir(), f"{LINK} -> .revs/{md5} dangles after a crash"
        problems = tree_problems(tree, world.files[md5])
        assert not problems, f"published tree of {world.names[md5]} is damaged: {problems}"
    problems = cache_problems(world.cache)
    assert not problems, f"node cache damaged by a crash: {problems}"
    return md5


def check_settled(world: World, target: str) -> str | None:
    """What must hold after a run completed. Returns the md5 of the spare, if any."""
    md5 = world.revs[target].md5
    assert published(world) == md5, f"{LINK} does not name {target}"
    problems = tree_problems(world.dest / ".revs" / md5, world.files[md5])
    assert not problems, f"published tree of {target} is wrong: {problems}"
    assert sorted(os.listdir(world.dest)) == [".revs", LINK], "temp links or strays in DEST"
    revs = world.dest / ".revs"
    names = set(os.listdir(revs)) - {".datapin", ".lock", ".meta", md5}
    spares = {n for n in names if n.startswith(".spare-")}
    assert names == spares, f"debris left in .revs: {sorted(names - spares)}"
    assert len(spares) <= 1, f"more than one spare: {sorted(spares)}"
    spare = next(iter(spares)).removeprefix(".spare-") if spares else None
    if spare is not None:
        assert spare in world.files, f"spare of an unknown revision: {spare}"
        # The next switch edits the spare in place, trusting its meta: it must be complete.
        problems = tree_problems(revs / f".spare-{spare}", world.files[spare])
        assert not problems, f"spare tree of {world.names[spare]} is not what it claims: {problems}"
    metas = sorted(os.listdir(revs / ".meta"))
    wanted = sorted(f"{m}.json" for m in (md5, spare) if m is not None)
    assert metas == wanted, f"meta files {metas}, expected {wanted}"
    assert not cache_problems(world.cache)
    private = world.cache / ".datapin"
    leftovers = sorted(
        str(p.relative_to(private))
        for p in private.rglob("*")
        if p.is_file() and (p.parent.name == "tmp" or p.name.endswith(".tmp"))
    )
    assert leftovers == [], f"temp files left in the cache: {leftovers}"
    return spare


def run_cli(argv: list[str]) -> dict[str, object]:
    """Run the CLI to completion; its JSON result."""
    proc = subprocess.run(
        [*CLI, *argv], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"rerun failed (exit {proc.returncode}): {proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def timed_cli(argv: list[str]) -> float:
    started = time.monotonic()
    run_cli(argv)
    return time.monotonic() - started


def evict(cache: Path, rng: random.Random, fraction: float, *, manifests: bool) -> int:
    """Delete a random `fraction` of the cache's objects (as `dvc gc` would); how many."""
    root = cache / "files" / "md5"
    paths = [p for p in root.glob("*/*") if manifests or not p.name.endswith(".dir")]
    doomed = rng.sample(paths, int(len(paths) * fraction))
    for path in doomed:
        path.unlink()
    return len(doomed)


def wait_for_lock_holder(lock: Path, proc: subprocess.Popen[str]) -> bool:
    """Poll until some process holds the flock on `lock` (True), or `proc` exits (False).

    Taking the lock for an instant to test it is harmless: the materialiser just waits.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the lock if we got it
        time.sleep(0.001)
    return False


def fs_name(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["fs_dir"])


# -- 1. the random kill loop ------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_loop(fs_dir: Path, request: pytest.FixtureRequest) -> None:
    on_xfs = fs_name(request) == "xfs"
    # At most `iterations`; no new one after `budget` seconds once `floor` are done. rootfs
    # gets fewer iterations and a smaller dataset: a cold run fsyncs every object it fetches,
    # which on a loaded ext4 costs 1-3 ms each, and the named points cover it as well.
    iterations, floor, budget = (32, 8, 26.0) if on_xfs else (20, 6, 16.0)
    shape = (
        {"dirs": 8, "subdirs": 8, "per_dir": 32}
        if on_xfs
        else {"dirs": 6, "subdirs": 6, "per_dir": 32}
    )
    evict_fraction = 0.25
    rng = random.Random(20240607 + on_xfs)
    world = make_world(fs_dir, make_revisions(7, **shape))
    assert min(len(f) for f in world.files.values()) > 1000

    # How long is a normal run? Measure on a scratch dest and cache, then throw them away.
    scratch = World(base=fs_dir / "scratch", revs=world.revs, files=world.files, names=world.names)
    scratch.cache.mkdir(parents=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import datapin_sidecar.cli"], check=True)
    startup = time.monotonic() - started
    scratch.remote.symlink_to(world.remote)
    cold = timed_cli(scratch.argv("A"))
    timed_cli(scratch.argv("B"))  # fetches what B adds; then switches recycle the spare
    switch = max(timed_cli(scratch.argv("A")), timed_cli(scratch.argv("B")))
    rmtree_robust(scratch.base)

    started = time.monotonic()
    stats = {"killed": 0, "finished": 0, "debris": 0, "evicted": 0}
    current: str | None = None
    i = 0
    while i < iterations and (i < floor or time.monotonic() - started < budget):
        i += 1
        if current is None or rng.random() < 0.2:
            target = rng.choice([n for n in ("A", "B", "C") if n != current])
        else:
            target = "B" if current == "A" else "A"
        keep_spare = rng.random() > 0.3
        # Spread the kill over the whole run: start-up, lock, fetch, build, publish, retire.
        expected = cold if current is None else switch
        if current is not None and rng.random() < 0.35:
            manifests = rng.random() < 0.5
            stats["evicted"] += evict(world.cache, rng, evict_fraction, manifests=manifests)
            expected = switch + (cold - switch) * evict_fraction
        # Half the kills are timed from the start of the process; the other half from the
        # moment it holds the destination lock, where all the interesting windows are (a
        # 0.1 s start-up would otherwise swallow most kills of a 30 ms warm switch).
        aimed = rng.random() < 0.5
        work = max(expected - startup, 0.02)
        delay = rng.uniform(0, work * 1.1) if aimed else rng.uniform(startup * 0.8, expected * 1.1)
        where = (
            f"iteration {i}: {current} -> {target}, keep_spare={keep_spare}, "
            f"kill {delay:.3f}s after {'taking the lock' if aimed else 'the start'}"
        )

        proc = subprocess.Popen(
            [*CLI, *world.argv(target, keep_spare=keep_spare)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if not aimed or wait_for_lock_holder(world.dest / ".revs" / ".lock", proc):
            time.sleep(delay)
        if proc.poll() is None:
            proc.kill()
            stats["killed"] += 1
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, f"{where}: exit {proc.returncode}: {err}"
            stats["finished"] += 1

        try:
            check_crashed(world)
        except AssertionError as exc:
            raise AssertionError(f"{where}, while crashed: {exc}") from exc
        revs = world.dest / ".revs"
        if revs.is_dir() and any(n.startswith(".build-") for n in os.listdir(revs)):
            stats["debris"] += 1
        tmp = world.cache / ".datapin" / "tmp"
        if tmp.is_dir() and os.listdir(tmp):
            stats["debris"] += 1

        result = run_cli(world.argv(target, keep_spare=keep_spare))
        try:
            check_settled(world, target)
        except AssertionError as exc:
            raise AssertionError(f"{where}, after the rerun ({result}): {exc}") from exc
        assert result["files"] == len(world.files[world.revs[target].md5])
        current = target

    print(
        f"kill loop on {fs_name(request)}: {i} iterations in {time.monotonic() - started:.1f}s,"
        f" startup {startup:.2f}s cold {cold:.2f}s switch {switch:.2f}s, {stats}"
    )
    assert stats["killed"] >= 3, f"almost every run finished before its kill: {stats}"


# -- 2. kills at named points -----------------------------------------------------------------

#: Runs the CLI with one `os` function wrapped: SIGKILL just before the n-th call having a
#: path argument that contains the needle. argv: FUNC NEEDLE N CLI-ARGS...
KILL_DRIVER = r"""
import os, signal, sys

func, needle, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = getattr(os, func)
seen = 0

real_readlink = os.readlink

def full(arg, fd):
    # Work inside a destination is relative to directory descriptors: name the directory.
    name = os.fsdecode(arg)
    if not isinstance(fd, int) or name.startswith("/"):
        return name
    try:
        return real_readlink(f"/proc/self/fd/{fd}") + "/" + name
    except OSError:
        return name

def hooked(*args, **kwargs):
    global seen
    fd = next((kwargs[k] for k in ("dir_fd", "dst_dir_fd", "src_dir_fd") if k in kwargs), None)
    paths = [full(a, fd) for a in args if isinstance(a, (str, bytes, os.PathLike))]
    if any(needle in p for p in paths):
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(os, func, hooked)
from datapin_sidecar.cli import main
sys.exit(main(["materialize", *sys.argv[4:]]))
"""


@dataclass(frozen=True)
class Point:
    """Where to die: before the `nth` `os.<func>` call with `needle` in a path argument."""

    func: str
    needle: str
    nth: int = 1


@dataclass(frozen=True)
class Scenario:
    """A destination state made by in-process runs, then a crashed run to `target`."""

    setup: tuple[str, ...]  # revisions materialised first, in order
    target: str
    keep_spare: bool = True
    evict_dir: str | None = None  # drop this revision's .dir from the cache before the crash
    setup_links: tuple[Strategy, ...] = ()  # per setup run (default: auto)
    link: Strategy = Strategy.AUTO  # of the crashed run and its rerun


SCENARIOS = {
    # A brand-new destination and an empty cache: claim, fetch, build, commit, first publish.
    "first": Scenario(setup=(), target="A"),
    # current A, spare C: the spare is taken, edited into B, published; A becomes the spare.
    "recycle": Scenario(setup=("C", "A"), target="B"),
    # The same with --no-spare: the old tree A is deleted after the swap.
    "no-spare": Scenario(setup=("C", "A"), target="B", keep_spare=False),
    # The spare's manifest is gone from the cache, so it cannot be recycled: B is carried over
    # from the published A, and the useless spare C is deleted at the retire.
    "stale-spare": Scenario(setup=("C", "A"), target="B", evict_dir="C"),
    # current B (copies), spare A (hardlinks: unusable for a copy run): A is built from B and
    # the same-revision spare is deleted before the new tree takes its name and meta file.
    "same-key-spare": Scenario(
        setup=("A", "B"),
        setup_links=(Strategy.HARDLINK, Strategy.COPY),
        target="A",
        link=Strategy.COPY,
    ),
}

POINTS = [
    pytest.param("first", Point("rename", ".datapin.tmp-"), id="first-before-marker"),
    pytest.param("first", Point("unlink", ".build-probe-"), id="first-mid-link-probe"),
    pytest.param("first", Point("link", "/.datapin/fetch/", 1), id="first-before-manifest-fetch"),
    pytest.param("first", Point("mkdir", ".build-", 3), id="first-mid-build"),
    pytest.param("first", Point("link", "/.datapin/fetch/", 40), id="first-mid-fetch"),
    pytest.param("first", Point("rename", ".json.tmp-"), id="first-before-meta"),
    pytest.param("first", Point("rename", ".build-"), id="first-before-commit"),
    pytest.param("first", Point("rename", f".{LINK}.tmp-"), id="first-before-swap"),
    pytest.param("recycle", Point("rename", ".spare-", 1), id="recycle-before-take-spare"),
    pytest.param(
        "recycle", Point("rename", "/.datapin/manifests/"), id="recycle-keeping-parsed-manifest"
    ),
    pytest.param("recycle", Point("unlink", ".build-", 5), id="recycle-mid-remove"),
    pytest.param("recycle", Point("mkdir", ".build-", 2), id="recycle-mid-add"),
    pytest.param("recycle", Point("rename", ".build-"), id="recycle-before-commit"),
    pytest.param("recycle", Point("rename", f".{LINK}.tmp-"), id="recycle-before-swap"),
    pytest.param("recycle", Point("rename", ".spare-", 2), id="recycle-before-retire"),
    pytest.param("no-spare", Point("rmdir", MARKER_DIR), id="no-spare-mid-delete-old"),
    pytest.param("stale-spare", Point("rmdir", MARKER_DIR), id="stale-spare-mid-delete-spare"),
    pytest.param("stale-spare", Point("link", ".build-", 20), id="stale-spare-mid-carry"),
    pytest.param(
        "same-key-spare", Point("rmdir", MARKER_DIR), id="same-key-spare-mid-delete-spare"
    ),
    pytest.param("same-key-spare", Point("rename", ".build-", 2), id="same-key-spare-commit"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scenario", "point"), POINTS)
def test_kill_at_named_point(fs_dir: Path, scenario: str, point: Point) -> None:
    s = SCENARIOS[scenario]
    world = make_world(
        fs_dir, make_revisions(11, dirs=3, subdirs=4, per_dir=12), warm=scenario != "first"
    )
    links = s.setup_links or (Strategy.AUTO,) * len(s.setup)
    for name, link in zip(s.setup, links, strict=True):
        materialize(world.request(name, strategy=link))
    if s.evict_dir is not None:
        os.unlink(NodeCache(world.cache).path(world.revs[s.evict_dir].oid, Layout.DVC3))

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_DRIVER,
            point.func,
            point.needle,
            str(point.nth),
            *world.argv(s.target, keep_spare=s.keep_spare, strategy=s.link),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"the run did not die at {point} (exit {proc.returncode}): the point no longer "
        f"matches what the materialiser does\n{proc.stderr}"
    )
    check_crashed(world)

    run_cli(world.argv(s.target, keep_spare=s.keep_spare, strategy=s.link))
    check_settled(world, s.target)
    # Damage a crash left for later (a spare that is not what it claims) shows on the next
    # switches: visit every other revision, then come back.
    others = [n for n in world.revs if n != s.target]
    for name in [*others, s.target]:
        result = materialize(world.request(name))
        try:
            check_settled(world, name)
        except AssertionError as exc:
            raise AssertionError(f"follow-up switch to {name} ({result}): {exc}") from exc


# -- 3. hand-made debris, and the temp-file lock rule ------------------------------------------


def small_world(base: Path) -> World:
    return make_world(base, make_revisions(3, dirs=2, subdirs=3, per_dir=8))


def add_unpublished(world: World, name: str, *, claim: bool) -> None:
    """Leave a complete, unpublished tree of `name` with its meta in the destination.

    That is what a crash between the rename of the build into place and the swap of the link
    leaves. The tree is made for real in a side destination on the same filesystem and moved
    over; with `claim`, the destination is first claimed the way a first run does it.
    """
    md5 = world.revs[name].md5
    side = World(
        base=world.base / f"side-{name}", revs=world.revs, files=world.files, names=world.names
    )
    side.base.mkdir()
    materialize(
        Request(
            cache=NodeCache(world.cache),
            revision=world.revs[name],
            dest=side.dest,
            remote=DirectoryRemote(world.remote),
        )
    )
    revs = world.dest / ".revs"
    if claim:
        shutil.copytree(side.dest / ".revs", revs, ignore=shutil.ignore_patterns(md5, "*.json"))
    os.rename(side.dest / ".revs" / md5, revs / md5)
    shutil.copy(side.dest / ".revs" / ".meta" / f"{md5}.json", revs / ".meta" / f"{md5}.json")
    rmtree_robust(side.base)


def add_untrusted_spare(world: World, name: str) -> None:
    """A half-deleted spare of `name` without its meta file (so it cannot be trusted)."""
    spare = world.dest / ".revs" / f".spare-{world.revs[name].md5}"
    for relpath, data in list(world.files[world.revs[name].md5].items())[::3]:
        (spare / relpath).parent.mkdir(parents=True, exist_ok=True)
        (spare / relpath).write_bytes(data)


@pytest.mark.parametrize("was_published", [True, False], ids=["switch", "first-publish"])
def test_recover_hand_made_debris(fs_dir: Path, was_published: bool) -> None:
    """Every kind of debris a crash can leave, laid out by hand, then one run."""
    world = small_world(fs_dir)
    a, b = world.revs["A"].md5, world.revs["B"].md5
    revs = world.dest / ".revs"
    if was_published:
        materialize(world.request("A"))
    add_unpublished(world, "B", claim=not was_published)
    # A half-built tree of a crashed run, with read-only files and a read-only directory.
    build = revs / ".build-x-1234"
    (build / "deep" / "er").mkdir(parents=True)
    for n in range(50):
        path = build / ("deep/er" if n % 2 else "deep") / f"f{n}"
        path.write_bytes(b"half %d" % n)
        path.chmod(0o444)
    (build / "deep" / "er").chmod(0o555)
    # A temp symlink about to replace `current`, a temp marker, a temp and an orphan meta.
    os.symlink(f".revs/{b}", world.dest / f".{LINK}.tmp-ab12")
    (revs / ".datapin.tmp-dead").write_text("datapin workspace 1\n")
    (revs / ".meta" / f".{b}.json.tmp-dead").write_text("{")
    (revs / ".meta" / f"{'0' * 32}.json").write_text("{}")
    # A temp object of a dead writer (no flock held) in the cache.
    tmp = world.cache / ".datapin" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stale = tmp / f"{object_name(b'partial')}.deadbeef0001.tmp"
    stale.write_bytes(b"parti")

    result = materialize(world.request("B"))

    assert result.base == "spare", "the unpublished complete tree was not reused"
    assert result.reused == len(world.files[b])
    spare = check_settled(world, "B")
    assert spare == (a if was_published else None)
    assert not stale.exists()


def test_result_reports_recovered_debris(fs_dir: Path) -> None:
    """`Result.recovered` (the CLI's 'recovered' line) names what the run cleaned up."""
    world = small_world(fs_dir)
    materialize(world.request("A"))
    (world.dest / ".revs" / ".build-x-1234" / "d").mkdir(parents=True)
    os.symlink(".revs/x", world.dest / f".{LINK}.tmp-ab12")
    result = materialize(world.request("B"))
    check_settled(world, "B")
    assert any(".build-x-1234" in r for r in result.recovered), result.recovered
    assert any(f".{LINK}.tmp-ab12" in r for r in result.recovered), result.recovered


def test_untrusted_spare_is_removed(fs_dir: Path) -> None:
    """A spare without meta (half deleted, say) is never recycled: it is removed."""
    world = small_world(fs_dir)
    materialize(world.request("A"))
    add_untrusted_spare(world, "C")
    result = materialize(world.request("C"))
    assert result.base != "spare"
    assert check_settled(world, "C") == world.revs["A"].md5


def test_untrusted_spare_does_not_cost_the_unpublished_tree(fs_dir: Path) -> None:
    """A spare removed as untrusted does not count as the spare: the complete tree is kept."""
    world = small_world(fs_dir)
    materialize(world.request("A"))
    add_unpublished(world, "B", claim=False)
    add_untrusted_spare(world, "C")
    result = materialize(world.request("B"))
    assert check_settled(world, "B") == world.revs["A"].md5  # correct either way
    assert result.base == "spare", f"the complete tree of B was thrown away: {result.recovered}"


def test_clean_temp_spares_live_writers(fs_dir: Path) -> None:
    """`clean_temp` removes a temp file only when no one holds its flock: alive vs dead."""
    cache = NodeCache(fs_dir / "cache")
    cache.tmp_dir.mkdir(parents=True)
    live = cache.tmp_dir / f"{object_name(b'live')}.000000000001.tmp"
    dead = cache.tmp_dir / f"{object_name(b'dead')}.000000000002.tmp"
    dead.write_bytes(b"de")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
            "os.write(fd, b'li')\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(live),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        assert cache.clean_temp() == 1
        assert live.exists(), "clean_temp removed the temp file of a live writer"
        assert not dead.exists()
        # A writer in this very process (its own open file, so its own flock) counts too.
        with cache.writer(object_name(b"inflight"), Layout.DVC3) as w:
            w.write(b"infl")
            assert cache.clean_temp() == 0
            assert len(os.listdir(cache.tmp_dir)) == 2
            w.write(b"ight")
        assert cache.find(object_name(b"inflight")) is Layout.DVC3
    finally:
        holder.kill()
        holder.wait()
    # Its writer is dead now (SIGKILL released the lock): the next clean_temp takes it.
    assert cache.clean_temp() == 1
    assert os.listdir(cache.tmp_dir) == []
