"""Property tests: random datasets and random sequences of switches, checked exactly.

Example-based tests pick the cases their author thought of; here hypothesis picks them.

* ``test_switch_sequences_give_exact_trees`` draws two or three revisions of one dataset and a
  sequence of one to six materialise operations over them (repeats, i.e. no-ops, included;
  ``keep_spare`` and the link strategy toggled per operation), on a fresh cache and destination
  per example, and after every operation checks the whole observable state: ``current`` names
  ``.revs/<md5>`` and its tree holds exactly the revision's files (bytes and mode 0444, nothing
  more), no build debris or temp links, one spare at most and exactly the one the operation
  should have kept, meta files for the live trees only, the result's counters, and the
  read-only flag against reality (a file sharing its inode with a cache object must make the
  tree read-only). Revisions are derived from each other by the edits that stress an
  in-place recycle: changed bytes, removals that empty directories, additions, a file turned
  into a directory and a directory turned into a file. Some revisions are only on a directory
  remote, so some operations fetch.
* Names are where naive code breaks: non-BMP characters, combining characters (``é`` composed
  and decomposed are two different files on Linux filesystems, which do not normalise),
  control characters, spaces, names that are prefixes of others (``a``, ``a-b``, ``a.b``,
  ``a/b``: ``-`` and ``.`` sort before ``/``, so a "walk order" and DVC's "full relpath order"
  differ), deep nesting (up to 8 levels), zero-byte files and many entries sharing one object.
  Segments never contain ``/`` or NUL and are never ``.`` or ``..``; a path is never both a
  file and a directory. Segments stay short (at most 8 characters, 32 bytes) so no name
  reaches the 255-byte limit of the filesystems.
* The manifest tests need no filesystem: ``Manifest.from_entries(...).dumps()`` is byte for
  byte what DVC writes (``json.dumps(rows, sort_keys=True)`` sorted by relpath), ``parse``
  reads those bytes and reformatted or reordered JSON back to the same entries, invalid paths
  are refused, ``diff(a, b)`` applied to ``a`` gives ``b`` (including its same-paths fast
  path), and the parsed form the cache keeps (``to_bytes``/``from_bytes``, trusted without
  re-validation) round-trips and refuses any damaged blob.

Hypothesis re-runs the body, so each example makes its own directory under the fixture's and
removes it. The filesystem test is an inner ``@given`` function: its example budget can then
depend on the filesystem (reflink XFS gets more than ext4, whose runs are slower), and no
function-scoped fixture is shared between examples (so no health check needs silencing for it).

Counterexamples hypothesis found are kept as plain tests (``test_switch_back_past_...``), so
they run every time, not only when the example database still holds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.manifest import Manifest, diff
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.part import Part, folders
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import ManifestError, PathNotInRevisionError
from datapin_sidecar.remotes.directory import DirectoryRemote
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from testkit import rmtree_robust
from testkit.dvcrepo import tree_bytes
from testkit.trees import put_revision

Files = dict[str, bytes]
T = TypeVar("T")

# -- strategies -------------------------------------------------------------------------------

#: Names chosen to collide in interesting ways; drawn often, so paths share prefixes.
TRICKY_NAMES = (
    "a",
    "a-b",
    "a.b",
    "a b",
    "A",
    "b",
    "é",  # U+00E9, composed
    "e\u0301",  # e + COMBINING ACUTE ACCENT: another name
    "\U0001d518",  # MATHEMATICAL FRAKTUR CAPITAL U, outside the BMP
    "\U0001f600x",  # an emoji, then ASCII
    "\u0301lead",  # a combining mark with nothing to combine with
    "..a",
    ".hidden",
    "x\ty",
    "new\nline",
    "ü" * 8,
)

_segment_chars = st.characters(
    codec="utf-8",  # no lone surrogates: they have no UTF-8 form
    exclude_characters="/\x00",
)
SEGMENTS = st.one_of(
    st.sampled_from(TRICKY_NAMES),
    st.text(_segment_chars, min_size=1, max_size=8).filter(lambda s: s not in (".", "..")),
)
#: A few blobs shared by many files (one object, many entries), plus fresh ones.
SHARED = (b"", b"\n", b"shared blob\n", bytes(range(256)))
CONTENTS = st.one_of(st.sampled_from(SHARED), st.binary(min_size=0, max_size=48))
MD5S = st.one_of(
    st.sampled_from(["0" * 32, "f" * 32, hashlib.md5(b"").hexdigest()]),
    st.binary(min_size=16, max_size=16).map(bytes.hex),
)


def parents(path: str) -> Iterator[str]:
    cut = path.rfind("/")
    while cut > 0:
        yield path[:cut]
        cut = path.rfind("/", 0, cut)


def can_add(tree: dict[str, object], dirs: set[str], path: str) -> bool:
    """`path` may become a file of `tree`: not a file or a directory yet, no parent a file."""
    return path not in tree and path not in dirs and not any(p in tree for p in parents(path))


def directories(tree: dict[str, object]) -> set[str]:
    return {p for path in tree for p in parents(path)}


@st.composite
def paths(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=1, max_value=8))
    return "/".join(draw(SEGMENTS) for _ in range(depth))


@st.composite
def trees(draw: st.DrawFn, values: st.SearchStrategy[T], max_files: int = 200) -> dict[str, T]:
    """relpath -> value for 0..max_files files: a valid tree (no file is also a directory)."""
    tree: dict[str, T] = {}
    dirs: set[str] = set()
    for _ in range(draw(st.integers(min_value=0, max_value=max_files))):
        path = draw(paths())
        if can_add(tree, dirs, path):
            tree[path] = draw(values)
            dirs.update(parents(path))
    return tree


@st.composite
def edited(draw: st.DrawFn, base: Files) -> Files:
    """A revision derived from `base` by the edits a recycle has to get right."""
    tree = dict(base)
    names = sorted(tree)
    if names:
        for path in draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)):
            tree[path] = draw(CONTENTS)  # changed (or, by chance, not)
        for path in draw(st.lists(st.sampled_from(names), max_size=len(names) // 2 + 1)):
            tree.pop(path, None)
    if draw(st.booleans()) and tree:  # a file becomes a directory
        path = draw(st.sampled_from(sorted(tree)))
        del tree[path]
        tree[f"{path}/{draw(SEGMENTS)}"] = draw(CONTENTS)
    dirs = directories(tree)
    if draw(st.booleans()) and dirs:  # a directory becomes a file
        path = draw(st.sampled_from(sorted(dirs)))
        for victim in [p for p in tree if p.startswith(f"{path}/")]:
            del tree[victim]
        tree[path] = draw(CONTENTS)
    dirs = directories(tree)
    for _ in range(draw(st.integers(min_value=0, max_value=20))):  # additions
        if dirs and draw(st.booleans()):  # next to existing files
            path = f"{draw(st.sampled_from(sorted(dirs)))}/{draw(SEGMENTS)}"
        else:
            path = draw(paths())
        if can_add(tree, dirs, path):
            tree[path] = draw(CONTENTS)
            dirs.update(parents(path))
    return tree


@dataclass(frozen=True)
class Op:
    revision: int
    keep_spare: bool
    strategy: Strategy


@dataclass(frozen=True)
class Case:
    revisions: tuple[Files, ...]
    cold: tuple[bool, ...]  # revision only on the remote, not in the cache
    ops: tuple[Op, ...]


@st.composite
def cases(draw: st.DrawFn, strategies: tuple[Strategy, ...]) -> Case:
    revisions: list[Files] = [draw(trees(CONTENTS))]
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            revisions.append(draw(trees(CONTENTS)))  # unrelated
        else:
            revisions.append(draw(edited(draw(st.sampled_from(revisions)))))
    ops = draw(
        st.lists(
            st.builds(
                Op,
                revision=st.integers(min_value=0, max_value=len(revisions) - 1),
                keep_spare=st.booleans(),
                strategy=st.sampled_from(strategies),
            ),
            min_size=1,
            max_size=6,
        )
    )
    cold = tuple(draw(st.integers(min_value=0, max_value=3)) == 0 for _ in revisions)
    return Case(revisions=tuple(revisions), cold=cold, ops=tuple(ops))


# -- the filesystem property ------------------------------------------------------------------


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Fixture writes need no durability; on a loop-mounted XFS an fsync costs ~3 ms."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def cache_inodes(cache: Path) -> set[tuple[int, int]]:
    found = set()
    for dirpath, _dirs, names in os.walk(cache / "files"):
        for name in names:
            st_ = os.lstat(os.path.join(dirpath, name))
            found.add((st_.st_dev, st_.st_ino))
    return found


def check_state(
    dest: Path, *, cache: Path, files: Files, md5: str, spare: str | None, known: dict[str, Files]
) -> None:
    """Everything observable about `dest` after a completed operation."""
    assert os.readlink(dest / "current") == f".revs/{md5}"
    assert sorted(os.listdir(dest)) == [".revs", "current"], "temp links or strays in DEST"
    revs = dest / ".revs"
    tree = revs / md5
    got = tree_bytes(tree)
    missing, extra = sorted(files.keys() - got.keys()), sorted(got.keys() - files.keys())
    assert (missing, extra) == ([], []), f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = sorted(p for p in files if got[p] != files[p])
    assert not wrong, f"wrong bytes: {wrong[:5]}"
    linked = cache_inodes(cache)
    shared = []
    for dirpath, dirs, names in os.walk(tree):
        assert dirs or names or dirpath == str(tree), f"empty directory {dirpath} (DVC has none)"
        for name in names:
            st_ = os.lstat(os.path.join(dirpath, name))
            assert stat.S_IMODE(st_.st_mode) == 0o444, f"{dirpath}/{name}: {oct(st_.st_mode)}"
            if (st_.st_dev, st_.st_ino) in linked:
                shared.append(name)
    info = json.loads((revs / ".meta" / f"{md5}.json").read_text())
    assert info["files"] == len(files)
    assert info["bytes"] == sum(map(len, files.values()))
    if shared:
        assert info["read_only"], f"hardlinks into the cache in a tree said writable: {shared[:3]}"
    expected = {".datapin", ".lock", ".meta", md5} | ({f".spare-{spare}"} if spare else set())
    assert set(os.listdir(revs)) == expected
    metas = {f"{m}.json" for m in (md5, spare) if m}
    assert set(os.listdir(revs / ".meta")) == metas
    if spare is not None:
        assert tree_bytes(revs / f".spare-{spare}") == known[spare], "spare is not its revision"


def run_case(base: Path, case: Case, *, log: Callable[[str], object] = note) -> None:
    cache, remote, dest = NodeCache(base / "cache"), NodeCache(base / "remote"), base / "dest"
    revs: list[Revision] = []
    by_md5: dict[str, Files] = {}
    with no_fsync():
        for files, cold in zip(case.revisions, case.cold, strict=True):
            rev = put_revision(remote, files)
            if not cold:
                put_revision(cache, files)
            revs.append(rev)
            by_md5[rev.md5] = files
    (base / "cache").mkdir(exist_ok=True)
    current: str | None = None
    spare: str | None = None
    for step, op in enumerate(case.ops):
        rev = revs[op.revision]
        files = case.revisions[op.revision]
        log(f"step {step}: {op} -> {rev.md5} ({len(files)} files)")
        result = materialize(
            Request(
                cache=cache,
                revision=rev,
                dest=dest,
                strategy=op.strategy,
                remote=DirectoryRemote(base / "remote"),
                keep_spare=op.keep_spare,
            )
        )
        if rev.md5 == current:
            assert result.base == "noop", result
        else:
            assert result.base != "noop", result
            assert result.reused + result.hits + result.misses == len(files), result
            assert result.bytes == sum(map(len, files.values())), result
            # The old tree becomes the spare (replacing any other), or everything goes.
            spare = current if op.keep_spare else None
            current = rev.md5
        assert result.files == len(files)
        check_state(dest, cache=cache.root, files=files, md5=rev.md5, spare=spare, known=by_md5)


def fs_strategies(fs: str) -> tuple[Strategy, ...]:
    both = (Strategy.AUTO, Strategy.HARDLINK, Strategy.COPY)
    return (*both, Strategy.REFLINK) if fs == "xfs" else both


@pytest.mark.slow
def test_switch_sequences_give_exact_trees(fs_dir: Path, request: pytest.FixtureRequest) -> None:
    fs = str(request.node.callspec.params["fs_dir"])

    @settings(
        max_examples=40 if fs == "xfs" else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases(fs_strategies(fs)))
    def switch_sequences(case: Case) -> None:
        base = Path(tempfile.mkdtemp(prefix="prop-", dir=fs_dir))
        try:
            run_case(base, case)
        finally:
            rmtree_robust(base)

    switch_sequences()


def test_switch_back_past_unusable_spare_keeps_meta(fs_dir: Path) -> None:
    """A counterexample hypothesis found, shrunk by hand: A as hardlinks, B as copies, then A
    again as copies. The spare (A, read-only) cannot be recycled by a copy run, so A is built
    anew; the retire then deleted the spare *with its meta file*, which is keyed by md5 alone
    and so was the meta of the tree just published (no-ops then said read-only, and the next
    switch could neither recycle nor carry it).
    """
    a, b = {"f": b"one", "g": b"two"}, {"f": b"one", "h": b"three"}
    ops = (
        Op(revision=0, keep_spare=True, strategy=Strategy.HARDLINK),
        Op(revision=1, keep_spare=True, strategy=Strategy.COPY),  # spare: A, read-only
        Op(revision=0, keep_spare=True, strategy=Strategy.COPY),  # A built from B; meta lost
        Op(revision=0, keep_spare=True, strategy=Strategy.COPY),  # no-op
    )
    case = Case(revisions=(a, b), cold=(False, False), ops=ops)
    run_case(fs_dir, case, log=print)


# -- the manifest properties ------------------------------------------------------------------


def dvc_bytes(entries: dict[str, str]) -> bytes:
    """What DVC writes: rows sorted by relpath, `json.dumps(rows, sort_keys=True)`."""
    rows = [{"md5": md5, "relpath": path} for path, md5 in sorted(entries.items())]
    return json.dumps(rows, sort_keys=True).encode()


#: The pure tests: hypothesis's default example count; generating deep unicode paths is the
#: cost, so their manifests are smaller than the filesystem test's.
PURE = settings(max_examples=100, deadline=None)


@PURE
@given(entries=trees(MD5S, max_files=80), seed=st.randoms(use_true_random=False))
def test_manifest_bytes_are_dvcs_and_round_trip(
    entries: dict[str, str], seed: random.Random
) -> None:
    pairs = list(entries.items())
    seed.shuffle(pairs)
    manifest = Manifest.from_entries(pairs, source="prop")
    raw = dvc_bytes(entries)
    assert manifest.dumps() == raw
    assert [tuple(e) for e in Manifest.parse(raw, source="prop")] == sorted(entries.items())
    # Reformatted or reordered JSON (hand-edited, another serialiser) reads the same.
    rows = [{"relpath": p, "md5": m} for p, m in pairs]
    for other in (json.dumps(rows, indent=1), json.dumps(rows, ensure_ascii=False)):
        parsed = Manifest.parse(other.encode(), source="prop")
        assert parsed.dumps() == raw


@PURE
@given(
    entries=trees(MD5S, max_files=30).filter(bool),
    bad=st.sampled_from(["under-file", "duplicate", "dot", "dotdot", "empty", "absolute"]),
    data=st.data(),
)
def test_manifest_refuses_invalid_paths(
    entries: dict[str, str], bad: str, data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(sorted(entries)))
    extra = {
        "under-file": f"{path}/x",
        "duplicate": path,
        "dot": f"{path}/./x",
        "dotdot": f"../{path}",
        "empty": f"{path}//x",
        "absolute": f"/{path}",
    }[bad]
    pairs = [*entries.items(), (extra, "0" * 32)]
    with pytest.raises(ManifestError):
        Manifest.from_entries(pairs, source="prop")
    rows = [{"md5": m, "relpath": p} for p, m in sorted(pairs)]
    with pytest.raises(ManifestError):
        Manifest.parse(json.dumps(rows, sort_keys=True).encode(), source="prop")


@PURE
@given(entries=trees(MD5S, max_files=80).filter(bool), data=st.data())
def test_part_selection_equals_a_prefix_filter(
    entries: dict[str, str], data: st.DataObject
) -> None:
    """`Part.select` (binary search over the sorted buffers) takes exactly the entries beneath
    the chosen folders, whatever their names (`a-b`, `a.b` and `a0` sort around `a/`), and a
    name that is a file or no folder is refused with the revision's top-level folders."""
    manifest = Manifest.from_entries(entries.items(), source="prop")
    dirs = sorted({p.rsplit("/", i)[0] for p in entries for i in range(1, p.count("/") + 1)})
    if dirs:
        chosen = data.draw(st.lists(st.sampled_from(dirs), min_size=1, max_size=4))
        part = Part.parse(chosen, split=False)
        got = [tuple(e) for e in part.select(manifest, revision="r.dir")]
        want = sorted(
            ((p, m) for p, m in entries.items() if any(p.startswith(d + "/") for d in chosen)),
            key=lambda e: e[0].encode(),
        )
        assert got == want
    top = sorted({p.split("/")[0] for p in entries if "/" in p}, key=str.encode)
    assert folders(manifest) == top
    file = data.draw(st.sampled_from(sorted(entries)))
    with pytest.raises(PathNotInRevisionError, match="is a file"):
        Part.parse([file], split=False).select(manifest, revision="r.dir")


@PURE
@given(entries=trees(MD5S, max_files=80), data=st.data())
def test_parsed_manifest_blob_round_trips_or_is_refused(
    entries: dict[str, str], data: st.DataObject
) -> None:
    """`to_bytes`/`from_bytes` (the parsed form kept in the cache) give back the manifest, and
    a damaged blob is refused (None), never loaded as some other manifest: it is trusted
    without validation."""
    manifest = Manifest.from_entries(entries.items(), source="prop")
    blob = manifest.to_bytes()
    loaded = Manifest.from_bytes(blob, source="prop")
    assert loaded is not None
    assert loaded.dumps() == manifest.dumps()
    assert list(loaded) == list(manifest)
    damage = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if damage == "flip":
        at = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
        bit = data.draw(st.integers(min_value=0, max_value=7))
        bad = blob[:at] + bytes([blob[at] ^ (1 << bit)]) + blob[at + 1 :]
    elif damage == "truncate":
        bad = blob[: data.draw(st.integers(min_value=0, max_value=len(blob) - 1))]
    else:
        bad = blob + data.draw(st.binary(min_size=1, max_size=8))
    assert Manifest.from_bytes(bad, source="prop") is None


@st.composite
def manifest_pairs(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    a = draw(trees(MD5S, max_files=60))
    if draw(st.booleans()):  # the same paths, some contents changed (diff has a fast path)
        return a, {p: draw(MD5S) if draw(st.booleans()) else m for p, m in a.items()}
    b: dict[str, str] = {}
    dirs: set[str] = set()
    for path, md5 in a.items():  # keep, change or drop each entry of a
        choice = draw(st.integers(min_value=0, max_value=2))
        if choice < 2:
            b[path] = md5 if choice == 0 else draw(MD5S)
            dirs.update(parents(path))
    for path, md5 in draw(trees(MD5S, max_files=20)).items():
        if can_add(b, dirs, path):
            b[path] = md5
            dirs.update(parents(path))
    return a, b


@PURE
@given(pair=manifest_pairs())
def test_diff_applied_to_a_gives_b(pair: tuple[dict[str, str], dict[str, str]]) -> None:
    a_entries, b_entries = pair
    a = Manifest.from_entries(a_entries.items(), source="a")
    b = Manifest.from_entries(b_entries.items(), source="b")
    plan = diff(a, b)
    assert list(plan.remove) == sorted(set(plan.remove))
    assert list(plan.add) == sorted(set(plan.add))
    result = dict(a_entries)
    for i in plan.remove:
        del result[a.relpath(i)]
    for j in plan.add:
        assert b.relpath(j) not in result, "add of an entry that was kept"
        result[b.relpath(j)] = b.md5(j)
    assert result == b_entries
    same = sum(1 for p, m in a_entries.items() if b_entries.get(p) == m)
    assert plan.unchanged == same
    assert plan.unchanged + len(plan.remove) == len(a)
    assert plan.unchanged + len(plan.add) == len(b)
