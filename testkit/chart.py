"""Render the Helm chart offline and read what it renders the way Kubernetes would.

Design: the chart is rendered with helm-python-sdk (Helm's own Go template engine and values
schema checks behind a C ABI, no `helm` binary, no cluster), so what the tests read is exactly
what `helm install` would send. :class:`Release` holds one rendering, parsed into objects, with
lookups by kind and name that fail with a message listing what *was* rendered.

The other helpers answer the questions the tests ask of those objects with Kubernetes' own
rules, not a simplified reading, because the point is to catch a chart that Kubernetes would
read differently from its authors:

- :func:`container_env` expands an env list as kubelet does: `valueFrom.fieldRef` from the
  pod's fields, then `$(VAR)` references to variables defined *earlier* in the list (a later or
  unknown one stays literal, `$$` escapes), so an out-of-order variable shows up as a literal
  `$(...)` in the value instead of being silently "fixed" by the test.
- :func:`resolve_port` resolves a named port (a probe's or a Service's targetPort) against the
  container's ports, as kubelet and the endpoints controller do.
- :func:`selector_matches` / :func:`label_selector_matches` apply matchLabels and the
  `k=v,k!=v` selector strings the operator uses to find its agents.
- :func:`mount_covering` finds the volume mount a path lives under (longest mount path wins).
- :func:`subcommands` lists the first positional choices of an argparse parser, which is how
  the console scripts name their subcommands.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from testkit import REPO_ROOT

__all__ = [
    "CHART_DIR",
    "Release",
    "container_env",
    "label_selector_matches",
    "mount_covering",
    "pod_containers",
    "pod_spec",
    "render",
    "resolve_port",
    "selector_matches",
    "subcommands",
    "volume_named",
]

CHART_DIR = REPO_ROOT / "charts" / "datapin"

# `$(NAME)` as kubelet expands it; `$$` is an escaped `$`.
_ENV_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass(frozen=True)
class Release:
    """One rendering of the chart: its objects (documents in template order) and NOTES.txt."""

    name: str
    namespace: str
    manifests: dict[str, str]
    objects: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    def kinds(self) -> Counter[str]:
        return Counter(obj["kind"] for obj in self.objects)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        if len(found) > 1:
            raise AssertionError(f"the chart renders {kind} {name} {len(found)} times")
        return found[0] if found else None

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """The single object of `kind` (named `name` if given); fails listing what exists."""
        found = self.of_kind(kind)
        if name is not None:
            found = [o for o in found if o["metadata"]["name"] == name]
        if len(found) != 1:
            rendered = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in self.objects)
            wanted = kind if name is None else f"{kind}/{name}"
            raise AssertionError(f"expected exactly one {wanted}, the chart rendered {rendered}")
        return found[0]


def render(chart: Any, values: Mapping[str, Any], *, name: str, namespace: str) -> Release:
    """Render `chart` (a `helm_python.Chart`) with `values` as release `name` in `namespace`."""
    manifests = chart.render(dict(values), name=name, namespace=namespace)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise AssertionError(f"{path} renders a document that is not an object: {doc!r}")
            objects.append(doc)
    return Release(
        name=name, namespace=namespace, manifests=manifests, objects=objects, notes=notes
    )


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment/DaemonSet/Job (its template's), or of a Pod."""
    if workload["kind"] == "Pod":
        return dict(workload["spec"])
    return dict(workload["spec"]["template"]["spec"])


def pod_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Init containers then containers: every process the pod runs."""
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_env(
    container: Mapping[str, Any], *, fields: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The container's environment as the process sees it (kubelet's expansion rules).

    `fields` maps a `fieldRef.fieldPath` (`spec.nodeName`, ...) to its value; a `valueFrom`
    of another sort (secretKeyRef, ...) or an unknown field path raises, since the tests must
    know every value they parse.
    """
    fields = fields or {}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if name in env:
            raise AssertionError(f"env {name} is defined twice in container {container['name']}")
        if "valueFrom" in entry:
            ref = entry["valueFrom"].get("fieldRef")
            if ref is None or ref["fieldPath"] not in fields:
                raise AssertionError(
                    f"env {name} of container {container['name']} comes from "
                    f"{entry['valueFrom']}, which this test cannot provide"
                )
            env[name] = fields[ref["fieldPath"]]
            continue
        env[name] = _expand(str(entry.get("value", "")), env)
    return env


def _expand(value: str, defined: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        ref = match.group(1)
        return defined[ref] if ref in defined else match.group(0)

    return _ENV_REF.sub(one, value)


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    """A port number, or the containerPort of the container's port with that name."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selector_matches(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """matchLabels semantics: every selector label present with the same value."""
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """A label selector string (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated)."""
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    if not terms:
        raise AssertionError(f"empty label selector {selector!r} would select everything")
    for term in terms:
        if " in " in term or " notin " in term:
            raise AssertionError(f"set-based selector term {term!r}: teach this helper")
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def volume_named(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    for volume in spec.get("volumes", []):
        if volume["name"] == name:
            return dict(volume)
    raise AssertionError(f"the pod mounts volume {name!r}, which its spec does not declare")


def mount_covering(container: Mapping[str, Any], path: str | PurePosixPath) -> dict[str, Any]:
    """The volume mount `path` lives under (the deepest one, as the kernel resolves it)."""
    target = PurePosixPath(path)
    best: dict[str, Any] | None = None
    for mount in container.get("volumeMounts", []):
        root = PurePosixPath(mount["mountPath"])
        if (target == root or root in target.parents) and (
            best is None or len(root.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = dict(mount)
    if best is None:
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        raise AssertionError(
            f"{target} is on container {container['name']}'s root filesystem (mounts: {mounts})"
        )
    return best


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The choices of the parser's first positional argument (or its subparsers)."""
    for action in parser._actions:
        if not action.option_strings and action.choices is not None:
            return list(action.choices)
    raise AssertionError(f"parser {parser.prog} has no positional argument with choices")
