"""The rules and the dashboard against a real Prometheus scraping a real gateway and engine-sim.

promtool's unit tests feed the rules hand-written series; here Prometheus scrapes the gateway's
/metrics and its /metrics/engine relay the way the chart's ServiceMonitor does (job = the Service
name for both paths, namespace, pod, a metrics_path label per path) and evaluates the real rules
file. What only real series can show: every rule evaluates without error (no vector-matching
clash between the two paths' series), a healthy deployment raises no alert, every recording rule
has a sample, and every dashboard query on the gateway's and engine's metrics returns data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Server, chat, poll_until, upstream_env
from tests.support.metrics import value
from tests.support.prometheus import start_prometheus
from tests.support.promql import (
    RULES_FILE,
    all_dashboard_expressions,
    external_metric_names,
    metric_names,
    recorded_names,
    rule_expressions,
    substitute_grafana_variables,
)

NAMESPACE, JOB, POD = "llm", "chatfleet", "chatfleet-6b7c9d8f4-x2k4z"
NEEDS_KUBE_STATE_METRICS = {
    "namespace_job_horizontalpodautoscaler:kube_horizontalpodautoscaler_info:relabel"}


def prometheus_config(gateway: Server) -> dict[str, Any]:
    """Two scrape jobs, one per path, both labelled as the ServiceMonitor labels its targets."""
    def scrape(name: str, path: str) -> dict[str, Any]:
        return {
            "job_name": name,
            "metrics_path": path,
            "static_configs": [{
                "targets": [f"127.0.0.1:{gateway.port}"],
                "labels": {"namespace": NAMESPACE, "pod": POD, "container": "gateway",
                           "service": JOB, "endpoint": "http"}}],
            "relabel_configs": [
                {"target_label": "job", "replacement": JOB},
                {"source_labels": ["__metrics_path__"], "target_label": "metrics_path"}],
        }
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [scrape("gateway", "/metrics"), scrape("engine", "/metrics/engine")],
    }


async def test_rules_and_dashboard_on_real_scrapes(engine_sim: Callable[..., Server],
                                                   gateway: Callable[..., Server],
                                                   tmp_path: Path) -> None:
    gw = gateway(upstream_env(engine_sim()))
    prometheus_proc, prometheus = start_prometheus(tmp_path, prometheus_config(gw))
    values = {"namespace": NAMESPACE, "job": JOB}
    dashboard = {where: substitute_grafana_variables(expr, values)
                 for where, expr in all_dashboard_expressions().items()
                 if not metric_names(substitute_grafana_variables(expr)) & external_metric_names()}
    records = sorted(recorded_names() - NEEDS_KUBE_STATE_METRICS)
    empty: dict[str, str] = {}

    async with httpx.AsyncClient(timeout=10) as client:
        async def results(promql: str) -> list[dict[str, Any]]:
            body = (await client.get(prometheus + "/api/v1/query", params={"query": promql})).json()
            assert body["status"] == "success", (promql, body)
            return body["data"]["result"]

        async def every_query_has_data() -> bool:
            empty.clear()
            for where, promql in [*((f"record {r}", r) for r in records), *dashboard.items()]:
                if not await results(promql):
                    empty[where] = promql
            return not empty

        try:
            # Answers streamed and not, and one refused as asked: every family gets samples.
            for body in (chat(4), chat(4, stream=True), chat(2), {"model": "nope", "messages": []}):
                await client.post(gw.v1 + "/chat/completions", json=body)
            try:
                await poll_until(every_query_has_data, timeout=30, interval=0.5)
            except AssertionError as exc:
                raise AssertionError(f"queries without data: {empty}\n"
                                     f"{prometheus_proc.log_tail()}") from exc

            groups = (await client.get(prometheus + "/api/v1/rules")).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert {rule["name"] for rule in rules} == set(rule_expressions())
            unhealthy = {rule["name"]: rule.get("lastError") for rule in rules
                         if rule["health"] != "ok"}
            assert unhealthy == {}

            alerts = (await client.get(prometheus + "/api/v1/alerts")).json()["data"]["alerts"]
            assert alerts == [], "a healthy deployment raised alerts"

            # The recorded view agrees with the pod's own gauges.
            [sample] = await results("namespace_job:chatfleet_engine_slots:sum")
            assert sample["metric"] == {"__name__": "namespace_job:chatfleet_engine_slots:sum",
                                        "namespace": NAMESPACE, "job": JOB}
            own = (await client.get(gw.url + "/metrics")).text
            assert float(sample["value"][1]) == value(own, "chatfleet_engine_slots") > 0
        finally:
            prometheus_proc.terminate()
