"""Real git + DVC repositories (DVC 3 and legacy DVC 2.58) as test fixtures.

Why real DVC: datapin must read exactly what DVC writes - ``.dvc`` files, ``.dir`` objects, the
two cache/remote layouts, DVC 2's ``md5-dos2unix`` object names - and must produce trees that DVC
itself would check out. Hand-written fixtures would only encode our own understanding of those
formats, so these helpers drive the real ``dvc`` executables (each in its own virtualenv, because
DVC 2 and DVC 3 cannot share one) and real ``git``, and the tests compare against their output.

Design:

- :func:`find_dvc` resolves the executable from ``DATAPIN_DVC3`` / ``DATAPIN_DVC2`` or the
  project's ``.tools/dvc{3,2}/bin/dvc`` (installed by ``scripts/setup``), checks that it runs and
  reports the expected major version. Absence raises :class:`DvcUnavailable` (fixtures skip with
  its reason); pointing a variable at the wrong major version is a hard error, because it would
  silently test the wrong on-disk format.
- Every DVC/git call goes through :func:`run_dvc` / :func:`run_git` with a hermetic environment:
  analytics off (``DVC_NO_ANALYTICS``, plus ``core.analytics false`` in the repo config; DVC only
  runs its updater from ``dvc version``), no user/system DVC or git config, and DVC's "site cache"
  (its hash/link state databases, by default shared under ``/var/tmp/dvc``) kept inside the
  repo's ``.dvc/tmp``. Failures raise with DVC's stdout/stderr in the message.
- :func:`make_dvc_repo` builds ``<root>/repo`` (git + DVC, dataset added and committed, directory
  remote configured as default and committed) and ``<root>/remote`` (pushed), and returns an
  immutable :class:`DvcFixture` describing them, including the exact bytes of the dataset.
- :func:`dvc_checkout` never modifies the fixture repo (session fixtures are shared by many
  tests): it clones it with git, points the clone at a cache (the fixture's own or the one given)
  with a link type, and runs the real ``dvc checkout`` there.
- :func:`sample_files` is a deterministic dataset full of the cases that break naive
  implementations (see its docstring).
"""

from __future__ import annotations

import functools
import json
import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testkit import REPO_ROOT, rmtree_robust
from testkit.procs import CommandError, Unavailable, run, which

__all__ = [
    "DvcFixture",
    "DvcUnavailable",
    "dvc_checkout",
    "find_dvc",
    "make_dvc_repo",
    "object_path",
    "read_dir_object",
    "run_dvc",
    "run_git",
    "sample_files",
    "tree_bytes",
]


_ENV_VARS = {3: "DATAPIN_DVC3", 2: "DATAPIN_DVC2"}

_TIMEOUT = 300.0


class DvcUnavailable(Unavailable):
    """The requested DVC executable is missing or broken; ``reason`` names the fix."""


@functools.cache
def find_dvc(version: int) -> Path:
    """Path of the DVC ``version`` (3 or 2) executable; raises :class:`DvcUnavailable`.

    The result is cached per process (a successful lookup runs ``dvc --version`` once).
    """
    if version not in _ENV_VARS:
        raise ValueError(f"DVC major version must be 3 or 2, not {version!r}")
    var = _ENV_VARS[version]
    configured = os.environ.get(var)
    exe = Path(configured) if configured else REPO_ROOT / ".tools" / f"dvc{version}" / "bin" / "dvc"
    source = f"${var}" if configured else f"default path (set ${var} to override)"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise DvcUnavailable(
            f"DVC {version} executable not found at {exe} ({source}): run scripts/setup "
            f"or set {var} to a DVC {version}.x `dvc` executable"
        )
    try:
        out = run(
            [exe, "--version"],
            env=hermetic_env(Path(tempfile.gettempdir()) / "datapin-dvc-probe"),
            timeout=60,
        ).stdout.strip()
    except CommandError as exc:
        raise DvcUnavailable(
            f"DVC {version} at {exe} ({source}) does not run: {exc} - re-run scripts/setup"
        ) from exc
    if out.split(".", 1)[0] != str(version):
        raise RuntimeError(
            f"{exe} ({source}) reports DVC {out!r}, expected {version}.x: fix ${var}"
        )
    return exe


@dataclass(frozen=True, kw_only=True)
class DvcFixture:
    """A real git+DVC repository with one directory output pushed to a directory remote."""

    repo: Path
    """Git + DVC working tree; the dataset's workspace is ``repo / name``."""
    cache: Path
    """The repo's ``.dvc/cache``."""
    remote: Path
    """Directory remote (``dvc remote add -d local``) the dataset was pushed to."""
    rev: str
    """The directory object, ``<md5>.dir``, as written in ``<name>.dvc`` (``outs[0].md5``)."""
    dvc: Path
    """The DVC executable that made the repo."""
    version: int
    """Its major version: 3, or 2 (legacy layout, md5-dos2unix names)."""
    files: dict[str, bytes] = field(repr=False)
    """relpath (``/``-separated, relative to the output dir) -> exact bytes as added."""
    name: str = "data"
    """The tracked directory (output path) inside ``repo``."""

    @property
    def workspace(self) -> Path:
        return self.repo / self.name

    @property
    def dvc_file(self) -> Path:
        return self.repo / f"{self.name}.dvc"


def hermetic_env(private: Path, *, who: str = "tests") -> dict[str, str]:
    """The caller's environment made safe for DVC/git runs, with DVC's state under `private`.

    Drops anything that would leak in (DVC_*, GIT_*, Python path settings), disables analytics
    and user/system config, and names a git identity. Shared by the tests and the benchmark.
    """
    drop_prefixes = ("DVC_", "GIT_")
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}
    env.update(
        DVC_NO_ANALYTICS="1",
        # DVC 2.58 reads DVC_SYSTEM_CONFIG_DIR for *both* the system and the global config dir
        # (a bug in its dvc/dirs.py); pointing both at one absent directory disables both.
        DVC_GLOBAL_CONFIG_DIR=str(private / "no-user-config"),
        DVC_SYSTEM_CONFIG_DIR=str(private / "no-user-config"),
        DVC_SITE_CACHE_DIR=str(private / "site-cache"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME=f"datapin {who}",
        GIT_AUTHOR_EMAIL=f"{who}@datapin.invalid",
        GIT_COMMITTER_NAME=f"datapin {who}",
        GIT_COMMITTER_EMAIL=f"{who}@datapin.invalid",
        LC_ALL="C.UTF-8",
    )
    return env


def _repo_env(repo: Path) -> dict[str, str]:
    return hermetic_env(repo / ".dvc" / "tmp")


def run_dvc(
    dvc: Path, repo: Path, *args: str | os.PathLike[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``dvc args...`` in ``repo`` with the hermetic environment; raise with its output."""
    return run([dvc, *args], cwd=repo, env=_repo_env(repo), timeout=_TIMEOUT)


def run_git(repo: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``git args...`` in ``repo`` without user/system git config; raise with its output."""
    if which("git") is None:
        raise DvcUnavailable("`git` not found: `apt-get install -y git` (or run scripts/setup)")
    return run(["git", *args], cwd=repo, env=_repo_env(repo), timeout=_TIMEOUT)


def _check_relpath(relpath: str) -> None:
    parts = relpath.split("/")
    if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in relpath:
        raise ValueError(f"dataset paths must be relative, '/'-separated and clean: {relpath!r}")


def make_dvc_repo(
    root: Path, files: Mapping[str, bytes], *, version: int, name: str = "data"
) -> DvcFixture:
    """Create ``root/repo`` with ``files`` under ``name/``, ``dvc add`` + commit, push to
    ``root/remote``. ``root`` is created if needed; ``repo`` and ``remote`` must not exist.
    """
    dvc = find_dvc(version)
    if not files:
        raise ValueError("DVC does not track an empty directory; give at least one file")
    repo, remote = root / "repo", root / "remote"
    root.mkdir(parents=True, exist_ok=True)
    repo.mkdir()
    remote.mkdir()

    run_git(repo, "init", "-q", "--initial-branch=main")
    run_git(repo, "config", "user.name", "datapin tests")
    run_git(repo, "config", "user.email", "tests@datapin.invalid")
    run_git(repo, "config", "commit.gpgsign", "false")
    run_dvc(dvc, repo, "init", "-q")
    run_dvc(dvc, repo, "config", "core.analytics", "false")

    for relpath, data in files.items():
        _check_relpath(relpath)
        target = repo / name / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    run_dvc(dvc, repo, "add", name)
    run_dvc(dvc, repo, "remote", "add", "-d", "local", str(remote))
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", f"track {name} with DVC {version}")
    run_dvc(dvc, repo, "push")

    meta: Any = yaml.safe_load((repo / f"{name}.dvc").read_text(encoding="utf-8"))
    rev = str(meta["outs"][0]["md5"])
    if not rev.endswith(".dir"):
        raise RuntimeError(f"{name}.dvc does not describe a directory output: {meta!r}")
    return DvcFixture(
        repo=repo,
        cache=repo / ".dvc" / "cache",
        remote=remote,
        rev=rev,
        dvc=dvc,
        version=version,
        files=dict(files),
        name=name,
    )


def object_path(root: Path, md5: str, *, version: int) -> Path:
    """Where a cache or directory remote rooted at ``root`` stores object ``md5`` (may end in
    ``.dir``): DVC 3 ``files/md5/<2>/<30>``, DVC 2 (legacy) ``<2>/<30>``.
    """
    base = root / "files" / "md5" if version >= 3 else root
    return base / md5[:2] / md5[2:]


def read_dir_object(fx: DvcFixture) -> list[dict[str, str]]:
    """The entries (``{"md5": ..., "relpath": ...}``) of the fixture's ``.dir`` object."""
    raw = object_path(fx.cache, fx.rev, version=fx.version).read_bytes()
    entries: list[dict[str, str]] = json.loads(raw)
    return entries


def dvc_checkout(
    fx: DvcFixture,
    *,
    cache_dir: Path | None = None,
    link_type: str = "copy",
    workdir: Path | None = None,
) -> Path:
    """Check the fixture's dataset out with the real ``dvc checkout``; return the directory.

    The fixture repo is left untouched: it is cloned (``git clone``) into ``workdir`` (default: a
    fresh directory next to ``fx.repo``), the clone's cache is set with ``dvc cache dir`` to
    ``cache_dir`` (default ``fx.cache``) and ``cache.type`` to ``link_type`` (``copy``,
    ``reflink``, ``hardlink``, ``symlink`` or a comma list), any workspace directory is deleted,
    then ``dvc checkout`` runs. Raises :class:`CommandError` (with DVC's output) if it fails, e.g.
    because ``cache_dir`` lacks objects.
    """
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="checkout-", dir=fx.repo.parent))
    clone = workdir
    clone.mkdir(parents=True, exist_ok=True)
    run_git(clone, "clone", "-q", str(fx.repo), ".")
    run_dvc(fx.dvc, clone, "cache", "dir", str(cache_dir if cache_dir is not None else fx.cache))
    run_dvc(fx.dvc, clone, "config", "cache.type", link_type)
    workspace = clone / fx.name
    rmtree_robust(workspace)
    run_dvc(fx.dvc, clone, "checkout")
    return workspace


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Map every regular file under ``root`` (``/``-separated relpath) to its bytes.

    Symlinks are never followed: meeting one, or a device/FIFO/socket, raises ``ValueError``, so
    a comparison against ``fx.files`` also proves the tree is made of plain files. Empty
    directories do not appear (DVC does not record them either).
    """
    result: dict[str, bytes] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                walk(Path(entry.path), f"{rel}/")
            elif stat.S_ISREG(mode):
                result[rel] = Path(entry.path).read_bytes()
            elif stat.S_ISLNK(mode):
                raise ValueError(f"symlink in tree: {entry.path} -> {os.readlink(entry.path)}")
            else:
                raise ValueError(f"special file in tree: {entry.path} (mode {oct(mode)})")

    if not root.is_dir() or root.is_symlink():
        raise ValueError(f"not a real directory: {root}")
    walk(root, "")
    return result


def _text(rng: random.Random, lines: int, *, eol: bytes, width: int = 60) -> bytes:
    words = [
        b"alpha",
        b"beta",
        b"gamma",
        b"delta",
        b"epoch",
        b"loss",
        b"0.125",
        b"label",
        b"tensor",
        b"shard",
    ]
    out = []
    for _ in range(lines):
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(1, width // 6)))
        out.append(line + eol)
    return b"".join(out)


def sample_files(seed: int = 0) -> dict[str, bytes]:
    """A deterministic ~40-file dataset (0 B to ~200 KiB) exercising DVC's corner cases.

    It contains: nesting three levels deep; non-ASCII names (``données/é.txt``); names with spaces;
    names whose sort order differs between "full relpath" and "directory walk" order (``a-b.txt``,
    ``a.txt`` and ``a/...``: '-' and '.' sort before '/'; upper case before lower case); a zero-byte
    file; two paths with identical bytes (one object, two entries); binary files with NUL bytes;
    several CRLF text files, which DVC 2 names by the md5 of their LF-converted bytes while storing
    the raw CRLF bytes; a CRLF file that is mostly multi-byte UTF-8, which DVC 2's text heuristic
    (first 512 bytes: no NUL and <= 30 % bytes outside printable ASCII) judges *binary*, so its
    legacy name is the plain md5; and a file whose first 512 bytes are CRLF text but which has NUL
    bytes and CRLFs later, which DVC 2 judges text and converts throughout.

    No CRLF file's LF conversion equals another file (DVC 2 would then store one object for two
    different contents and check out the wrong bytes for one of them).
    """
    rng = random.Random(seed)
    files: dict[str, bytes] = {}

    # Text with Windows line endings (the md5-dos2unix cases).
    files["README.txt"] = b"datapin sample dataset\r\nline two\r\n"
    files["text/train.csv"] = b"id,label\r\n" + b"".join(
        f"{i},{rng.randint(0, 9)}\r\n".encode() for i in range(3000)
    )
    files["text/notes crlf.md"] = _text(rng, 40, eol=b"\r\n")
    files["text/large-crlf.log"] = _text(rng, 3400, eol=b"\r\n")  # ~120 KiB
    files["text/mixed-eol.txt"] = _text(rng, 20, eol=b"\r\n") + _text(rng, 20, eol=b"\n") + b"\r"
    files["text/no-final-eol.txt"] = b"first\r\nsecond\r\nthird"
    files["text/utf8-heavy crlf.txt"] = ("ドキュメント データ\r\n" * 30).encode()
    files["text/text-then-nul.dat"] = (
        _text(rng, 20, eol=b"\r\n")[:600]
        + b"\x00\x01\r\n\x00"
        + bytes(rng.randrange(256) for _ in range(300))
    )
    # Plain LF text (same name under DVC 2 and 3).
    files["text/lf-only.txt"] = _text(rng, 50, eol=b"\n")

    # Names and nesting.
    files["a/b/c/deep.txt"] = b"three levels down\n"
    files["a/b/sibling.bin"] = rng.randbytes(777)
    files["a/top.json"] = json.dumps({"k": [1, 2, 3]}).encode()
    files["a-b.txt"] = b"dash sorts before slash\n"
    files["a.txt"] = b"dot sorts before slash\n"
    files["B-upper.txt"] = b"upper case sorts first\n"
    files["données/é.txt"] = "accentué\n".encode()
    files["données/naïve résumé.bin"] = rng.randbytes(1500)
    files["with space/file name.txt"] = b"spaces in both components\n"

    # Edge contents.
    files["empty.bin"] = b""
    files["a/b/c/empty-too.txt"] = b""  # same object as empty.bin: another duplicate
    dup = rng.randbytes(4096)
    files["dup/one.bin"] = dup
    files["dup/nested/two.bin"] = dup
    files["bin/nul.bin"] = b"\x00" * 64 + b"\r\n" + rng.randbytes(2000) + b"\x00\r\n"
    files["bin/random-200k.bin"] = rng.randbytes(200 * 1024)
    files["bin/one-byte"] = b"\n"

    # Filler: a spread of sizes and kinds to reach ~40 files.
    for i in range(16):
        size = rng.choice([10, 100, 1000, 5000, 20000, 60000])
        if i % 3 == 0:
            files[f"shards/part-{i:02d}.txt"] = _text(rng, max(1, size // 40), eol=b"\n")
        else:
            files[f"shards/part-{i:02d}.bin"] = rng.randbytes(size)
    return files
