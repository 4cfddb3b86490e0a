"""Interop with real DVC, both ways, for DVC 3 and the legacy DVC 2.58 layout.

* What `dvc push` put on a directory remote, datapin materialises byte for byte as
  `dvc checkout` does (the legacy fixture includes CRLF text, whose object names are
  md5-dos2unix, not the md5 of the bytes).
* A node cache datapin filled is a DVC cache: `dvc checkout` works from it.
* A DVC cache is a node cache: datapin materialises straight from `.dvc/cache`.
* `--verify` on legacy objects uses DVC 2's hash, so good CRLF objects are not quarantined.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.engine.materialize import Request, materialize
from datapin_sidecar.engine.revision import Revision, read_dvc_file
from datapin_sidecar.remotes.directory import DirectoryRemote

from testkit.dvcrepo import DvcFixture, dvc_checkout, tree_bytes


@pytest.fixture(params=[3, 2], ids=["dvc3", "dvc2"])
def fx(request: pytest.FixtureRequest) -> DvcFixture:
    fixture: DvcFixture = request.getfixturevalue(f"dvc{request.param}_fixture")
    return fixture


def published(dest: Path) -> dict[str, bytes]:
    return tree_bytes((dest / "current").resolve())


def test_fixture_has_legacy_crlf_objects(dvc2_fixture: DvcFixture) -> None:
    """Guards the point of the legacy tests: some object names are not md5(bytes)."""
    out = read_dvc_file(dvc2_fixture.dvc_file)[0]
    assert out.layout is Layout.LEGACY
    cache = NodeCache(dvc2_fixture.cache)
    manifest = cache.load_manifest(out.revision, Layout.LEGACY)
    differing = [
        e.relpath
        for e in manifest
        if hashlib.md5(dvc2_fixture.files[e.relpath]).hexdigest() != e.md5
    ]
    assert differing, "no md5-dos2unix objects in the legacy fixture"


def test_from_remote_equals_dvc_checkout(fx: DvcFixture, fs_dir: Path) -> None:
    rev = Revision.parse(fx.rev)
    result = materialize(
        Request(
            cache=NodeCache(fs_dir / "cache"),
            revision=rev,
            dest=fs_dir / "pod",
            remote=DirectoryRemote(fx.remote),
            verify=True,
        )
    )
    checked_out = dvc_checkout(fx, workdir=fs_dir / "checkout")
    assert published(fs_dir / "pod") == tree_bytes(checked_out) == fx.files
    assert result.quarantined == ()
    assert result.fetched_objects > 0


def test_dvc_checkout_works_from_a_cache_we_filled(fx: DvcFixture, fs_dir: Path) -> None:
    cache_dir = fs_dir / "node-cache"
    materialize(
        Request(
            cache=NodeCache(cache_dir),
            revision=Revision.parse(fx.rev),
            dest=fs_dir / "pod",
            remote=DirectoryRemote(fx.remote),
        )
    )
    checked_out = dvc_checkout(
        fx, cache_dir=cache_dir, link_type="copy", workdir=fs_dir / "checkout"
    )
    assert tree_bytes(checked_out) == fx.files


def test_a_dvc_cache_serves_as_node_cache(fx: DvcFixture, fs_dir: Path) -> None:
    result = materialize(
        Request(cache=NodeCache(fx.cache), revision=Revision.parse(fx.rev), dest=fs_dir / "pod")
    )
    assert published(fs_dir / "pod") == fx.files
    assert result.misses == 0
    # The DVC cache itself was not disturbed: DVC still checks out from it.
    assert tree_bytes(dvc_checkout(fx, workdir=fs_dir / "checkout")) == fx.files
