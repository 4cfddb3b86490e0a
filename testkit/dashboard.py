"""Read the Grafana dashboard shipped with the chart and turn its queries into plain PromQL.

The dashboard's queries use Grafana's variables (``$node``, ``$dataset``, ``$__rate_interval``,
``$__range``, ...), which Prometheus does not know. :func:`expand` substitutes them the way
Grafana would for one choice of values, so a test can run every panel's query against a real
Prometheus (:mod:`testkit.prometheus`); :func:`metric_names` lists the datapin metrics a
query reads, so a test can check each against what the code exports.

A variable :func:`expand` does not know raises ``ValueError``: a new variable in the dashboard
must be taught here rather than reach Prometheus as a parse error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["expand", "iter_panels", "load_dashboard", "metric_names", "panel_queries"]

# `$name` or `${name}` (also `${name:format}`), not followed by more identifier characters, so
# `$__range` does not match inside `$__range_s`.
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::\w+)?\}|(?P<bare>\w+))(?!\w)")
_METRIC = re.compile(r"(?<![\w:])datapin_[A-Za-z0-9_:]*")


def load_dashboard(path: str | Path) -> dict[str, Any]:
    """The dashboard JSON at ``path`` as a dict (raises on invalid JSON)."""
    with open(path, encoding="utf-8") as f:
        data: Any = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a dashboard is a JSON object, got {type(data).__name__}")
    return data


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows (nested under the row)."""
    stack = list(reversed(dashboard.get("panels", [])))
    while stack:
        panel = stack.pop()
        yield panel
        stack.extend(reversed(panel.get("panels", [])))


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every target of every panel, nested ones included."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def expand(
    expr: str,
    *,
    rate_interval: str = "30s",
    range_: str = "5m",
    node: str = ".*",
    dataset: str = ".*",
    interval: str | None = None,
) -> str:
    """``expr`` with the dashboard's variables replaced: ``$__rate_interval``, ``$__interval``
    (default: ``rate_interval``), ``$__range``, ``$node`` / ``${node}``, ``$dataset`` /
    ``${dataset}``. ``node`` and ``dataset`` are regexes (they land in ``=~"..."``), as Grafana's
    ``All`` (``.*``) or a multi-value selection (``(a|b)``) would be.
    """
    values = {
        "__rate_interval": rate_interval,
        "__interval": interval if interval is not None else rate_interval,
        "__range": range_,
        "node": node,
        "dataset": dataset,
    }

    def substitute(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        if name not in values:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(substitute, expr)


def metric_names(expr: str) -> set[str]:
    """The ``datapin_*`` metric names ``expr`` reads, as written (``_bucket`` etc. kept)."""
    return set(_METRIC.findall(expr))
