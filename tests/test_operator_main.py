"""`datapin-operator` as users run it: the console script's commands, and the docs it feeds.

The `run`/`dev` commands are exercised by the operator tests (the same `run()` coroutine);
here: the installed console script prints a CRD equal to the chart's, RBAC manifests that
pass the Kubernetes schemas, every setting, and bad settings exit 2 with the variable named.
The RBAC table in docs/architecture.md must be the one the code generates, so the docs never
promise less privilege than the operator takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from datapin_operator.api.crd import CHART_CRD_PATH
from datapin_operator.api.rbac import rbac_table

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("datapin-operator")
    if exe is None:
        pytest.skip("datapin-operator is not installed (run `pip install -e .`)")
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


def test_crd_command_prints_the_charts_crd() -> None:
    done = _run("crd")
    assert done.returncode == 0, done.stderr
    assert done.stdout == CHART_CRD_PATH.read_text()


def test_rbac_command_prints_valid_least_privilege_manifests() -> None:
    done = _run("rbac", env={**os.environ, "DATAPIN_NAMESPACE": "datapin-system"})
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"]
    for doc in docs:
        for version in ("1.29", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "datapin-system"


def test_settings_command_lists_every_setting() -> None:
    done = _run("settings")
    assert done.returncode == 0
    for name in ("DATAPIN_WEBHOOK_MODE", "DATAPIN_SIDECAR_IMAGE", "DATAPIN_GIT_ALLOW_PROTOCOLS"):
        assert name in done.stdout


def test_bad_settings_exit_2_naming_the_variable() -> None:
    done = _run("run", env={**os.environ, "DATAPIN_WEBHOOK_MODE": "sometimes"})
    assert done.returncode == 2
    assert "DATAPIN_WEBHOOK_MODE" in done.stderr
    assert "sometimes" in done.stderr


def test_the_documented_rbac_table_is_the_generated_one() -> None:
    docs = (ROOT / "docs" / "architecture.md").read_text()
    assert rbac_table() in docs, "docs/architecture.md: paste `rbac_table()` output again"
