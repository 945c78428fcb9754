"""Every PromQL expression the chart ships (alerts, recording rules, dashboard queries, the HPA's
adapter rules and the KEDA triggers) and the operator's queries (autoscale/prometheus.py) read only
metrics that exist, with labels and label values that exist.

Existing names: the gateway's (GatewayMetrics), the engine's (a live engine-sim's /metrics, which
exports vLLM's names), the recording rules' outputs, and the external names docs/metrics.md lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from promql_parser import MatchOp

from chatfleet.autoscale.prometheus import (
    capacity_query,
    cold_start_query,
    demand_query,
)
from chatfleet.telemetry.metrics import Outcome
from tests.chart.render import ROOT, one, render
from tests.support.metrics import families
from tests.support.promql import (
    RECORDING_SECTION,
    all_dashboard_expressions,
    doc_table_names,
    external_metric_names,
    known_metric_names,
    label_matchers,
    metric_names,
    recorded_names,
    rule_expressions,
    substitute_grafana_variables,
)

SCRAPE_LABELS = {"namespace", "pod", "container", "service", "endpoint", "job", "instance",
                 "metrics_path"}
"""Labels the chart's ServiceMonitor adds to every gateway and engine series."""
CLOSED_VALUES = {
    "outcome": {outcome.value for outcome in Outcome},
    "priority": {"interactive", "batch"},
    "finished_reason": {"stop", "length", "abort"},
}
"""Labels whose values are a closed set: a matcher must name (or match) one of them."""
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Expositions:
    gateway: str
    engine: str


@pytest.fixture(scope="module")
def expositions() -> Iterator[Expositions]:
    """A gateway in front of engine-sim, after one answered request, so that every labelled
    family (TTFT by route, outcomes) has samples and shows its labels."""
    from tests.conftest import chat, start_engine_sim, start_gateway, upstream_env
    sim = start_engine_sim()
    gateway = start_gateway(upstream_env(sim))
    try:
        httpx.post(gateway.v1 + "/chat/completions", json=chat(3), timeout=10).raise_for_status()
        yield Expositions(gateway=gateway.metrics(),
                          engine=httpx.get(sim.url + "/metrics", timeout=5).text)
    finally:
        gateway.proc.terminate()
        sim.proc.terminate()


def autoscaling_expressions() -> dict[str, str]:
    """The prometheus-adapter queries (templates filled as the adapter fills them) and the KEDA
    ScaledObject's queries as the chart renders them."""
    adapter = yaml.safe_load((ROOT / "hpa" / "prometheus-adapter-values.yaml").read_text())
    exprs = {}
    for rule in adapter["rules"]["custom"]:
        (series,) = metric_names(rule["seriesQuery"])
        filled = (rule["metricsQuery"].replace("<<.Series>>", series)
                  .replace("<<.LabelMatchers>>", 'namespace="llm",pod=~"chatfleet-a|chatfleet-b"')
                  .replace("<<.GroupBy>>", "pod"))
        exprs[f"adapter {rule['name']['as']}"] = filled
    scaled = one(render({"autoscaling.mode": "keda"}), "ScaledObject")
    for trigger in scaled["spec"]["triggers"]:
        exprs[f"keda {trigger['name']}"] = trigger["metadata"]["query"]
    return exprs


def operator_expressions() -> dict[str, str]:
    """What ``chatfleet operator`` asks Prometheus each tick, for the TTFT SLO bounds a policy
    may name (the chart's 2 s and another bucket bound), and the cold start it learns from the
    Deployment's pods (kube-state-metrics) for a policy that sets none."""
    exprs = {"operator demand": demand_query("llm", "chatfleet"),
             "operator cold start": cold_start_query("llm", "chatfleet")}
    for ttft in (0.5, 2.0):
        exprs[f"operator capacity (TTFT {ttft:g} s)"] = capacity_query(
            "llm", "chatfleet", busy_utilization=0.7, slo_error_ratio=0.01, ttft_seconds=ttft)
    return exprs


def shipped_expressions() -> dict[str, str]:
    """Where -> expression (Grafana variables filled) for every rule, dashboard query, adapter
    rule, KEDA trigger and operator query."""
    exprs = {f"rule {name}": expr for name, expr in rule_expressions().items()}
    exprs |= {where: substitute_grafana_variables(expr)
              for where, expr in all_dashboard_expressions().items()}
    exprs |= autoscaling_expressions()
    exprs |= operator_expressions()
    return exprs


def family_of(sample_name: str, labels_by_family: dict[str, set[str]]) -> str | None:
    """The family a sample name belongs to (``x_bucket`` -> ``x``, ``x_total`` -> ``x``)."""
    for candidate in (sample_name, sample_name.removesuffix("_total"),
                      *(sample_name.removesuffix(s) for s in _HISTOGRAM_SUFFIXES)):
        if candidate in labels_by_family:
            return candidate
    return None


def test_every_query_reads_only_metrics_that_exist(expositions: Expositions) -> None:
    known = known_metric_names(expositions.engine)
    assert "vllm:kv_cache_usage_perc" in known and "chatfleet_ttft_seconds_bucket" in known
    # The check can fail: a misspelt name is reported.
    assert metric_names("sum(rate(chatfleet_request_total[5m]))") - known == {"chatfleet_request_total"}

    exprs = shipped_expressions()
    assert len(exprs) >= 60
    unknown: dict[str, set[str]] = {}
    for where, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{where} reads no metric: {expr}"
        if names - known:
            unknown[where] = names - known
    assert unknown == {}


def test_every_documented_external_name_is_used() -> None:
    """docs/metrics.md's external table lists exactly what rules and dashboards need."""
    used = {name for expr in shipped_expressions().values() for name in metric_names(expr)}
    external = external_metric_names()
    assert len(external) >= 10
    assert external - used == set()


def test_docs_list_exactly_the_recording_rules() -> None:
    """Autoscalers and people read the recorded series by the names docs/metrics.md gives."""
    assert doc_table_names(RECORDING_SECTION) == recorded_names()


def test_label_matchers_use_labels_and_values_that_exist(expositions: Expositions) -> None:
    labels_by_family = families(expositions.gateway) | families(expositions.engine)
    le_values = bucket_bounds(expositions.gateway, expositions.engine)
    assert "2.0" in le_values["chatfleet_ttft_seconds"]  # the TTFT SLO's threshold
    problems: list[str] = []
    for where, expr in shipped_expressions().items():
        for metric, label, op, value in label_matchers(expr):
            family = family_of(metric, labels_by_family)
            if family is None:  # a recording rule's output or an external exporter's series
                continue
            allowed = labels_by_family[family] | SCRAPE_LABELS
            if metric.endswith("_bucket"):
                allowed |= {"le"}
            closed = le_values.get(family, set()) if label == "le" else CLOSED_VALUES.get(label)
            if label not in allowed:
                problems.append(f"{where}: {metric} has no label {label!r}")
            elif closed is not None and not matches_some(op, value, closed):
                problems.append(f"{where}: {label} {op} {value!r} matches none of {sorted(closed)}")
    assert problems == []


def bucket_bounds(*texts: str) -> dict[str, set[str]]:
    """Histogram family -> the ``le`` values its buckets expose, as the exposition writes them."""
    bounds: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bounds.setdefault(family.name, set()).add(sample.labels["le"])
    return bounds


def matches_some(op: MatchOp, value: str, values: set[str]) -> bool:
    """Whether an ``=`` or ``=~`` matcher selects one of ``values``; each alternative of a
    ``=~`` without groups must. Negative matchers always pass."""
    if op == MatchOp.Equal:
        return value in values
    if op == MatchOp.Re:
        alternatives = [value] if "(" in value else value.split("|")
        return all(any(re.fullmatch(part, v) for v in values) for part in alternatives)
    return True


def test_closed_value_check_catches_a_misspelt_outcome() -> None:
    outcomes = CLOSED_VALUES["outcome"]
    [(_, _, op, value)] = label_matchers('x{outcome=~"queue_ful|queue_timeout"}')
    assert not matches_some(op, value, outcomes)
    [(_, _, op, value)] = label_matchers('x{outcome="engine_eror"}')
    assert not matches_some(op, value, outcomes)
    [(_, _, op, value)] = label_matchers('x{outcome=~"queue_(full|timeout)"}')
    assert matches_some(op, value, outcomes)
