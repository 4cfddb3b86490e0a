"""The node cache's insert contract: verified, atomic, 0444, safe under concurrent writers.

Concurrency is tested with real processes (sidecars of different pods are processes), all
writing the same objects at once into one cache, and then materialising from it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.manifest import Manifest
from datapin_sidecar.errors import CorruptObjectError

from testkit.dvcrepo import tree_bytes
from testkit.trees import object_name, put_revision


def test_insert_verifies_and_publishes_read_only(fs_dir: Path) -> None:
    cache = NodeCache(fs_dir / "cache")
    data = b"some bytes"
    oid = object_name(data)
    cache.insert_bytes(data, oid, Layout.DVC3)
    path = Path(cache.path(oid, Layout.DVC3))
    assert path == fs_dir / "cache" / "files" / "md5" / oid[:2] / oid[2:]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    with pytest.raises(CorruptObjectError, match="do not hash to their name"):
        cache.insert_bytes(b"other bytes", "0" * 32, Layout.DVC3)
    assert not os.path.exists(cache.path("0" * 32, Layout.DVC3))
    assert list(cache.tmp_dir.iterdir()) == []


def test_second_writer_never_replaces_an_installed_object(fs_dir: Path) -> None:
    cache = NodeCache(fs_dir / "cache")
    data = b"popular object"
    oid = object_name(data)
    cache.insert_bytes(data, oid, Layout.DVC3)
    inode = os.stat(cache.path(oid, Layout.DVC3)).st_ino
    cache.insert_bytes(data, oid, Layout.DVC3)
    # Trees hardlinked to the object keep sharing it with the cache.
    assert os.stat(cache.path(oid, Layout.DVC3)).st_ino == inode


def test_legacy_layout_is_found_and_read(fs_dir: Path) -> None:
    cache = NodeCache(fs_dir / "cache")
    text = b"a\r\nb\r\n"
    legacy = object_name(text, Layout.LEGACY)
    assert legacy != object_name(text)
    cache.insert_bytes(text, legacy, Layout.LEGACY)
    assert cache.path(legacy, Layout.LEGACY) == f"{fs_dir}/cache/{legacy[:2]}/{legacy[2:]}"
    assert cache.find(legacy) is Layout.LEGACY
    assert cache.verify(legacy, Layout.LEGACY)


def test_concurrent_writers_and_materialisers(fs_dir: Path) -> None:
    """4 processes fill one cold cache with the same revision from a remote, at once."""
    remote = fs_dir / "remote"
    files = {f"s{i % 10}/obj-{i}.bin": os.urandom(2048 + i) for i in range(600)}
    rev = put_revision(NodeCache(remote), files)
    cache = fs_dir / "cache"
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from datapin_sidecar.engine.cache import NodeCache
        from datapin_sidecar.engine.materialize import Request, materialize
        from datapin_sidecar.remotes.directory import DirectoryRemote
        from datapin_sidecar.engine.revision import Revision
        cache, remote, rev, dest = sys.argv[1:]
        materialize(Request(cache=NodeCache(cache), revision=Revision.parse(rev),
                            dest=Path(dest), remote=DirectoryRemote(remote)))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache), str(remote), rev.oid, str(fs_dir / f"p{n}")]
        )
        for n in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    for n in range(4):
        assert tree_bytes((fs_dir / f"p{n}" / "current").resolve()) == files
    node = NodeCache(cache)
    for data in files.values():
        assert node.verify(object_name(data), Layout.DVC3)
    assert list(node.tmp_dir.iterdir()) == []


def test_parsed_manifest_is_reused_and_rebuilt_when_damaged(fs_dir: Path) -> None:
    cache = NodeCache(fs_dir / "cache")
    rev = put_revision(cache, {"a": b"1", "b/c": b"2"})
    first = cache.load_manifest(rev, Layout.DVC3)
    (parsed,) = cache.manifests_dir.iterdir()
    second = cache.load_manifest(rev, Layout.DVC3)
    assert list(second) == list(first)
    parsed.write_bytes(b"garbage")
    third = cache.load_manifest(rev, Layout.DVC3)
    assert list(third) == list(first)
    assert Manifest.from_bytes(parsed.read_bytes(), source="x") is not None  # rewritten
    # Without its .dir the parsed form is not trusted: the revision is gone from the cache.
    os.unlink(cache.path(rev.oid, Layout.DVC3))
    with pytest.raises(FileNotFoundError):
        cache.load_manifest(rev, Layout.DVC3)
