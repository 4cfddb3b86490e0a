"""Adversarial: the `safefs` primitives against what a hostile pod can plant.

Every case builds the hostile object for real (symlinks, FIFOs, devices via /dev/zero, deep
chains, chmod 000 directories) and asserts that nothing outside the tree changes and nothing
blocks.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from datapin_sidecar import safefs
from datapin_sidecar.errors import UnsafeFileError


def _outside(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    return victim


def test_remove_tree_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "a" / "link").symlink_to(victim)
    (tree / "top-link").symlink_to(victim / "keep.txt")
    safefs.remove_tree(tree)
    assert not tree.exists()
    assert (victim / "keep.txt").read_text() == "precious"


def test_remove_tree_of_a_symlink_removes_only_the_link(tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    safefs.remove_tree(link)
    assert not os.path.lexists(link)
    assert (victim / "keep.txt").read_text() == "precious"


def test_remove_tree_opens_up_modes_a_tenant_removed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "locked" / "inner").mkdir(parents=True)
    (tree / "locked" / "inner" / "f").write_text("x")
    os.chmod(tree / "locked" / "inner", 0)
    os.chmod(tree / "locked", 0o500)
    safefs.remove_tree(tree)
    assert not tree.exists()


def test_remove_tree_survives_chains_deeper_than_recursion_and_descriptors(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    depth = 3000  # past Python's recursion limit and far past MAX_OPEN_DEPTH
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)
    before = len(os.listdir("/proc/self/fd"))
    safefs.remove_tree(tree)
    assert not tree.exists()
    assert len(os.listdir("/proc/self/fd")) == before


def test_read_regular_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "meta.json"
    os.mkfifo(fifo)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            safefs.read_regular(fifo, limit=1024)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"
    assert isinstance(errors[0], UnsafeFileError)


def test_read_regular_refuses_symlink_to_dev_zero_and_oversized_files(tmp_path: Path) -> None:
    link = tmp_path / "meta.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError):
        safefs.read_regular(link, limit=1024)
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(UnsafeFileError, match="larger than 1024"):
        safefs.read_regular(big, limit=1024)
    ok = tmp_path / "ok.json"
    ok.write_bytes(b"{}")
    assert safefs.read_regular(ok, limit=2) == b"{}"


def test_open_regular_refuses_a_fifo_lock(tmp_path: Path) -> None:
    fifo = tmp_path / ".lock"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError):
        safefs.open_regular(fifo, os.O_RDWR | os.O_CREAT)


def test_open_dir_beneath_refuses_symlinked_components(tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").symlink_to(victim)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafeFileError):
            safefs.open_dir_beneath(fd, "a/b")
        with pytest.raises(UnsafeFileError):
            safefs.open_dir_beneath(fd, "a/../a")
        with pytest.raises(UnsafeFileError):
            safefs.open_dir_beneath(fd, "/etc")
        sub = safefs.open_dir_beneath(fd, "a/c/d", create=True)
        os.close(sub)
        assert (root / "a" / "c" / "d").is_dir()
    finally:
        os.close(fd)
