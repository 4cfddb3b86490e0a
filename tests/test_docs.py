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

The checks live in testkit/docscheck.py: functions that return problems (empty: fine), so
that the last tests can feed them broken input and show that each one can fail. Known names
are derived from the code (settings models, a fresh `Metrics` exposition, the operator's source
via `ast`), never from a hard-coded list. Nothing here needs a cluster: the manifests are
validated offline, and the chart is rendered with helm-python-sdk.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datapin_operator.errors as operator_errors
import pytest
import yaml

from testkit.docscheck import (
    CHART,
    DOCS,
    DOCS_DIR,
    FAKE_PIN,
    INSTALL,
    OPERATIONS,
    ROLES,
    Block,
    Page,
    catalogue,
    code_spans,
    column,
    dashboard_panel_titles,
    dashboard_table_problems,
    exposition,
    fresh_registry,
    helm_commands,
    key_path_problems,
    key_path_spans,
    link_problems,
    load_page,
    metric_problems,
    operator_reasons,
    parse_page,
    pins_examples,
    pins_problems,
    reason_problems,
    render_problems,
    tables,
    variable_problems,
    workload_problems,
)
from testkit.dvcrepo import DvcFixture

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
        for role in ROLES
        for f in fresh_registry(role).collect()
    }
    assert set(documented) == families, (
        f"undocumented: {sorted(families - set(documented))}; "
        f"not exported: {sorted(set(documented) - families)}"
    )
    for name, roles in documented.items():
        for role in ROLES:
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
