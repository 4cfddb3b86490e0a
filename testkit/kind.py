"""Support for the end-to-end test against a real cluster (kind): preconditions, tools, reports.

The e2e test (`tests/test_e2e_kind.py`) installs the chart, so it runs only when a cluster,
the tools and a remote holding a pushed dataset are all there, and it must say exactly what is
missing otherwise. Design:

* :func:`load_config` checks every precondition and raises :class:`E2EUnavailable` listing
  *all* missing ones at once (a developer fixes them in one go instead of one rerun each).
  The cluster probe is `kubectl version` with a request timeout and a process timeout, so a
  dead API server costs seconds, never a hang. Variables that are present but malformed raise
  :class:`E2EConfigError` instead: a CI job that sets them wrongly must fail, not skip.
* :class:`Cluster` runs `kubectl` and `helm` as argument lists with `KUBECONFIG` set and a
  timeout on every call, raising :class:`~testkit.procs.CommandError` with the output.
  Manifests go in on stdin, so Secret values never appear in an argument list (visible to
  every process in /proc and quoted in error messages); known secret values are also
  redacted from any output that ends up in an error.
* :func:`diagnostics` gathers what explains a failure (objects, events, pod logs of every
  container including the sidecar, operator logs) but never a Secret's data.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from testkit.procs import CommandError, which

ENV_KUBECONFIG: Final = "DATAPIN_E2E_KUBECONFIG"
ENV_REMOTE: Final = "DATAPIN_E2E_REMOTE"
ENV_ENDPOINT: Final = "DATAPIN_E2E_ENDPOINT"
ENV_ACCESS_KEY_ID: Final = "DATAPIN_E2E_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY: Final = "DATAPIN_E2E_SECRET_ACCESS_KEY"
ENV_PIN: Final = "DATAPIN_E2E_PIN"
ENV_FILES: Final = "DATAPIN_E2E_FILES"
ENV_IMAGE: Final = "DATAPIN_E2E_IMAGE"
ENV_READER_IMAGE: Final = "DATAPIN_E2E_READER_IMAGE"
#: The remote variables, in the order the skip reason names them.
REMOTE_VARS: Final = (
    ENV_REMOTE,
    ENV_ENDPOINT,
    ENV_ACCESS_KEY_ID,
    ENV_SECRET_ACCESS_KEY,
    ENV_PIN,
    ENV_FILES,
)
DEFAULT_READER_IMAGE: Final = "busybox:1.36"
CREATE_CLUSTER: Final = "run `make kind-e2e` or `kind create cluster --config kind-config.yaml`"
_PIN: Final = re.compile(r"[0-9a-f]{32}\.dir")
_MD5: Final = re.compile(r"[0-9a-f]{32}")
_MD5SUM_LINE: Final = re.compile(r"(\\?)([0-9a-f]{32}) [ *](.*)")
_PROBE_TIMEOUT: Final = 20.0
_REPORT_LIMIT: Final = 6000


class E2EUnavailable(RuntimeError):  # noqa: N818 - a skip reason, not an error; name is API
    """Something the e2e test needs is missing; `reason` lists every missing thing and a fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        self.reason = "kind e2e needs: " + "; ".join(
            f"({i}) {p}" for i, p in enumerate(self.problems, 1)
        )
        super().__init__(self.reason)


class E2EConfigError(ValueError):
    """A DATAPIN_E2E_* variable is set but unusable (the message names it and the fix)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class E2EConfig:
    """Everything the e2e test needs, checked. The keys never appear in its repr."""

    kubeconfig: str  # a KUBECONFIG value: one path or several joined by os.pathsep
    kubectl: Path
    helm: Path
    chart: Path
    remote: str
    endpoint: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    pin: str
    expected: Mapping[str, str]  # relative path -> md5 of every file of the revision
    image: tuple[str, str] | None  # (repository, tag) of the datapin image, None: chart's
    reader_image: str

    @property
    def secrets(self) -> tuple[str, str]:
        return (self.access_key_id, self.secret_access_key)


def kubeconfig_value(env: Mapping[str, str], home: Path) -> str:
    """DATAPIN_E2E_KUBECONFIG, else KUBECONFIG, else ~/.kube/config."""
    return env.get(ENV_KUBECONFIG) or env.get("KUBECONFIG") or str(home / ".kube" / "config")


def probe_cluster(kubectl: Path, kubeconfig: str) -> str | None:
    """None if the API server answers `kubectl version`, else why not (bounded in time)."""
    argv = [str(kubectl), "version", "--request-timeout=5s", "-o", "json"]
    try:
        proc = subprocess.run(
            argv,
            env={**os.environ, "KUBECONFIG": kubeconfig},
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"`kubectl version` did not answer within {_PROBE_TIMEOUT:.0f} s"
    try:
        server = json.loads(proc.stdout).get("serverVersion") if proc.stdout.strip() else None
    except json.JSONDecodeError:
        server = None
    if proc.returncode == 0 and server:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"`kubectl version` exited {proc.returncode}"


def load_config(env: Mapping[str, str], *, repo_root: Path, home: Path) -> E2EConfig:
    """The checked configuration; `E2EUnavailable` if anything is missing (all of it listed),
    `E2EConfigError` if a variable is set but malformed."""
    problems: list[str] = []
    kubeconfig = kubeconfig_value(env, home)
    paths = [p for p in kubeconfig.split(os.pathsep) if p]
    if not any(Path(p).is_file() for p in paths):
        problems.append(f"no kubeconfig at {kubeconfig}; {CREATE_CLUSTER}")
    kubectl = which("kubectl")
    if kubectl is None:
        problems.append(
            "kubectl not found on PATH; install it "
            "(https://kubernetes.io/docs/tasks/tools/#kubectl)"
        )
    if kubectl is not None and not problems:
        why = probe_cluster(kubectl, kubeconfig)
        if why is not None:
            problems.append(
                f"no reachable cluster with kubeconfig {kubeconfig} ({why}); {CREATE_CLUSTER}"
            )
    helm = which("helm")
    if helm is None:
        problems.append(
            "helm not found on PATH; install Helm 3 (https://helm.sh/docs/intro/install/)"
        )
    chart = repo_root / "charts" / "datapin"
    if not (chart / "Chart.yaml").is_file():
        problems.append(f"the chart is not in this tree yet (issue 6): no {chart / 'Chart.yaml'}")
    missing = [name for name in REMOTE_VARS if not env.get(name)]
    if missing:
        problems.append(
            f"an S3 remote reachable from the cluster holding a DVC-pushed dataset: set "
            f"{', '.join(missing)} (see the docstring of tests/test_e2e_kind.py; "
            "`make kind-e2e` sets them)"
        )
    if problems:
        raise E2EUnavailable(problems)
    assert kubectl is not None
    assert helm is not None
    return E2EConfig(
        kubeconfig=kubeconfig,
        kubectl=kubectl,
        helm=helm,
        chart=chart,
        remote=_checked(
            env, ENV_REMOTE, r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", "s3://BUCKET/PREFIX"
        ),
        endpoint=_checked(env, ENV_ENDPOINT, r"https?://\S+", "http(s)://HOST[:PORT]"),
        access_key_id=env[ENV_ACCESS_KEY_ID],
        secret_access_key=env[ENV_SECRET_ACCESS_KEY],
        pin=_checked(env, ENV_PIN, _PIN.pattern, "<32 hex digits>.dir"),
        expected=load_manifest(Path(env[ENV_FILES])),
        image=split_image(env[ENV_IMAGE]) if env.get(ENV_IMAGE) else None,
        reader_image=env.get(ENV_READER_IMAGE) or DEFAULT_READER_IMAGE,
    )


def _checked(env: Mapping[str, str], name: str, pattern: str, form: str) -> str:
    value = env[name].strip()
    if not re.fullmatch(pattern, value):
        raise E2EConfigError(f"{name}={value!r} is malformed. Fix: set it to {form}")
    return value


def load_manifest(path: Path) -> dict[str, str]:
    """The expected files, `{relative path: md5}`, from the JSON file at `path`."""
    fix = f'Fix: point {ENV_FILES} at a JSON object {{"relative/path": "<md5>", ...}}'
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise E2EConfigError(f"{ENV_FILES}: cannot read {path} ({exc.strerror}). {fix}") from exc
    except json.JSONDecodeError as exc:
        raise E2EConfigError(f"{ENV_FILES}: {path} is not JSON ({exc.msg}). {fix}") from exc
    if not isinstance(doc, dict) or not doc:
        raise E2EConfigError(f"{ENV_FILES}: {path} is not a non-empty JSON object. {fix}")
    bad = [k for k, v in doc.items() if not isinstance(v, str) or not _MD5.fullmatch(v)]
    if bad:
        raise E2EConfigError(f"{ENV_FILES}: {path}: entries {bad[:5]} are not md5s. {fix}")
    return {str(k).removeprefix("./"): str(v) for k, v in doc.items()}


def split_image(ref: str) -> tuple[str, str]:
    """`registry[:port]/repo[:tag]` -> (repository, tag); the tag defaults to `latest`."""
    if "@" in ref:
        raise E2EConfigError(
            f"{ENV_IMAGE}={ref!r}: digests are not supported. Fix: use repository:tag"
        )
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag or not repository:
        return ref, "latest"
    return repository, tag


def parse_md5sum(output: str) -> dict[str, str]:
    """`md5sum` lines (`<md5>  ./path`, escaped with a leading backslash when the name holds
    a backslash or newline) -> {relative path: md5}; other lines are ignored."""
    files: dict[str, str] = {}
    for line in output.splitlines():
        match = _MD5SUM_LINE.fullmatch(line)
        if match is None:
            continue
        escaped, md5, name = match.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], name)
        files[name.removeprefix("./")] = md5
    return files


def compare_files(expected: Mapping[str, str], seen: Mapping[str, str]) -> list[str]:
    """What differs between the expected and the seen `{path: md5}`, one line per problem."""
    problems = [f"missing {p}" for p in sorted(set(expected) - set(seen))]
    problems += [f"unexpected {p}" for p in sorted(set(seen) - set(expected))]
    problems += [
        f"{p}: md5 {seen[p]}, expected {expected[p]}"
        for p in sorted(set(expected) & set(seen))
        if seen[p] != expected[p]
    ]
    return problems


class Cluster:
    """`kubectl` and `helm` against one kubeconfig, each call bounded by a timeout."""

    def __init__(self, config: E2EConfig) -> None:
        self._config = config
        self._env = {**os.environ, "KUBECONFIG": config.kubeconfig}

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self._config.kubectl), *args], stdin, timeout, check)

    def helm(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self._config.helm), *args], None, timeout, check)

    def create(self, manifest: Mapping[str, Any]) -> None:
        """`kubectl create` from stdin (a webhook rejection raises, with its message)."""
        self.kubectl("create", "-f", "-", stdin=json.dumps(manifest))

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        doc: dict[str, Any] = json.loads(out)
        return doc

    def _run(
        self, argv: list[str], stdin: str | None, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                argv,
                env=self._env,
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out, err = _text(exc.stdout), _text(exc.stderr)
            raise CommandError(argv, None, self._redact(out), self._redact(err)) from None
        if check and proc.returncode != 0:
            raise CommandError(
                argv, proc.returncode, self._redact(proc.stdout), self._redact(proc.stderr)
            )
        return proc

    def _redact(self, text: str) -> str:
        for value in self._config.secrets:
            if value:
                text = text.replace(value, "<redacted>")
        return text


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def wait_for(
    what: str, poll: Callable[[], str | None], *, timeout: float, interval: float = 2.0
) -> str:
    """Call `poll` until it returns a result; `TimeoutError` naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = poll()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


def job_outcome(job: Mapping[str, Any]) -> str | None:
    """The Job's final condition type (Complete or Failed) once it has finished, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in {"Complete", "Failed"} and condition.get("status") == "True":
            return str(condition["type"])
    return None


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The status condition of type `kind`, if any."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def diagnostics(cluster: Cluster, *, namespace: str | None, operator_namespace: str) -> str:
    """What explains a failure: the test namespace's objects, events and pod logs (every
    container, the datapin sidecar included; None: no test namespace yet) and the operator's
    pods, events and logs. No Secret data: Secrets are never listed with their contents."""
    commands: list[tuple[str, ...]] = []
    if namespace is not None:
        commands += [
            ("get", "jobs,pods,datasets", "-n", namespace, "-o", "wide"),
            ("get", "datasets", "-n", namespace, "-o", "yaml"),
            ("describe", "pods", "-n", namespace),
            ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp"),
            ("logs", "-n", namespace, "--all-containers", "--prefix", "--tail=200",
             "-l", "batch.kubernetes.io/job-name"),
        ]  # fmt: skip
    commands += [
        ("get", "pods", "-n", operator_namespace, "-o", "wide"),
        ("get", "events", "-n", operator_namespace, "--sort-by=.lastTimestamp"),
        ("logs", "-n", operator_namespace, "--all-containers", "--prefix", "--tail=200",
         "-l", "app.kubernetes.io/instance=datapin"),
    ]  # fmt: skip
    sections = []
    for args in commands:
        try:
            proc = cluster.kubectl(*args, timeout=30.0, check=False)
            body = (proc.stdout + proc.stderr).strip()
        except CommandError as exc:
            body = str(exc)
        if len(body) > _REPORT_LIMIT:
            body = "...\n" + body[-_REPORT_LIMIT:]
        sections.append(f"--- kubectl {' '.join(args)}\n{body}")
    return "\n".join(sections)
