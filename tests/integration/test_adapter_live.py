"""prometheus-adapter's rules, run as the adapter runs them, against a real Prometheus and gateways.

Two gateways share one engine-sim; a real Prometheus scrapes them every second with the labels the
chart's ServiceMonitor gives pods in a cluster (namespace, pod, job). Each gateway is loaded to a
different, steady queue and slot use. The rules' seriesQuery and metricsQuery are read from
hpa/prometheus-adapter-values.yaml and filled as the adapter fills them for the HPA's request
``pods/*/<metric>``; Prometheus must answer one value per pod, equal to what that pod's own
/metrics says.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import Server, chat, poll_until, upstream_env
from tests.support.metrics import value
from tests.support.prometheus import start_prometheus

ADAPTER_VALUES = Path(__file__).parents[2] / "hpa" / "prometheus-adapter-values.yaml"
NAMESPACE = "default"
PODS = ("gw-a", "gw-b")
MODEL = "chatfleet-sim/llama-3-8b-l4"
"""A slow profile (about 66 ms a decode step): 1000 tokens hold a slot for over a minute."""
LONG = 1000


def adapter_rule(metric: str) -> dict[str, Any]:
    """The custom rule that serves ``metric`` (its ``name.as``)."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric]
    return rule


def fill(rule: dict[str, Any], series: str) -> str:
    """``metricsQuery`` as the adapter renders it for all pods of namespace default: Series is the
    discovered series, LabelMatchers selects the namespace and the pods, GroupBy the pod label."""
    query = (rule["metricsQuery"]
             .replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS)}"')
             .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query, f"a template field the adapter would fill is left: {query}"
    return query


def prometheus_config(targets: dict[str, Server]) -> dict[str, Any]:
    """Scrape ``targets`` (pod name -> gateway) every second, labelled as in the cluster."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "chatfleet",
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"],
                                "labels": {"namespace": NAMESPACE, "pod": pod}}
                               for pod, server in targets.items()],
        }],
    }


async def query(client: httpx.AsyncClient, prometheus: str, promql: str) -> dict[str, float]:
    """Instant query -> {pod label: value}; fails on an error or a series without a pod label."""
    response = await client.get(prometheus + "/api/v1/query", params={"query": promql})
    body = response.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    assert all(set(r["metric"]) == {"pod"} for r in result), f"grouped by more than pod: {result}"
    return {r["metric"]["pod"]: float(r["value"][1]) for r in result}


async def test_adapter_queries_return_each_pods_own_gauges(engine_sim, gateway, tmp_path: Path) -> None:
    sim: Server = engine_sim(profile="llama-3-8b-l4")
    common = {"engine__model": MODEL, "admission__max_queue": 64, "admission__max_queue_wait_s": 300}
    gateways = {"gw-a": gateway(upstream_env(sim, admission__engine_slots=2, **common)),
                "gw-b": gateway(upstream_env(sim, admission__engine_slots=4, **common))}
    queue_rule, slots_rule = adapter_rule("chatfleet_queue_depth"), adapter_rule("chatfleet_slot_utilization")
    prometheus_proc, prometheus = start_prometheus(tmp_path, prometheus_config(gateways))
    load: list[asyncio.Task[None]] = []

    async with httpx.AsyncClient(timeout=120) as client:
        async def ask(gw: Server, priority: str) -> None:
            await client.post(gw.v1 + "/chat/completions", json=chat(LONG, model=MODEL),
                              headers={"X-ChatFleet-Priority": priority})

        # Discovery: each seriesQuery finds both pods' series, with the labels the overrides map.
        async def discovered() -> bool:
            for rule in (queue_rule, slots_rule):
                found = (await client.get(prometheus + "/api/v1/series",
                                          params={"match[]": rule["seriesQuery"]})).json()["data"]
                if {(s["namespace"], s["pod"]) for s in found} != {(NAMESPACE, p) for p in PODS}:
                    return False
            return True

        queue_query = fill(queue_rule, "chatfleet_queue_depth")
        slots_query = fill(slots_rule, "chatfleet_requests_running")
        seen: dict[str, dict[str, float]] = {}

        async def prometheus_agrees_with_the_pods() -> bool:
            own = {pod: (await client.get(gw.url + "/metrics")).text for pod, gw in gateways.items()}
            seen["queue"] = await query(client, prometheus, queue_query)
            seen["slots"] = await query(client, prometheus, slots_query)
            seen["own_queue"] = {pod: value(text, "chatfleet_queue_depth") for pod, text in own.items()}
            seen["own_slots"] = {pod: value(text, "chatfleet_requests_running")
                                 / value(text, "chatfleet_engine_slots") for pod, text in own.items()}
            return seen["queue"] == seen["own_queue"] and seen["slots"] == seen["own_slots"]

        try:
            # gw-a: both slots busy, then 1 interactive and 2 batch requests queued (depth 3).
            load += [asyncio.create_task(ask(gateways["gw-a"], "interactive")) for _ in range(2)]
            await gateways["gw-a"].wait_for("chatfleet_requests_running", 2)
            load += [asyncio.create_task(ask(gateways["gw-a"], p)) for p in ("interactive", "batch", "batch")]
            await gateways["gw-a"].wait_for("chatfleet_queue_depth", 3)
            # gw-b: 3 of its 4 slots busy, nothing queued.
            load += [asyncio.create_task(ask(gateways["gw-b"], "batch")) for _ in range(3)]
            await gateways["gw-b"].wait_for("chatfleet_requests_running", 3)

            await poll_until(discovered, timeout=15, interval=0.25)
            try:
                await poll_until(prometheus_agrees_with_the_pods, timeout=15, interval=0.25)
            except AssertionError as exc:
                raise AssertionError(f"Prometheus never matched the pods: {seen}\n"
                                     f"{prometheus_proc.log_tail()}") from exc
            # What the HPA receives: the queue summed over priorities, and busy/total slots, per pod.
            assert seen["queue"] == {"gw-a": 3.0, "gw-b": 0.0}
            assert seen["slots"] == {"gw-a": 1.0, "gw-b": 0.75}
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            prometheus_proc.terminate()
