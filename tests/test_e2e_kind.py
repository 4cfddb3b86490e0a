"""End to end on a real cluster (kind): a Job annotated for a Dataset reads the pinned bytes.

What users depend on, checked through the real chart, operator, webhook, sidecar and remote:
after `helm install`, a Dataset naming a revision becomes Ready; a Job asking for it with
`datapin.dev/dataset` / `datapin.dev/revision` / `datapin.dev/mount-path` is admitted with
`datapin.dev/pins` recording that revision's pin; and its container finds exactly the
revision's files, byte for byte (md5 of every file), at `<mount path>/current`.

It runs only when everything is there, and otherwise skips naming *every* missing thing and
the fix (`-rs` prints it): a kubeconfig and a reachable API server (probed with `kubectl
version --request-timeout=5s` under a process timeout, so it never hangs), `kubectl` and
`helm` on PATH, the chart in this tree (issue 6), and the remote below. Variables that are set
but malformed fail the test instead: a CI job configured wrongly must not pass as skipped.
Setting the remote variables is the opt-in: a laptop whose ~/.kube/config points at a real
cluster is not touched unless they are set.

Environment (`make kind-e2e` sets these):

    DATAPIN_E2E_KUBECONFIG         kubeconfig of the cluster (default: $KUBECONFIG, then
                                   ~/.kube/config); its current context is used
    DATAPIN_E2E_REMOTE             s3://BUCKET/PREFIX, the DVC remote the dataset was pushed to
    DATAPIN_E2E_ENDPOINT           http(s):// S3 endpoint as reached from INSIDE the cluster
    DATAPIN_E2E_ACCESS_KEY_ID      the remote's keys (put in a Secret through stdin; never in
    DATAPIN_E2E_SECRET_ACCESS_KEY  an argument list, a log or an error message)
    DATAPIN_E2E_PIN                <md5>.dir of the pushed directory (the .dvc file's md5)
    DATAPIN_E2E_FILES              path of a JSON file {"relative/path": "<md5>", ...} listing
                                   EVERY file of that revision (extra files fail the test)
    DATAPIN_E2E_IMAGE              optional: the datapin image as repository:tag, passed to the
                                   chart as image.repository / image.tag (e.g. an image loaded
                                   with `kind load docker-image`); unset: the chart's default
    DATAPIN_E2E_READER_IMAGE       optional: the reading container's image (default
                                   busybox:1.36; set it for clusters without registry access)

The cluster's nodes must carry the node volume the chart's settings name (kind-config.yaml
mounts it). The chart is installed as release `datapin` in namespace `datapin-e2e`
(`helm upgrade --install --wait`), and each test works in a fresh namespace. Teardown always
runs, in this order: the test namespace is deleted while the operator still runs (it may hold
finalizers on the Dataset), then the release is uninstalled, then `datapin-e2e` is deleted if
the test created it. The Job is polled for Complete *or* Failed rather than `kubectl wait
--for=condition=complete`, which would sit out its whole 10-minute timeout on a failed Job;
every failure message carries `diagnostics()` (objects, events, logs of every container and
of the operator).

The first tests check the skip logic itself on this machine, without a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest
from datapin_operator.api.crd import validate_dataset
from datapin_operator.settings import Settings
from datapin_operator.webhook.requests import parse_request

from testkit import podsecurity
from testkit.kind import (
    REMOTE_VARS,
    Cluster,
    E2EConfig,
    E2EConfigError,
    E2EUnavailable,
    compare_files,
    condition,
    diagnostics,
    job_outcome,
    load_config,
    parse_md5sum,
    wait_for,
)
from testkit.procs import CommandError, which

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
RELEASE: Final = "datapin"
OPERATOR_NAMESPACE: Final = "datapin-e2e"
DATASET: Final = "e2e"
SECRET: Final = "e2e-remote"
JOB: Final = "e2e-read"
READER: Final = "reader"
MOUNT_PATH: Final = "/data/e2e"
PINS_KEY: Final = "datapin.dev/pins"
RESTRICTED_LABEL: Final = "pod-security.kubernetes.io/enforce"
#: The chart's webhook configuration; the operator fills in its caBundle once it serves.
WEBHOOK_CONFIGURATION: Final = Settings.model_fields["webhook_configuration"].default


# --- the skip logic, checked here without a cluster ----------------------------------------


def test_every_missing_precondition_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(E2EUnavailable) as caught:
        load_config({}, repo_root=tmp_path, home=tmp_path)
    reason = caught.value.reason
    assert f"no kubeconfig at {tmp_path / '.kube' / 'config'}" in reason
    assert "kind create cluster --config kind-config.yaml" in reason
    assert "helm not found" in reason
    assert "the chart is not in this tree yet (issue 6)" in reason
    for name in REMOTE_VARS:
        assert name in reason
    if which("kubectl") is None:  # which() also searches the sbin directories, not on PATH
        assert "kubectl not found" in reason


def test_unreachable_cluster_is_reported_not_waited_on(tmp_path: Path) -> None:
    kubectl = which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found on PATH: the cluster probe cannot be exercised")
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
                "current-context": "gone",
            }
        )
    )
    start = time.monotonic()
    with pytest.raises(E2EUnavailable) as caught:
        load_config({"DATAPIN_E2E_KUBECONFIG": str(kubeconfig)}, repo_root=tmp_path, home=tmp_path)
    assert time.monotonic() - start < 30
    assert f"no reachable cluster with kubeconfig {kubeconfig}" in caught.value.reason
    assert f"127.0.0.1:{port}" in caught.value.reason  # kubectl's own explanation is kept


def test_md5sum_output_is_read_back_exactly(tmp_path: Path) -> None:
    md5sum = which("md5sum")
    if md5sum is None:
        pytest.skip("md5sum (coreutils) not found: its output format cannot be checked")
    files = {"a.bin": b"\x00" * 10, "dir/b c.txt": b"space", "dir/new\nline": b"nl", "d\\e": b""}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    out = subprocess.run(
        ["sh", "-c", f"find . -type f -exec {md5sum} {{}} +"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    expected = {rel: hashlib.md5(data).hexdigest() for rel, data in files.items()}
    assert parse_md5sum(out) == expected
    assert compare_files(expected, expected) == []
    assert compare_files(expected, {**expected, "a.bin": "0" * 32, "x": "1" * 32}) == [
        "unexpected x",
        f"a.bin: md5 {'0' * 32}, expected {expected['a.bin']}",
    ]


def test_the_e2e_manifests_are_what_the_api_server_and_operator_accept(tmp_path: Path) -> None:
    sample = E2EConfig(
        kubeconfig=str(tmp_path / "kubeconfig"),
        kubectl=tmp_path / "kubectl",
        helm=tmp_path / "helm",
        chart=tmp_path,
        remote="s3://bucket/dvcstore",
        endpoint="http://seaweed.e2e.svc:8333",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="wJalrXUtnFEMI",
        pin="bd5cd9ca7c141c3c30a3ebfbe0001e22.dir",
        expected={"a": "0" * 32},
        image=None,
        reader_image="busybox:1.36",
    )
    assert "wJalrXUtnFEMI" not in repr(sample)
    version = kubernetes_validate.latest_version()
    for manifest in (_secret("ns", sample), _job("ns", sample)):
        kubernetes_validate.validate(manifest, version, strict=True)
    assert validate_dataset(_dataset("ns", sample)) == []
    request = parse_request(
        _job("ns", sample)["metadata"]["annotations"],
        mount_root=Settings.model_fields["mount_root"].default,
    )
    assert request is not None
    assert [(m.dataset, m.revision, m.mount_path) for m in request.mounts] == [
        (DATASET, DATASET, MOUNT_PATH)
    ]
    # The namespace enforces `restricted`: the Job's pods must meet it before injection (the
    # injected csi volume keeps them within it: tests/test_pod_security.py).
    assert request.mode == "csi"
    assert podsecurity.restricted(_job("ns", sample)) == []


# --- the end-to-end test -------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e() -> E2EConfig:
    try:
        return load_config(os.environ, repo_root=REPO_ROOT, home=Path.home())
    except E2EUnavailable as exc:
        pytest.skip(exc.reason)
    except E2EConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def cluster(e2e: E2EConfig) -> Cluster:
    return Cluster(e2e)


@pytest.fixture(scope="module")
def operator_namespace(e2e: E2EConfig, cluster: Cluster) -> Iterator[str]:
    """The chart installed as release `datapin` in `datapin-e2e`; uninstalled afterwards."""
    existed = _namespace_exists(cluster, OPERATOR_NAMESPACE)
    args = [
        "upgrade", "--install", RELEASE, str(e2e.chart), "-n", OPERATOR_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "5m",
    ]  # fmt: skip
    if e2e.image is not None:
        repository, tag = e2e.image
        args += ["--set-string", f"image.repository={repository},image.tag={tag}"]
    try:
        try:
            cluster.helm(*args, timeout=360.0)
        except CommandError as exc:
            pytest.fail(f"helm could not install the chart: {exc}\n{_report(cluster, None)}")
        _wait_for_webhook(cluster)
        yield OPERATOR_NAMESPACE
    finally:
        _uninstall(cluster, delete_namespace=not existed)


@pytest.fixture
def namespace(cluster: Cluster, operator_namespace: str) -> Iterator[str]:
    """A fresh namespace for the test's objects, deleted (and waited for) afterwards. It
    enforces the `restricted` Pod Security level: the default (csi) mode must not need more."""
    name = f"datapin-e2e-{secrets.token_hex(4)}"
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {RESTRICTED_LABEL: "restricted"}},
        }
    )
    try:
        yield name
    finally:
        cluster.kubectl(
            "delete", "namespace", name, "--ignore-not-found", "--wait=true", "--timeout=5m",
            timeout=330.0,
        )  # fmt: skip


def test_job_reads_the_pinned_revision(e2e: E2EConfig, cluster: Cluster, namespace: str) -> None:
    cluster.create(_secret(namespace, e2e))
    cluster.create(_dataset(namespace, e2e))
    try:
        wait_for(
            f"Dataset {DATASET} Ready",
            lambda: _ready(cluster.get("dataset", DATASET, namespace)),
            timeout=180.0,
        )
    except TimeoutError as exc:
        ready = condition(cluster.get("dataset", DATASET, namespace), "Ready")
        pytest.fail(f"{exc}; its Ready condition: {ready}\n{_report(cluster, namespace)}")

    try:
        cluster.create(_job(namespace, e2e))
    except CommandError as exc:
        pytest.fail(f"the Job was not admitted: {exc}\n{_report(cluster, namespace)}")
    annotations = cluster.get("job", JOB, namespace)["metadata"].get("annotations") or {}
    assert PINS_KEY in annotations, (
        f"the Job was admitted without {PINS_KEY}: did the webhook see it?\n"
        f"{_report(cluster, namespace)}"
    )
    pins = json.loads(annotations[PINS_KEY])
    assert pins[DATASET]["pin"] == e2e.pin, pins
    assert pins[DATASET]["ref"] == DATASET, pins

    try:
        outcome = wait_for(
            f"Job {JOB}",
            lambda: job_outcome(cluster.get("job", JOB, namespace)),
            timeout=600.0,
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{_report(cluster, namespace)}")
    assert outcome == "Complete", f"Job {JOB} {outcome}\n{_report(cluster, namespace)}"

    logs = cluster.kubectl("logs", f"job/{JOB}", "-c", READER, "-n", namespace).stdout
    problems = compare_files(e2e.expected, parse_md5sum(logs))
    assert not problems, (
        f"{MOUNT_PATH}/current does not hold revision {e2e.pin} exactly "
        f"({len(problems)} problems):\n" + "\n".join(problems[:50]) + "\n"
        f"{_report(cluster, namespace)}"
    )


# --- helpers -------------------------------------------------------------------------------


def _secret(namespace: str, e2e: E2EConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": {
            "AWS_ACCESS_KEY_ID": e2e.access_key_id,
            "AWS_SECRET_ACCESS_KEY": e2e.secret_access_key,
        },
    }


def _dataset(namespace: str, e2e: E2EConfig) -> dict[str, Any]:
    return {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": DATASET, "namespace": namespace},
        "spec": {
            "remote": {
                "url": e2e.remote,
                "endpoint": e2e.endpoint,
                "credentialsSecretRef": {"name": SECRET},
            },
            "revisions": {DATASET: e2e.pin},
        },
    }


def _job(namespace: str, e2e: E2EConfig) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": JOB,
            "namespace": namespace,
            "annotations": {
                "datapin.dev/dataset": DATASET,
                "datapin.dev/revision": DATASET,
                "datapin.dev/mount-path": MOUNT_PATH,
            },
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 600,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    # What the `restricted` level asks of every pod (the namespace enforces it).
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": READER,
                            "image": e2e.reader_image,
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "command": [
                                "sh",
                                "-c",
                                f"cd {MOUNT_PATH}/current && find . -type f -exec md5sum {{}} +",
                            ],
                        }
                    ],
                }
            },
        },
    }


def _ready(dataset: dict[str, Any]) -> str | None:
    ready = condition(dataset, "Ready")
    return "ready" if ready is not None and ready.get("status") == "True" else None


def _namespace_exists(cluster: Cluster, name: str) -> bool:
    proc = cluster.kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name")
    return bool(proc.stdout.strip())


def _wait_for_webhook(cluster: Cluster) -> None:
    """Jobs created before the operator registers its webhook would run without data."""

    def registered() -> str | None:
        proc = cluster.kubectl(
            "get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found",
            "-o", "json",
        )  # fmt: skip
        found = json.loads(proc.stdout) if proc.stdout.strip() else {}
        webhooks = found.get("webhooks") or []
        # The chart creates the configuration; it works once the operator set its caBundle.
        ready = webhooks and all((w.get("clientConfig") or {}).get("caBundle") for w in webhooks)
        return "registered" if ready else None

    try:
        wait_for(f"webhook configuration {WEBHOOK_CONFIGURATION}", registered, timeout=120.0)
    except TimeoutError as exc:
        pytest.fail(f"{exc}: the operator did not set its caBundle\n{_report(cluster, None)}")


def _uninstall(cluster: Cluster, *, delete_namespace: bool) -> None:
    proc = cluster.helm(
        "uninstall", RELEASE, "-n", OPERATOR_NAMESPACE, "--wait", "--timeout", "5m",
        timeout=330.0, check=False,
    )  # fmt: skip
    if proc.returncode != 0 and "not found" not in proc.stderr:
        raise CommandError(proc.args, proc.returncode, proc.stdout, proc.stderr)
    if delete_namespace:
        cluster.kubectl(
            "delete", "namespace", OPERATOR_NAMESPACE, "--ignore-not-found", "--wait=true",
            "--timeout=5m", timeout=330.0,
        )  # fmt: skip


def _report(cluster: Cluster, namespace: str | None) -> str:
    with contextlib.suppress(Exception):  # a report must never hide the failure it explains
        return diagnostics(cluster, namespace=namespace, operator_namespace=OPERATOR_NAMESPACE)
    return "(no diagnostics: kubectl failed)"
