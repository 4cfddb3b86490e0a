"""Adversarial: every bad flag, setting and manifest is refused with its exit code and a fix.

Runs the installed `datapin` console script and `datapin-sidecar` (as `tests/test_cli.py`
does) so what is asserted is what a user sees: the exit code, a message naming the option and
the fix, and never a traceback. Empty values must never silently mean the working directory,
numbers have stated caps, names are single file names, files are not directories (and the
reverse), and nothing blocks on a FIFO or reads a device whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout

from testkit.trees import object_name, put_revision

#: The documented limits (manifest.py): NAME_MAX, PATH_MAX, and a depth no dataset reaches.
MAX_SEGMENT_BYTES = 255
MAX_RELPATH_BYTES = 4096
MAX_DEPTH = 256


def datapin(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("datapin")
    if exe is None:
        pytest.fail("the `datapin` console script is not installed: run scripts/setup")
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def sidecar_once(env: dict[str, str], work: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    exe = shutil.which("datapin-sidecar")
    if exe is None:
        pytest.fail("the `datapin-sidecar` console script is not installed: run scripts/setup")
    termination = work / "termination-log"
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        "DATAPIN_TERMINATION_MESSAGE_PATH": str(termination),
        "DATAPIN_LOG_FORMAT": "json",
        **env,
    }
    proc = subprocess.run(
        [exe, "once"], capture_output=True, text=True, timeout=60, check=False, env=full, cwd=work
    )
    return proc, termination.read_text() if termination.exists() else ""


@pytest.fixture
def setup(rootfs_dir: Path) -> tuple[Path, str]:
    cache = NodeCache(rootfs_dir / "cache")
    return cache.root, put_revision(cache, {"x.txt": b"hello"}).oid


def _argv(cache: Path, rev: str, dest: Path, *extra: str) -> list[str]:
    return ["materialize", "--cache", str(cache), "--rev", rev, "--dest", str(dest), *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def _refused(proc: subprocess.CompletedProcess[str], code: int, *texts: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in texts:
        assert text in proc.stderr, proc.stderr


# -- empty values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    [
        "--cache",
        "--dest",
        "--remote",
        "--rev",
        "--file-name",
        "--link-name",
        "--dvc-repo",
        "--target",
        "--remote-name",
        "--endpoint-url",
        "--region",
        "--ca-bundle",
        "--credentials-dir",
        "--env-file",
    ],
)
def test_an_empty_value_is_refused_never_the_working_directory(
    setup: tuple[Path, str], rootfs_dir: Path, flag: str
) -> None:
    cache, rev = setup
    work = rootfs_dir / "cwd"
    work.mkdir()
    proc = datapin(*_replace(_argv(cache, rev, rootfs_dir / "dest"), flag, ""), cwd=work)
    _refused(proc, 2, f"argument {flag}: must not be empty")
    assert list(work.iterdir()) == []  # nothing was created in the working directory


# -- numbers and names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "text"),
    [
        ("--jobs", "0", "must be between 1 and 1024 (got 0)"),
        ("--jobs", "1025", "must be between 1 and 1024"),
        ("--jobs", "1000000000", "must be between 1 and 1024 (got 1000000000)"),
        ("--jobs", "lots", "is not a whole number"),
        ("--link-name", "../elsewhere", "is not a plain file name"),
        ("--link-name", ".revs", "is not a plain file name"),
        ("--link-name", "a" * 256, "at most 255 bytes"),
        ("--file-name", "a/b", "is not a plain file name"),
        ("--file-name", "..", "is not a plain file name"),
    ],
)
def test_absurd_numbers_and_bad_names_are_refused_with_the_cap(
    setup: tuple[Path, str], rootfs_dir: Path, flag: str, value: str, text: str
) -> None:
    cache, rev = setup
    proc = datapin(*_replace(_argv(cache, rev, rootfs_dir / "dest"), flag, value))
    _refused(proc, 2, f"argument {flag}", text)


def test_jobs_cap_is_in_the_help() -> None:
    assert "at most 1024" in datapin("materialize", "--help").stdout


# -- files where directories are expected, and the reverse --------------------------------------


def test_cache_or_dest_naming_a_file(setup: tuple[Path, str], rootfs_dir: Path) -> None:
    cache, rev = setup
    a_file = rootfs_dir / "a-file"
    a_file.write_text("not a directory")
    proc = datapin(*_replace(_argv(cache, rev, rootfs_dir / "dest"), "--cache", str(a_file)))
    _refused(proc, 2, f"--cache {a_file} is a file, not a directory", "Fix:")
    proc = datapin(*_argv(cache, rev, a_file))
    _refused(proc, 2, f"--dest {a_file} is a file, not a directory")
    proc = datapin(*_argv(cache, rev, a_file / "below"))
    _refused(proc, 2, "a component of the path is a file")
    assert a_file.read_text() == "not a directory"


def test_very_long_cache_paths(setup: tuple[Path, str], rootfs_dir: Path) -> None:
    cache, rev = setup
    long_name = rootfs_dir / ("x" * 300)
    proc = datapin(*_replace(_argv(cache, rev, rootfs_dir / "dest"), "--cache", str(long_name)))
    _refused(proc, 2, "longer than 255 bytes")
    deep = rootfs_dir.joinpath(*["d" * 200] * 6)
    proc = datapin(*_replace(_argv(cache, rev, rootfs_dir / "dest"), "--cache", str(deep)))
    _refused(proc, 2, "datapin accepts at most 1024")


def test_env_file_that_is_a_device_fifo_directory_or_huge(
    setup: tuple[Path, str], rootfs_dir: Path
) -> None:
    cache, rev = setup
    fifo = rootfs_dir / "fifo"
    os.mkfifo(fifo)  # nobody writes: reading it would block forever
    huge = rootfs_dir / "huge.env"
    with huge.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    s3 = ("--remote", "s3://bucket-x/prefix", "--endpoint-url", "http://127.0.0.1:9")
    base = _argv(cache, rev, rootfs_dir / "dest", *s3)
    for env_file, text in (
        ("/dev/zero", "is not a regular file"),
        (str(fifo), "is not a regular file"),
        (str(rootfs_dir), "is not a regular file"),
        (str(huge), "is larger than 1048576 bytes"),
        (str(rootfs_dir / "missing.env"), "does not exist"),
    ):
        proc = datapin(*base, "--env-file", env_file)
        _refused(proc, 2, f"env file {env_file} {text}", "Fix:")


def test_dvc_file_that_is_a_fifo(setup: tuple[Path, str], rootfs_dir: Path) -> None:
    cache, _ = setup
    repo = rootfs_dir / "repo"
    (repo / ".dvc").mkdir(parents=True)
    os.mkfifo(repo / "data.dvc")
    proc = datapin(
        "materialize", "--cache", cache, "--dest", rootfs_dir / "d", "--dvc-repo", repo,
        "--target", "data.dvc",
    )  # fmt: skip
    _refused(proc, 3, "is not a regular file")


def test_directory_remote_that_is_a_file(setup: tuple[Path, str], rootfs_dir: Path) -> None:
    cache, _ = setup
    rev = put_revision(NodeCache(rootfs_dir / "other"), {"y.txt": b"y"}, objects=False).oid
    remote = rootfs_dir / "remote-file"
    remote.write_text("x")
    proc = datapin(*_argv(cache, rev, rootfs_dir / "dest", "--remote", str(remote)))
    _refused(proc, 8, "Fix:")


# -- manifests ---------------------------------------------------------------------------------


def _raw_revision(cache: NodeCache, entries: list[tuple[str, bytes]]) -> str:
    """A `.dir` in DVC's exact bytes, written without datapin's validation."""
    items = []
    for relpath, data in entries:
        oid = object_name(data)
        if cache.find(oid, (Layout.DVC3,)) is None:
            cache.insert_bytes(data, oid, Layout.DVC3)
        items.append({"md5": oid, "relpath": relpath})
    raw = json.dumps(sorted(items, key=lambda e: e["relpath"]), sort_keys=True).encode()
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    path = Path(cache.path(f"{md5}.dir", Layout.DVC3))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return f"{md5}.dir"


@pytest.mark.parametrize(
    ("relpath", "text"),
    [
        ("a" * (MAX_SEGMENT_BYTES + 1), "a path segment is 256 bytes long"),
        ("ok/" + "é" * 128, "a path segment is 256 bytes long"),
        ("ab/" * (MAX_RELPATH_BYTES // 3 + 100) + "f", "paths longer than 4096 bytes"),
        ("a/" * (MAX_DEPTH + 10) + "f", f"more than {MAX_DEPTH} directories deep"),
    ],
    ids=["segment", "utf8-segment", "relpath", "depth"],
)
def test_overlong_manifest_paths_are_manifest_errors(
    rootfs_dir: Path, relpath: str, text: str
) -> None:
    cache = NodeCache(rootfs_dir / "cache")
    rev = _raw_revision(cache, [("fine.txt", b"fine"), (relpath, b"bad")])
    proc = datapin(*_argv(cache.root, rev, rootfs_dir / "dest"))
    _refused(proc, 3, "invalid DVC manifest", text, "Fix:")
    assert len(proc.stderr) < 2000  # the path is cut, not echoed whole
    assert not (rootfs_dir / "dest" / "current").exists()


def test_manifest_paths_at_the_limits_still_work(rootfs_dir: Path) -> None:
    cache = NodeCache(rootfs_dir / "cache")
    longest = "n" * MAX_SEGMENT_BYTES
    deep = "/".join(["d"] * (MAX_DEPTH - 1)) + "/f"
    rev = _raw_revision(cache, [(longest, b"long"), (deep, b"deep")])
    proc = datapin(*_argv(cache.root, rev, rootfs_dir / "dest"), "--json")
    assert proc.returncode == 0, proc.stderr
    current = rootfs_dir / "dest" / "current"
    assert (current / longest).read_bytes() == b"long"
    assert (current / deep).read_bytes() == b"deep"


# -- datapin-sidecar settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "text"),
    [
        ("DATAPIN_ROOT", "", "DATAPIN_ROOT: must not be empty"),
        ("DATAPIN_ROOT", "relative/root", "DATAPIN_ROOT: must be an absolute path"),
        ("DATAPIN_WORKSPACE_DIR", "", "DATAPIN_WORKSPACE_DIR: must not be empty"),
        ("DATAPIN_ANNOTATIONS_FILE", "", "DATAPIN_ANNOTATIONS_FILE: must not be empty"),
        ("DATAPIN_POD_UID", "../..", "DATAPIN_POD_UID: must be the pod's metadata.uid, a UUID"),
        ("DATAPIN_POD_UID", "", "DATAPIN_POD_UID: must be the pod's metadata.uid"),
        ("DATAPIN_LINK_NAME", "", "DATAPIN_LINK_NAME: must be one file name"),
        ("DATAPIN_LINK_NAME", "../x", "DATAPIN_LINK_NAME: must be one file name"),
        ("DATAPIN_JOBS", "1000000000", "DATAPIN_JOBS: Input should be less than or equal to 1024"),
        ("DATAPIN_WATCH_INTERVAL_SECONDS", "inf", "less than or equal to 3600"),
        ("DATAPIN_GC_INTERVAL_SECONDS", "1e12", "less than or equal to 86400"),
        ("DATAPIN_SPARE_GRACE_SECONDS", "nan", "DATAPIN_SPARE_GRACE_SECONDS"),
        ("DATAPIN_GC_HIGH_PERCENT", "1000", "less than or equal to 100"),
        (
            "DATAPIN_DATASETS",
            json.dumps([{"name": "a..b", "remote": "/r"}]),
            "DATAPIN_DATASETS[0].name: must be a Kubernetes resource name",
        ),
        (
            "DATAPIN_DATASETS",
            json.dumps([{"name": "a", "remote": ""}]),
            "DATAPIN_DATASETS[0].remote: must not be empty",
        ),
        (
            "DATAPIN_DATASETS",
            json.dumps([{"name": "a", "remote": "relative/remote"}]),
            "a directory remote must be an absolute path",
        ),
        (
            "DATAPIN_DATASETS",
            json.dumps([{"name": "a", "remote": "/r", "credentials_dir": ""}]),
            "DATAPIN_DATASETS[0].credentials_dir: must not be empty",
        ),
    ],
)
def test_sidecar_settings_are_validated(
    tmp_path: Path, variable: str, value: str, text: str
) -> None:
    env = {
        "DATAPIN_ROOT": str(tmp_path / "root"),
        "DATAPIN_POD_UID": str(uuid.uuid4()),
        "DATAPIN_DATASETS": json.dumps([{"name": "a", "remote": str(tmp_path / "remote")}]),
        variable: value,
    }
    proc, message = sidecar_once(env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert text in proc.stderr
    assert text in message  # the termination message says it too
    assert list(tmp_path.iterdir()) == [tmp_path / "termination-log"]  # nothing was made


def test_settings_describe_the_caps() -> None:
    exe = shutil.which("datapin-sidecar")
    assert exe is not None
    text = subprocess.run([exe, "settings"], capture_output=True, text=True, check=True).stdout
    assert "Remote requests in flight (1 to 1024)" in text
    assert "(at most an hour)" in text
    assert "(a UUID: the workspace is ROOT/workspaces/<uid>)" in text


def test_annotations_file_that_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "annotations"
    os.mkfifo(fifo)
    (tmp_path / "remote").mkdir()
    env = {
        "DATAPIN_ROOT": str(tmp_path / "root"),
        "DATAPIN_POD_UID": str(uuid.uuid4()),
        "DATAPIN_DATASETS": json.dumps([{"name": "a", "remote": str(tmp_path / "remote")}]),
        "DATAPIN_ANNOTATIONS_FILE": str(fifo),
    }
    proc, message = sidecar_once(env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "is not a regular file" in message


@pytest.mark.parametrize(
    ("variable", "value", "text"),
    [
        ("DATAPIN_ROOT", "{file}", "DATAPIN_ROOT: is a file, not a directory"),
        ("DATAPIN_WORKSPACE_DIR", "{file}", "DATAPIN_WORKSPACE_DIR: is a file, not a directory"),
        ("DATAPIN_WORKSPACE_DIR", "{file}/ws", "a component of the path is a file"),
        ("DATAPIN_ROOT", "{tmp}/" + "x" * 300, "DATAPIN_ROOT: cannot be used (File name too long)"),
        ("DATAPIN_ROOT", "{tmp}/" + "d" * 200 + "/" + "d" * 900, "must be at most 1024 bytes"),
    ],
    ids=["root-file", "workspace-file", "workspace-below-file", "long-name", "long-path"],
)
def test_sidecar_directories_that_are_files_or_too_long(
    tmp_path: Path, variable: str, value: str, text: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    (tmp_path / "remote").mkdir()
    env = {
        "DATAPIN_ROOT": str(tmp_path / "root"),
        "DATAPIN_POD_UID": str(uuid.uuid4()),
        "DATAPIN_DATASETS": json.dumps(
            [{"name": "a", "remote": str(tmp_path / "remote"), "pin": "f" * 32 + ".dir"}]
        ),
        variable: value.format(file=a_file, tmp=tmp_path),
    }
    proc, message = sidecar_once(env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert text in proc.stderr
    assert text in message
    assert a_file.read_text() == "not a directory"


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_credentials_dir_key_file_that_is_not_a_key(
    setup: tuple[Path, str], rootfs_dir: Path, kind: str
) -> None:
    """Secret files are read bounded and never opened if not regular (a FIFO would block)."""
    cache, _ = setup
    rev = "f" * 32 + ".dir"  # not in the cache: the keys are read for the fetch
    secret = rootfs_dir / "secret"
    secret.mkdir()
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("a-secret-value\n")
    key_id = secret / "AWS_ACCESS_KEY_ID"
    if kind == "fifo":
        os.mkfifo(key_id)
        text = "is not a regular file"
    elif kind == "device":
        key_id.symlink_to("/dev/zero")
        text = "is not a regular file"
    elif kind == "directory":
        key_id.mkdir()
        text = "is not a regular file"
    else:
        with key_id.open("wb") as f:
            f.truncate(1024 * 1024 * 1024)
        text = "is over 16384 bytes, too big for a key"
    s3 = ("--remote", "s3://bucket-x/prefix", "--endpoint-url", "http://127.0.0.1:9")
    proc = datapin(*_argv(cache, rev, rootfs_dir / "dest", *s3, "--credentials-dir", str(secret)))
    _refused(proc, 2, f"Secret file {key_id} {text}", "Fix:")


@pytest.mark.parametrize(
    "flag",
    ["--cache", "--dest", "--remote", "--dvc-repo", "--target", "--ca-bundle", "--env-file"],
)
@pytest.mark.parametrize("shape", ["long-name", "long-path"])
def test_paths_linux_cannot_open_are_usage_errors(
    setup: tuple[Path, str], rootfs_dir: Path, flag: str, shape: str
) -> None:
    cache, rev = setup
    value = "x" * 300 if shape == "long-name" else "/".join(["y" * 200] * 25)
    argv = _argv(cache, rev, rootfs_dir / "dest")
    if flag in ("--dvc-repo", "--target"):
        argv = [a for a in argv if a not in ("--rev", rev)]
        argv += ["--dvc-repo", str(rootfs_dir), "--target", "data.dvc"]
    if flag in ("--ca-bundle", "--env-file"):
        argv += ["--remote", "s3://bucket-x/p", "--endpoint-url", "http://127.0.0.1:9"]
    proc = datapin(*_replace(argv, flag, value))
    text = "longer than 255 bytes" if shape == "long-name" else "Linux paths are shorter"
    _refused(proc, 2, f"argument {flag}", text)


def test_termination_message_path_that_is_a_fifo(tmp_path: Path) -> None:
    """Nobody reads the FIFO: writing the message must not block the exit."""
    fifo = tmp_path / "termination-fifo"
    os.mkfifo(fifo)
    env = {
        "DATAPIN_ROOT": str(tmp_path / "root"),
        "DATAPIN_POD_UID": "../..",
        "DATAPIN_TERMINATION_MESSAGE_PATH": str(fifo),
    }
    proc, _ = sidecar_once(env, tmp_path)  # times out (a failure) if the write blocks
    assert proc.returncode == 2, proc.stderr
    assert "DATAPIN_POD_UID" in proc.stderr
