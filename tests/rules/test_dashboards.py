"""The Grafana dashboard: generated, parameterised, complete, and valid PromQL throughout."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

from tests.support.promql import (
    DASHBOARDS_DIR,
    ROOT,
    all_dashboard_expressions,
    label_matchers,
    metric_names,
    promtool_check_expressions,
    selector_name,
    selectors,
    substitute_grafana_variables,
)

DASHBOARD = DASHBOARDS_DIR / "chatfleet.json"
SCOPED_TO_DEPLOYMENT = ("chatfleet_", "vllm:")
"""Series the gateway's scrape labels with the deployment's job."""
# What an operator looks for on the dashboard, by the metrics that show it.
REQUIRED_METRICS = {
    "request rate": "chatfleet_requests_total",
    "queue depth": "chatfleet_queue_depth",
    "queue wait": "chatfleet_queue_wait_seconds_bucket",
    "TTFT": "chatfleet_ttft_seconds_bucket",
    "ITL": "chatfleet_itl_seconds_bucket",
    "end-to-end latency": "chatfleet_request_duration_seconds_bucket",
    "tokens/s": "chatfleet_completion_tokens_total",
    "slots in use": "chatfleet_requests_running",
    "engine slots": "chatfleet_engine_slots",
    "replicas desired": "kube_horizontalpodautoscaler_status_desired_replicas",
    "replicas ready": "kube_deployment_status_replicas_available",
    "engine KV usage": "vllm:kv_cache_usage_perc",
    "GPU utilisation": "DCGM_FI_DEV_GPU_UTIL",
    "GPU memory used": "DCGM_FI_DEV_FB_USED",
    "GPU memory free": "DCGM_FI_DEV_FB_FREE",
    "container CPU": "container_cpu_usage_seconds_total",
    "container memory": "container_memory_working_set_bytes",
    "pod restarts": "kube_pod_container_status_restarts_total",
}


def generator() -> ModuleType:
    path = ROOT / "scripts" / "build_dashboards.py"
    spec = importlib.util.spec_from_file_location("build_dashboards", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def test_committed_dashboards_are_the_generators_output() -> None:
    build = generator()
    assert {path.name for path in DASHBOARDS_DIR.glob("*.json")} == set(build.DASHBOARDS)
    for name in build.DASHBOARDS:
        assert (DASHBOARDS_DIR / name).read_text() == build.render(name), (
            f"{name} is stale: run python scripts/build_dashboards.py")


def test_datasource_namespace_and_deployment_are_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert variables["job"]["query"] == 'label_values(chatfleet_build_info{namespace="$namespace"}, job)'
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_panels_show_what_an_operator_looks_for() -> None:
    shown = {name for expr in all_dashboard_expressions().values()
             for name in metric_names(substitute_grafana_variables(expr))}
    missing = {what: name for what, name in REQUIRED_METRICS.items() if name not in shown}
    assert missing == {}


def test_every_panel_has_a_title_description_and_unique_id() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["title"] and panel.get("description"), panel
        assert panel["targets"], panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [
            chr(ord("A") + i) for i in range(len(panel["targets"]))], panel["title"]


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_query_is_scoped_to_the_selected_deployment() -> None:
    """Gateway and engine series by namespace and job; cluster exporters' series by namespace
    and by the Deployment's pod names, its name, or its HPA's scale target."""
    for where, expr in all_dashboard_expressions().items():
        if where.endswith("variable namespace"):
            continue
        for selector in selectors(substitute_grafana_variables(expr)):
            name = selector_name(selector)
            matchers = {(m.name, str(m.op), m.value) for m in selector.matchers.matchers}
            assert ("namespace", "MatchOp.Equal", "namespace") in matchers, (where, name)
            if name.startswith(SCOPED_TO_DEPLOYMENT) and not where.endswith("variable job"):
                assert ("job", "MatchOp.Equal", "job") in matchers, (where, name)


def test_pod_scoped_queries_match_only_the_deployments_pods() -> None:
    """Exporter series are matched by pod name: ``<job>-<replicaset hash>-<suffix>``."""
    pod_patterns = {value for expr in all_dashboard_expressions().values()
                    for _, label, _, value in label_matchers(substitute_grafana_variables(expr))
                    if label == "pod"}
    assert pod_patterns == {"job-[a-z0-9]+-[a-z0-9]+"}


def test_every_query_passes_promtool() -> None:
    exprs = all_dashboard_expressions()
    assert len(exprs) >= 30
    result = promtool_check_expressions(exprs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_dashboard_fits_kubectl_apply() -> None:
    """k8s/ users run ``kubectl apply``, which copies the ConfigMap into its last-applied
    annotation: annotations hold at most 256 KiB."""
    assert DASHBOARD.stat().st_size < 200 * 1024
