"""The admin docs (docs/install.md, docs/operations.md) against the code they describe.

A cluster admin copies manifests, `helm` commands, value names, metric names and variable names
out of these pages. Each of those is checked here against the thing it names, so a page that
drifts from the chart, the operator or the sidecar fails this test rather than a user's install:

* every ```yaml block is one of three things, and is checked as such: Kubernetes objects
  (`kubernetes_validate` in strict mode for Kubernetes 1.29, the oldest supported, and the
  newest; Datasets through the operator's own CRD schema check), a Helm values file (its first
  line is a `# <name>values.yaml` comment: every key exists in the chart and the chart renders
  with it) or a Prometheus configuration (`promtool check config`). Anything else fails;
* every annotated Job parses with the operator's annotation parser, names a Dataset (and a
  Secret) the same page creates, and goes through the real injection builder; the injected Job
  must still be a valid Kubernetes object and its containers must read `<mount path>/current`;
* every `helm install|upgrade|template` command renders the chart with exactly its values;
* every values key path (`agent.watermarks.high`, `--set KEY=...`) exists in the chart;
* every `datapin_*` metric (with its label names and label values), every `DATAPIN_*`
  variable, every condition or Event reason and every dashboard panel named exists in the code;
* every relative link (and its `#anchor`) resolves;
* every `datapin.dev/pins` value shown is byte for byte what the operator writes for that
  Dataset and revision: the layout comes from the real resolver (a git revision through a real
  git repository holding a `.dvc` file real DVC 3 wrote, a name or pin from the Dataset's
  `spec.remote.layout`), the JSON from the real formatter.

The checks are functions that return problems (empty: fine), so that the last tests can feed
them broken input and show that each one can fail. Known names are derived from the code
(settings models, a fresh `Metrics` exposition, the operator's source via `ast`), never from a
hard-coded list. Nothing here needs a cluster: the manifests are validated offline, and the
chart is rendered with helm-python-sdk.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import datapin_operator.errors as operator_errors
import datapin_sidecar.errors as sidecar_errors
import helm_python
import kubernetes_validate
import pytest
import yaml
from datapin_operator.api.crd import validate_dataset
from datapin_operator.api.models import DatasetSpec
from datapin_operator.errors import OperatorError
from datapin_operator.resolve.gitsource import GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings as OperatorSettings
from datapin_operator.webhook.inject import NODE_VOLUME, POD_UID_ENV, DatasetMount, inject
from datapin_operator.webhook.requests import ANNOTATION_PREFIX, PINS_KEY, parse_request
from datapin_sidecar.node.metrics import Metrics
from datapin_sidecar.node.settings import Settings as SidecarSettings
from datapin_sidecar.pins import PinRecord, format_pins
from prometheus_client import CollectorRegistry

from testkit.dashboard import iter_panels, load_dashboard
from testkit.dvcrepo import DvcFixture, run_git
from tests.conftest import REPO_ROOT

DOCS_DIR = REPO_ROOT / "docs"
INSTALL = DOCS_DIR / "install.md"
OPERATIONS = DOCS_DIR / "operations.md"
DOCS = (INSTALL, OPERATIONS)
CHART = REPO_ROOT / "charts" / "datapin"
OPERATOR_SRC = REPO_ROOT / "operator" / "datapin_operator"
DASHBOARD = CHART / "dashboards" / "datapin.json"

#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
#: What the docs' Jobs mount under (the chart's sidecar.mountRoot default).
MOUNT_ROOT = "/data"
#: A pin for injecting documented Jobs: resolution needs git and B2, which the docs only name.
FAKE_PIN = "0123456789abcdef0123456789abcdef.dir"
#: Python packages, whose names look like metric names.
NOT_METRICS = frozenset({"datapin_sidecar", "datapin_operator"})
#: Helm options that take a value (the rest of those used are flags).
HELM_VALUE_OPTIONS = frozenset(
    {"-n", "--namespace", "--set", "--set-string", "-f", "--values", "--timeout", "--version"}
)
_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".py", ".txt", ".tpl", ".sh")
_SHELL_LANGS = frozenset({"sh", "bash", "shell", "console"})


# -- reading Markdown ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass
class Page:
    """A Markdown page split into fenced blocks and the prose around them."""

    name: str
    path: Path | None
    blocks: list[Block] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, line)

    @property
    def prose_text(self) -> str:
        return "\n".join(line for _, line in self.prose)

    def blocks_of(self, *langs: str) -> list[Block]:
        return [b for b in self.blocks if b.lang in langs]


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def parse_page(text: str, name: str, path: Path | None = None) -> Page:
    """Split Markdown into fenced blocks (dedented by their fence's indent) and prose lines."""
    page = Page(name=name, path=path)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            page.prose.append((i + 1, lines[i]))
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        lang = (match["info"].strip().split() or [""])[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        page.blocks.append(Block(doc=name, line=i + 1, lang=lang, text="\n".join(body) + "\n"))
        i = j + 1
    return page


@cache
def load_page(path: Path) -> Page:
    return parse_page(path.read_text(encoding="utf-8"), path.name, path)


def code_spans(text: str) -> list[str]:
    """The contents of inline code spans (`...`, ``...``) in prose."""
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", text)]


def tables(page: Page) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Markdown tables of the prose: (header cells, body rows)."""
    rows: list[list[str]] = []

    def cells(line: str) -> list[str]:
        # Split on pipes outside code spans.
        parts, depth, cur = [], False, ""
        for ch in line.strip().strip("|"):
            if ch == "`":
                depth = not depth
            if ch == "|" and not depth:
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        parts.append(cur.strip())
        return parts

    for _, line in [*page.prose, (0, "")]:
        if line.strip().startswith("|"):
            rows.append(cells(line))
            continue
        if len(rows) >= 2 and set("".join(rows[1])) <= set("-: "):
            yield rows[0], rows[2:]
        rows = []


def column(header: list[str], rows: list[list[str]], name: str) -> list[str]:
    """The cells of the column whose header, without backticks and bold, is `name`."""
    norm = [re.sub(r"[`*]", "", h).strip().lower() for h in header]
    if name not in norm:
        return []
    index = norm.index(name)
    return [row[index] for row in rows if index < len(row)]


# -- what the code defines ----------------------------------------------------------------------


@cache
def chart_values() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


@cache
def chart_schema() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


@cache
def settings_fields() -> frozenset[str]:
    """Every `DATAPIN_*` variable either program reads."""
    names = {*OperatorSettings.model_fields, *SidecarSettings.model_fields}
    return frozenset(f"DATAPIN_{name.upper()}" for name in names)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class Exposition:
    """What a role's fresh `Metrics` exports: sample names, and per sample name the label
    names and the label values the code creates up front."""

    names: frozenset[str]
    labels: Mapping[str, frozenset[str]]
    values: Mapping[tuple[str, str], frozenset[str]]


@cache
def exposition(role: str) -> Exposition:
    metrics = Metrics(CollectorRegistry(), role=role)
    metrics.dataset("probe")  # creates every per-dataset series, with its fixed label values
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in metrics.registry.collect():
        sample_names = {family.name + s for s in _SUFFIXES[family.type]}
        names |= sample_names | {family.name}
        for sample in family.samples:
            for name in sample_names | {family.name}:
                labels.setdefault(name, set()).update(k for k in sample.labels if k != "le")
            for key, value in sample.labels.items():
                for name in sample_names | {family.name}:
                    values.setdefault((name, key), set()).add(value)
    return Exposition(
        names=frozenset(names),
        labels={k: frozenset(v) for k, v in labels.items()},
        values={k: frozenset(v) for k, v in values.items()},
    )


def metric_reasons() -> frozenset[str]:
    """Values of the `reason` label: those created at zero, and every sidecar error's reason
    (some are only created when they happen)."""
    created = {
        v
        for role in ("sidecar", "agent")
        for (_, label), vs in exposition(role).values.items()
        if label == "reason"
        for v in vs
    }
    errors = {
        cls.reason
        for cls in vars(sidecar_errors).values()
        if isinstance(cls, type) and issubclass(cls, sidecar_errors.DatapinError)
    }
    return frozenset(created | errors)


@cache
def operator_reasons() -> frozenset[str]:
    """Every condition and Event reason the operator can write, read out of its source.

    Picked up: `reason = "X"` (error classes), `reason="X"` arguments (Events, RemoteCheckError),
    a `{cause: "X"}.get(cause, "Y")` mapping assigned to `reason`, and status.py's rule
    returns `return "True"|"False"|"Unknown", "X", ...`.
    """
    reasons: set[str] = set()
    statuses = {"True", "False", "Unknown"}
    for path in sorted(OPERATOR_SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "reason" for t in node.targets
            ):
                reasons |= _string_constants(node.value)
            if isinstance(node, ast.keyword) and node.arg == "reason":
                reasons |= _string_constants(node.value)
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                elts = node.value.elts
                if (
                    len(elts) >= 2
                    and isinstance(elts[0], ast.Constant)
                    and elts[0].value in statuses
                    and isinstance(elts[1], ast.Constant)
                    and isinstance(elts[1].value, str)
                ):
                    reasons.add(elts[1].value)
    return frozenset(r for r in reasons if re.fullmatch(r"[A-Z][A-Za-z]+", r))


def _string_constants(node: ast.expr) -> set[str]:
    """String constants of a plain value, or of a `{...}.get(key, default)` lookup."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Dict)
    ):
        found: set[str] = set()
        for value in [*node.func.value.values, *node.args[1:]]:
            found |= _string_constants(value)
        return found
    return set()


@cache
def dashboard_panel_titles() -> frozenset[str]:
    return frozenset(
        str(p.get("title"))
        for p in iter_panels(load_dashboard(DASHBOARD))
        if p.get("type") != "row"
    )


# -- checks: each returns problems, one line each ------------------------------------------------


def value_path_problems(values: Mapping[str, Any], where: str) -> list[str]:
    """Key paths of `values` that the chart does not have.

    A key exists if values.yaml has it or the schema declares it; below a map the schema leaves
    open (nodeSelector, labels, ...) anything goes.
    """
    problems: list[str] = []

    def walk(tree: Any, defaults: Any, schema: Any, path: tuple[str, ...]) -> None:
        if not isinstance(tree, Mapping):
            return
        for key, sub in tree.items():
            here = (*path, str(key))
            known_default = isinstance(defaults, Mapping) and key in defaults
            props = (schema or {}).get("properties", {}) if isinstance(schema, Mapping) else {}
            if not known_default and key not in props:
                open_map = isinstance(schema, Mapping) and schema.get(
                    "additionalProperties", True
                ) not in (False, None)
                if open_map and path:
                    continue
                problems.append(
                    f"{where}: `{'.'.join(here)}` is not a value of the chart "
                    f"(charts/datapin/values.yaml)"
                )
                continue
            walk(
                sub,
                defaults.get(key) if known_default else None,
                props.get(key),
                here,
            )

    walk(values, chart_values(), chart_schema(), ())
    return problems


def key_path_spans(page: Page) -> list[tuple[str, dict[str, Any]]]:
    """Backticked values paths in the prose (`agent.watermarks.high`, `sidecar.link=reflink`,
    `--set a.b=c`), each as the values tree Helm's own parser makes of it."""
    top = set(chart_values())
    found: list[tuple[str, dict[str, Any]]] = []
    for span in code_spans(page.prose_text):
        for opt, expr in re.findall(r"(--set(?:-string)?)[ =](\S+)", span):
            found.append((f"{opt} {expr}", _parse_set(opt, expr.strip("'\""))))
        if re.search(r"\s", span) or span.endswith(_FILE_SUFFIXES):
            continue
        head = span.split(".", 1)[0]
        if "." in span and head in top:
            expr = span if "=" in span else f"{span}=x"
            found.append((span, _parse_set("--set-string", expr)))
    return found


def _parse_set(option: str, expr: str) -> dict[str, Any]:
    parse = (
        helm_python.parse_set_string_values
        if option == "--set-string"
        else helm_python.parse_set_string
    )
    return parse(expr)


def key_path_problems(page: Page) -> list[str]:
    problems = []
    for span, tree in key_path_spans(page):
        problems += value_path_problems(tree, f"{page.name}: `{span}`")
    return problems


_METRIC = re.compile(
    r"(?<![A-Za-z0-9_])(?P<name>datapin_[a-z0-9_]+)(?P<star>\*)?(?:\{(?P<labels>[^}]*)\})?"
)


def metric_problems(text: str, where: str) -> list[str]:
    """`datapin_*` names (and `{label="value"}` selectors) that no role exports."""
    sidecar, agent = exposition("sidecar"), exposition("agent")
    names = sidecar.names | agent.names
    reasons = metric_reasons()
    problems = []
    for m in _METRIC.finditer(text):
        name = m["name"] if m["star"] else m["name"].rstrip("_")
        if name in NOT_METRICS:
            continue
        if m["star"]:
            if not any(n.startswith(name) for n in names):
                problems.append(f"{where}: no exported metric starts with `{name}`")
            continue
        if name not in names:
            problems.append(f"{where}: `{name}` is not a metric datapin exports")
            continue
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', m["labels"] or ""):
            known = sidecar.labels.get(name, frozenset()) | agent.labels.get(name, frozenset())
            if known and label not in known and label not in {"node", "namespace", "pod"}:
                problems.append(
                    f"{where}: `{name}` has no label `{label}` (it has {sorted(known)})"
                )
                continue
            allowed = sidecar.values.get((name, label), frozenset()) | agent.values.get(
                (name, label), frozenset()
            )
            if label == "reason":
                allowed |= reasons
            if label in {"mode", "result", "reason", "kind", "level", "state"} and (
                value not in allowed
            ):
                problems.append(
                    f'{where}: `{name}{{{label}="{value}"}}`: datapin never sets {label}="{value}" '
                    f"(it sets {sorted(allowed)})"
                )
    return problems


_VARIABLE = re.compile(r"(?<![A-Za-z0-9_])(?P<name>DATAPIN_[A-Z0-9_]*[A-Z0-9])(?P<star>\*)?")


def variable_problems(text: str, where: str) -> list[str]:
    known = settings_fields()
    problems = []
    for m in _VARIABLE.finditer(text):
        name = m["name"]
        if m["star"]:
            if not any(k.startswith(name) for k in known):
                problems.append(f"{where}: no setting starts with `{name}`")
        elif name not in known:
            problems.append(f"{where}: `{name}` is not a setting of the operator or the sidecar")
    return problems


_REASONS_INLINE = re.compile(
    r"\b(?:[Rr]easons?|Events?)\s+((?:`[A-Za-z]+`(?:,\s*|\s+(?:and|or)\s+)?)+)"
)


def reason_problems(page: Page) -> list[str]:
    """Reasons the page names as condition or Event reasons that the operator never writes,
    and `reason` label values the sidecar never sets."""
    known = operator_reasons()
    problems = []
    named: list[tuple[str, str]] = []
    for header, rows in tables(page):
        named += [
            ("table", tok) for cell in column(header, rows, "reason") for tok in code_spans(cell)
        ]
        for cell in column(header, rows, "reason label"):
            for tok in code_spans(cell):
                if tok not in metric_reasons():
                    problems.append(f"{page.name}: `reason` label `{tok}` is never set")
    for m in _REASONS_INLINE.finditer(page.prose_text):
        named += [("text", tok) for tok in re.findall(r"`([A-Za-z]+)`", m.group(1))]
    for origin, tok in named:
        if re.fullmatch(r"[A-Z][A-Za-z]+", tok) and tok not in known:
            problems.append(
                f"{page.name} ({origin}): reason `{tok}` is not one the operator writes"
            )
    return problems


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    page = parse_page(text, "anchors")
    for _, line in page.prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


_LINK = re.compile(r"(?<!!)\[[^\]]+\]\((?P<target>[^)\s]+)\)")


def link_problems(page: Page, base: Path) -> list[str]:
    problems = []
    for target in _LINK.findall(page.prose_text):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (base / path_part).resolve() if path_part else page.path
        if path is None or not path.exists():
            problems.append(f"{page.name}: link `{target}`: {path_part} does not exist")
            continue
        if not path.resolve().is_relative_to(REPO_ROOT):
            problems.append(f"{page.name}: link `{target}` leaves the repository")
            continue
        anchors = github_anchors(path.read_text(encoding="utf-8")) if path.suffix == ".md" else None
        if anchor and anchors is not None and anchor not in anchors:
            problems.append(f"{page.name}: link `{target}`: no heading #{anchor} there")
    return problems


def dashboard_table_problems(page: Page) -> list[str]:
    titles = dashboard_panel_titles()
    problems = []
    for header, rows in tables(page):
        for cell in column(header, rows, "panel"):
            if cell not in titles:
                problems.append(f"{page.name}: dashboard panel {cell!r} does not exist")
    return problems


# -- YAML blocks ----------------------------------------------------------------------------------


@dataclass
class Catalogue:
    """What the YAML blocks of a page hold, by kind."""

    objects: list[tuple[Block, dict[str, Any]]] = field(default_factory=list)
    values_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    prometheus: list[tuple[Block, dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_VALUES_HEADER = re.compile(r"^#\s*(?P<name>[\w.-]*values\.ya?ml)\s*$")


def catalogue(page: Page) -> Catalogue:
    cat = Catalogue()
    for block in page.blocks_of("yaml", "yml"):
        try:
            docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
        except yaml.YAMLError as exc:
            cat.problems.append(f"{block.where}: not valid YAML: {exc}")
            continue
        if not docs:
            cat.problems.append(f"{block.where}: empty YAML block")
            continue
        header = _VALUES_HEADER.match(block.text.splitlines()[0])
        if header is not None:
            if len(docs) != 1 or not isinstance(docs[0], dict):
                cat.problems.append(f"{block.where}: a values file is one mapping")
                continue
            cat.values_files[header["name"]] = docs[0]
            cat.problems += value_path_problems(docs[0], f"{block.where} ({header['name']})")
            continue
        for doc in docs:
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                cat.objects.append((block, doc))
                cat.problems += manifest_problems(doc, block.where)
            elif isinstance(doc, dict) and "scrape_configs" in doc:
                cat.prometheus.append((block, doc))
            else:
                cat.problems.append(
                    f"{block.where}: a YAML block must be Kubernetes objects, a Helm values file "
                    "(first line `# NAME-values.yaml`) or a Prometheus configuration"
                )
    return cat


def manifest_problems(obj: dict[str, Any], where: str) -> list[str]:
    """What the API server (or the Dataset CRD's schema) would refuse in one object."""
    what = f"{where}: {obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
    if str(obj.get("apiVersion", "")).startswith("datapin.dev/"):
        return [f"{what}: {p}" for p in validate_dataset(obj)]
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [f"{what}: no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}"]
        except kubernetes_validate.ValidationError as exc:
            at = ".".join(str(p) for p in exc.absolute_path) or "<object>"
            problems.append(f"{what}: Kubernetes {version}: {at}: {str(exc).splitlines()[0]}")
    return problems


def pod_template(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") == "Pod":
        return {"metadata": obj.get("metadata") or {}, "spec": obj.get("spec") or {}}
    if obj.get("kind") == "Job":
        template = (obj.get("spec") or {}).get("template")
        return template if isinstance(template, dict) else None
    return None


def created_secrets(page: Page) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret the page creates with kubectl or a manifest."""
    found = set()
    for command in shell_commands(page):
        args = command[1:]
        positional = _positionals(args)
        creates = positional[:3] == ["create", "secret", "generic"] and len(positional) > 3
        if command[:1] == ["kubectl"] and creates:
            namespace = _option(args, "-n", "--namespace") or "default"
            found.add((namespace, positional[3]))
    for block in page.blocks_of("yaml", "yml"):
        for doc in yaml.safe_load_all(block.text):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                meta = doc.get("metadata") or {}
                found.add((meta.get("namespace", "default"), meta.get("name")))
    return found


def workload_problems(page: Page, cat: Catalogue) -> list[str]:
    """Annotated Jobs and Pods: parse, find their Datasets and Secrets, inject, validate."""
    datasets = {
        ((d.get("metadata") or {}).get("namespace", "default"), d["metadata"]["name"]): d
        for _, d in cat.objects
        if d.get("kind") == "Dataset"
    }
    secrets = created_secrets(page)
    problems = []
    for block, obj in cat.objects:
        template = pod_template(obj)
        if template is None:
            continue
        meta = obj.get("metadata") or {}
        where = f"{block.where}: {obj['kind']} {meta.get('name')}"
        namespace = meta.get("namespace", "default")
        own = meta.get("annotations") or {}
        tmpl = (template.get("metadata") or {}).get("annotations") or {}
        annotations = own if any(k.startswith(ANNOTATION_PREFIX) for k in own) else tmpl
        if not any(k.startswith(ANNOTATION_PREFIX) for k in annotations):
            continue
        try:
            request = parse_request(annotations, mount_root=MOUNT_ROOT)
        except OperatorError as exc:  # a refusal is the finding
            problems.append(f"{where}: the webhook would refuse it: {exc}")
            continue
        if request is None:
            problems.append(f"{where}: datapin.dev annotations that ask for nothing")
            continue
        mounts = []
        for m in request.mounts:
            dataset = datasets.get((namespace, m.dataset))
            if dataset is None:
                problems.append(f"{where}: names Dataset {namespace}/{m.dataset}, not on this page")
                continue
            spec = DatasetSpec.model_validate(dataset["spec"])
            literal = re.fullmatch(r"[0-9a-f]{32}\.dir", m.revision)
            if not literal and m.revision not in spec.revisions and spec.source is None:
                problems.append(
                    f"{where}: revision {m.revision!r} of {m.dataset} is no pin, no "
                    "spec.revisions name, and the Dataset has no spec.source"
                )
            secret = spec.remote.credentials_secret_ref.name
            if (namespace, secret) not in secrets:
                problems.append(f"{where}: Secret {namespace}/{secret} is never created here")
            pin = PinRecord(dataset=m.dataset, pin=FAKE_PIN, ref=m.revision, layout="dvc3")
            mounts.append(DatasetMount(request=m, spec=spec, pin=pin))
        if len(mounts) != len(request.mounts):
            continue
        injected = inject(template, request=request, mounts=mounts, settings=OperatorSettings())
        result = copy.deepcopy(obj)
        if obj["kind"] == "Pod":
            result["metadata"], result["spec"] = injected["metadata"], injected["spec"]
        else:
            result["spec"]["template"] = injected
        problems += manifest_problems(result, f"{where} (injected)")
        for container in injected["spec"]["containers"]:
            got = {
                v["mountPath"]: v
                for v in container.get("volumeMounts") or []
                if v["name"] == NODE_VOLUME
            }
            script = " ".join(map(str, [*container.get("command", []), *container.get("args", [])]))
            for m in request.mounts:
                mount = got.get(m.mount_path)
                if mount is None or not mount.get("readOnly"):
                    problems.append(
                        f"{where}: {container['name']} lacks a read-only {m.mount_path}"
                    )
                if script and f"{m.mount_path}/current" not in script:
                    problems.append(
                        f"{where}: {container['name']} never reads {m.mount_path}/current "
                        "(the published revision is under current/)"
                    )
            if not any(e.get("name") == POD_UID_ENV for e in container.get("env") or []):
                problems.append(f"{where}: {container['name']} got no {POD_UID_ENV}")
    return problems


# -- shell blocks and helm ----------------------------------------------------------------------


def shell_commands(page: Page) -> list[list[str]]:
    """Every simple command of the page's shell blocks, as argv (continuations joined,
    comments dropped, split at pipes and `&&`)."""
    commands = []
    for block in page.blocks_of(*_SHELL_LANGS):
        text = re.sub(r"\\\n", " ", block.text)
        for line in text.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            command: list[str] = []
            for token in [*tokens, "|"]:
                if token in {"|", "||", "&&", ";", "&"}:
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(token)
    return commands


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


def _positionals(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HELM_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


@dataclass
class HelmCommand:
    argv: list[str]
    verb: str
    release: str
    chart: str
    namespace: str
    values: dict[str, Any]
    problems: list[str]


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def helm_commands(page: Page, values_files: Mapping[str, dict[str, Any]]) -> list[HelmCommand]:
    found = []
    for argv in shell_commands(page):
        if (
            argv[:1] != ["helm"]
            or len(argv) < 2
            or argv[1] not in {"install", "upgrade", "template"}
        ):
            continue
        args = argv[2:]
        problems: list[str] = []
        values: dict[str, Any] = {}
        i = 0
        while i < len(args):
            arg = args[i]
            name, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if name in HELM_VALUE_OPTIONS:
                value = inline or (args[i + 1] if i + 1 < len(args) else "")
                i += 1 if inline else 2
                if name in {"--set", "--set-string"}:
                    tree = _parse_set(name, value)
                    problems += value_path_problems(tree, f"`{name} {value}`")
                    _merge(values, tree)
                elif name in {"-f", "--values"}:
                    if value not in values_files:
                        problems.append(f"`-f {value}`: no `# {value}` values block on this page")
                    else:
                        _merge(values, values_files[value])
                continue
            i += 1
        positional = _positionals(args)
        release, chart = [*positional, "", ""][:2]
        found.append(
            HelmCommand(
                argv=argv,
                verb=argv[1],
                release=release,
                chart=chart,
                namespace=_option(args, "-n", "--namespace") or "default",
                values=values,
                problems=problems,
            )
        )
    return found


def render_problems(command: HelmCommand) -> list[str]:
    """Render the chart as the command would; validate what Kubernetes has schemas for."""
    shown = " ".join(command.argv[:4])
    problems = [f"{shown}: {p}" for p in command.problems]
    if (REPO_ROOT / command.chart).resolve() != CHART.resolve():
        return [*problems, f"{shown}: chart {command.chart!r} is not charts/datapin"]
    chart = helm_python.Chart.load(CHART)
    try:
        chart.validate_schema(command.values)
        rendered = chart.render(command.values, name=command.release, namespace=command.namespace)
    except helm_python.HelmError as exc:
        return [*problems, f"{shown}: the chart refuses these values: {exc}"]
    finally:
        chart.close()
    for template, text in rendered.items():
        if not template.endswith((".yaml", ".yml")):
            continue
        for obj in yaml.safe_load_all(text):
            if not obj:
                continue
            try:
                kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                continue  # custom resources (ServiceMonitor, Certificate, ...)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{shown}: {template}: {str(exc).splitlines()[0]}")
    return problems


# -- pins the operator writes ----------------------------------------------------------------

#: A `datapin.dev/pins` value: `{"<dataset>":{"layout":...}}` (the compact form it is written in).
_PINS_VALUE = re.compile(r'\{"[^"]+":\{"layout":.*\}\}')


def pins_examples(page: Page) -> list[tuple[str, str]]:
    """(where, value) of every `datapin.dev/pins` value the page's code blocks show."""
    found = []
    for block in page.blocks:
        for offset, line in enumerate(block.text.splitlines(), start=1):
            match = _PINS_VALUE.search(line)
            if match is not None:
                found.append((f"{block.doc}:{block.line + offset}", match.group(0)))
    return found


def _git_repo(root: Path, target: str, ref: str, dvc: DvcFixture) -> Path:
    """A git repository whose `ref` holds, at `target`, the `.dvc` file real DVC 3 wrote."""
    repo = root / f"repo-{len(list(root.glob('repo-*')))}"
    repo.mkdir(parents=True)
    run_git(repo, "init", "-q", "--initial-branch=main")
    run_git(repo, "config", "user.name", "datapin tests")
    run_git(repo, "config", "user.email", "tests@datapin.invalid")
    run_git(repo, "config", "commit.gpgsign", "false")
    (repo / target).parent.mkdir(parents=True, exist_ok=True)
    (repo / target).write_bytes(dvc.dvc_file.read_bytes())
    run_git(repo, "add", target)
    run_git(repo, "commit", "-q", "-m", "data")
    run_git(repo, "tag", ref)
    return repo


def operator_layout(dataset: str, spec: DatasetSpec, ref: str, dvc: DvcFixture, root: Path) -> str:
    """The layout the operator's resolver gives `ref` of the Dataset (git refs resolved in a
    local repository standing in for spec.source.repo)."""
    if spec.source is not None and ref not in spec.revisions:
        target = spec.source.path.partition(":")[0]
        repo = _git_repo(root, target if target.endswith(".dvc") else f"{target}.dvc", ref, dvc)
        spec = spec.model_copy(
            update={"source": spec.source.model_copy(update={"repo": f"file://{repo}"})}
        )

    async def resolve() -> str:
        git = GitSource(
            cache_dir=root / "git-cache", timeout=60, ref_ttl=0, allow_protocols=("file",)
        )

        async def no_secret(namespace: str, name: str) -> None:
            return None

        resolver = Resolver(git, secrets=no_secret)
        resolved = await resolver.resolve(dataset=dataset, spec=spec, revision=ref)
        return str(resolved.layout)

    return asyncio.run(resolve())


def pins_problems(page: Page, cat: Catalogue, dvc: DvcFixture, root: Path) -> list[str]:
    """Shown pins that differ from what the operator would write for them."""
    datasets = {
        d["metadata"]["name"]: DatasetSpec.model_validate(d["spec"])
        for _, d in cat.objects
        if d.get("kind") == "Dataset"
    }
    problems = []
    for where, shown in pins_examples(page):
        try:
            doc: dict[str, dict[str, str]] = json.loads(shown)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: {shown} is not JSON ({exc.msg})")
            continue
        records = []
        for dataset, entry in doc.items():
            spec = datasets.get(dataset)
            if spec is None:
                problems.append(f"{where}: pins Dataset {dataset}, which the page never creates")
                continue
            ref = entry.get("ref", "")
            try:
                layout = operator_layout(dataset, spec, ref, dvc, root)
            except OperatorError as exc:
                problems.append(f"{where}: {dataset} revision {ref!r} does not resolve: {exc}")
                continue
            records.append(
                PinRecord(dataset=dataset, pin=entry.get("pin", ""), ref=ref, layout=layout)
            )
        if len(records) != len(doc):
            continue
        try:
            written = format_pins(records)[PINS_KEY]
        except ValueError as exc:
            problems.append(f"{where}: {shown}: the operator never writes this ({exc})")
            continue
        if written != shown:
            problems.append(f"{where}: shows {shown}, the operator writes {written}")
    return problems


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_datapin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's Settings read DATAPIN_* from the environment; the docs assume defaults."""
    for name in list(os.environ):
        if name.startswith("DATAPIN_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_yaml_blocks_are_valid(doc: Path) -> None:
    cat = catalogue(load_page(doc))
    assert cat.objects or cat.values_files or cat.prometheus, f"{doc.name}: no YAML blocks found"
    assert not cat.problems, "\n".join(cat.problems)


def test_install_page_has_the_objects_of_the_walkthrough() -> None:
    kinds = [obj["kind"] for _, obj in catalogue(load_page(INSTALL)).objects]
    for kind in ("Namespace", "Dataset", "Job", "DaemonSet"):
        assert kind in kinds, f"install.md has no {kind} manifest (it has {sorted(set(kinds))})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_annotated_jobs_are_admitted_and_injected(doc: Path) -> None:
    page = load_page(doc)
    problems = workload_problems(page, catalogue(page))
    assert not problems, "\n".join(problems)


def test_install_page_injects_at_least_two_jobs() -> None:
    """The walkthrough's Jobs are what the check above exercises: make sure it saw them."""
    page = load_page(INSTALL)
    annotated = [
        obj
        for _, obj in catalogue(page).objects
        if obj["kind"] == "Job" and "datapin.dev" in json.dumps(obj)
    ]
    assert len(annotated) >= 2


def test_prometheus_configurations_pass_promtool(promtool: Path, tmp_path: Path) -> None:
    """`promtool check config` on each documented configuration.

    Debian's Prometheus is built without Kubernetes service discovery, so its promtool rejects
    `kubernetes_sd_configs` as an unknown field. Then the configuration is checked again with
    that one block replaced by a static target (relabelling, regexes and the rest are still
    checked by promtool), and the discovery block itself against the roles Prometheus knows.
    """
    configs = [c for doc in DOCS for c in catalogue(load_page(doc)).prometheus]
    assert configs, "operations.md should show a plain Prometheus scrape configuration"
    for i, (block, config) in enumerate(configs):
        done = _promtool_check(promtool, tmp_path / f"prometheus-{i}.yml", config)
        if "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
            static = copy.deepcopy(config)
            for job in static["scrape_configs"]:
                for sd in job.pop("kubernetes_sd_configs", []):
                    assert set(sd) <= {"role", "namespaces", "selectors"}, f"{block.where}: {sd}"
                    assert sd["role"] in {"pod", "service", "endpoints", "endpointslice", "node"}
                    job["static_configs"] = [{"targets": ["127.0.0.1:9479"]}]
            done = _promtool_check(promtool, tmp_path / f"prometheus-{i}-static.yml", static)
        assert done.returncode == 0, f"{block.where}: promtool: {done.stdout}{done.stderr}"


def _promtool_check(
    promtool: Path, path: Path, config: Mapping[str, Any]
) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    return subprocess.run(
        [str(promtool), "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.dvc
def test_shown_pins_are_what_the_operator_writes(dvc3_fixture: DvcFixture, tmp_path: Path) -> None:
    page = load_page(INSTALL)
    shown = [value for _, value in pins_examples(page)]
    assert any('"ref":"v2"' in v for v in shown), "install.md shows no pins of a git revision"
    assert any('"ref":"golden"' in v for v in shown), "install.md shows no pins of a name"
    problems = pins_problems(page, catalogue(page), dvc3_fixture, tmp_path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_json_blocks_parse(doc: Path) -> None:
    for block in load_page(doc).blocks_of("json"):
        json.loads(block.text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_helm_commands_render_the_chart(doc: Path) -> None:
    page = load_page(doc)
    values_files = {
        **catalogue(load_page(INSTALL)).values_files,
        **catalogue(load_page(OPERATIONS)).values_files,
    }
    commands = helm_commands(page, values_files)
    verbs = {c.verb for c in commands}
    expected = {"install"} if doc == INSTALL else {"upgrade"}
    assert expected <= verbs, f"{doc.name}: expected helm {expected}, found {verbs}"
    problems = [p for c in commands for p in render_problems(c)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_values_key_paths_exist(doc: Path) -> None:
    page = load_page(doc)
    assert key_path_spans(page), f"{doc.name}: no values key paths found"
    problems = key_path_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_metric_names_are_exported(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    problems = metric_problems(text, doc.name)
    assert not problems, "\n".join(problems)


def test_metrics_table_lists_every_family_with_who_exports_it() -> None:
    page = load_page(OPERATIONS)
    documented: dict[str, str] = {}
    for header, rows in tables(page):
        names = column(header, rows, "metric")
        who = column(header, rows, "exported by")
        for name, roles in zip(names, who, strict=True):
            documented[name.strip("`")] = roles
    families = {
        f.name if f.type != "counter" else f"{f.name}_total"
        for role in ("sidecar", "agent")
        for f in Metrics(CollectorRegistry(), role=role).registry.collect()
    }
    assert set(documented) == families, (
        f"undocumented: {sorted(families - set(documented))}; "
        f"not exported: {sorted(set(documented) - families)}"
    )
    for name, roles in documented.items():
        for role in ("sidecar", "agent"):
            if role in roles:
                assert name in exposition(role).names, f"{name} is not exported by the {role}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_datapin_variables_are_settings(doc: Path) -> None:
    problems = variable_problems(doc.read_text(encoding="utf-8"), doc.name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_reasons_are_written_by_the_operator(doc: Path) -> None:
    problems = reason_problems(load_page(doc))
    assert not problems, "\n".join(problems)


def test_operations_page_explains_every_condition_reason() -> None:
    """Every reason the operator can write on a Dataset (a condition) or post as an Event must be
    explained in operations.md (its tables, or its text in backticks).

    Left out, from the class hierarchy rather than by name: the reasons of the webhook's
    refusals (`RejectedError` subclasses other than `SecretError`, which is also a condition),
    whose message goes to `kubectl apply` and whose reason nobody sees, and the reasons of the
    abstract bases and of the program's own settings error.
    """
    page = load_page(OPERATIONS)
    in_tables = {
        tok
        for header, rows in tables(page)
        for c in column(header, rows, "reason")
        for tok in code_spans(c)
    }
    mentioned = set(re.findall(r"`([A-Z][A-Za-z]+)`", page.prose_text))
    refusals_only = {
        cls.reason
        for cls in vars(operator_errors).values()
        if isinstance(cls, type)
        and issubclass(cls, operator_errors.RejectedError)
        and not issubclass(cls, operator_errors.SecretError)
    }
    bases = {
        operator_errors.OperatorError.reason,
        operator_errors.ResolutionError.reason,
        operator_errors.SettingsError.reason,
    }
    missing = operator_reasons() - in_tables - mentioned - refusals_only - bases
    assert not missing, f"operations.md does not explain: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    problems = link_problems(load_page(doc), doc.parent)
    assert not problems, "\n".join(problems)


def test_dashboard_panels_are_all_described() -> None:
    page = load_page(OPERATIONS)
    described = {c for header, rows in tables(page) for c in column(header, rows, "panel")}
    assert not dashboard_table_problems(page), "\n".join(dashboard_table_problems(page))
    missing = dashboard_panel_titles() - described
    assert not missing, f"operations.md does not describe panels {sorted(missing)}"


def test_chart_notes_point_at_the_node_volume_step() -> None:
    """NOTES.txt sends admins with a stuck agent to "docs/install.md, step 1"."""
    notes = (CHART / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    assert "docs/install.md, step 1" in notes
    headings = [line for _, line in load_page(INSTALL).prose if line.startswith("## Step 1")]
    assert headings, "install.md has no '## Step 1' heading"
    assert "node volume" in headings[0].lower()
    assert any(
        line.startswith("## Troubleshooting by symptom") for _, line in load_page(OPERATIONS).prose
    )


# -- the checks can fail --------------------------------------------------------------------------


BROKEN = """\
Set `agent.watermarks.hihg` and `--set operator.replica=2`; keep `operator.replicas`.
Watch `datapin_cache_hits_total`, `datapin_gc_runs_total{result="partial"}` and
`datapin_fetch_errors_total{reason="nope"}`; `datapin_volume_*` is fine, `datapin_nothing_*` not.
Set `DATAPIN_GC_HIGH_PERCENTAGE` (but `DATAPIN_GC_HIGH_PERCENT` exists). The reason `NotPuhsed`.

| reason | meaning |
| --- | --- |
| `NotPushed` | fine |
| `RemoteGone` | invented |

| panel | shows |
| --- | --- |
| Cache hit ratio (files) | fine |
| Cache hit rate | invented |

See [nowhere](no-such-file.md), [ops](operations.md#no-such-heading), [ok](install.md#uninstall).

```yaml
apiVersion: batch/v1
kind: Job
metadata:
  name: broken
  namespace: ml
  annotations:
    datapin.dev/dataset: imagenet
    datapin.dev/revison: v2
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: ["ls", "/data/imagenet"]}]
```

```yaml
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec: {replicas: "two"}
```

```yaml
apiVersion: datapin.dev/v1alpha1
kind: Dataset
metadata: {name: imagenet, namespace: ml}
spec:
  remote: {url: "http://not-s3", credentialsSecretRef: {name: b2}}
```

```yaml
just: a mapping
```

```sh
helm install datapin charts/datapin -n datapin --set agent.watermarks.low=95
```
"""


def broken_page() -> Page:
    return parse_page(BROKEN, "broken.md", DOCS_DIR / "broken.md")


def test_checks_catch_wrong_value_paths() -> None:
    problems = key_path_problems(broken_page())
    assert any("agent.watermarks.hihg" in p for p in problems)
    assert any("operator.replica`" in p for p in problems)
    assert not any("operator.replicas`" in p for p in problems)


def test_checks_catch_wrong_metrics_and_label_values() -> None:
    problems = metric_problems(BROKEN, "broken.md")
    text = "\n".join(problems)
    assert "datapin_cache_hits_total" in text
    assert 'result="partial"' in text
    assert 'reason="nope"' in text
    assert "datapin_nothing" in text
    assert "datapin_volume" not in text


def test_checks_catch_unknown_variables() -> None:
    problems = variable_problems(BROKEN, "broken.md")
    assert problems == [
        "broken.md: `DATAPIN_GC_HIGH_PERCENTAGE` is not a setting of the operator or the sidecar"
    ]


def test_checks_catch_invented_reasons() -> None:
    text = "\n".join(reason_problems(broken_page()))
    assert "NotPuhsed" in text
    assert "RemoteGone" in text
    assert "`NotPushed`" not in text


def test_checks_catch_missing_panels_and_links() -> None:
    page = broken_page()
    assert dashboard_table_problems(page) == [
        "broken.md: dashboard panel 'Cache hit rate' does not exist"
    ]
    links = "\n".join(link_problems(page, DOCS_DIR))
    assert "no-such-file.md" in links
    assert "#no-such-heading" in links
    assert "install.md#uninstall" not in links


def test_checks_catch_invalid_manifests_and_refused_jobs() -> None:
    page = broken_page()
    cat = catalogue(page)
    text = "\n".join(cat.problems)
    assert "Deployment x" in text  # replicas must be an integer
    assert "Dataset imagenet" in text  # spec.remote.url must be s3://
    assert "a YAML block must be" in text  # the bare mapping
    refusals = "\n".join(workload_problems(page, cat))
    assert "datapin.dev/revison" in refusals  # the webhook's unknown-key refusal


def test_checks_catch_values_the_chart_refuses() -> None:
    (command,) = helm_commands(broken_page(), {})
    problems = render_problems(command)
    assert any("agent.watermarks.low" in p for p in problems), problems


def test_injection_check_catches_a_job_reading_the_wrong_path() -> None:
    page = parse_page(
        BROKEN.replace("datapin.dev/revison", "datapin.dev/revision"),
        "broken.md",
        DOCS_DIR / "broken.md",
    )
    cat = catalogue(page)
    # Give the Job a valid Dataset and Secret, so only its reading path is wrong.
    dataset = {
        "apiVersion": "datapin.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {
            "remote": {"url": "s3://bucket/x", "credentialsSecretRef": {"name": "b2"}},
            "revisions": {"v2": FAKE_PIN},
        },
    }
    cat.objects = [(b, o) for b, o in cat.objects if o["kind"] != "Dataset"]
    cat.objects.append((cat.objects[0][0], dataset))
    page.blocks.append(
        Block(doc="broken.md", line=0, lang="sh", text="kubectl -n ml create secret generic b2\n")
    )
    problems = workload_problems(page, cat)
    assert problems == [
        f"{cat.objects[0][0].where}: Job broken: c never reads /data/imagenet/current "
        "(the published revision is under current/)"
    ]


@pytest.mark.dvc
def test_pins_check_catches_a_wrong_layout(dvc3_fixture: DvcFixture, tmp_path: Path) -> None:
    """What install.md once showed: a git revision's pins with the wrong layout, a named
    revision's with DVC 3's where the operator writes the Dataset's `auto`, and a shortened
    pin no operator writes."""
    page = load_page(INSTALL)
    wrong = [
        '{"imagenet":{"layout":"auto","pin":"d3b07384d113edec49eaa6238ad5ff00.dir","ref":"v2"}}',
        '{"imagenet":{"layout":"dvc3","pin":"3f0c5e1a9b2d4c6e8f0a1b2c3d4e5f60.dir","ref":"golden"}}',
        '{"imagenet":{"layout":"dvc3","pin":"d3b0...e1.dir","ref":"v2"}}',
    ]
    page = Page(
        name="broken.md",
        path=page.path,
        blocks=[Block(doc="broken.md", line=1, lang="text", text="\n".join(wrong) + "\n")],
    )
    problems = pins_problems(page, catalogue(load_page(INSTALL)), dvc3_fixture, tmp_path)
    assert len(problems) == 3, problems
    assert '"layout":"dvc3","pin":"d3b07384d113edec49eaa6238ad5ff00.dir"' in problems[0]
    assert '"layout":"auto","pin":"3f0c5e1a9b2d4c6e8f0a1b2c3d4e5f60.dir"' in problems[1]
    assert "never writes" in problems[2]
