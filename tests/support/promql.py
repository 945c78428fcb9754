"""PromQL in tests: which metrics an expression reads, and which metric names exist.

An expression is parsed with promql-parser (Prometheus' grammar, in Rust), never matched with
regular expressions. The names that exist are: the gateway's (``GatewayMetrics``), those of any
exposition given (engine-sim's or vLLM's ``/metrics``), the rules file's recording rules, and the
external names that docs/metrics.md lists (kube-state-metrics, cAdvisor, DCGM exporter).

For the rules file, the dashboards, and any other PromQL the chart ships (prometheus-adapter rules,
KEDA queries):

    unknown = metric_names(expr) - known_metric_names(engine_exposition)

Grafana's variables (``$__rate_interval``, ``$namespace``, ...) and prometheus-adapter's
``<<.Series>>``-style templates must be filled first: :func:`substitute_grafana_variables` does the
former.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from chatfleet.telemetry.metrics import GatewayMetrics, OperatorMetrics
from tests.support.tools import tool_path

ROOT = Path(__file__).parents[2]
RULES_FILE = ROOT / "charts" / "chatfleet" / "rules" / "chatfleet-rules.yaml"
DASHBOARDS_DIR = ROOT / "charts" / "chatfleet" / "dashboards"
METRICS_DOC = ROOT / "docs" / "metrics.md"
EXTERNAL_SECTION = "## External metrics"
"""The heading (its start) of the docs/metrics.md section that lists the external names."""
RECORDING_SECTION = "## Recording rules"
"""The heading of the docs/metrics.md section that lists the recording rules."""

GRAFANA_INTERVALS = frozenset({"__rate_interval", "__interval", "__range"})
"""Grafana variables that stand for a duration: they become 5m; any other becomes its name."""
_GRAFANA_VARIABLE = re.compile(
    r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}"  # ${name} or ${name:format}
    r"|\$([A-Za-z_]\w*)"                 # $name (not $1, a label_replace group)
    r"|\[\[([A-Za-z_]\w*)\]\]"           # [[name]], the old syntax
)
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.DOTALL)

# Sample names a family of each type exposes (prometheus_client names counters without _total).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def substitute_grafana_variables(expr: str, values: Mapping[str, str] | None = None) -> str:
    """``expr`` with each Grafana variable replaced by its entry in ``values``, else durations by
    ``5m`` and any other variable by its name (``namespace="$namespace"`` becomes
    ``namespace="namespace"``, so a test can still see which variable a matcher used)."""
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if values and name in values:
            return values[name]
        return "5m" if name in GRAFANA_INTERVALS else name
    return _GRAFANA_VARIABLE.sub(replace, expr)


def parse(expr: str) -> promql_parser.Expr:
    """The syntax tree of ``expr``; ValueError (with the parser's message) when it is not PromQL."""
    try:
        return promql_parser.parse(expr)
    except ValueError as exc:
        raise ValueError(f"not PromQL: {exc}: {expr}") from exc


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every vector selector in ``expr`` (those inside range selectors and subqueries too)."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(parse(expr), visit)
    return found


def selector_name(selector: promql_parser.VectorSelector) -> str:
    """The metric a selector reads: its name, or its ``__name__="..."`` matcher.

    A selector without a fixed name (``{__name__=~"..."}``) cannot be checked: ValueError.
    """
    if selector.name:
        return str(selector.name)
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return str(matcher.value)
    raise ValueError(f"selector without a fixed metric name: {selector}")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads (sample names: ``x_bucket``, ``x_total``)."""
    return {selector_name(selector) for selector in selectors(expr)}


def label_matchers(expr: str) -> Iterator[tuple[str, str, promql_parser.MatchOp, str]]:
    """(metric, label, operator, value) for each label matcher of each selector in ``expr``."""
    for selector in selectors(expr):
        name = selector_name(selector)
        for matcher in selector.matchers.matchers:
            if matcher.name != "__name__":
                yield name, str(matcher.name), matcher.op, str(matcher.value)


def family_sample_names(name: str, kind: str) -> set[str]:
    """The sample names of a family called ``name`` (as prometheus_client names it) of ``kind``."""
    return {name + suffix for suffix in _SUFFIXES.get(kind, ("",))}


def exposition_names(text: str) -> set[str]:
    """Every sample name a text exposition has or, by its families' types, can have."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= family_sample_names(family.name, family.type)
        names |= {sample.name for sample in family.samples}
    return names


def gateway_metric_names() -> set[str]:
    """The gateway's sample names, from a fresh ``GatewayMetrics`` (the metric contract)."""
    metrics = GatewayMetrics(model="m", engine_kind="sim", version="0")
    return {name for family in metrics.registry.collect()
            for name in family_sample_names(family.name, family.type)}


def operator_metric_names() -> set[str]:
    """``chatfleet operator``'s sample names, from a fresh ``OperatorMetrics``."""
    return {name for family in OperatorMetrics().registry.collect()
            for name in family_sample_names(family.name, family.type)}


def doc_table_names(heading: str, doc: Path = METRICS_DOC) -> set[str]:
    """The names in the first column of the tables of the section of ``doc`` whose heading
    starts with ``heading`` (``## ...``)."""
    text = doc.read_text()
    start = text.find(heading)
    assert start >= 0, f"{doc} has no section starting {heading!r}"
    section = text[start + len(heading):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    return set(re.findall(r"^\| `([A-Za-z_:][A-Za-z0-9_:]*)` \|", section, re.MULTILINE))


def external_metric_names(doc: Path = METRICS_DOC) -> set[str]:
    """The kube-state-metrics, cAdvisor and DCGM names docs/metrics.md lists."""
    return doc_table_names(EXTERNAL_SECTION, doc)


def load_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    """The rules of a Prometheus rule file, in order, each a dict (record or alert, expr, ...)."""
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recorded_names(path: Path = RULES_FILE) -> set[str]:
    return {rule["record"] for rule in load_rules(path) if "record" in rule}


def known_metric_names(*expositions: str) -> set[str]:
    """Every name a query may read: the gateway's and the operator's, those in ``expositions``
    (pass engine-sim's ``/metrics``), the recording rules' and docs/metrics.md's external names."""
    names = (gateway_metric_names() | operator_metric_names() | recorded_names()
             | external_metric_names())
    for text in expositions:
        names |= exposition_names(text)
    return names


def rule_expressions(path: Path = RULES_FILE) -> dict[str, str]:
    """Rule name (record or alert) -> its expression."""
    return {rule.get("record") or rule["alert"]: rule["expr"] for rule in load_rules(path)}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_expressions(path: Path) -> dict[str, str]:
    """Where ("<file> panel <title> <refId>", "<file> variable <name>") -> the PromQL it runs,
    Grafana variables still in. A variable's ``label_values(selector, label)`` yields the selector."""
    dashboard = json.loads(path.read_text())
    found: dict[str, str] = {}
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found[f"{path.name} panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
        if match:
            found[f"{path.name} variable {variable['name']}"] = match.group(1)
    return found


def all_dashboard_expressions(directory: Path = DASHBOARDS_DIR) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(directory.glob("*.json")):
        found |= dashboard_expressions(path)
    return found


def promtool_check_expressions(exprs: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on ``exprs`` written as recording rules (Grafana variables
    filled): Prometheus' own parser and checks, on queries that are not rules themselves."""
    rules = [{"record": f"check:expression_{i}:promtool", "expr": substitute_grafana_variables(e)}
             for i, e in enumerate(exprs.values())]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="chatfleet-exprs-") as file:
        yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}, file)
        file.flush()
        return subprocess.run([tool_path("promtool"), "check", "rules", file.name],
                              capture_output=True, text=True, timeout=60, check=False)
