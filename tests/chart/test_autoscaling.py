"""Autoscaling objects of the chart, rendered by real helm, and the queries they scale on.

The HPA (mode hpa) and the KEDA ScaledObject (mode keda) must scale the chart's Deployment on the
metrics prometheus-adapter serves (hpa/prometheus-adapter-values.yaml); the standalone files in
hpa/ must be what the chart renders; and the ScaledObject's PromQL, with its pending-pod discount,
is evaluated by promtool against kube-state-metrics and gateway series of a cluster mid-scale-up.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.render import CHART, ROOT, by_kind, helm, notes, one, render, set_args
from tests.support.tools import tool_path

HPA_DIR = ROOT / "hpa"
ADAPTER_VALUES = HPA_DIR / "prometheus-adapter-values.yaml"
METRICS_DOC = ROOT / "docs" / "metrics.md"

SHARED_KB = {"knowledgeBase.store": "pgvector", "knowledgeBase.pgvector.existingSecret": "chatfleet-pg"}
"""More than one pod needs knowledge bases every pod shares (the chart refuses local ones)."""

TUNED = {
    **SHARED_KB,
    "autoscaling.minReplicas": 2,
    "autoscaling.maxReplicas": 12,
    "autoscaling.targetQueueDepthPerPod": 4,
    "autoscaling.targetSlotUtilization": 0.75,
    "autoscaling.scaleUp": {"stabilizationWindowSeconds": 15, "percent": 200, "pods": 3,
                            "periodSeconds": 20},
    "autoscaling.scaleDown": {"stabilizationWindowSeconds": 600, "percent": 10, "pods": 1,
                              "periodSeconds": 120},
}
"""Values unlike the defaults, so a template that ignores one of them fails."""


def adapter_rules() -> dict[str, dict[str, Any]]:
    """prometheus-adapter's custom rules by the metric name they serve (``name.as``)."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def contract_names() -> set[str]:
    """Gateway metric names documented in docs/metrics.md (the metric contract)."""
    return set(re.findall(r"^\| `(chatfleet_[a-z_]+)` \|", METRICS_DOC.read_text(), re.MULTILINE))


def series_in(promql: str) -> set[str]:
    """Metric names a PromQL expression selects (a name directly followed by a matcher)."""
    return set(re.findall(r"([a-z_:][a-z0-9_:]*)\{", promql))


def triggers(scaled_object: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in scaled_object["spec"]["triggers"]}


def test_hpa_mode_scales_the_deployment_on_both_pods_metrics() -> None:
    docs = render({"autoscaling.mode": "hpa", **TUNED}, release="chat", namespace="llm")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert "ScaledObject" not in by_kind(docs)
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["namespace"] == "llm"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 12)
    assert hpa["spec"]["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "chatfleet_queue_depth"},
                                  "target": {"type": "AverageValue", "averageValue": "4"}}},
        {"type": "Pods", "pods": {"metric": {"name": "chatfleet_slot_utilization"},
                                  "target": {"type": "AverageValue", "averageValue": "750m"}}},
    ]
    assert hpa["spec"]["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 15, "selectPolicy": "Max", "policies": [
            {"type": "Percent", "value": 200, "periodSeconds": 20},
            {"type": "Pods", "value": 3, "periodSeconds": 20}]},
        "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Min", "policies": [
            {"type": "Percent", "value": 10, "periodSeconds": 120},
            {"type": "Pods", "value": 1, "periodSeconds": 120}]},
    }


@pytest.mark.parametrize(("target", "quantity"), [(8, "8"), (2.5, "2500m"), (0.9, "900m"),
                                                  (0.333, "333m"), (1, "1")])
def test_hpa_targets_are_exact_kubernetes_quantities(target: float, quantity: str) -> None:
    docs = render({"autoscaling.targetQueueDepthPerPod": target,
                   "autoscaling.targetSlotUtilization": min(target, 1)})
    metrics = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metrics[0]["pods"]["target"]["averageValue"] == quantity
    if target <= 1:
        assert metrics[1]["pods"]["target"]["averageValue"] == quantity


def test_keda_mode_scales_the_deployment_with_the_hpa_behavior() -> None:
    docs = render({"autoscaling.mode": "keda", **TUNED,
                   "autoscaling.keda.prometheusServerAddress": "http://prom.obs.svc:9090"},
                  release="chat", namespace="llm")
    scaled = one(docs, "ScaledObject")
    assert "HorizontalPodAutoscaler" not in by_kind(docs), "KEDA creates its own HPA"
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "KEDA's HPA owns the replica count"
    hpa_behavior = one(render({"autoscaling.mode": "hpa", **TUNED}), "HorizontalPodAutoscaler")[
        "spec"]["behavior"]

    spec = scaled["spec"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"] == "chat-chatfleet"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 12)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa_behavior
    found = triggers(scaled)
    assert set(found) == {"queue-depth", "slot-utilization"}
    for trigger in found.values():
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["serverAddress"] == "http://prom.obs.svc:9090"
        # The gateway series of this release only: its namespace and its Prometheus job.
        assert 'namespace="llm",job="chat-chatfleet"' in trigger["metadata"]["query"]
    assert found["queue-depth"]["metadata"]["threshold"] == "4"
    assert found["slot-utilization"]["metadata"]["threshold"] == "0.75"


def test_mode_none_renders_no_autoscaler_and_a_fixed_replica_count() -> None:
    docs = render({"autoscaling.mode": "none", "replicaCount": 3, **SHARED_KB})
    kinds = by_kind(docs)
    assert "HorizontalPodAutoscaler" not in kinds and "ScaledObject" not in kinds
    assert one(docs, "Deployment")["spec"]["replicas"] == 3


def test_adapter_rules_serve_the_metrics_the_hpa_asks_for() -> None:
    rules = adapter_rules()
    hpa = one(render(), "HorizontalPodAutoscaler")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == set(rules)
    documented = contract_names()
    for served, rule in rules.items():
        # Discovery: the series the rule finds, renamed by name.matches/as, is the served name.
        (discovered,) = series_in(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], discovered), (served, discovered)
        assert {"namespace", "pod"} == set(rule["resources"]["overrides"])
        assert all(rule["resources"]["overrides"][k] == {"resource": k} for k in ("namespace", "pod"))
        query = rule["metricsQuery"]
        for placeholder in ("<<.Series>>{<<.LabelMatchers>>}", "by (<<.GroupBy>>)"):
            assert placeholder in query, (served, placeholder)
        assert series_in(query.replace("<<.Series>>", discovered)) <= documented, served


def test_keda_queries_use_the_adapter_series() -> None:
    """Both paths read the same gateway series, all of them in the metric contract."""
    scaled = one(render({"autoscaling.mode": "keda"}), "ScaledObject")
    queries = {name: t["metadata"]["query"] for name, t in triggers(scaled).items()}
    rules = adapter_rules()
    adapter_series = {
        "queue-depth": series_in(rules["chatfleet_queue_depth"]["seriesQuery"]),
        "slot-utilization": series_in(rules["chatfleet_slot_utilization"]["metricsQuery"])
        | series_in(rules["chatfleet_slot_utilization"]["seriesQuery"]),
    }
    for name, query in queries.items():
        gateway = {s for s in series_in(query) if s.startswith("chatfleet_")}
        assert gateway == adapter_series[name], name
        assert gateway <= contract_names()


@pytest.mark.parametrize(("standalone", "mode", "kind"), [
    ("hpa.yaml", "hpa", "HorizontalPodAutoscaler"),
    ("keda-scaledobject.yaml", "keda", "ScaledObject"),
])
def test_standalone_files_are_what_the_chart_renders(standalone: str, mode: str, kind: str) -> None:
    """hpa/ serves kubectl users a release "chatfleet" in namespace "chatfleet"; it must not drift."""
    (written,) = [d for d in yaml.safe_load_all((HPA_DIR / standalone).read_text()) if d]
    rendered = one(render({"autoscaling.mode": mode, "autoscaling.maxReplicas": 8, **SHARED_KB},
                          release="chatfleet", namespace="chatfleet"), kind)
    assert written["apiVersion"] == rendered["apiVersion"] and written["kind"] == kind
    assert written["metadata"]["name"] == rendered["metadata"]["name"] == "chatfleet"
    assert written["metadata"]["namespace"] == "chatfleet"
    assert written["spec"] == rendered["spec"], f"hpa/{standalone} differs from the chart's {kind}"


# A release "chat" in namespace "llm", mid-scale-up, as Prometheus holds it: gateway series from the
# ServiceMonitor (job chat-chatfleet) and pod state from kube-state-metrics. Samples 1 minute apart:
#   t0: 2 ready pods (a, b); c unscheduled (no Ready condition yet); d running, its model loading;
#       e being deleted; f evicted (Failed); another Deployment's pod and another namespace's pod
#       not ready: 2 pods count as starting (c, d).
#   t1: c still pending, d ready: 1 starting.  t2: all ready: 0 starting.
#   t3: a small queue and 2 starting again: the discount exceeds the queue, the demand is 0.
P = "chat-chatfleet-5d8f7c9b4-"
KSM_AND_GATEWAY = [
    (f'chatfleet_queue_depth{{namespace="llm",job="chat-chatfleet",pod="{P}aaaaa",priority="interactive"}}', "100 100 100 5"),
    (f'chatfleet_queue_depth{{namespace="llm",job="chat-chatfleet",pod="{P}aaaaa",priority="batch"}}', "50 50 50 0"),
    (f'chatfleet_queue_depth{{namespace="llm",job="chat-chatfleet",pod="{P}bbbbb",priority="interactive"}}', "30 30 30 1"),
    (f'chatfleet_queue_depth{{namespace="llm",job="chat-chatfleet",pod="{P}ddddd",priority="interactive"}}', "0 0 0 0"),
    # Another release's gateway in the same namespace: not this Deployment's demand.
    ('chatfleet_queue_depth{namespace="llm",job="other",pod="other-5d8f7c9b4-zzzzz",priority="interactive"}', "999 999 999 999"),
    (f'chatfleet_requests_running{{namespace="llm",job="chat-chatfleet",pod="{P}aaaaa",model="m"}}', "64 64 64 64"),
    (f'chatfleet_requests_running{{namespace="llm",job="chat-chatfleet",pod="{P}bbbbb",model="m"}}', "32 32 48 16"),
    (f'chatfleet_engine_slots{{namespace="llm",job="chat-chatfleet",pod="{P}aaaaa",model="m"}}', "64 64 64 64"),
    (f'chatfleet_engine_slots{{namespace="llm",job="chat-chatfleet",pod="{P}bbbbb",model="m"}}', "64 64 64 64"),
    ('chatfleet_requests_running{namespace="llm",job="other",pod="other-5d8f7c9b4-zzzzz",model="m"}', "8 8 8 8"),
    ('chatfleet_engine_slots{namespace="llm",job="other",pod="other-5d8f7c9b4-zzzzz",model="m"}', "8 8 8 8"),
    *[(f'kube_pod_status_phase{{namespace="llm",pod="{P}{s}",phase="Running"}}', "1 1 1 1") for s in ("aaaaa", "bbbbb")],
    *[(f'kube_pod_status_ready{{namespace="llm",pod="{P}{s}",condition="true"}}', "1 1 1 1") for s in ("aaaaa", "bbbbb")],
    (f'kube_pod_status_phase{{namespace="llm",pod="{P}ccccc",phase="Pending"}}', "1 1 0 1"),
    (f'kube_pod_status_phase{{namespace="llm",pod="{P}ccccc",phase="Running"}}', "0 0 1 0"),
    (f'kube_pod_status_ready{{namespace="llm",pod="{P}ccccc",condition="true"}}', "_ _ 1 0"),
    (f'kube_pod_status_phase{{namespace="llm",pod="{P}ddddd",phase="Running"}}', "1 1 1 1"),
    (f'kube_pod_status_ready{{namespace="llm",pod="{P}ddddd",condition="true"}}', "0 1 1 0"),
    (f'kube_pod_status_ready{{namespace="llm",pod="{P}ddddd",condition="false"}}', "1 0 0 1"),
    (f'kube_pod_status_phase{{namespace="llm",pod="{P}eeeee",phase="Running"}}', "1 1 1 1"),
    (f'kube_pod_status_ready{{namespace="llm",pod="{P}eeeee",condition="true"}}', "0 0 0 0"),
    (f'kube_pod_deletion_timestamp{{namespace="llm",pod="{P}eeeee"}}', "1.7e9 1.7e9 1.7e9 1.7e9"),
    (f'kube_pod_status_phase{{namespace="llm",pod="{P}fffff",phase="Failed"}}', "1 1 1 1"),
    (f'kube_pod_status_ready{{namespace="llm",pod="{P}fffff",condition="true"}}', "0 0 0 0"),
    ('kube_pod_status_phase{namespace="llm",pod="chat-chatfleet-canary-6c7d8f9b5-ggggg",phase="Pending"}', "1 1 1 1"),
    (f'kube_pod_status_phase{{namespace="staging",pod="{P}hhhhh",phase="Pending"}}', "1 1 1 1"),
]


def promtool_eval(tmp_path: Path, expr: str, expected: list[float]) -> None:
    """Evaluate ``expr`` at t0..t3 over KSM_AND_GATEWAY with promtool; one unlabelled sample each."""
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in KSM_AND_GATEWAY],
        "promql_expr_test": [{"expr": expr, "eval_time": f"{t}m",
                              "exp_samples": [{"labels": "{}", "value": value}]}
                             for t, value in enumerate(expected)],
    }]}
    path = tmp_path / "keda-query-test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    result = subprocess.run([tool_path("promtool"), "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_keda_queue_demand_discounts_pods_that_are_not_ready(tmp_path: Path) -> None:
    scaled = one(render({"autoscaling.mode": "keda", "engine.maxNumSeqs": 64,
                         "autoscaling.targetQueueDepthPerPod": 8}, release="chat", namespace="llm"),
                 "ScaledObject")
    query = triggers(scaled)["queue-depth"]["metadata"]["query"]
    # Queue 180 (pods a, b, d); each starting pod takes 64 slots + 8 queued = 72 off it.
    promtool_eval(tmp_path, query, [180 - 2 * 72, 180 - 72, 180, 0])


def test_keda_pending_pod_allowance_is_a_value_and_zero_turns_it_off(tmp_path: Path) -> None:
    for allowance, expected in ((10, [160, 170, 180, 0]), (0, [180, 180, 180, 6])):
        scaled = one(render({"autoscaling.mode": "keda", "autoscaling.keda.pendingPodAllowance": allowance},
                            release="chat", namespace="llm"), "ScaledObject")
        promtool_eval(tmp_path, triggers(scaled)["queue-depth"]["metadata"]["query"], expected)


def test_keda_slot_utilization_is_the_sum_of_per_pod_shares(tmp_path: Path) -> None:
    scaled = one(render({"autoscaling.mode": "keda"}, release="chat", namespace="llm"), "ScaledObject")
    # Pod a 64/64, pod b 32, 32, 48, 16 of 64; pods without a gateway yet add nothing.
    promtool_eval(tmp_path, triggers(scaled)["slot-utilization"]["metadata"]["query"],
                  [1.5, 1.5, 1.75, 1.25])


def test_keda_reads_a_missing_series_as_a_failure_and_falls_back_to_max_replicas() -> None:
    """ignoreNullValues "false": an empty result (say the ServiceMonitor is not selected) is an
    error, and after failureThreshold of them KEDA asks for the fallback replicas, by default the
    most pods the autoscaler may run, instead of reading no demand and scaling to the floor.
    No cooldownPeriod: KEDA uses it only to scale to zero, and the floor is at least 1."""
    spec = one(render({"autoscaling.mode": "keda", **TUNED}), "ScaledObject")["spec"]
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 12}
    assert "cooldownPeriod" not in spec
    for trigger in spec["triggers"]:
        assert trigger["metadata"]["ignoreNullValues"] == "false", trigger["name"]
    spec = one(render({"autoscaling.mode": "keda", **TUNED, "autoscaling.keda.fallback": {
        "failureThreshold": 5, "replicas": 4}}), "ScaledObject")["spec"]
    assert spec["fallback"] == {"failureThreshold": 5, "replicas": 4}


def test_notes_say_what_keda_does_without_the_series() -> None:
    text = notes({"autoscaling.mode": "keda", **TUNED})
    assert "KEDA runs 12 pods after 3 polls (FALLBACK True), not the floor." in text


def test_a_removed_cooldown_period_value_is_refused_by_the_schema() -> None:
    result = helm("template", "x", str(CHART), *set_args({"autoscaling.keda.cooldownPeriod": 300}))
    assert result.returncode != 0 and "cooldownPeriod" in result.stderr, result.stderr


def test_keda_queries_find_nothing_without_the_gateway_series(tmp_path: Path) -> None:
    """What the fallback is for: with kube-state-metrics but no gateway series (an unselected
    ServiceMonitor), both queries return no sample at all, which KEDA would otherwise read as 0."""
    scaled = one(render({"autoscaling.mode": "keda"}, release="chat", namespace="llm"), "ScaledObject")
    ksm_only = [(series, values) for series, values in KSM_AND_GATEWAY if series.startswith("kube_")]
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in ksm_only],
        "promql_expr_test": [{"expr": t["metadata"]["query"], "eval_time": "1m", "exp_samples": []}
                             for t in scaled["spec"]["triggers"]],
    }]}
    path = tmp_path / "keda-null-test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    result = subprocess.run([tool_path("promtool"), "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
