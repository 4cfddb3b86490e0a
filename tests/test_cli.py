"""The `datapin` command as scripts and people use it: exit codes, summary, JSON, progress.

Runs the installed console script in a subprocess (stdin/stdout not a TTY, as in a container),
so what is asserted here is exactly what an init container's log and exit status show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout

from testkit.trees import object_name, put_revision

FILES = {f"d{i % 7}/f{i:05d}.txt": f"row {i}\n".encode() * 20 for i in range(5000)}


def datapin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("datapin")
    if exe is None:
        pytest.fail("the `datapin` console script is not installed: run scripts/setup")
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("cli-remote")
    return root, put_revision(NodeCache(root), FILES).oid


def test_cold_warm_noop_summaries(remote: tuple[Path, str], rootfs_dir: Path) -> None:
    remote_dir, rev = remote
    common = ("--cache", rootfs_dir / "cache", "--rev", rev, "--remote", remote_dir)
    cold = datapin("materialize", *common, "--dest", rootfs_dir / "a")
    assert cold.returncode == 0, cold.stderr
    assert f"published {rev}" in cold.stdout
    assert "files       5000" in cold.stdout
    assert "0 hits" in cold.stdout
    assert "5000 misses" in cold.stdout
    assert "progress: fetch" in cold.stderr  # off a TTY: plain progress lines
    assert "\r" not in cold.stderr

    warm = datapin("materialize", *common, "--dest", rootfs_dir / "b", "--json")
    assert warm.returncode == 0, warm.stderr
    result = json.loads(warm.stdout)
    assert (result["hits"], result["misses"], result["files"]) == (5000, 0, 5000)
    assert result["mode"] == "hardlink"  # ext4: no reflinks
    assert result["read_only"] is True

    noop = datapin("materialize", *common, "--dest", rootfs_dir / "b", "--json")
    assert json.loads(noop.stdout)["noop"] is True


@pytest.mark.parametrize(
    ("setup", "args", "code", "text"),
    [
        ("none", ("--rev", "v1.0"), 3, "not a DVC object id"),
        ("none", ("--rev", "f" * 32 + ".dir"), 4, "not found in node cache"),
        ("corrupt", ("--verify",), 5, "corrupt object"),
        ("foreign", (), 6, "not a datapin destination"),
        ("good", ("--link", "sideways"), 2, "invalid choice"),
        ("good", ("--remote", "/nonexistent/remote"), 8, "does not exist"),
    ],
)
def test_exit_codes(
    rootfs_dir: Path, setup: str, args: tuple[str, ...], code: int, text: str
) -> None:
    cache = NodeCache(rootfs_dir / "cache")
    rev = put_revision(cache, {"x.txt": b"hello"}).oid
    dest = rootfs_dir / "dest"
    if setup == "corrupt":
        victim = cache.path(object_name(b"hello"), Layout.DVC3)
        os.chmod(victim, 0o644)
        Path(victim).write_bytes(b"HELLO")
    if setup == "foreign":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    argv = ["materialize", "--cache", str(cache.root), "--rev", rev, "--dest", str(dest)]
    overrides = dict(zip(args[::2], args[1::2], strict=False)) if len(args) > 1 else {}
    for flag, value in overrides.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    argv += [a for a in args if a.startswith("--") and a not in overrides]
    proc = datapin(*argv)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert "Traceback" not in proc.stderr
