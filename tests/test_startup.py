"""Start-up: what `datapin --help`, a no-op `datapin materialize` and `datapin-sidecar run` load.

A pod on a warm node waits mostly for start-up (issue 15), so which modules each path imports
is behaviour users depend on: `--help` loads no engine, a run without an s3:// remote loads no
asyncio or aiohttp, and the sidecar's `run` never loads the node agent (the CSI plugin, gRPC,
the Kubernetes client) or aiohttp's server. Each case runs the real console script (or the
program, as testkit.sidecarproc starts it) in a fresh process with PYTHONPROFILEIMPORTTIME=1,
which makes the interpreter name every module it imports on stderr; nothing here is timed (the
timings are bench/bench_startup.py's). The cases fail if a top-level import comes back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from datapin_sidecar import cli
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import LayoutChoice
from datapin_sidecar.engine.linker import Strategy
from datapin_sidecar.pins import ANNOTATION, format_downward_annotations
from datapin_sidecar.remotes.endpoint import Addressing

from testkit.k8svolume import kubelet_update
from testkit.launcher import free_ports
from testkit.sidecarproc import SidecarProcess
from testkit.trees import put_revision

#: Never needed to parse arguments, nor by a run without an S3 remote.
HEAVY = ("asyncio", "aiohttp", "pydantic", "pydantic_settings", "prometheus_client", "yaml")
#: The node agent's world (the CSI plugin, gRPC, the Kubernetes API), which `datapin-sidecar run`
#: must not load, and aiohttp, which a directory remote and the probe server do not need.
AGENT = (
    "datapin_sidecar.node.agent",
    "datapin_sidecar.node.plugin",
    "datapin_sidecar.csi.plugin",
    "datapin_sidecar.csi.rpc",
    "datapin_sidecar.csi.kubeapi",
    "grpc",
    "aiohttp",
)


def imported(stderr: str) -> set[str]:
    """The modules an interpreter run with PYTHONPROFILEIMPORTTIME=1 reported importing."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.MULTILINE))


def loaded(modules: set[str], prefixes: Sequence[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


def datapin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("datapin")
    if exe is None:
        pytest.fail("the `datapin` console script is not installed: run scripts/setup")
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, env=env(), check=False
    )


def test_the_cli_spells_out_the_engines_choices() -> None:
    """`--link`, `--layout` and `--addressing` are listed in the CLI so that parsing loads
    neither the engine nor the remotes; they must stay the enums' values."""
    assert tuple(s.value for s in Strategy) == cli.LINKS
    assert tuple(c.value for c in LayoutChoice) == cli.LAYOUTS
    assert tuple(a.value for a in Addressing) == cli.ADDRESSINGS


def test_help_loads_no_engine_no_event_loop() -> None:
    proc = datapin("--help")
    assert proc.returncode == 0, proc.stderr
    assert "materialize" in proc.stdout
    modules = imported(proc.stderr)
    assert "datapin_sidecar.cli" in modules, "PYTHONPROFILEIMPORTTIME reported nothing"
    assert loaded(modules, HEAVY) == []
    assert loaded(modules, ("datapin_sidecar.engine", "datapin_sidecar.remotes")) == []


def test_bad_usage_loads_nothing_either() -> None:
    proc = datapin("materialize", "--cache", "c", "--dest", "d", "--link", "sideways")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
    assert loaded(imported(proc.stderr), (*HEAVY, "datapin_sidecar.engine")) == []


def test_noop_with_a_directory_remote_loads_no_event_loop(rootfs_dir: Path) -> None:
    remote = rootfs_dir / "remote"
    rev = put_revision(NodeCache(remote), {f"d/f{i}.txt": b"x%d" % i for i in range(50)}).oid
    args: tuple[str | Path, ...] = ("materialize", "--cache", rootfs_dir / "cache")
    args += ("--dest", rootfs_dir / "dest", "--rev", rev, "--remote", remote, "--json")
    first = datapin(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["noop"] is False
    noop = datapin(*args)
    assert noop.returncode == 0, noop.stderr
    assert json.loads(noop.stdout)["noop"] is True
    modules = imported(noop.stderr)
    assert "datapin_sidecar.engine.materialize" in modules
    assert loaded(modules, HEAVY) == []


def pod_settings(
    tmp_path: Path, rev: str, *, root: Path, dataset: dict[str, str]
) -> dict[str, object]:
    """The settings of a pod of one dataset pinned to `rev`, its pin in a downward-API file."""
    podinfo = tmp_path / "podinfo"
    pins = json.dumps({dataset["name"]: {"pin": rev, "ref": "v1"}})
    kubelet_update(
        podinfo,
        {"annotations": format_downward_annotations({ANNOTATION: pins})},
        "2026_12_02_00_00_00.1",
    )
    return {
        "root": str(root),
        "pod_uid": str(uuid.uuid4()),
        "datasets": [dataset],
        "annotations_file": str(podinfo / "annotations"),
        "log_format": "json",
    }


def test_sidecar_run_loads_neither_the_agent_nor_aiohttp(rootfs_dir: Path, tmp_path: Path) -> None:
    """`run` with a directory remote, to ready, then a clean stop: none of the agent's world."""
    remote = rootfs_dir / "remote"
    rev = put_revision(NodeCache(remote), {"a.txt": b"a", "b/c.txt": b"c"}).oid
    settings = pod_settings(
        tmp_path, rev, root=rootfs_dir / "node", dataset={"name": "ds", "remote": str(remote)}
    )
    sidecar = SidecarProcess("run", tmp_path, settings)
    sidecar.env["PYTHONPROFILEIMPORTTIME"] = "1"
    with sidecar:
        sidecar.wait_until("/readyz 200", lambda: sidecar.get("/readyz")[0] == 200)
        assert sidecar.get("/healthz")[0] == 200
        assert "datapin_ready 1.0" in sidecar.get("/metrics")[1]
        assert sidecar.stop() == 0
    modules = imported(sidecar.output())
    assert "datapin_sidecar.node.sidecar" in modules, sidecar.output()[-2000:]
    assert loaded(modules, AGENT) == []


def test_a_warm_start_from_an_s3_remote_opens_no_connection_and_loads_no_http_client(
    rootfs_dir: Path, tmp_path: Path
) -> None:
    """A pod whose revision is already on the node never reads its S3 remote, so `run` is ready
    without loading aiohttp: the remote opens at its first use (node.remotes.LazyRemote). The
    endpoint is a port nobody listens on: a connection attempt would fail the start."""
    (port,) = free_ports(1)
    root = rootfs_dir / "node"
    rev = put_revision(NodeCache(root / "cache"), {"a.txt": b"a", "b/c.txt": b"c"}).oid
    endpoint = f"http://127.0.0.1:{port}"
    dataset = {"name": "ds", "remote": "s3://bucket/store", "endpoint_url": endpoint}
    settings = pod_settings(tmp_path, rev, root=root, dataset=dataset)
    sidecar = SidecarProcess("run", tmp_path, settings)
    sidecar.env |= {
        "PYTHONPROFILEIMPORTTIME": "1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "never-used-" + uuid.uuid4().hex,
    }
    with sidecar:
        sidecar.wait_until("/readyz 200", lambda: sidecar.get("/readyz")[0] == 200)
        assert sidecar.stop() == 0
    modules = imported(sidecar.output())
    assert "datapin_sidecar.node.sidecar" in modules, sidecar.output()[-2000:]
    assert loaded(modules, ("aiohttp", "datapin_sidecar.remotes.s3client")) == []


def test_ctrl_c_during_a_run_lets_it_finish_then_exits_130(rootfs_dir: Path) -> None:
    """Without an event loop the materialiser runs in a thread of the CLI's own; Ctrl-C must
    still do what it did under `asyncio.run`: wait for the run to publish (never leave a
    half-built tree behind an exiting interpreter), then exit 130."""
    remote = rootfs_dir / "remote"
    rev = put_revision(NodeCache(remote), {f"d{i % 50}/f{i}": b"%d" % i for i in range(1500)}).oid
    dest = rootfs_dir / "dest"
    exe = shutil.which("datapin")
    assert exe is not None
    args = ["materialize", "--cache", str(rootfs_dir / "cache"), "--dest", str(dest)]
    proc = subprocess.Popen(
        [exe, *args, "--rev", rev, "--remote", str(remote)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first progress line: the worker thread is running
    assert first.startswith("progress:"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "datapin: interrupted" in err
    assert [p.name for p in (dest / ".revs").iterdir() if p.name.startswith(".build-")] == []
    assert (dest / "current").is_dir(), "the run was cut short instead of finishing"
