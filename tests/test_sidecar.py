"""The sidecar as a service (`datapin-sidecar run|once`), on real components.

Each test runs the real program as a subprocess, configured only through `DATAPIN_*` variables
the way the webhook will configure it: the node volume is a real reflink XFS, the remote a real
SeaweedFS that real `dvc push` filled (behind the fault proxy when a test needs a slow or
failing remote), the keys a Secret directory and the pins a downward-API annotations file, both
written the way kubelet writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from datapin_sidecar.engine.cache import NodeCache
from datapin_sidecar.engine.hashing import Layout, hash_file

from testkit.dvcremote import S3DvcFixture
from testkit.dvcrepo import DvcFixture, tree_bytes
from testkit.faultproxy import FaultProxy
from testkit.k8svolume import kubelet_update
from testkit.seaweed import SeaweedServer
from testkit.sidecarproc import Pod, SidecarProcess, serving


def _cache_sound(root: Path) -> None:
    """Every object at its final name hashes to its name; no partial object is visible."""
    cache = NodeCache(root / "cache")
    prefix = Path(cache.prefix(Layout.DVC3))
    checked = 0
    for path in prefix.glob("*/*"):
        oid = path.parent.name + path.name
        assert hash_file(path, Layout.DVC3) == oid.removesuffix(".dir"), path
        checked += 1
    assert checked > 0


def test_run_ready_after_publish_and_metrics_cold_then_warm(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    a, _ = dvc3_revisions
    # The .dir arrives late, so there is a window where the sidecar runs but is not ready.
    fault_proxy.latency(2.0, method="GET", path=".dir", times=1)
    pod = Pod(xfs_dir, tmp_path, a, fault_proxy.endpoint)
    pod.pin(a.rev, "v1")
    distinct = {hashlib.md5(v).hexdigest(): len(v) for v in a.files.values()}
    with SidecarProcess("run", tmp_path, pod.settings()) as cold:
        answers = []

        def ready() -> bool:
            code, _ = cold.get("/readyz")
            answers.append(code)
            return code == 200

        cold.wait_until("/readyz 200", ready)
        assert 503 in answers, f"never saw /readyz not ready before ready: {answers[:10]}"
        assert cold.get("/healthz")[0] == 200
        assert tree_bytes(pod.current.resolve()) == a.files
        m = cold.metrics()
        label = (("dataset", "images"),)
        assert m[("datapin_cache_miss_objects_total", label)] == len(a.files)
        assert m[("datapin_cache_hit_objects_total", label)] == 0
        assert m[("datapin_remote_fetched_objects_total", label)] == len(distinct) + 1
        assert m[("datapin_remote_fetched_bytes_total", label)] > sum(distinct.values())
        assert m[("datapin_cache_miss_bytes_total", label)] == sum(len(v) for v in a.files.values())
        info = (
            "datapin_revision_info",
            (("dataset", "images"), ("path", ""), ("pin", a.rev), ("revision", "v1")),
        )
        assert m[info] == 1
        assert m[("datapin_ready", ())] == 1
        assert m[("datapin_last_success_timestamp_seconds", label)] > time.time() - 120
        ok = (("dataset", "images"), ("mode", "reflink"), ("result", "success"))
        assert m[("datapin_materialize_duration_seconds_count", ok)] == 1
        assert m[("datapin_objects_linked_total", (*label, ("mode", "reflink")))] == len(a.files)

        # A second pod on the same node: every object is a hit, nothing crosses the wire.
        fault_proxy.reset_counters()
        warm_pod = Pod(xfs_dir, tmp_path / "warm", a, fault_proxy.endpoint)
        warm_pod.pin(a.rev, "v1")
        with SidecarProcess("run", tmp_path, warm_pod.settings()) as warm:
            warm.wait_until("/readyz 200", lambda: warm.get("/readyz")[0] == 200)
            w = warm.metrics()
            assert w[("datapin_cache_hit_objects_total", label)] == len(a.files)
            assert w[("datapin_cache_hit_bytes_total", label)] == sum(
                len(v) for v in a.files.values()
            )
            assert w[("datapin_cache_miss_objects_total", label)] == 0
            assert w[("datapin_remote_fetched_bytes_total", label)] == 0
            assert tree_bytes(warm_pod.current.resolve()) == a.files
            assert warm.stop() == 0
        assert fault_proxy.gets() == [], "a warm start must not touch the remote"
        assert cold.stop() == 0

    lines = cold.log_lines()
    assert any(line["msg"].startswith("published") for line in lines)
    for line in lines:
        assert line["pod"] == f"ml/{pod.settings()['pod_name']}"
        assert a.secret_key not in json.dumps(line)
    published = next(line for line in lines if line["msg"].startswith("published"))
    assert published["dataset"] == "images"
    assert published["revision"] == "v1"


_READER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    current, expected_path, out_path, stop_path = sys.argv[1:5]
    expected = json.load(open(expected_path))
    seen = {"A": 0, "B": 0, "mixed": 0, "errors": 0, "examples": []}
    while not os.path.exists(stop_path):
        try:
            fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        tree = {}
        try:
            for top, dirs, files, dfd in os.fwalk(dir_fd=fd):
                for name in files:
                    rel = os.path.normpath(os.path.join(top, name))
                    f = os.open(name, os.O_RDONLY, dir_fd=dfd)
                    try:
                        data = b""
                        while chunk := os.read(f, 1 << 20):
                            data += chunk
                    finally:
                        os.close(f)
                    tree[rel] = hashlib.md5(data).hexdigest()
        except OSError as exc:
            seen["errors"] += 1
            seen["examples"].append(repr(exc))
            continue
        finally:
            os.close(fd)
        for name, want in expected.items():
            if tree == want:
                seen[name] += 1
                break
        else:
            seen["mixed"] += 1
            seen["examples"].append(sorted(tree)[:3])
    json.dump(seen, open(out_path, "w"))
    """
)


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in files.items()}


def test_live_switch_reader_sees_whole_revisions_only(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, b = dvc3_revisions
    pod = Pod(xfs_dir, tmp_path, a, seaweed.endpoint)
    pod.pin(a.rev, "v1")
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"A": _digests(a.files), "B": _digests(b.files)}))
    out, stop = tmp_path / "reader.json", tmp_path / "reader.stop"
    with SidecarProcess("run", tmp_path, pod.settings()) as proc:
        proc.wait_until("A served", lambda: proc.get("/readyz")[0] == 200)
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(pod.current), str(expected), str(out), str(stop)]
        )
        try:
            time.sleep(0.5)
            for i, (fx, ref) in enumerate([(b, "v2"), (a, "v1"), (b, "v2"), (a, "v1")]):
                pod.pin(fx.rev, ref)
                proc.wait_until(f"switch {i} to {ref}", lambda fx=fx: serving(proc, fx.rev))
                assert tree_bytes(pod.current.resolve()) == fx.files
                time.sleep(0.7)
        finally:
            stop.touch()
            reader.wait(60)
        seen = json.loads(out.read_text())
        assert seen["mixed"] == 0, seen
        assert seen["errors"] == 0, seen
        assert seen["A"] > 0, seen
        assert seen["B"] > 0, seen
        # The switches were builds beside the served tree, then one swap each.
        m = proc.metrics()
        info = (
            "datapin_revision_info",
            (("dataset", "images"), ("path", ""), ("pin", a.rev), ("revision", "v1")),
        )
        assert m[info] == 1
        assert not any(k[0] == "datapin_revision_info" and ("pin", b.rev) in k[1] for k in m)
        assert proc.stop() == 0


def test_garbage_annotations_keep_the_previous_revision(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, b = dvc3_revisions
    pod = Pod(xfs_dir, tmp_path, a, seaweed.endpoint)
    pod.pin(a.rev, "v1")
    with SidecarProcess("run", tmp_path, pod.settings()) as proc:
        proc.wait_until("A served", lambda: proc.get("/readyz")[0] == 200)
        kubelet_update(pod.podinfo, {"annotations": 'datapin.dev/pins="{not json\n'}, "garbage.1")
        proc.wait_until(
            "the error counted", lambda: proc.sample("datapin_annotations_errors_total") >= 1
        )
        assert proc.get("/readyz")[0] == 200
        assert tree_bytes(pod.current.resolve()) == a.files
        errors = [line for line in proc.log_lines() if line["level"] == "error"]
        assert any(
            "datapin.dev/pins" in line["msg"] and "still serving" in line["msg"] for line in errors
        ), errors
        # A good file again: the sidecar follows it.
        pod.pin(b.rev, "v2")
        proc.wait_until("B served", lambda: serving(proc, b.rev))
        assert tree_bytes(pod.current.resolve()) == b.files
        assert proc.stop() == 0


def test_sigterm_mid_download_leaves_a_consistent_cache(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    fault_proxy: FaultProxy,
) -> None:
    a, _ = dvc3_revisions
    fault_proxy.latency(0.3, method="GET", times=None)  # every request slow: cold takes ~s
    pod = Pod(xfs_dir, tmp_path, a, fault_proxy.endpoint)
    pod.pin(a.rev, "v1")
    proc = SidecarProcess("run", tmp_path, pod.settings(jobs=4)).start()
    try:
        proc.wait_until("downloads under way", lambda: len(fault_proxy.gets()) > 8)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = proc.wait(30)
        took = time.monotonic() - started
    finally:
        proc.stop()
    assert code == 0, proc.output()[-3000:]
    assert took < 10, f"SIGTERM took {took:.1f} s to stop the sidecar"
    assert not pod.current.exists(), "nothing may be published by a cancelled first run"
    revs = pod.current.parent / ".revs"
    leftovers = [n for n in os.listdir(revs) if n.startswith(".build-")] if revs.exists() else []
    assert leftovers == [], leftovers
    _cache_sound(xfs_dir)
    # The next run repairs whatever was left and publishes.
    fault_proxy.clear_faults()
    with SidecarProcess("run", tmp_path, pod.settings()) as again:
        again.wait_until("ready", lambda: again.get("/readyz")[0] == 200)
        assert tree_bytes(pod.current.resolve()) == a.files
    _cache_sound(xfs_dir)


def test_once_publishes_and_exits_zero(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, _ = dvc3_revisions
    pod = Pod(xfs_dir, tmp_path, a, seaweed.endpoint)
    pod.pin(a.rev, "v1")
    proc = SidecarProcess("once", tmp_path, pod.settings()).start()
    assert proc.wait(120) == 0, proc.output()
    assert tree_bytes(pod.current.resolve()) == a.files
    assert proc.termination_message() == ""


def test_once_failure_writes_the_termination_message(
    xfs_dir: Path,
    tmp_path: Path,
    dvc3_revisions: tuple[S3DvcFixture, S3DvcFixture],
    seaweed: SeaweedServer,
) -> None:
    a, _ = dvc3_revisions
    pod = Pod(xfs_dir, tmp_path, a, seaweed.endpoint)
    missing = "0123456789abcdef0123456789abcdef.dir"
    pod.pin(missing, "v9")
    proc = SidecarProcess("once", tmp_path, pod.settings()).start()
    assert proc.wait(120) == 4, proc.output()
    message = proc.termination_message()
    assert "dataset images" in message
    assert missing in message
    assert "Fix:" in message
    assert a.secret_key not in message + proc.output()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"jobs": "0"}, "DATAPIN_JOBS: Input should be greater than or equal to 1 (got '0')"),
        ({"gc_low_percent": "95"}, "DATAPIN_GC_LOW_PERCENT must be below DATAPIN_GC_HIGH_PERCENT"),
        ({"datasets": "[{]"}, "DATAPIN_DATASETS: not valid JSON"),
        ({"link": "symlink"}, "DATAPIN_LINK: Input should be 'auto', 'reflink', 'hardlink' or"),
        (
            {"datasets": [{"name": "Images", "remote": "ftp://x"}]},
            "DATAPIN_DATASETS[0].name: must be a Kubernetes resource name",
        ),
    ],
)
def test_bad_settings_fail_at_start_with_one_line_per_field(
    tmp_path: Path, settings: dict[str, Any], expected: str
) -> None:
    proc = SidecarProcess("run", tmp_path, {"pod_uid": str(uuid.uuid4()), **settings}).start()
    assert proc.wait(30) == 2
    out = proc.output()
    assert expected in out, out
    assert proc.get("/readyz")[0] == 0, "a bad setting must fail before serving anything"
    assert expected in proc.termination_message()


def test_two_bad_settings_give_two_lines(tmp_path: Path) -> None:
    proc = SidecarProcess("agent", tmp_path, {"jobs": "-1", "gc_interval_seconds": "soon"}).start()
    assert proc.wait(30) == 2
    lines = [line for line in proc.output().splitlines() if line.startswith("  DATAPIN_")]
    assert [line.split(":")[0].strip() for line in lines] == [
        "DATAPIN_JOBS",
        "DATAPIN_GC_INTERVAL_SECONDS",
    ], proc.output()


def test_once_outside_kubernetes_with_pins_in_settings(
    fs_dir: Path, tmp_path: Path, dvc3_fixture: DvcFixture
) -> None:
    """No annotations file, no pod uid: the dataset's `pin` and DATAPIN_WORKSPACE_DIR, and a DVC
    directory remote, as the README shows. On a filesystem without reflinks too."""
    settings = {
        "root": str(fs_dir),
        "workspace_dir": str(fs_dir / "me"),
        "datasets": [{"name": "data", "remote": str(dvc3_fixture.remote), "pin": dvc3_fixture.rev}],
        "log_format": "json",
    }
    proc = SidecarProcess("once", tmp_path, settings).start()
    assert proc.wait(120) == 0, proc.output()
    assert tree_bytes((fs_dir / "me" / "data" / "current").resolve()) == dvc3_fixture.files
    lines = proc.log_lines()
    assert any(line["msg"].startswith("published") and line["dataset"] == "data" for line in lines)


def test_run_without_pins_says_how_to_give_them(tmp_path: Path) -> None:
    settings = {
        "workspace_dir": str(tmp_path / "ws"),
        "root": str(tmp_path),
        "datasets": [{"name": "data", "remote": str(tmp_path)}],
    }
    proc = SidecarProcess("run", tmp_path, settings).start()
    assert proc.wait(30) == 2
    assert "DATAPIN_ANNOTATIONS_FILE" in proc.termination_message()
    assert "(no pin: data)" in proc.termination_message()
