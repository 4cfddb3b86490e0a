"""Bad input and faults: a clear error, nothing partial published, the previous tree served.

Every test first publishes a good revision A, then makes a run for B fail in one specific way,
and asserts three things users depend on: the error names the thing and the fix; `current`
still shows exactly A; no build debris is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision
from datapin_sidecar.errors import (
    CorruptObjectError,
    DestinationError,
    ManifestError,
    ObjectsMissingError,
)
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision

FILES_A = {f"a/{i:03d}.bin": f"file {i} of A\n".encode() * 50 for i in range(40)}
FILES_B = {f"b/{i:03d}.bin": f"file {i} of B\n".encode() * 50 for i in range(40)}


@pytest.fixture
def served(fs_dir: Path) -> tuple[NodeCache, Path]:
    """A cache holding A and B, and a destination serving A."""
    cache = NodeCache(fs_dir / "cache")
    rev_a = put_revision(cache, FILES_A)
    materialize(Request(cache=cache, revision=rev_a, dest=fs_dir / "pod"))
    return cache, fs_dir / "pod"


def assert_still_serving_a(dest: Path) -> None:
    assert tree_bytes((dest / "current").resolve()) == FILES_A
    leftovers = [p.name for p in (dest / ".revs").iterdir() if p.name.startswith(".build-")]
    assert leftovers == []
    assert not [p for p in dest.iterdir() if ".tmp-" in p.name]


def put_raw_manifest(cache: NodeCache, entries: list[dict[str, str]]) -> Revision:
    raw = json.dumps(entries, sort_keys=True).encode()
    md5 = object_name(raw)
    cache.insert_bytes(raw, md5 + ".dir", Layout.DVC3)
    return Revision(md5=md5, is_dir=True)


@pytest.mark.parametrize(
    ("relpath", "problem"),
    [
        ("/abs/file", "absolute path"),
        ("../escape", "'..'"),
        ("x//y", "empty path segment"),
        ("nul\u0000byte", "NUL"),
    ],
)
def test_invalid_manifest(served: tuple[NodeCache, Path], relpath: str, problem: str) -> None:
    cache, dest = served
    oid = object_name(b"x")
    cache.insert_bytes(b"x", oid, Layout.DVC3)
    rev = put_raw_manifest(cache, [{"md5": oid, "relpath": "ok"}, {"md5": oid, "relpath": relpath}])
    with pytest.raises(ManifestError) as err:
        materialize(Request(cache=cache, revision=rev, dest=dest))
    assert problem in str(err.value)
    assert rev.md5 in str(err.value)  # the manifest is named by its cache path
    assert_still_serving_a(dest)


@pytest.mark.parametrize(
    "entries",
    [
        [("dup", "x"), ("dup", "y")],
        [("p", "x"), ("p/q", "y")],
    ],
    ids=["duplicate", "file-and-dir"],
)
def test_invalid_manifest_structure(
    served: tuple[NodeCache, Path], entries: list[tuple[str, str]]
) -> None:
    cache, dest = served
    rows = []
    for relpath, data in entries:
        oid = object_name(data.encode())
        cache.insert_bytes(data.encode(), oid, Layout.DVC3)
        rows.append({"md5": oid, "relpath": relpath})
    rev = put_raw_manifest(cache, rows)
    with pytest.raises(ManifestError, match=r"entry '(dup|p/q)'"):
        materialize(Request(cache=cache, revision=rev, dest=dest))
    assert_still_serving_a(dest)


def test_missing_objects_name_count_and_fix(served: tuple[NodeCache, Path]) -> None:
    cache, dest = served
    rev_b = put_revision(cache, FILES_B, objects=False)
    with pytest.raises(ObjectsMissingError) as err:
        materialize(Request(cache=cache, revision=rev_b, dest=dest))
    message = str(err.value)
    assert "40 object(s) not found in node cache" in message
    assert object_name(FILES_B["b/000.bin"]) in message or "and 35 more" in message
    assert "Fix: pass --remote" in message
    assert_still_serving_a(dest)


def test_missing_manifest_and_remote_without_it(
    served: tuple[NodeCache, Path], tmp_path: Path
) -> None:
    cache, dest = served
    rev = Revision(md5="f" * 32, is_dir=True)
    with pytest.raises(ObjectsMissingError, match=f"{'f' * 32}.dir.*dvc push"):
        materialize(Request(cache=cache, revision=rev, dest=dest, remote=DirectoryRemote(tmp_path)))
    assert_still_serving_a(dest)


def test_corrupt_object_is_quarantined_and_never_linked(served: tuple[NodeCache, Path]) -> None:
    cache, dest = served
    rev_b = put_revision(cache, FILES_B)
    victim = cache.path(object_name(FILES_B["b/007.bin"]), Layout.DVC3)
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.write(b"X")  # bit rot
    with pytest.raises(CorruptObjectError) as err:
        materialize(Request(cache=cache, revision=rev_b, dest=dest, verify=True))
    assert object_name(FILES_B["b/007.bin"]) in str(err.value)
    assert "quarantine" in str(err.value)
    assert not os.path.exists(victim)
    assert any(cache.quarantine_dir.iterdir())
    assert_still_serving_a(dest)


def test_corrupt_object_is_repaired_from_the_remote(fs_dir: Path) -> None:
    remote_dir = fs_dir / "remote"
    rev = put_revision(NodeCache(remote_dir), FILES_B)
    cache = NodeCache(fs_dir / "cache")
    put_revision(cache, FILES_B)
    victim = cache.path(object_name(FILES_B["b/001.bin"]), Layout.DVC3)
    os.chmod(victim, 0o644)
    Path(victim).write_bytes(b"garbage")
    result = materialize(
        Request(
            cache=cache,
            revision=rev,
            dest=fs_dir / "pod",
            verify=True,
            remote=DirectoryRemote(remote_dir),
        )
    )
    assert result.quarantined == (object_name(FILES_B["b/001.bin"]),)
    assert result.fetched_objects == 1
    assert tree_bytes((fs_dir / "pod" / "current").resolve()) == FILES_B


def test_corrupt_object_on_the_remote_never_enters_the_cache(fs_dir: Path) -> None:
    remote_dir = fs_dir / "remote"
    remote = NodeCache(remote_dir)
    rev = put_revision(remote, FILES_B)
    bad = remote.path(object_name(FILES_B["b/002.bin"]), Layout.DVC3)
    os.chmod(bad, 0o644)
    Path(bad).write_bytes(b"tampered")
    cache = NodeCache(fs_dir / "cache")
    with pytest.raises(CorruptObjectError, match=object_name(FILES_B["b/002.bin"])):
        materialize(
            Request(
                cache=cache, revision=rev, dest=fs_dir / "pod", remote=DirectoryRemote(remote_dir)
            )
        )
    assert not os.path.exists(cache.path(object_name(FILES_B["b/002.bin"]), Layout.DVC3))
    assert not (fs_dir / "pod" / "current").exists()
    assert list(cache.tmp_dir.iterdir()) == []


@pytest.fixture
def read_only_bind(served: tuple[NodeCache, Path]) -> Iterator[Path]:
    """The served destination, re-mounted read-only on top of itself."""
    _, dest = served
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root: run the suite as root")
    subprocess.run(["mount", "--bind", dest, dest], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", dest], check=True)
        yield dest
    finally:
        subprocess.run(["umount", dest], check=True)


def test_read_only_destination(served: tuple[NodeCache, Path], read_only_bind: Path) -> None:
    cache, dest = served
    rev_b = put_revision(cache, FILES_B)
    with pytest.raises(DestinationError, match=r"(cannot write|Read-only).*Fix: mount"):
        materialize(Request(cache=cache, revision=rev_b, dest=dest))
    assert tree_bytes((dest / "current").resolve()) == FILES_A


def test_destination_that_is_not_ours(fs_dir: Path) -> None:
    cache = NodeCache(fs_dir / "cache")
    rev = put_revision(cache, FILES_A)
    home = fs_dir / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(DestinationError, match=r"not a datapin destination.*thesis\.tex.*Fix"):
        materialize(Request(cache=cache, revision=rev, dest=home))
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]
    # A file where the link should be, inside an otherwise datapin-managed destination.
    materialize(Request(cache=cache, revision=rev, dest=fs_dir / "pod"))
    (fs_dir / "pod" / "current").unlink()
    (fs_dir / "pod" / "current").write_text("not a link")
    with pytest.raises(DestinationError, match="current exists and is not datapin's symlink"):
        materialize(Request(cache=cache, revision=rev, dest=fs_dir / "pod"))
    assert (fs_dir / "pod" / "current").read_text() == "not a link"


def test_no_space_left(small_xfs: Path) -> None:
    """Copy mode on a ~238 MiB volume: the build hits ENOSPC, A stays, the space comes back."""
    cache = NodeCache(small_xfs / "cache")
    rev_a = put_revision(cache, {"small.bin": b"a" * 4096})
    dest = small_xfs / "pod"
    materialize(Request(cache=cache, revision=rev_a, dest=dest))
    big = {f"big-{i}.bin": os.urandom(30 << 20) for i in range(5)}  # 150 MiB in the cache
    rev_b = put_revision(cache, big)
    os.sync()
    free_before = os.statvfs(small_xfs).f_bavail * os.statvfs(small_xfs).f_frsize
    with pytest.raises(DestinationError, match=r"no space left on the destination volume.*Fix"):
        materialize(Request(cache=cache, revision=rev_b, dest=dest, strategy=Strategy.COPY))
    assert tree_bytes((dest / "current").resolve()) == {"small.bin": b"a" * 4096}
    assert not [p for p in (dest / ".revs").iterdir() if p.name.startswith(".build-")]
    os.sync()
    free_after = os.statvfs(small_xfs).f_bavail * os.statvfs(small_xfs).f_frsize
    assert free_after > free_before - (1 << 20), "the failed build's blocks were not freed"
    # Reflinks need no data blocks: the same revision fits once cloned.
    result = materialize(Request(cache=cache, revision=rev_b, dest=dest))
    assert result.mode == "reflink"
