"""Tests of the test infrastructure itself (testkit and conftest fixtures).

The rest of the suite trusts these fixtures to be what they claim: a real reflink-capable XFS
volume that is always torn down, a root filesystem without reflinks, and real DVC 2/3
repositories whose on-disk formats match what datapin has to read. Each test therefore checks an
observable fact of the system (mount table, loop devices, extent flags, free space, cache files,
DVC's own checkout) rather than the helpers' return values alone. They double as executable
documentation of the DVC behaviours in /work/shared/REFERENCE.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from testkit import rmtree_robust
from testkit.dvcrepo import (
    DvcFixture,
    dvc_checkout,
    object_path,
    read_dir_object,
    run_git,
    sample_files,
    tree_bytes,
)
from testkit.procs import run, which
from testkit.xfs import (
    XfsUnavailable,
    check_xfs_available,
    free_bytes,
    loop_devices,
    mount_fstype,
    shared_extents,
    xfs_volume,
)

FICLONE = 0x40049409
MIB = 1024 * 1024


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _ficlone(src: Path, dst: Path) -> None:
    with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
        fcntl.ioctl(fdst.fileno(), FICLONE, fsrc.fileno())


def _strerror(code: int) -> str:
    return re.escape(os.strerror(code))


def _loops_backed_by(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image``, even if it was deleted meanwhile."""
    out = run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"]).stdout
    return [line for line in out.splitlines() if str(image) in line]


def _xfs_or_skip() -> None:
    """Skip tests that call xfs_volume directly when the machine cannot provide one."""
    try:
        check_xfs_available()
    except XfsUnavailable as exc:
        pytest.skip(f"no XFS volume: {exc.reason}")


# --- XFS volumes -------------------------------------------------------------------------------


def test_xfs_mount_is_a_mounted_reflink_xfs(xfs_mount: Path) -> None:
    assert mount_fstype(xfs_mount) == "xfs"
    if which("findmnt") is not None:
        fstype = run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", str(xfs_mount)]).stdout
        assert fstype.strip() == "xfs"
    info = run(["xfs_info", str(xfs_mount)]).stdout
    assert "reflink=1" in info
    assert free_bytes(xfs_mount) > 2 * 1024 * MIB


def test_reflink_copy_shares_extents_and_costs_no_space(xfs_dir: Path) -> None:
    src = xfs_dir / "one-mib.bin"
    src.write_bytes(os.urandom(MIB))
    os.sync()
    assert not shared_extents(src)

    before = free_bytes(xfs_dir)
    run(["cp", "--reflink=always", str(src), str(xfs_dir / "reflinked.bin")])
    os.sync()
    after_reflink = free_bytes(xfs_dir)
    assert shared_extents(xfs_dir / "reflinked.bin")
    assert shared_extents(src)
    assert (xfs_dir / "reflinked.bin").read_bytes() == src.read_bytes()
    assert before - after_reflink < 64 * 1024, "a reflink must not allocate data blocks"

    # Contrast: a real copy is not shared and does consume ~1 MiB, so the measure above is valid.
    run(["cp", "--reflink=never", str(src), str(xfs_dir / "copied.bin")])
    os.sync()
    assert not shared_extents(xfs_dir / "copied.bin")
    assert after_reflink - free_bytes(xfs_dir) >= MIB


def test_rootfs_dir_is_on_the_root_filesystem_without_reflinks(rootfs_dir: Path) -> None:
    assert os.stat(rootfs_dir).st_dev == os.stat("/").st_dev
    assert list(rootfs_dir.iterdir()) == []
    src = rootfs_dir / "src"
    src.write_bytes(b"x" * 8192)
    try:
        _ficlone(src, rootfs_dir / "dst")
    except OSError as exc:
        code = exc.errno
    else:
        pytest.skip(
            "the root filesystem supports reflinks (btrfs/xfs?), so `rootfs` variants do not "
            "exercise the copy fallback here: use --basetemp on an ext4 directory"
        )
    assert code in {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY}


def test_fs_dir_is_on_the_requested_filesystem(
    fs_dir: Path, request: pytest.FixtureRequest
) -> None:
    assert fs_dir.is_dir()
    assert list(fs_dir.iterdir()) == []
    if request.node.callspec.params["fs_dir"] == "xfs":
        xfs_mount: Path = request.getfixturevalue("xfs_mount")
        assert os.stat(fs_dir).st_dev == os.stat(xfs_mount).st_dev
    else:
        assert os.stat(fs_dir).st_dev == os.stat("/").st_dev


def test_ficlone_across_filesystems_is_exdev(xfs_dir: Path, rootfs_dir: Path) -> None:
    src = rootfs_dir / "src"
    src.write_bytes(b"y" * 4096)
    with pytest.raises(OSError, match=_strerror(errno.EXDEV)) as info:
        _ficlone(src, xfs_dir / "dst")
    assert info.value.errno == errno.EXDEV


def test_small_xfs_runs_out_of_space(small_xfs: Path) -> None:
    assert mount_fstype(small_xfs) == "xfs"
    free = free_bytes(small_xfs)
    assert 150 * MIB < free < 320 * MIB
    fd = os.open(small_xfs / "too-big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        with pytest.raises(OSError, match=_strerror(errno.ENOSPC)) as info:
            os.posix_fallocate(fd, 0, 400 * MIB)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _assert_torn_down(base: Path, image: Path, mountpoint: Path) -> None:
    assert mount_fstype(mountpoint) is None
    with open("/proc/mounts", encoding="utf-8") as fh:
        assert str(mountpoint) not in fh.read()
    assert _loops_backed_by(image) == []
    assert not image.exists()
    assert not base.exists()


@pytest.mark.xfs
def test_xfs_volume_tears_down_after_normal_exit(tmp_path: Path) -> None:
    _xfs_or_skip()
    with xfs_volume("320M", workdir=tmp_path, reflink=False) as mnt:
        base, image = mnt.parent, mnt.parent / "volume.img"
        assert mount_fstype(mnt) == "xfs"
        assert len(loop_devices(image)) == 1
        assert "reflink=0" in run(["xfs_info", str(mnt)]).stdout
        (mnt / "f").write_bytes(b"data")
        with pytest.raises(OSError, match=_strerror(errno.EOPNOTSUPP)) as info:
            _ficlone(mnt / "f", mnt / "g")
        assert info.value.errno == errno.EOPNOTSUPP
    _assert_torn_down(base, image, mnt)
    assert list(tmp_path.iterdir()) == []


class _BoomError(Exception):
    pass


@pytest.mark.xfs
def test_xfs_volume_tears_down_when_the_body_raises(tmp_path: Path) -> None:
    _xfs_or_skip()
    seen: list[Path] = []

    def fill_then_fail() -> None:
        with xfs_volume("320M", workdir=tmp_path) as mnt:
            seen.append(mnt)
            (mnt / "dir").mkdir()
            (mnt / "dir" / "ro").write_bytes(b"read-only")
            (mnt / "dir" / "ro").chmod(0o444)
            (mnt / "dir").chmod(0o555)
            raise _BoomError

    with pytest.raises(_BoomError):
        fill_then_fail()
    (mnt,) = seen
    _assert_torn_down(mnt.parent, mnt.parent / "volume.img", mnt)


@pytest.mark.xfs
def test_xfs_volume_tears_down_while_a_file_is_held_open(tmp_path: Path) -> None:
    """umount gets EBUSY, retries, falls back to a lazy unmount; the loop device auto-clears."""
    _xfs_or_skip()
    with xfs_volume("320M", workdir=tmp_path) as mnt:
        image = mnt.parent / "volume.img"
        holder = open(mnt / "held", "wb")  # noqa: SIM115 - deliberately outlives the volume
    try:
        assert mount_fstype(mnt) is None
        assert not image.exists()
    finally:
        holder.close()
    deadline = time.monotonic() + 5
    while _loops_backed_by(image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loops_backed_by(image) == []
    assert not mnt.parent.exists()


@pytest.mark.xfs
def test_xfs_volume_below_the_minimum_size_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    _xfs_or_skip()
    with pytest.raises(ValueError, match="too small"), xfs_volume("100M", workdir=tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_rmtree_robust_removes_read_only_trees(tmp_path: Path) -> None:
    top = tmp_path / "tree"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_bytes(b"x")
    (top / "link").symlink_to("/etc")
    (top / "a" / "b" / "f").chmod(0o444)
    for d in (top / "a" / "b", top / "a", top):
        d.chmod(0o555)
    rmtree_robust(top)
    assert not top.exists()
    assert Path("/etc").is_dir()
    rmtree_robust(top)  # idempotent


# --- DVC repositories --------------------------------------------------------------------------


@pytest.fixture(params=[3, 2], ids=["dvc3", "dvc2"])
def dvc_fx(request: pytest.FixtureRequest) -> DvcFixture:
    fx: DvcFixture = request.getfixturevalue(f"dvc{request.param}_fixture")
    return fx


def test_sample_files_cover_the_promised_cases() -> None:
    files = sample_files()
    assert files == sample_files()  # deterministic
    assert 35 <= len(files) <= 45
    assert any(p.count("/") >= 3 for p in files)
    assert "données/é.txt" in files
    assert any(" " in p for p in files)
    assert b"" in files.values()
    assert len(set(files.values())) < len(files)  # duplicate objects
    assert any(b"\x00" in v for v in files.values())
    assert sum(b"\r\n" in v and b"\x00" not in v for v in files.values()) >= 5
    assert max(len(v) for v in files.values()) <= 210 * 1024


@pytest.mark.dvc
def test_dvc_file_and_dir_object_match_the_documented_format(dvc_fx: DvcFixture) -> None:
    meta = yaml.safe_load(dvc_fx.dvc_file.read_text(encoding="utf-8"))
    (out,) = meta["outs"]
    assert out["md5"] == dvc_fx.rev
    assert out["path"] == dvc_fx.name
    assert out["nfiles"] == len(dvc_fx.files)
    assert out["size"] == sum(len(v) for v in dvc_fx.files.values())
    assert ("hash" in out) == (dvc_fx.version == 3)

    raw = object_path(dvc_fx.cache, dvc_fx.rev, version=dvc_fx.version).read_bytes()
    assert _md5(raw) + ".dir" == dvc_fx.rev
    entries = read_dir_object(dvc_fx)
    assert [e["relpath"] for e in entries] == sorted(dvc_fx.files)  # code-point order
    assert raw == json.dumps(entries, sort_keys=True).encode()


def test_dvc3_layout_and_plain_md5_names(dvc3_fixture: DvcFixture) -> None:
    fx = dvc3_fixture
    digest = fx.rev.removesuffix(".dir")
    assert (fx.cache / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")).is_file()
    assert (fx.remote / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")).is_file()
    for entry in read_dir_object(fx):
        data = fx.files[entry["relpath"]]
        assert entry["md5"] == _md5(data)
        for root in (fx.cache, fx.remote):
            obj = object_path(root, entry["md5"], version=3)
            assert obj.read_bytes() == data
    assert os.stat(object_path(fx.cache, fx.rev, version=3)).st_mode & 0o777 == 0o444


def test_dvc2_legacy_layout_and_dos2unix_names(dvc2_fixture: DvcFixture) -> None:
    fx = dvc2_fixture
    digest = fx.rev.removesuffix(".dir")
    assert (fx.cache / digest[:2] / (digest[2:] + ".dir")).is_file()
    assert (fx.remote / digest[:2] / (digest[2:] + ".dir")).is_file()
    assert not (fx.cache / "files").exists()
    assert not (fx.remote / "files").exists()

    names = {e["relpath"]: e["md5"] for e in read_dir_object(fx)}
    differing = []
    for relpath, md5 in names.items():
        data = fx.files[relpath]
        # Objects hold the raw bytes (CRLF kept) whatever their name.
        assert object_path(fx.cache, md5, version=2).read_bytes() == data
        assert object_path(fx.remote, md5, version=2).read_bytes() == data
        if md5 != _md5(data):
            assert md5 == _md5(data.replace(b"\r\n", b"\n"))
            differing.append(relpath)
    assert "text/train.csv" in differing
    assert "text/text-then-nul.dat" in differing  # text by its first 512 bytes, NULs later
    assert "bin/nul.bin" not in differing  # NUL in the first 512 bytes: binary
    # Mostly multi-byte UTF-8: >30 % non-ASCII bytes, judged binary, so CRLF is kept in the name.
    assert "text/utf8-heavy crlf.txt" not in differing
    assert b"\r\n" in fx.files["text/utf8-heavy crlf.txt"]


@pytest.mark.dvc
def test_dvc_checkout_reproduces_the_dataset_and_leaves_the_fixture_alone(
    dvc_fx: DvcFixture, tmp_path: Path
) -> None:
    out = dvc_checkout(dvc_fx, workdir=tmp_path / "clone")
    assert out == tmp_path / "clone" / dvc_fx.name
    assert tree_bytes(out) == dvc_fx.files
    assert run_git(dvc_fx.repo, "status", "--porcelain").stdout == ""
    assert tree_bytes(dvc_fx.workspace) == dvc_fx.files


def test_dvc_checkout_from_another_cache_with_symlinks(
    dvc3_fixture: DvcFixture, tmp_path: Path
) -> None:
    cache = tmp_path / "other-cache"
    shutil.copytree(dvc3_fixture.cache, cache, symlinks=True)
    out = dvc_checkout(
        dvc3_fixture, cache_dir=cache, link_type="symlink", workdir=tmp_path / "clone"
    )
    assert (out / "a.txt").is_symlink()
    assert os.readlink(out / "a.txt").startswith(str(cache))
    with pytest.raises(ValueError, match="symlink in tree"):
        tree_bytes(out)


def test_tree_bytes_rejects_special_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"ok")
    assert tree_bytes(tmp_path) == {"d/f": b"ok"}
    os.mkfifo(tmp_path / "d" / "fifo")
    with pytest.raises(ValueError, match="special file"):
        tree_bytes(tmp_path)


def test_dvc_env_keeps_dvc_state_inside_the_repo(dvc3_fixture: DvcFixture) -> None:
    site = dvc3_fixture.repo / ".dvc" / "tmp" / "site-cache"
    assert site.is_dir()
    run_git(dvc3_fixture.repo, "check-ignore", "-q", str(site))  # raises unless git-ignored
