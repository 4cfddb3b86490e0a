"""A node whose agent runs as root (the CSI node plugin) and whose sidecar-mode pods write the
cache as the sidecar's user: the agent gives the cache's directories to the node volume's
owner first, so a sidecar can still add objects to a shard the root agent created."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout
from datapin_sidecar.errors import DestinationError

SIDECAR_UID = 65532

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the agent is root and the sidecar another user"
)


@pytest.fixture
def volume() -> Iterator[Path]:
    """A node volume root owned by the sidecar's user, reachable by it (tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="datapin-share-", dir="/var/tmp"))
    base.chmod(0o755)
    root = base / "volume"
    root.mkdir()
    os.chown(root, SIDECAR_UID, SIDECAR_UID)
    try:
        yield root
    finally:
        shutil.rmtree(base)


def _insert_as_sidecar(root: Path, data: bytes) -> int:
    """Insert `data` as the sidecar's user would, in a forked child (python itself lives
    under /root, which that user cannot reach); 0 done, 13 refused (EACCES), 1 other."""
    oid = hashlib.md5(data).hexdigest()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setgroups([])
            os.setgid(SIDECAR_UID)
            os.setuid(SIDECAR_UID)
            with NodeCache(root / "cache").writer(oid, Layout.DVC3) as w:
                w.write(data)
            code = 0
        except DestinationError as exc:  # "cannot write to the node cache (Permission denied)"
            code = 13 if "Permission denied" in str(exc) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_sidecar_writes_shards_the_root_agent_created(volume: Path) -> None:
    cache = NodeCache(volume / "cache")
    data = b"an object the sidecar fetched"
    shard = Path(cache.path(hashlib.md5(data).hexdigest(), Layout.DVC3)).parent
    # Without sharing, a shard the root agent made first locks the sidecar out.
    shard.mkdir(parents=True)
    assert _insert_as_sidecar(volume, data) == 13
    shard.rmdir()

    given = cache.share_directories(SIDECAR_UID, SIDECAR_UID)

    assert given >= 2 * 256 + 256  # both layouts' shards and the slots' shards at least
    for directory in (shard, cache.tmp_dir, cache.fetch_dir / "00", cache.used_dir):
        st = directory.stat()
        assert (st.st_uid, st.st_gid) == (SIDECAR_UID, SIDECAR_UID), directory
        assert st.st_mode & 0o022 == 0, "never group- or world-writable"
    assert _insert_as_sidecar(volume, data) == 0
    assert cache.present(hashlib.md5(data).hexdigest(), Layout.DVC3)
    # Idempotent, and a symlink planted in a shard's place is never followed.
    elsewhere = volume.parent / "elsewhere"
    elsewhere.mkdir()
    planted = cache.root / "ff"  # a legacy-layout shard
    planted.rmdir()
    planted.symlink_to(elsewhere)
    assert cache.share_directories(SIDECAR_UID, SIDECAR_UID) == 0
    assert elsewhere.stat().st_uid == 0
