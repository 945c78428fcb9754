#!/usr/bin/env python3
"""Build ChatFleet's Grafana dashboard, charts/chatfleet/dashboards/chatfleet.json, in code.

The JSON is generated with grafana-foundation-sdk (the test extra pins it): edit this script, then

    python scripts/build_dashboards.py           # rewrite the JSON
    python scripts/build_dashboards.py --check   # exit 1 if the committed JSON differs

tests/rules/test_dashboards.py fails when the committed file is not this script's output. The chart
ships the file verbatim in a ConfigMap for Grafana's dashboard sidecar. Queries use only the names
docs/metrics.md lists (the gateway's, the engine's vllm:* names, and the external ones from
kube-state-metrics, cAdvisor and the DCGM exporter); tests/rules/test_metric_names.py checks that.

Scrape labels: every gateway and engine series carries namespace, job (the chart's fullname, also
the Deployment's name) and pod. kube-state-metrics, cAdvisor and DCGM series name the workload's
namespace and pod, so they are matched by the Deployment's pod names: <job>-<hash>-<suffix>.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    GraphThresholdsStyleMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

OUT_DIR = Path(__file__).resolve().parents[1] / "charts" / "chatfleet" / "dashboards"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace="$namespace"'
SEL = NS + ', job="$job"'
"""The selected deployment's gateway and engine series."""
PODS = NS + ', pod=~"$job-[a-z0-9]+-[a-z0-9]+"'
"""The selected Deployment's pods in kube-state-metrics, cAdvisor and DCGM series."""
CONTAINERS = PODS + ', container!="", container!="POD"'
"""cAdvisor's per-container series, without the pod-level and pause-container ones."""
HPA = ('kube_horizontalpodautoscaler_info{' + NS + ', scaletargetref_kind="Deployment", '
       'scaletargetref_name="$job"}')
"""The HPA (the chart's, or KEDA's) that scales the selected Deployment."""
RATE = "[$__rate_interval]"
TTFT_SLO_S = 2.0
"""The TTFT SLO threshold: the rules' burn-rate alerts (chatfleet-rules.yaml) use the same."""


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def quantiles(histogram: str, label: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)
              ) -> list[prometheus.Dataquery]:
    """histogram_quantile queries of ``histogram`` (its base name), one per quantile."""
    by = f"le, {label}" if label else "le"
    suffix = f" {{{{{label}}}}}" if label else ""
    return [query(f"histogram_quantile({q}, sum by ({by}) "
                  f"(rate({histogram}_bucket{{{SEL}}}{RATE})))", f"p{round(q * 100)}{suffix}")
            for q in qs]


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=value, color=color) for value, color in steps]))


def graph(title: str, description: str, unit: str, targets: list[prometheus.Dataquery], *,
          width: int = 8, line_at: float | None = None) -> timeseries.Panel:
    """A time series panel; ``line_at`` draws a red threshold line (an SLO or a limit)."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
             .unit(unit).height(8).span(width).fill_opacity(10).line_width(1))
    if line_at is not None:
        panel = (panel.thresholds(thresholds((None, "green"), (line_at, "red")))
                 .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE)))
    for ref_id, target in zip(string.ascii_uppercase, targets, strict=False):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def single(title: str, description: str, unit: str, expr: str,
           steps: tuple[tuple[float | None, str], ...] = ((None, "green"),)) -> stat.Panel:
    """A stat panel: one number, the latest value, coloured by ``steps``."""
    return (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
            .height(4).span(4).graph_mode(BigValueGraphMode.AREA)
            .color_mode(BigValueColorMode.VALUE)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(thresholds(*steps))
            .with_target(query(expr, title).ref_id("A")))


def variables(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
                       .query("label_values(chatfleet_build_info, namespace)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(VariableSort.ALPHABETICAL_ASC))
        .with_variable(QueryVariable("job").label("Deployment").datasource(DATASOURCE)
                       .query('label_values(chatfleet_build_info{namespace="$namespace"}, job)')
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(VariableSort.ALPHABETICAL_ASC))
    )


def overview(dashboard: Dashboard) -> Dashboard:
    requests = f"sum(rate(chatfleet_requests_total{{{SEL}}}{RATE}))"
    return (
        dashboard.with_row(Row("Overview"))
        .with_panel(single("Ready pods", "Pods whose engine lists the model and that are not "
                           "draining (chatfleet_ready).", "short",
                           f"sum(chatfleet_ready{{{SEL}}})", ((None, "red"), (1, "green"))))
        .with_panel(single("Demand", "Requests per second reaching the gateways, whatever "
                           "became of them.", "reqps", requests))
        .with_panel(single("Queued", "Requests waiting for an engine slot now: the autoscaling "
                           "signal.", "short", f"sum(chatfleet_queue_depth{{{SEL}}})"))
        .with_panel(single("Slots busy", "Engine slots in use over engine slots.", "percentunit",
                           f"sum(chatfleet_requests_running{{{SEL}}}) "
                           f"/ sum(chatfleet_engine_slots{{{SEL}}})",
                           ((None, "green"), (0.9, "orange"))))
        .with_panel(single("TTFT p95", "95th percentile of time to first token, queue wait "
                           f"included. SLO: 95 % within {TTFT_SLO_S:g} s.", "s",
                           f"histogram_quantile(0.95, sum by (le) "
                           f"(rate(chatfleet_ttft_seconds_bucket{{{SEL}}}{RATE})))",
                           ((None, "green"), (TTFT_SLO_S, "red"))))
        .with_panel(single("Engine errors", "Share of requests that ended with outcome "
                           "engine_error.", "percentunit",
                           f'(sum(rate(chatfleet_requests_total{{{SEL}, outcome="engine_error"}}'
                           f"{RATE})) or vector(0)) / {requests}",
                           ((None, "green"), (0.01, "orange"), (0.05, "red"))))
    )


def traffic(dashboard: Dashboard) -> Dashboard:
    outcome = f"sum(rate(chatfleet_requests_total{{{SEL}, outcome"
    return (
        dashboard.with_row(Row("Traffic"))
        .with_panel(graph("Requests by outcome", "Finished requests per second, by how they "
                          "ended (docs/metrics.md lists the outcomes).", "reqps", [
                              query(f"sum by (outcome) (rate(chatfleet_requests_total{{{SEL}}}"
                                    f"{RATE}))", "{{outcome}}")]))
        .with_panel(graph("Errors and 429s", "Refusals and failures per second: 429 when the "
                          "queue is full or a request waited past its deadline, 503 while pods "
                          "drain, engine errors (0 when there are none), and, with API keys on, "
                          "requests refused for a missing or wrong key (401) or a key over its "
                          "rate (429).", "reqps", [
                              query(f'{outcome}=~"queue_full|queue_timeout"}}{RATE})) '
                                    "or vector(0)", "429 queue full or timed out"),
                              query(f'{outcome}="draining"}}{RATE})) or vector(0)',
                                    "503 draining"),
                              query(f'{outcome}="engine_error"}}{RATE})) or vector(0)',
                                    "engine errors"),
                              query(f"sum by (reason) (rate(chatfleet_auth_rejections_total{{{SEL}}}"
                                    f"{RATE}))", "API key {{reason}}")]))
        .with_panel(graph("Tokens per second", "Prompt tokens admitted and output tokens "
                          "relayed by the gateways, and output tokens the engines generated.",
                          "short", [
                              query(f"sum(rate(chatfleet_completion_tokens_total{{{SEL}}}{RATE}))",
                                    "output, relayed"),
                              query(f"sum(rate(chatfleet_prompt_tokens_total{{{SEL}}}{RATE}))",
                                    "prompt"),
                              query(f"sum(rate(vllm:generation_tokens_total{{{SEL}}}{RATE}))",
                                    "output, generated by the engines")]))
    )


def queue(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Queue and engine slots"))
        .with_panel(graph("Queue depth", "Requests waiting in the gateways' admission queues, by "
                          "priority. The engines' own queues stay near empty: the gateway lets "
                          "through only as many requests as there are slots.", "short", [
                              query(f"sum by (priority) (chatfleet_queue_depth{{{SEL}}})",
                                    "{{priority}}"),
                              query(f"sum(vllm:num_requests_waiting{{{SEL}}})",
                                    "waiting inside the engines")]))
        .with_panel(graph("Queue wait", "Arrival to engine slot (or to rejection), by "
                          "priority.", "s", quantiles("chatfleet_queue_wait_seconds", "priority",
                                                      (0.5, 0.95))))
        .with_panel(graph("Slots in use vs engine slots", "Requests holding an engine slot, the "
                          "slots of all pods, and the engines' running batches.", "short", [
                              query(f"sum(chatfleet_requests_running{{{SEL}}})", "slots in use"),
                              query(f"sum(chatfleet_engine_slots{{{SEL}}})", "engine slots"),
                              query(f"sum(vllm:num_requests_running{{{SEL}}})",
                                    "running in the engines")]))
    )


def latency(dashboard: Dashboard) -> Dashboard:
    def engine_p95(histogram: str) -> prometheus.Dataquery:
        return query(f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{{{SEL}}}"
                     f"{RATE})))", "p95 inside the engine")

    return (
        dashboard.with_row(Row("Latency"))
        .with_panel(graph("Time to first token", "Arrival at the gateway to the first token "
                          "relayed, queue wait included; the red line is the SLO. The engine's "
                          "own TTFT leaves out the gateway's queue.", "s",
                          [*quantiles("chatfleet_ttft_seconds"),
                           engine_p95("vllm:time_to_first_token_seconds")],
                          line_at=TTFT_SLO_S))
        .with_panel(graph("Inter-token latency", "Gap between consecutive tokens relayed to a "
                          "client.", "s", [*quantiles("chatfleet_itl_seconds"),
                                           engine_p95("vllm:inter_token_latency_seconds")]))
        .with_panel(graph("Request duration", "Arrival to the last byte, for admitted "
                          "requests.", "s", [*quantiles("chatfleet_request_duration_seconds"),
                                             engine_p95("vllm:e2e_request_latency_seconds")]))
    )


def knowledge(dashboard: Dashboard) -> Dashboard:
    def phase_mean(phase: str) -> prometheus.Dataquery:
        series = f'chatfleet_knowledge_chat_ttft_seconds_{{}}{{{{{SEL}, phase="{phase}"}}}}'
        return query(f"sum(rate({series.format('sum')}{RATE})) / "
                     f"sum(rate({series.format('count')}{RATE}))", phase)

    return (
        dashboard.with_row(Row("Knowledge bases"))
        .with_panel(graph("Retrieval latency", "Question to fused chunks (the query's embedding, "
                          "BM25 and dense search), by store; the benchmark's target for p95 is "
                          "50 ms.", "s", quantiles("chatfleet_retrieval_seconds", "store"),
                          line_at=0.05))
        .with_panel(graph("Knowledge-base chat TTFT, by phase", "Mean time to first token of "
                          "kb_chat answers, split: retrieval, the admission queue, the engine. "
                          "The largest phase says what to scale: the embeddings or database "
                          "(retrieval), replicas (queue) or the engine.", "s",
                          [phase_mean(p) for p in ("retrieval", "queue", "engine")]))
        .with_panel(graph("Ingestion", "Chunks stored per second, and files refused (bad type, "
                          "empty, unreadable, a path in the name) or failed (embeddings or store "
                          "down) per second.", "short", [
                              query(f"sum(rate(chatfleet_ingest_chunks_total{{{SEL}}}{RATE}))",
                                    "chunks/s"),
                              query(f"sum by (outcome) (rate(chatfleet_ingest_files_total"
                                    f'{{{SEL}, outcome!="ok"}}{RATE}))', "files {{outcome}}/s")]))
    )


def scaling(dashboard: Dashboard) -> Dashboard:
    deployment = NS + ', deployment="$job"'
    return (
        dashboard.with_row(Row("Scaling"))
        .with_panel(graph("Replicas", "What the HPA wants and its bounds (kube-state-metrics), "
                          "the Deployment's replicas and those available, and the pods whose "
                          "gateway reports ready.", "short", [
                              *[query(f"max(kube_horizontalpodautoscaler_{metric}{{{NS}}} "
                                      f"and on (namespace, horizontalpodautoscaler) {HPA})",
                                      legend)
                                for metric, legend in (("status_desired_replicas", "HPA desired"),
                                                       ("spec_min_replicas", "HPA min"),
                                                       ("spec_max_replicas", "HPA max"))],
                              query(f"max(kube_deployment_spec_replicas{{{deployment}}})",
                                    "Deployment replicas"),
                              query(f"max(kube_deployment_status_replicas_available"
                                    f"{{{deployment}}})", "available"),
                              query(f"sum(chatfleet_ready{{{SEL}}})", "ready (gateway)")]))
        .with_panel(graph("Queue per pod: the HPA's signal", "Queued requests per pod, averaged "
                          "as the HPA averages its Pods metric; the HPA adds pods while this "
                          "is above its target.", "short", [
                              query(f"sum(chatfleet_queue_depth{{{SEL}}}) / count(count by "
                                    f"(pod) (chatfleet_queue_depth{{{SEL}}}))", "queued per pod")]))
        .with_panel(graph("Pod restarts", "Container restarts in the last hour.", "short", [
            query(f"sum by (pod, container) "
                  f"(increase(kube_pod_container_status_restarts_total{{{PODS}}}[1h]))",
                  "{{pod}} {{container}}")]))
    )


def engine(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Engine"))
        .with_panel(graph("KV cache usage", "Share of each engine's KV-cache blocks in use; near "
                          "full, vLLM preempts requests.", "percentunit", [
                              query(f"max by (pod) (vllm:kv_cache_usage_perc{{{SEL}}})",
                                    "{{pod}}")], width=12, line_at=0.95))
        .with_panel(graph("Preemptions", "Requests each engine preempted per second to free KV "
                          "blocks.", "short", [
                              query(f"sum by (pod) (rate(vllm:num_preemptions_total{{{SEL}}}"
                                    f"{RATE}))", "{{pod}}")], width=12))
    )


def resources(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("GPU and containers"))
        .with_panel(graph("GPU utilisation", "Time each GPU was busy (DCGM exporter).",
                          "percent", [
                              query(f"avg by (pod, gpu) (DCGM_FI_DEV_GPU_UTIL{{{PODS}}})",
                                    "{{pod}} GPU {{gpu}}")], width=12))
        .with_panel(graph("GPU memory", "Frame buffer used, and its size (used + free), per "
                          "pod. vLLM reserves most of it for the KV cache at start.", "mbytes", [
                              query(f"sum by (pod) (DCGM_FI_DEV_FB_USED{{{PODS}}})",
                                    "{{pod}} used"),
                              query(f"sum by (pod) (DCGM_FI_DEV_FB_USED{{{PODS}}} "
                                    f"+ DCGM_FI_DEV_FB_FREE{{{PODS}}})", "{{pod}} size")],
                          width=12))
        .with_panel(graph("Container CPU", "CPU cores used per container (cAdvisor).", "short", [
            query(f"sum by (pod, container) "
                  f"(rate(container_cpu_usage_seconds_total{{{CONTAINERS}}}{RATE}))",
                  "{{pod}} {{container}}")], width=12))
        .with_panel(graph("Container memory", "Working set per container (cAdvisor): what the "
                          "kernel would not reclaim, and the OOM killer compares with the "
                          "limit.", "bytes", [
                              query(f"sum by (pod, container) "
                                    f"(container_memory_working_set_bytes{{{CONTAINERS}}})",
                                    "{{pod}} {{container}}")], width=12))
    )


def chatfleet() -> dict[str, object]:
    """The ChatFleet dashboard: one deployment's traffic, queue, latency, scaling and hardware."""
    dashboard = (Dashboard("ChatFleet").uid("chatfleet").tags(["chatfleet", "llm"])
                 .description("One ChatFleet deployment: demand, the admission queue, latency "
                              "against the TTFT SLO, knowledge-base retrieval and ingestion, "
                              "autoscaling, the engines, GPUs and containers.")
                 .refresh("30s").time("now-3h", "now"))
    for section in (variables, overview, traffic, queue, latency, knowledge, scaling, engine,
                    resources):
        dashboard = section(dashboard)
    model = dashboard.build()
    for panel_id, panel in enumerate(model.panels or [], start=1):
        panel.id_val = panel_id
    return json.loads(json.dumps(model, cls=JSONEncoder))


DASHBOARDS = {"chatfleet.json": chatfleet}
"""File name under charts/chatfleet/dashboards/ -> the function that builds it."""


def render(name: str) -> str:
    """The exact text of one dashboard file."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed dashboard differs from this script's output")
    args = parser.parse_args()
    stale = []
    for name in DASHBOARDS:
        path = OUT_DIR / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/build_dashboards.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
