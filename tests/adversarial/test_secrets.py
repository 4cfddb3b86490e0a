"""Adversarial: a key is never echoed, whatever file it was pasted into.

People paste the secret into the key-id file, the key id into the secret's, either into a
`.env` or `config.local`, or a key where a key *name* goes. A canary key is planted in each of
those places and then looked for in everything a user sees: the CLI's stderr, the sidecar's
log lines and its termination message. One case uses an S3 server that echoes the request's
Authorization header (the key id) back in its error message, as some stores do.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.k8svolume import kubelet_update
from testkit.seaweed import SeaweedServer

#: Looks like a B2 applicationKey: base64 with '/' and '+' (the '/' once crashed the sidecar).
CANARY = "K005Canary/Secret+Value0123456789"
REV = "f" * 32 + ".dir"


def datapin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("datapin")
    if exe is None:
        pytest.fail("the `datapin` console script is not installed: run scripts/setup")
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert CANARY not in text
        assert json.dumps(CANARY)[1:-1] not in text
        assert "Traceback" not in text


def _s3_args(tmp_path: Path, endpoint: str, bucket: str) -> list[str | Path]:
    return [
        "materialize", "--cache", tmp_path / "cache", "--dest", tmp_path / "dest",
        "--rev", REV, "--remote", f"s3://{bucket}/store", "--endpoint-url", endpoint,
        "--quiet",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "where", ["secret-in-id-file", "id-in-secret-file", "env-file", "config-local"]
)
def test_cli_never_echoes_a_misplaced_key(
    tmp_path: Path, seaweed: SeaweedServer, s3_bucket: str, where: str
) -> None:
    args = _s3_args(tmp_path, seaweed.endpoint, s3_bucket)
    if where in ("secret-in-id-file", "id-in-secret-file"):
        keys = (
            {"AWS_ACCESS_KEY_ID": CANARY, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
            if where == "secret-in-id-file"
            else {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": CANARY}
        )
        kubelet_update(tmp_path / "secret", keys, "2026_12_01_00_00_00.1")
        args += ["--credentials-dir", tmp_path / "secret"]
    elif where == "env-file":
        env_file = tmp_path / ".env"
        env_file.write_text(f"AWS_ACCESS_KEY_ID={CANARY}\nAWS_SECRET_ACCESS_KEY={CANARY}\n")
        args += ["--env-file", env_file]
    else:
        repo = tmp_path / "repo"
        (repo / ".dvc").mkdir(parents=True)
        (repo / ".dvc" / "config").write_text(
            f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{s3_bucket}/store\n"
            f"    endpointurl = {seaweed.endpoint}\n"
        )
        (repo / ".dvc" / "config.local").write_text(
            f"['remote \"s3\"']\n    access_key_id = {CANARY}\n"
            f"    secret_access_key = {seaweed.secret_key}\n"
        )
        args = [*list(args[:7]), "--dvc-repo", repo, "--quiet"]
    proc = datapin(*args)
    assert proc.returncode == 8, proc.stderr
    assert (
        "InvalidAccessKeyId" in proc.stderr
        or "SignatureDoesNotMatch" in proc.stderr
        or ("Credential" in proc.stderr)
    )
    assert_hidden(proc.stderr, proc.stdout)


class _EchoingS3(http.server.BaseHTTPRequestHandler):
    """Answers every request with an error quoting its Authorization header."""

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization", "")
        body = (
            f"<Error><Code>WeirdError</Code><Message>cannot use {auth}</Message></Error>"
        ).encode()
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def echoing_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_masks_a_key_the_server_echoes(tmp_path: Path, echoing_s3: str) -> None:
    kubelet_update(
        tmp_path / "secret",
        {"AWS_ACCESS_KEY_ID": CANARY, "AWS_SECRET_ACCESS_KEY": "an-ordinary-secret"},
        "2026_12_01_00_00_00.1",
    )
    args = _s3_args(tmp_path, echoing_s3, "bucket-x")
    proc = datapin(*args, "--credentials-dir", tmp_path / "secret")
    assert proc.returncode == 8, proc.stderr
    assert "WeirdError" in proc.stderr
    assert "[redacted]" in proc.stderr
    assert_hidden(proc.stderr)


def _sidecar_once(tmp_path: Path, dataset: dict[str, object]) -> tuple[int, str, str]:
    exe = shutil.which("datapin-sidecar")
    if exe is None:
        pytest.fail("the `datapin-sidecar` console script is not installed: run scripts/setup")
    termination = tmp_path / "termination-log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        "DATAPIN_ROOT": str(tmp_path / "root"),
        "DATAPIN_POD_UID": str(uuid.uuid4()),
        "DATAPIN_TERMINATION_MESSAGE_PATH": str(termination),
        "DATAPIN_LOG_FORMAT": "json",
        "DATAPIN_DATASETS": json.dumps([{"name": "images", "pin": REV, **dataset}]),
    }
    proc = subprocess.run(
        [exe, "once"], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    message = termination.read_text() if termination.exists() else ""
    return proc.returncode, proc.stdout + proc.stderr, message


@pytest.mark.parametrize(
    ("dataset_extra", "code"),
    [
        ({"access_key_id_file": CANARY}, 2),  # a key pasted where the key's *name* goes
        ({"access_key_id_file": "K005CanarySecretValue0123456789"}, 2),
        ({"secret_access_key_file": CANARY}, 2),
        ({"secret_access_key": CANARY}, 2),  # a key pasted into the dataset itself
    ],
    ids=["slash-name", "plain-name", "secret-name", "extra-field"],
)
def test_sidecar_never_echoes_a_key_in_its_settings(
    tmp_path: Path, dataset_extra: dict[str, str], code: int
) -> None:
    secret = tmp_path / "secret"
    kubelet_update(
        secret, {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}, "2026_12_01_00.1"
    )
    dataset = {
        "remote": "s3://bucket-x/store",
        "endpoint_url": "http://127.0.0.1:9",
        "credentials_dir": str(secret),
        **dataset_extra,
    }
    returncode, output, message = _sidecar_once(tmp_path, dataset)
    assert returncode == code, output
    assert message
    if dataset_extra.get("access_key_id_file", "").startswith("K005CanarySecret"):
        assert "K005CanarySecret" not in output + message
    assert_hidden(output, message)


def test_sidecar_secret_pasted_into_the_key_id_file(
    tmp_path: Path, seaweed: SeaweedServer, s3_bucket: str
) -> None:
    secret = tmp_path / "secret"
    kubelet_update(
        secret,
        {"AWS_ACCESS_KEY_ID": CANARY, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key},
        "2026_12_01_00.1",
    )
    dataset = {
        "remote": f"s3://{s3_bucket}/store",
        "endpoint_url": seaweed.endpoint,
        "credentials_dir": str(secret),
    }
    returncode, output, message = _sidecar_once(tmp_path, dataset)
    assert returncode == 8, output
    assert message
    assert_hidden(output, message)


@pytest.mark.parametrize(
    "datasets",
    [
        [{"name": "images", "remote": "/r"}, CANARY],  # a key pasted as a list item
        [{"name": "images", "remote": f"https://id:{CANARY}@host"}],  # a key in a URL
        [{"name": "images", "remote": "/r", "endpoint_url": 7, "region": None}, {"x": CANARY}],
    ],
    ids=["stray-item", "url-with-key", "unknown-field"],
)
def test_bad_settings_never_quote_a_key(tmp_path: Path, datasets: list[object]) -> None:
    exe = shutil.which("datapin-sidecar")
    assert exe is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        "DATAPIN_TERMINATION_MESSAGE_PATH": str(tmp_path / "termination-log"),
        "DATAPIN_POD_UID": str(uuid.uuid4()),
        "DATAPIN_DATASETS": json.dumps(datasets),
    }
    proc = subprocess.run(
        [exe, "once"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert "DATAPIN_DATASETS" in proc.stderr
    assert_hidden(proc.stderr, (tmp_path / "termination-log").read_text())
