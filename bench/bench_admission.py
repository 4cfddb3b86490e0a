"""Issue 5 benchmark: the operator's admission path, `Admission.admit()`, beside git itself.

    python -m bench.bench_admission [--quick] [--runs N] [--tags K]

Run it from the repository root (no root needed; ~1 min). It prints a markdown report
(measurements, then ratios) and writes it to bench/results/<UTC>-admission.md. Nothing here is
pass/fail: the exit code is 0 unless something broke.

What the webhook pays for a Job naming a dataset, by the kind of revision it names:

* **literal** `<md5>.dir`, and a **named** revision of the Dataset (`spec.revisions`): no git
  at all; what is left is parsing the annotations, the Secret look-ups and `inject`.
* **Pod of an admitted Job**: the template already carries the sidecar, so the Pod webhook
  returns at once; every Pod of every Job takes this path.
* **git tag, steady state** (`ref_ttl=0`, so `git ls-remote` runs on every admit, as with
  the default 5 s TTL once it has expired; the commit's pin is cached): one `GitSource` for
  all rounds, warmed by an untimed first admit.
* **git tag, listing cached** (`ref_ttl` 1 h): what admits within the TTL cost.
* **git tag, cold**: a fresh `GitSource` and cache directory every time (what the first Job
  after an operator restart, or for a new repository, pays): `init` and its config, then
  `ls-remote`, a shallow blobless fetch, `ls-tree`, and `cat-file` of the one `.dvc` blob
  (which the partial clone fetches lazily).
* **abbreviated sha** (10 hex digits of v1's commit), steady and cold: an abbreviation names
  no ref, so its uniqueness needs the whole history (a blobless fetch of every branch and tag),
  and nothing caches the prefix -> commit answer.

Peers, on the same repository: `git ls-remote <url> v1` (the floor of any fresh answer: one
round trip that lists the ref), `git clone --depth 1 --branch v1 <url> tmp && cat
tmp/data.dvc` (what a naive init container would do to find its pin; the clone is deleted
untimed), and `git -C <work tree> show v1:data.dvc` (the local floor: no transport at all).

Design:

* **One repository, two transports.** A DVC-shaped repository (`.dvc/config`, `.gitignore`,
  `data.dvc` written by hand as DVC 3 writes it: md5 `.dir`, size, nfiles, `hash: md5`) with
  one commit per tag v1..vK, each naming another directory pin. Its bare clone (with
  `uploadpack.allowFilter`, as GitHub and GitLab allow filters) is served as `file://` and
  over smart HTTP by `git http-backend` behind basic auth (`testkit.gitrepo.
  GitHttpServer`) on 127.0.0.1, so every HTTP ls-remote is a real round trip (two requests,
  each a `git http-backend` process). The server runs in a child process, so its work never
  competes with the admission path for this process's GIL. The HTTP Dataset names a git
  credentials Secret; the webhook sends it as a header, and so do the peers (through
  `GIT_CONFIG_COUNT`, the same environment variables, never argv).
* **In-process, no HTTP in front**: `Admission.admit()` of a batch/v1 Job on a persistent
  event loop (`asyncio.Runner`), timed inside the loop around the `await`. The Secret reader
  is an async function returning Secret data, i.e. what the API server would answer, so the
  real `Admission`, `Resolver`, `GitSource` and `inject` run unchanged. Every sample is
  checked: the pin and commit recorded on the Job are v1's.
* **Peers side by side.** Within each transport the peers take turns round by round and the
  peer that starts rotates, so the shared machine's noise hits all alike. Medians, p90 and
  min-max; ratios of medians. CPU is this process's CPU (`process_time`) plus that of the
  children it reaped (`RUSAGE_CHILDREN`): git and its helpers, never the HTTP server's.
* **This checkout's code**: if `datapin_operator` or `datapin_sidecar` would be imported from
  elsewhere (an editable install made from another copy), the benchmark re-executes itself
  with this checkout's package directories first on PYTHONPATH; the report names the path.
* **Where the time goes**: each `GitSource` under test has its `_git` wrapped (in this
  process) to record each git subcommand's wall time; rows report the median count and time
  of each per admit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime as dt
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datapin_operator as operator_pkg
import datapin_sidecar as sidecar_pkg
from datapin_operator.resolve.gitsource import DEFAULT_PROTOCOLS, GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings
from datapin_operator.webhook.admission import Admission, Catalog

from bench.harness import (
    REPO_ROOT,
    BenchError,
    machine,
    median,
    source_state,
    write_report,
)
from bench.harness import secs as harness_secs
from testkit.dvcrepo import run_git

CHECKOUT_ENV = "DATAPIN_BENCH_CHECKOUT"  # set once re-executed against this checkout
NAMESPACE = "bench"
USER = "bench"
PASSWORD = "bench-Pa55word"  # noqa: S105 - a throw-away password of a local test server
REMOTE_SECRET = "b2"  # noqa: S105 - a Secret's name
GIT_SECRET = "git-creds"  # noqa: S105 - a Secret's name
SECRETS: dict[tuple[str, str], dict[str, str]] = {
    (NAMESPACE, REMOTE_SECRET): {
        "AWS_ACCESS_KEY_ID": "0027a1b2c3d4e5f0000000001",
        "AWS_SECRET_ACCESS_KEY": "K002bench-not-a-real-key-00000000",
    },
    (NAMESPACE, GIT_SECRET): {"username": USER, "password": PASSWORD},
}


# -- the repository ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    work: Path  # the work tree the local floor reads
    bare: Path  # what both transports serve
    pins: dict[str, str]  # tag -> the `<md5>.dir` its data.dvc names
    commits: dict[str, str]  # tag -> commit


def build_repo(root: Path, tags: int, rng: random.Random) -> History:
    """A DVC-shaped repository with one commit per tag v1..v<tags>, each a new pin."""
    work = root / "dataset-repo"
    (work / ".dvc").mkdir(parents=True)
    run_git(work, "init", "-q", "--initial-branch=main")
    for key, value in (
        ("user.name", "datapin bench"),
        ("user.email", "bench@datapin.invalid"),
        ("commit.gpgsign", "false"),
    ):
        run_git(work, "config", key, value)
    (work / ".dvc" / "config").write_text(
        "[core]\n    remote = b2\n['remote \"b2\"']\n    url = s3://bench-bucket/dvc\n"
        "    endpointurl = https://s3.us-west-002.backblazeb2.com\n"
    )
    (work / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (work / ".dvcignore").write_text("# DVC ignore patterns\n")
    (work / ".gitignore").write_text("/data\n")
    (work / "README.md").write_text("# a dataset\n\n`dvc pull` fetches `data/`.\n")
    pins: dict[str, str] = {}
    commits: dict[str, str] = {}
    for i in range(1, tags + 1):
        tag = f"v{i}"
        pin = f"{rng.getrandbits(128):032x}.dir"
        nfiles = 20_000 + 100 * i
        (work / "data.dvc").write_text(
            f"outs:\n- md5: {pin}\n  size: {nfiles * 4096}\n  nfiles: {nfiles}\n"
            "  hash: md5\n  path: data\n"
        )
        run_git(work, "add", "-A")
        run_git(work, "commit", "-q", "-m", f"data at {tag}")
        run_git(work, "tag", tag)
        pins[tag] = pin
        commits[tag] = run_git(work, "rev-parse", "HEAD").stdout.strip()
    served = root / "srv"
    served.mkdir()
    bare = served / "dataset.git"
    run_git(served, "clone", "-q", "--bare", str(work), str(bare))
    run_git(bare, "config", "uploadpack.allowFilter", "true")
    return History(work=work, bare=bare, pins=pins, commits=commits)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[int]:
    """`GitHttpServer` over `root` in a child process (see `serve`); yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_admission", "--serve", str(root)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise BenchError(f"the git HTTP server did not start (said {line!r})")
        yield int(line)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # `serve` stops on EOF
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(root: Path) -> int:
    """Child-process mode: serve `root`, print the port, stop when stdin closes."""
    from testkit.gitrepo import GitHttpServer  # noqa: PLC0415 - only the child needs it

    with GitHttpServer(root, username=USER, password=PASSWORD) as server:
        print(server.port, flush=True)
        sys.stdin.read()
    return 0


def git_env(home: Path, *, auth: bool) -> dict[str, str]:
    """The peers' environment: GitSource's (no user config, C locale), same credentials path."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "LC_ALL": "C",
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_COUNT": "0",
    }
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        env |= {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}",
        }
    return env


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float
    cpu: float
    git: tuple[tuple[str, float], ...] = ()  # (subcommand, seconds) of each git call


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_proc(
    argv: Sequence[str], *, env: Mapping[str, str], expect: str, cwd: Path | None = None
) -> Sample:
    """Run `argv` once, from fork to exit; its output must contain `expect`."""
    cpu0 = children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, timeout=120)
    wall = time.perf_counter() - started
    cpu = children_cpu() - cpu0
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or expect not in out:
        raise BenchError(
            f"{shlex.join(argv)} exited {proc.returncode} (expected {expect!r} in its output):"
            f"\n{out[-1000:]}\n{proc.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    return Sample(wall=wall, cpu=cpu)


def instrument(git: GitSource, calls: list[tuple[str, float]]) -> None:
    """Record each git call's subcommand and wall time into `calls` (this instance only)."""
    original = git._git

    async def timed(state: Any, session: Any, *args: str) -> Any:
        started = time.perf_counter()
        try:
            return await original(state, session, *args)
        finally:
            calls.append((args[0], time.perf_counter() - started))

    git._git = timed  # type: ignore[method-assign]


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def secs(x: float) -> str:
    """The harness's wording, and microseconds below a millisecond (an admission's steps)."""
    return f"{x * 1e6:.0f} us" if x < 0.001 else harness_secs(x)


def git_split(samples: Sequence[Sample]) -> str:
    """Median count and time per admit of each git subcommand, biggest first."""
    names = {name for s in samples for name, _ in s.git}
    if not names:
        return "no git"
    parts = []
    for name in names:
        counts = [sum(1 for n, _ in s.git if n == name) for s in samples]
        times = [sum(t for n, t in s.git if n == name) for s in samples]
        parts.append((median(times), f"{name} x{median(counts):g} {secs(median(times))}"))
    total = median([len(s.git) for s in samples])
    inner = ", ".join(text for _, text in sorted(parts, reverse=True))
    return f"{total:g} git processes: {inner}"


Peer = tuple[str, Callable[[int], Sample]]


def interleave(
    peers: Sequence[Peer], runs: int, log: Callable[[str], None]
) -> dict[str, list[Sample]]:
    """`runs` rounds; in each every peer runs once, and the one that starts rotates."""
    results: dict[str, list[Sample]] = {name: [] for name, _ in peers}
    for r in range(runs):
        shift = r % len(peers)
        for name, fn in [*peers[shift:], *peers[:shift]]:
            results[name].append(fn(r))
        if (r + 1) % 10 == 0 or r + 1 == runs:
            log(f"  round {r + 1}/{runs}")
    return results


# -- the report ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    case: str
    tool: str
    samples: list[Sample]
    note: str = ""

    @property
    def values(self) -> list[float]:
        return [s.wall for s in self.samples]

    @property
    def med(self) -> float:
        return median(self.values)


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    ratios: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def ratio(self, name: str, value: str, note: str = "") -> None:
        self.ratios.append((name, value, note))

    def render(self, header: str) -> str:
        lines = [header, "", "### Measurements", ""]
        lines += [
            "| case | peer | n | median | p90 | min-max | CPU (median) | notes |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            v = r.values
            cpu = secs(median([s.cpu for s in r.samples]))
            lines.append(
                f"| {r.case} | {r.tool} | {len(v)} | {secs(r.med)} | {secs(p90(v))} "
                f"| {secs(min(v))}-{secs(max(v))} | {cpu} | {r.note} |"
            )
        lines += ["", "### Ratios and differences", "", "| what | value | how |", "|---|---:|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.ratios]
        return "\n".join(lines) + "\n"


# -- the benchmark ------------------------------------------------------------------------------


def job(name: str, dataset: str, revision: str) -> dict[str, Any]:
    """A batch/v1 Job as `kubectl apply` sends it, asking for `dataset` at `revision`."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {
                "datapin.dev/dataset": dataset,
                "datapin.dev/revision": revision,
            },
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "train"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "train",
                            "image": "python:3.12-slim",
                            "command": ["python", "train.py"],
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                        }
                    ],
                },
            },
        },
    }


def pod_of(admitted: Mapping[str, Any]) -> dict[str, Any]:
    """The Pod the Job controller creates from an admitted Job's template."""
    template = copy.deepcopy(admitted["spec"]["template"])
    meta = template.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**meta, "name": "train-abcde", "namespace": NAMESPACE},
        "spec": template["spec"],
    }


def dataset_spec(repo: str | None, *, git_secret: bool, pins: Mapping[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "remote": {
            "url": "s3://bench-bucket/dvc",
            "endpoint": "https://s3.us-west-002.backblazeb2.com",
            "credentialsSecretRef": {"name": REMOTE_SECRET},
        },
        "revisions": {"golden": pins["v1"]},
    }
    if repo is not None:
        spec["source"] = {"repo": repo, "path": "data.dvc"}
        if git_secret:
            spec["source"]["credentialsSecretRef"] = {"name": GIT_SECRET}
    return spec


async def read_secret(namespace: str, name: str) -> Mapping[str, str] | None:
    """What the API server would answer for the Secret: its data, decoded."""
    return SECRETS.get((namespace, name))


class Bench:
    def __init__(self, *, scratch: Path, history: History, port: int, runs: int) -> None:
        self.scratch = scratch
        self.history = history
        self.runs = runs
        self.report = Report()
        self.settings = Settings()
        self.runner = asyncio.Runner()
        self.urls = {
            "file://": f"file://{history.bare}",
            "http://": f"http://127.0.0.1:{port}/{history.bare.name}",
        }
        self.catalog = Catalog(
            {
                (NAMESPACE, "local"): dataset_spec(None, git_secret=False, pins=history.pins),
                (NAMESPACE, "file"): dataset_spec(
                    self.urls["file://"], git_secret=False, pins=history.pins
                ),
                (NAMESPACE, "http"): dataset_spec(
                    self.urls["http://"], git_secret=True, pins=history.pins
                ),
            }
        )
        self.abbrev = history.commits["v1"][:10]
        self.started = time.monotonic()
        self.count = 0
        # Set by bench_local, which runs first: the references of the transport ratios.
        self.literal: Row | None = None
        self.local_floor: Row | None = None
        self.steady: dict[str, tuple[Row, Row]] = {}  # scheme -> (steady admit, ls-remote)

    async def list_datasets(self, namespace: str) -> dict[str, Mapping[str, Any]]:
        """The namespace's Datasets from memory (the API round trip is measured on its own)."""
        return {name: spec for (ns, name), spec in self.catalog.specs.items() if ns == namespace}

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.runner.close()

    def admission(self, ref_ttl: float) -> tuple[Admission, Path, list[tuple[str, float]]]:
        """A fresh Admission over its own GitSource (instrumented) and cache directory."""
        self.count += 1
        cache_dir = self.scratch / f"git-cache-{self.count}"
        git = GitSource(
            cache_dir=cache_dir,
            timeout=60.0,
            ref_ttl=ref_ttl,
            allow_protocols=DEFAULT_PROTOCOLS,
        )
        calls: list[tuple[str, float]] = []
        instrument(git, calls)
        admission = Admission(
            settings=self.settings,
            secrets=read_secret,
            datasets=self.list_datasets,
            resolver=Resolver(git, secrets=read_secret),
        )
        return admission, cache_dir, calls

    def admit(
        self,
        admission: Admission,
        calls: list[tuple[str, float]],
        obj: Mapping[str, Any],
        *,
        expect: str | None,
    ) -> Sample:
        """One timed `admit` on the runner's loop; checks the pin (None: nothing to admit)."""

        async def once() -> tuple[float, float, Any]:
            cpu0 = time.process_time() + children_cpu()
            started = time.perf_counter()
            got = await admission.admit(obj, namespace=NAMESPACE)
            wall = time.perf_counter() - started
            return wall, time.process_time() + children_cpu() - cpu0, got

        calls.clear()
        wall, cpu, got = self.runner.run(once())
        if expect is None:
            if got is not None:
                raise BenchError("an already injected Pod was changed")
        else:
            pin = None if got is None else got.pins[0].pin
            if pin != expect:
                raise BenchError(f"admit pinned {pin!r}, expected {expect!r}")
            if got.pins[0].commit not in (None, self.history.commits["v1"]):
                raise BenchError(f"admit recorded commit {got.pins[0].commit}, not v1's")
        return Sample(wall=wall, cpu=cpu, git=tuple(calls))

    def warm(self, ref_ttl: float, obj: Mapping[str, Any]) -> Callable[[int], Sample]:
        """A peer admitting `obj` with one GitSource for all rounds, warmed untimed."""
        admission, _cache, calls = self.admission(ref_ttl)
        pin = self.history.pins["v1"]
        self.admit(admission, calls, obj, expect=pin)
        return lambda _r: self.admit(admission, calls, obj, expect=pin)

    def cold(self, obj: Mapping[str, Any]) -> Callable[[int], Sample]:
        """A peer admitting `obj` with a fresh GitSource and cache directory every time."""
        pin = self.history.pins["v1"]

        def run(_r: int) -> Sample:
            admission, cache_dir, calls = self.admission(ref_ttl=0.0)
            try:
                return self.admit(admission, calls, obj, expect=pin)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)

        return run

    # -- cases --------------------------------------------------------------------------------

    def bench_local(self) -> None:
        """No git: a literal pin, a named revision, and the Pod of an admitted Job."""
        self.log("no git: literal, named, Pod of an admitted Job; local floor git show")
        pin = self.history.pins["v1"]
        admission, _cache, calls = self.admission(ref_ttl=0.0)
        literal = job("train-literal", "local", pin)
        named = job("train-named", "local", "golden")
        admitted = self.runner.run(admission.admit(literal, namespace=NAMESPACE))
        assert admitted is not None
        pod = pod_of(admitted.obj)
        env = git_env(self.scratch / "home", auth=False)
        show = ["git", "-C", str(self.history.work), "show", "v1:data.dvc"]
        res = interleave(
            [
                ("literal", lambda _r: self.admit(admission, calls, literal, expect=pin)),
                ("named", lambda _r: self.admit(admission, calls, named, expect=pin)),
                ("pod", lambda _r: self.admit(admission, calls, pod, expect=None)),
                ("show", lambda _r: run_proc(show, env=env, expect=pin)),
            ],
            self.runs,
            self.log,
        )
        case = "no transport"
        lit = self.report.add(
            Row(case, "`admit()`, revision = literal `<md5>.dir`", res["literal"], "no git")
        )
        self.report.add(
            Row(case, "`admit()`, revision = named (`spec.revisions`)", res["named"], "no git")
        )
        self.report.add(
            Row(
                case,
                "`admit()` of the Pod of an admitted Job",
                res["pod"],
                "already injected: returned unchanged",
            )
        )
        self.local_floor = self.report.add(
            Row(case, "`git -C <work tree> show v1:data.dvc` (local floor)", res["show"])
        )
        self.literal = lit

    def bench_transport(self, scheme: str) -> None:
        self.log(f"{scheme}: tag steady/cached/cold, abbreviated sha, ls-remote, clone")
        dataset = "file" if scheme == "file://" else "http"
        url = self.urls[scheme]
        pin, commit = self.history.pins["v1"], self.history.commits["v1"]
        tag_job = job("train-tag", dataset, "v1")
        abbrev_job = job("train-sha", dataset, self.abbrev)
        home = self.scratch / "home"
        env = git_env(home, auth=scheme == "http://")
        ls_remote = ["git", "ls-remote", url, "v1"]
        clones = self.scratch / "clones"
        clones.mkdir(exist_ok=True)

        def clone(r: int) -> Sample:
            dest = clones / f"c{r}"
            script = 'git clone -q --depth 1 --branch v1 "$1" "$2" && cat "$2/data.dvc"'
            try:
                return run_proc(["sh", "-c", script, "sh", url, str(dest)], env=env, expect=pin)
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        res = interleave(
            [
                ("steady", self.warm(0.0, tag_job)),
                ("cached", self.warm(3600.0, tag_job)),
                ("cold", self.cold(tag_job)),
                ("sha-steady", self.warm(0.0, abbrev_job)),
                ("sha-cold", self.cold(abbrev_job)),
                ("ls-remote", lambda _r: run_proc(ls_remote, env=env, expect=commit)),
                ("clone", clone),
            ],
            self.runs,
            self.log,
        )
        case = f"git ref over {scheme}"
        assert self.literal is not None
        assert self.local_floor is not None
        steady = self.report.add(
            Row(
                case,
                "`admit()`, tag v1, steady (`ref_ttl=0`, pin cached)",
                res["steady"],
                git_split(res["steady"]),
            )
        )
        cached = self.report.add(
            Row(
                case,
                "`admit()`, tag v1, listing within `ref_ttl`",
                res["cached"],
                git_split(res["cached"]),
            )
        )
        cold = self.report.add(
            Row(
                case,
                "`admit()`, tag v1, cold (fresh cache dir)",
                res["cold"],
                git_split(res["cold"]),
            )
        )
        sha_steady = self.report.add(
            Row(
                case,
                f"`admit()`, abbreviated sha `{self.abbrev}`, steady",
                res["sha-steady"],
                git_split(res["sha-steady"]),
            )
        )
        sha_cold = self.report.add(
            Row(
                case,
                f"`admit()`, abbreviated sha `{self.abbrev}`, cold",
                res["sha-cold"],
                git_split(res["sha-cold"]),
            )
        )
        lsr = self.report.add(Row(case, "`git ls-remote <url> v1`", res["ls-remote"]))
        cln = self.report.add(
            Row(
                case,
                "`git clone --depth 1 --branch v1 <url> tmp && cat tmp/data.dvc`",
                res["clone"],
            )
        )
        ls_git = median([sum(t for n, t in s.git if n == "ls-remote") for s in res["steady"]])
        tag = f"{scheme} tag"
        self.report.ratio(
            f"{tag}, steady `admit()` / `git ls-remote`",
            f"{steady.med / lsr.med:.2f}x",
            f"+{secs(steady.med - lsr.med)}; its own ls-remote (all heads and tags) {secs(ls_git)}",
        )
        self.report.ratio(
            f"{tag}, steady `admit()` - literal `admit()`",
            secs(steady.med - self.literal.med),
            "what resolving the tag adds to the admission",
        )
        self.report.ratio(
            f"{tag}, steady `admit()` / local floor `git show`",
            f"{steady.med / self.local_floor.med:.2f}x",
            "",
        )
        self.report.ratio(
            f"{tag}, cold `admit()` / `git clone --depth 1` + cat",
            f"{cold.med / cln.med:.2f}x",
            f"p90 {secs(p90(cold.values))} vs {secs(p90(cln.values))}",
        )
        self.report.ratio(f"{tag}, cold / steady `admit()`", f"{cold.med / steady.med:.2f}x", "")
        self.report.ratio(
            f"{tag}, steady `admit()` / within `ref_ttl`",
            f"{steady.med / cached.med:.0f}x",
            f"what the TTL saves: {secs(steady.med - cached.med)} per admit",
        )
        self.report.ratio(
            f"{scheme} abbreviated sha, steady / tag steady",
            f"{sha_steady.med / steady.med:.2f}x",
            "the history fetch every time",
        )
        self.report.ratio(
            f"{scheme} abbreviated sha, cold / tag cold",
            f"{sha_cold.med / cold.med:.2f}x",
            "",
        )
        self.steady[scheme] = (steady, lsr)

    def bench_cross(self) -> None:
        if "file://" in self.steady and "http://" in self.steady:
            (sf, lf), (sh, lh) = self.steady["file://"], self.steady["http://"]
            self.report.ratio(
                "HTTP round trip: `git ls-remote` over http:// - file://",
                secs(lh.med - lf.med),
                f"{lh.med / lf.med:.2f}x",
            )
            self.report.ratio(
                "steady `admit()` over http:// - file://",
                secs(sh.med - sf.med),
                f"{sh.med / sf.med:.2f}x",
            )


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_admission",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="5 rounds: a smoke test (~10 s)")
    p.add_argument("--runs", type=int, help="rounds per peer (default 40; quick 5)")
    p.add_argument("--tags", type=int, default=20, help="tags v1..vK in the repository")
    p.add_argument("--seed", type=int, default=5, help="PRNG seed of the pins")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the HTTP server's child
    args = p.parse_args(argv)
    args.runs = args.runs or (5 if args.quick else 40)
    if args.runs < 1 or args.tags < 1:
        p.error("--runs and --tags must be at least 1")
    return args


def use_this_checkout(argv: Sequence[str]) -> None:
    """Re-exec so the operator measured is this checkout's, not what `pip install -e` names.

    The editable install may point at another copy of the repository; its finder comes after
    `sys.path` entries, so putting this checkout's package directories on PYTHONPATH wins.
    """
    if all(Path(m.__file__ or "").is_relative_to(REPO_ROOT) for m in (operator_pkg, sidecar_pkg)):
        return
    if os.environ.get(CHECKOUT_ENV):
        raise BenchError(
            f"datapin imported from {operator_pkg.__file__} and {sidecar_pkg.__file__}, not "
            f"from {REPO_ROOT}, even with PYTHONPATH set"
        )
    path = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "sidecar"), str(REPO_ROOT)]
    env = {
        **os.environ,
        CHECKOUT_ENV: "1",
        "PYTHONPATH": os.pathsep.join([*path, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    args = [sys.executable, "-m", "bench.bench_admission", *argv]
    os.execve(sys.executable, args, env)  # noqa: S606 - our own interpreter, no shell


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.serve is not None:
        return serve(args.serve)
    use_this_checkout(argv)
    command = shlex.join(["python", "-m", "bench.bench_admission", *argv])
    when = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    what = source_state(None, ("operator", "sidecar"))
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp:
        scratch = Path(tmp)
        history = build_repo(scratch, args.tags, random.Random(args.seed))
        with http_server(history.bare.parent) as port:
            bench = Bench(scratch=scratch, history=history, port=port, runs=args.runs)
            try:
                bench.bench_local()
                bench.bench_transport("file://")
                bench.bench_transport("http://")
                bench.bench_cross()
            finally:
                bench.close()
            elapsed = time.monotonic() - bench.started
    header = "\n".join(
        [
            f"## datapin operator admission benchmark, {when:%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `{command}` (from the repository root)",
            f"- measured: {what} (`datapin_operator` imported from "
            f"{Path(operator_pkg.__file__ or '?').parent})",
            machine(["git", "--version"]),
            f"- repository: {args.tags} commits tagged v1..v{args.tags} (`data.dvc` + a DVC "
            "skeleton), served bare as file:// and by `git http-backend` on 127.0.0.1 "
            "(basic auth); `uploadpack.allowFilter` on",
            f"- {args.runs} rounds per peer, peers rotating within each round; load average "
            f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; whole run "
            f"{elapsed / 60:.1f} min",
            "- `admit()`: in-process on one event loop, no HTTP in front; times are wall "
            "clock; CPU = this process + reaped children (git); peers timed from fork to exit",
            *(["- **--quick: a smoke test**"] if args.quick else []),
        ]
    )
    write_report(bench.report.render(header), when, name="admission", quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
