"""Checks of the admin docs (docs/install.md, docs/operations.md) against the code they describe.

The library behind tests/test_docs.py (whose docstring lists what is checked and why): parsing a
Markdown page into fenced blocks, tables and code spans, and one function per kind of claim a
page makes (manifests, values key paths, `helm` commands, metric, variable and reason names,
links, dashboard panels, `datapin.dev/pins` values), each returning the problems it found
(empty: fine). Returning problems rather than asserting is what lets the tests feed them broken
pages and show that every check can fail.

Known names are derived from the code (settings models, a fresh `Metrics` exposition, the
operator's source via `ast`), never from a hard-coded list. Nothing here needs a cluster: the
manifests are validated offline, and the chart is rendered with helm-python-sdk.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import datapin_sidecar.errors as sidecar_errors
import helm_python
import kubernetes_validate
import yaml
from datapin_operator.api.crd import validate_dataset
from datapin_operator.api.models import DatasetSpec
from datapin_operator.errors import OperatorError
from datapin_operator.metrics import OperatorMetrics
from datapin_operator.resolve.gitsource import GitSource
from datapin_operator.resolve.resolver import Resolver
from datapin_operator.settings import Settings as OperatorSettings
from datapin_operator.webhook.inject import NODE_VOLUME, POD_UID_ENV, DatasetMount, inject
from datapin_operator.webhook.requests import ANNOTATION_PREFIX, PINS_KEY, parse_request
from datapin_sidecar.csi.volume import DRIVER as CSI_DRIVER
from datapin_sidecar.node.metrics import Metrics
from datapin_sidecar.node.settings import Settings as SidecarSettings
from datapin_sidecar.pins import PinRecord, format_pins
from prometheus_client import CollectorRegistry

from testkit import REPO_ROOT
from testkit.dashboard import iter_panels, load_dashboard
from testkit.dvcrepo import DvcFixture, run_git

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


#: The processes that export metrics: the node side's two roles of `Metrics`, and the operator.
ROLES = ("sidecar", "agent", "operator")


def fresh_registry(role: str) -> CollectorRegistry:
    """A fresh registry of `role`, with every series it creates up front."""
    registry = CollectorRegistry()
    if role == "operator":
        OperatorMetrics(registry)
        return registry
    metrics = Metrics(registry, role=role)
    metrics.dataset("probe")  # creates every per-dataset series, with its fixed label values
    return registry


@cache
def exposition(role: str) -> Exposition:
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in fresh_registry(role).collect():
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
        for role in ROLES
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
    roles = [exposition(role) for role in ROLES]
    names = frozenset().union(*(r.names for r in roles))
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
            known = frozenset().union(*(r.labels.get(name, frozenset()) for r in roles))
            if known and label not in known and label not in {"node", "namespace", "pod"}:
                problems.append(
                    f"{where}: `{name}` has no label `{label}` (it has {sorted(known)})"
                )
                continue
            allowed = frozenset().union(*(r.values.get((name, label), frozenset()) for r in roles))
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
        # The node volume (sidecar modes) or the datasets' csi volumes (csi mode).
        ours = {
            v["name"]
            for v in injected["spec"].get("volumes") or []
            if v["name"] == NODE_VOLUME or (v.get("csi") or {}).get("driver") == CSI_DRIVER
        }
        for container in injected["spec"]["containers"]:
            got = {
                v["mountPath"]: v for v in container.get("volumeMounts") or [] if v["name"] in ours
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
            if request.mode != "csi" and not any(
                e.get("name") == POD_UID_ENV for e in container.get("env") or []
            ):
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
