"""The datapin demo: a real DVC repository, materialised cold and warm from a node cache.

Run it with ``sudo demo/run`` (which installs what it needs first) or, once set up,
``sudo python3 demo/demo.py [--keep]``. Everything happens in a fresh temporary work directory
``$W``, removed at the end unless ``--keep`` is given:

1. ``$W/repo``: a real git + DVC 3 repository with a generated dataset ``data/`` (about 2,000
   small files in nested directories plus a few files of some MiB), ``dvc add``-ed, committed
   and ``dvc push``-ed to a directory remote ``$W/remote``. The revision datapin materialises is
   the ``md5`` of ``data.dvc``: DVC's ``<md5>.dir`` object.
2. ``$W/vol``: the "node". As root, with xfsprogs, a 1G sparse XFS image with ``reflink=1`` on a
   loop device; otherwise a plain directory, and the demo says why (datapin then falls back to
   hardlinks or copies, exactly as it would on such a node).
3. The real ``datapin materialize`` CLI, three times: pod-a from an empty node cache (cold: every
   object is fetched from the remote, then linked), pod-b (warm: all cache hits, reflinks only)
   and pod-a again (nothing to do).
4. Checks: pod-b's tree equals the repository's ``data/`` byte for byte, and on XFS
   ``filefrag -v`` shows that its files share their extents with the cache objects.
5. A revision switch: 1% of the files change in the repository (``dvc add`` + ``dvc push``) and
   pod-a moves to the new revision, rebuilding only what changed; then it rolls back.

Design notes: DVC and git run with a hermetic environment (no user config, analytics off, DVC's
state databases inside ``$W``), as in the test suite. Every resource is registered for cleanup
as soon as it exists (``contextlib.ExitStack``), and cleanup runs on success, on errors, on
Ctrl-C and on SIGTERM: unmount (lazily if busy), ``losetup -d``, remove the image, remove
``$W``. The work directory is never deleted while the volume might still be mounted on it.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 2024
VOLUME_SIZE = 1 << 30  # 1 GiB, sparse: costs only what is written

_W = "$W"  # how the work directory is shown in printed commands


class DemoError(RuntimeError):
    """Something the demo needs failed; the message says what and how to fix it."""


# --- output ---------------------------------------------------------------------------------

_step = 0
_workdir_shown: str | None = None


def heading(text: str) -> None:
    global _step  # noqa: PLW0603 - a demo's step counter
    _step += 1
    print(f"\n== {_step}. {text}", flush=True)


def say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def shown(arg: str | os.PathLike[str]) -> str:
    """An argument as printed: the work directory abbreviated to $W."""
    text = str(arg)
    if _workdir_shown and text.startswith(_workdir_shown):
        text = _W + text[len(_workdir_shown) :]
    return text


def show_cmd(cmd: Sequence[str | os.PathLike[str]]) -> None:
    """Print `cmd` as a shell would take it (with $W for the work directory)."""

    def quoted(arg: str) -> str:
        if arg == "|":
            return arg
        text = shown(arg)
        if text.startswith(_W):
            return _W + shlex.quote(text[len(_W) :])
        return shlex.quote(text)

    say("$ " + " ".join(quoted(str(a)) for a in cmd))


# --- running commands -----------------------------------------------------------------------


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    echo: bool = False,
    detached: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, capturing its output; raise `DemoError` with that output if it fails.

    `detached` starts it in its own session, so a second Ctrl-C during cleanup cannot kill it.
    """
    if echo:
        show_cmd(cmd)
    proc = subprocess.run(
        [str(a) for a in cmd],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=detached,
    )
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise DemoError(
            f"`{' '.join(shown(a) for a in cmd)}` failed ({proc.returncode}):\n{output}"
        )
    return proc


class Tools:
    """The executables the demo drives, and the hermetic environment for DVC and git."""

    def __init__(self, workdir: Path) -> None:
        self.dvc = find_dvc3()
        self.datapin = find_datapin()
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DVC_", "GIT_")) and k not in drop
        }
        private = workdir / "dvc-state"
        env.update(
            DVC_NO_ANALYTICS="1",
            DVC_GLOBAL_CONFIG_DIR=str(private / "no-user-config"),
            DVC_SYSTEM_CONFIG_DIR=str(private / "no-user-config"),
            DVC_SITE_CACHE_DIR=str(private / "site-cache"),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL=os.devnull,
            GIT_TERMINAL_PROMPT="0",
            GIT_AUTHOR_NAME="datapin demo",
            GIT_AUTHOR_EMAIL="demo@datapin.invalid",
            GIT_COMMITTER_NAME="datapin demo",
            GIT_COMMITTER_EMAIL="demo@datapin.invalid",
        )
        self.env = env

    def git(self, repo: Path, *args: str) -> None:
        run(["git", *args], cwd=repo, env=self.env, echo=True)

    def dvc_run(self, repo: Path, *args: str) -> None:
        show_cmd(["dvc", *args])
        run([self.dvc, *args], cwd=repo, env=self.env)

    def materialize(self, *args: str | os.PathLike[str]) -> None:
        """Run the real `datapin materialize` and print its summary, indented."""
        show_cmd(["datapin", "materialize", *args])
        proc = run([*self.datapin, "materialize", *args], check=False)
        for line in proc.stdout.splitlines():
            say(f"  {line.replace(_workdir_shown, _W) if _workdir_shown else line}")
        if proc.returncode != 0:
            raise DemoError(f"datapin exited with code {proc.returncode}:\n{proc.stderr.strip()}")


def find_dvc3() -> Path:
    configured = os.environ.get("DATAPIN_DVC3")
    exe = Path(configured) if configured else REPO_ROOT / ".tools" / "dvc3" / "bin" / "dvc"
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise DemoError(f"DVC 3 not found at {exe}: run scripts/setup (or set DATAPIN_DVC3)")
    version = run([exe, "--version"]).stdout.strip()
    if not version.startswith("3."):
        raise DemoError(f"{exe} is DVC {version}, not 3.x: re-run scripts/setup")
    return exe


def find_datapin() -> list[str]:
    """The installed `datapin` console script (next to this Python, else on PATH)."""
    beside = Path(sys.executable).with_name("datapin")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("datapin")
    if found:
        return [found]
    raise DemoError("the `datapin` command is not installed: run scripts/setup")


# --- the dataset ----------------------------------------------------------------------------


def sample_dataset(rng: random.Random) -> dict[str, bytes]:
    """A deterministic dataset shaped like a small image-classification set (~2,000 files)."""
    files: dict[str, bytes] = {}
    classes = [f"class-{i:02d}" for i in range(16)]
    for split, per_class in (("train", 100), ("val", 20)):
        rows = ["path,label"]
        for label, cls in enumerate(classes):
            for i in range(per_class):
                rel = f"images/{split}/{cls}/{i:04d}.bin"
                files[rel] = rng.randbytes(rng.randint(64, 3072))
                rows.append(f"{rel},{label}")
        files[f"labels/{split}.csv"] = ("\n".join(rows) + "\n").encode()
    for i in range(80):
        words = " ".join(rng.choice(("cat", "dog", "bird", "box", "tree")) for _ in range(40))
        files[f"annotations/{i // 20:02d}/{i:03d}.txt"] = f"{i}: {words}\n".encode()
    for i, mib in enumerate((2, 3, 4)):
        files[f"shards/shard-{i:02d}.bin"] = rng.randbytes(mib << 20)
    files["README.txt"] = b"A generated sample dataset for the datapin demo.\n"
    return files


def write_files(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def read_rev(repo: Path) -> str:
    meta: Any = yaml.safe_load((repo / "data.dvc").read_text(encoding="utf-8"))
    rev = str(meta["outs"][0]["md5"])
    if not rev.endswith(".dir"):
        raise DemoError(f"data.dvc does not describe a directory: {meta!r}")
    return rev


def relpaths(root: Path) -> list[str]:
    return sorted(
        str(Path(dirpath, name).relative_to(root))
        for dirpath, _dirs, names in os.walk(root)
        for name in names
    )


def verify_same_tree(tree: Path, reference: Path) -> int:
    """Raise unless `tree` has exactly the files of `reference`, byte for byte; return count."""
    got, want = relpaths(tree), relpaths(reference)
    if got != want:
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise DemoError(
            f"{tree} differs from {reference}: extra {extra[:5]}, missing {missing[:5]}"
        )
    for rel in want:
        if not filecmp.cmp(tree / rel, reference / rel, shallow=False):
            raise DemoError(f"{tree / rel} differs from {reference / rel}")
    return len(want)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# --- the volume -----------------------------------------------------------------------------


def xfs_unavailable_reason() -> str | None:
    """Why this machine cannot make an XFS loop volume, or None if it can try."""
    if os.geteuid() != 0:
        return "not root (mkfs, losetup and mount need root: run `sudo demo/run`)"
    for tool, package in (("mkfs.xfs", "xfsprogs"), ("losetup", "mount"), ("mount", "mount")):
        if shutil.which(tool) is None:
            return f"no `{tool}` (apt-get install {package}, or run scripts/setup)"
    return None


def make_volume(workdir: Path, stack: contextlib.ExitStack, keep: bool) -> tuple[Path, bool]:
    """The node's volume: (path, is_xfs). Teardown is registered on `stack` step by step."""
    vol = workdir / "vol"
    vol.mkdir()
    reason = xfs_unavailable_reason()
    if reason is None:
        image = workdir / "xfs.img"
        try:
            with image.open("wb") as fh:
                fh.truncate(VOLUME_SIZE)
            if not keep:
                stack.callback(image.unlink, missing_ok=True)
            run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", image], echo=True)
            proc = run(["losetup", "-f", "--show", image], check=False, echo=True)
            if proc.returncode != 0:
                raise DemoError(f"losetup failed: {proc.stderr.strip()} (no free loop device?)")
            device = proc.stdout.strip()
            stack.callback(detach, device)
            proc = run(["mount", "-t", "xfs", device, vol], check=False, echo=True)
            if proc.returncode != 0:
                raise DemoError(f"mount failed: {proc.stderr.strip()}")
            stack.callback(unmount, vol)
        except DemoError as exc:
            reason = str(exc)
        else:
            say(f"1G sparse XFS volume with reflink=1 on {device}, mounted at {shown(vol)}")
            return vol, True
    say(f"no XFS volume: {reason}")
    say(f"using a plain directory instead, {shown(vol)}: datapin will try reflinks, then fall")
    say("back to hardlinks (a read-only tree) or copies, as on a node without reflink support")
    return vol, False


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as fh:
        return any(line.split()[1] == target for line in fh if len(line.split()) > 1)


def unmount(vol: Path) -> None:
    for attempt in range(5):
        if not is_mounted(vol):
            return
        if run(["umount", vol], check=False, detached=True).returncode == 0:
            say(f"unmounted {shown(vol)}")
            return
        time.sleep(0.1 * 2**attempt)  # busy: a straggler still has a file open
    run(["umount", "-l", vol], detached=True)
    say(f"unmounted {shown(vol)} (lazily: something still had it open)")


def detach(device: str) -> None:
    for attempt in range(5):
        if run(["losetup", "-d", device], check=False, detached=True).returncode == 0:
            say(f"detached {device}")
            return
        time.sleep(0.1 * 2**attempt)
    say(f"WARNING: could not detach {device}: run `losetup -d {device}`")


def remove_tree(path: Path) -> None:
    """Delete `path` even if it holds read-only trees (hardlinked pods, 0444 cache objects)."""
    if is_mounted(path / "vol"):
        say(f"WARNING: {path}/vol is still mounted; leaving {path} in place")
        return

    def make_writable(func: Callable[..., object], failed: str, _exc: object) -> None:
        os.chmod(Path(failed).parent, 0o755)  # noqa: S103 - our own temp tree, being deleted
        func(failed)

    shutil.rmtree(path, onerror=make_writable)


# --- the demo -------------------------------------------------------------------------------


def demo(workdir: Path, stack: contextlib.ExitStack, keep: bool) -> None:
    tools = Tools(workdir)
    repo, remote = workdir / "repo", workdir / "remote"
    rng = random.Random(SEED)  # noqa: S311 - sample data, not secrets

    heading("A real DVC 3 repository with a sample dataset")
    say(f"work directory: W={workdir}")
    say(f"DVC: {shown(tools.dvc)} ({run([tools.dvc, '--version']).stdout.strip()})")
    repo.mkdir()
    tools.git(repo, "init", "-q", "--initial-branch=main")
    tools.dvc_run(repo, "init", "-q")
    tools.dvc_run(repo, "config", "core.analytics", "false")
    files = sample_dataset(rng)
    write_files(repo / "data", files)
    total = sum(len(b) for b in files.values())
    say(f"(generated data/: {len(files)} files, {size_text(total)}, in nested directories)")
    tools.dvc_run(repo, "add", "data")
    tools.git(repo, "add", "-A")
    tools.git(repo, "commit", "-q", "-m", "Track data with DVC")
    tools.dvc_run(repo, "remote", "add", "-d", "local", str(remote))
    tools.git(repo, "commit", "-q", "-am", "Add the directory remote")
    tools.dvc_run(repo, "push")
    rev1 = read_rev(repo)
    say(f"revision (outs[0].md5 in data.dvc): {rev1}")

    heading("The node's volume")
    vol, on_xfs = make_volume(workdir, stack, keep)
    cache, pods = vol / "cache", vol / "pods"
    cache.mkdir()
    say(f"empty node cache: {shown(cache)}")

    heading("Cold start: pod-a, empty node cache (objects fetched from the remote)")
    pod_a, pod_b = pods / "pod-a", pods / "pod-b"
    common = ("--cache", cache, "--remote", remote)
    tools.materialize(*common, "--rev", rev1, "--dest", pod_a)

    heading("Warm start: pod-b, same revision (every object is already in the cache)")
    before = used_bytes(vol)
    tools.materialize(*common, "--rev", rev1, "--dest", pod_b)
    grown = used_bytes(vol) - before
    say(f"the volume grew by {size_text(grown)} for a {size_text(total)} dataset")

    heading("pod-a again, same revision: nothing to do")
    tools.materialize(*common, "--rev", rev1, "--dest", pod_a)

    heading("Check: pod-b's tree is the repository's data/, byte for byte")
    n = verify_same_tree(pod_b / "current", repo / "data")
    say(f"OK: {n} files identical ({shown(pod_b / 'current')} vs {shown(repo / 'data')})")
    say(f"{shown(pod_b / 'current')} -> {os.readlink(pod_b / 'current')}")
    show_sharing(pod_b, cache, on_xfs)

    heading("Switch revision: change 1% of the files, dvc add + dvc push, move pod-a")
    names = sorted(files)
    changed = names[::100]
    for rel in changed:
        path = repo / "data" / rel
        path.unlink()  # never write in place: the workspace file may share blocks with the cache
        path.write_bytes(rng.randbytes(len(files[rel]) or 1))
    say(f"(rewrote {len(changed)} of {len(names)} files, e.g. data/{changed[1]})")
    tools.dvc_run(repo, "add", "data")
    tools.git(repo, "commit", "-q", "-am", "Update 1% of the data")
    tools.dvc_run(repo, "push")
    rev2 = read_rev(repo)
    say(f"new revision: {rev2}")
    tools.materialize(*common, "--rev", rev2, "--dest", pod_a)
    n = verify_same_tree(pod_a / "current", repo / "data")
    say(f"OK: pod-a now has the new revision ({n} files identical to data/)")
    show_dest(pod_a)

    heading("Roll pod-a back to the first revision (its tree was kept as the spare)")
    tools.materialize(*common, "--rev", rev1, "--dest", pod_a)
    show_dest(pod_a)


def show_sharing(pod: Path, cache: Path, on_xfs: bool) -> None:
    """Evidence that a materialised file and its cache object share blocks (a reflink)."""
    rel = "shards/shard-02.bin"
    file = pod / "current" / rel
    md5 = hashlib.md5(file.read_bytes(), usedforsecurity=False).hexdigest()
    obj = cache / "files" / "md5" / md5[:2] / md5[2:]
    same_inode = os.stat(file).st_ino == os.stat(obj).st_ino
    if not on_xfs:
        kind = "the same inode (a hardlink)" if same_inode else "a separate inode (a copy)"
        say(f"{rel} and its cache object are {kind}; no reflinks without XFS")
        return
    if shutil.which("filefrag") is None:
        say("filefrag not found (apt-get install e2fsprogs): skipping the extent check")
        return
    say(f"{rel}: a separate inode from its cache object, yet the same disk blocks:")
    for path in (file, obj):
        out = run(["filefrag", "-v", path]).stdout
        shared = [line.strip() for line in out.splitlines() if "shared" in line]
        show_cmd(["filefrag", "-v", path, "|", "grep", "shared"])
        for line in shared[:2]:
            say(f"    {line}")
        if not shared:
            raise DemoError(f"no shared extents in {path}: it is not a reflink")


def show_dest(dest: Path) -> None:
    revs = dest / ".revs"
    say(f"{shown(dest / 'current')} -> {os.readlink(dest / 'current')}")
    trees = sorted(p.name for p in revs.iterdir() if p.is_dir() and p.name != ".meta")
    say(f"trees in {shown(revs)}: {', '.join(trees)}")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    global _workdir_shown  # noqa: PLW0603 - set once, for printing
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory and print its path"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # so `kill` cleans up like Ctrl-C does

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="datapin-demo-"))
    _workdir_shown = str(workdir)
    stack = contextlib.ExitStack()
    if not args.keep:
        stack.callback(remove_tree, workdir)
    status = 1
    try:
        demo(workdir, stack, args.keep)
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        status = 130
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
    finally:
        heading("Clean up")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
        if args.keep:
            say(f"kept the work directory: {workdir}")
            if (workdir / "xfs.img").exists():
                say(f"(the XFS volume is unmounted: mount -o loop {workdir}/xfs.img {workdir}/vol)")
        else:
            say(f"removed {workdir}")
    if status == 0:
        print(f"\ndone in {time.monotonic() - started:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
