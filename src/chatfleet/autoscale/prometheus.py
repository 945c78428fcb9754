"""What the operator reads from Prometheus for one tick, over its HTTP API.

Two series per Deployment (``namespace`` and ``job``: the chart's Prometheus job is the
Deployment's name), and one figure about its pods:

- demand: the recording rule ``namespace_job:chatfleet_requests:rate5m`` (docs/metrics.md), read
  with ``/api/v1/query_range`` over the recent trend window, and around the same instant 1, 2 and
  7 days ago, so the policy can see seasonality without pulling a week at full resolution;
- capacity: requests/s answered ``ok`` per ready replica, kept only at instants when the fleet was
  busy (slot utilisation >= ``busy_utilization``) and within its TTFT SLO (the share of answers
  slower than the policy's ``slo.ttftSeconds``, a bucket bound of ``chatfleet_ttft_seconds``, at
  most ``slo_error_ratio``): what one replica really serves at SLO, which the policy learns from;
- cold start, only for a policy that does not set one: the 90th percentile, over the Deployment's
  pods seen in the last ``COLD_START_LOOKBACK_S``, of the seconds from a pod's creation to its
  first Ready (kube-state-metrics' ``kube_pod_created`` and ``kube_pod_status_ready_time``), read
  with ``/api/v1/query``. No pod seen (or no kube-state-metrics): no figure.

Only the HTTP API is used (no client library): a Prometheus, Thanos or Mimir query frontend all
answer it the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from chatfleet.autoscale.policy import DAY_S, CapacitySample, Observations, RatePoint

__all__ = ["COLD_START_LOOKBACK_S", "COLD_START_QUANTILE", "PrometheusError", "PrometheusReader",
           "capacity_query", "cold_start_query", "demand_query", "ttft_slo_error_query"]

SEASONAL_DAYS = (1, 2, 7)
"""Days back the policy's seasonal forecast looks at (policy.forecast_rate)."""

COLD_START_LOOKBACK_S = 6 * 3600.0
"""Pods whose cold start is learned: those kube-state-metrics reported in this window."""
COLD_START_QUANTILE = 0.9
"""The learned cold start is this quantile over those pods: the forecast must look far enough
ahead for a slow start (a node to add, an image not cached), not only for a typical one."""


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or answered with an error: the tick changes nothing."""


def _quote(value: str) -> str:
    """``value`` inside a PromQL double-quoted string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _selector(namespace: str, job: str) -> str:
    return f'namespace="{_quote(namespace)}",job="{_quote(job)}"'


def demand_query(namespace: str, job: str) -> str:
    """Requests/s arriving at the Deployment (the recording rule, one series)."""
    return f"sum(namespace_job:chatfleet_requests:rate5m{{{_selector(namespace, job)}}})"


def _pods_matcher(namespace: str, job: str) -> str:
    """kube-state-metrics' series of the Deployment's pods, matched by name as the chart's KEDA
    trigger matches them: ``<deployment>-<replicaset hash>-<suffix>``, the Deployment being named
    like the job (docs/metrics.md, external metrics)."""
    return f'namespace="{_quote(namespace)}",pod=~"{_quote(re.escape(job))}-[a-z0-9]+-[a-z0-9]+"'


def cold_start_query(namespace: str, job: str, lookback_s: float = COLD_START_LOOKBACK_S,
                     quantile: float = COLD_START_QUANTILE) -> str:
    """Seconds from creation to first Ready of the Deployment's pods seen over ``lookback_s``,
    their ``quantile``.

    kube-state-metrics reports ``kube_pod_status_ready_time`` (when the Ready condition last
    turned true) only while a pod is Ready; its minimum over the window is the pod's first
    readiness, so a pod that restarted a container later does not count the hours in between.
    ``min by``/``max by`` fold the duplicate series two kube-state-metrics replicas (or one that
    restarted, with a new ``instance``) leave behind.
    """
    pods = _pods_matcher(namespace, job)
    window = f"{lookback_s:.0f}s"
    return (f"quantile({quantile:g}, "
            f"min by (namespace, pod, uid) (min_over_time(kube_pod_status_ready_time{{{pods}}}[{window}]))"
            f" - on (namespace, pod, uid) "
            f"max by (namespace, pod, uid) (max_over_time(kube_pod_created{{{pods}}}[{window}])))")


def _le_matcher(bound_s: float) -> str:
    """A matcher for the histogram bucket ``le=bound_s``, however the exporter wrote the number
    ("2" or "2.0"), as the chart's recording rules match it."""
    text = f"{bound_s:g}".replace(".", "\\\\.")
    return f'le=~"{text}(\\\\.0)?"'


def ttft_slo_error_query(namespace: str, job: str, ttft_seconds: float) -> str:
    """Share of answered requests whose TTFT was over ``ttft_seconds`` (a bucket bound of
    chatfleet_ttft_seconds), over 5 minutes: the recording rule
    ``namespace_job:chatfleet_ttft_slo_errors:ratio_rate5m`` for any bound, not only 2 s."""
    sel = _selector(namespace, job)
    return (f"(1 - sum(rate(chatfleet_ttft_seconds_bucket{{{sel},{_le_matcher(ttft_seconds)}}}[5m]))"
            f" / sum(rate(chatfleet_ttft_seconds_count{{{sel}}}[5m])))")


def capacity_query(namespace: str, job: str, busy_utilization: float, slo_error_ratio: float,
                   ttft_seconds: float = 2.0) -> str:
    """Requests/s answered per ready replica, only while busy and within the TTFT SLO."""
    sel = _selector(namespace, job)
    return (
        f'sum(rate(chatfleet_requests_total{{{sel},outcome="ok"}}[5m]))'
        f" / sum(chatfleet_ready{{{sel}}} == 1)"
        f" and on() (sum(namespace_job:chatfleet_slot_utilization:ratio{{{sel}}}) >= {busy_utilization})"
        f" and on() ({ttft_slo_error_query(namespace, job, ttft_seconds)} <= {slo_error_ratio})"
    )


@dataclass(frozen=True, slots=True)
class ReadWindow:
    """How much history one tick reads."""

    trend_window_s: float
    horizon_s: float
    step_s: float = 15.0
    capacity_window_s: float = 3600.0
    seasonal_step_s: float = 60.0


class PrometheusReader:
    """Reads a tick's observations; one ``httpx.AsyncClient`` shared by all policies."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _get(self, endpoint: str, params: dict[str, str], result_type: str
                   ) -> list[dict[str, Any]]:
        """The ``result`` of a successful answer of type ``result_type``; PrometheusError else."""
        try:
            response = await self._client.get(f"{self.base_url}/api/v1/{endpoint}", params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"Prometheus at {self.base_url} unreachable: {exc}") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(f"Prometheus answered {response.status_code}, not JSON") from exc
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"Prometheus answered {response.status_code}: "
                                  f"{body.get('errorType', '')} {body.get('error', '')}".strip())
        data = body.get("data", {})
        if data.get("resultType") != result_type:
            raise PrometheusError(f"expected a {result_type}, got {data.get('resultType')!r}")
        result: list[dict[str, Any]] = data.get("result", [])
        return result

    async def query(self, query: str, at: float) -> float | None:
        """The value of the single series the instant query ``query`` returns at ``at`` (several:
        summed); None when it returns none (or only NaN)."""
        values = []
        for series in await self._get("query", {"query": query, "time": f"{at:.3f}"}, "vector"):
            value = float(series.get("value", [at, "NaN"])[1])
            if math.isfinite(value):
                values.append(value)
        return sum(values) if values else None

    async def cold_start(self, namespace: str, job: str, now: float,
                         lookback_s: float = COLD_START_LOOKBACK_S) -> float | None:
        """The Deployment's observed cold start (cold_start_query), or None: no pod seen."""
        seconds = await self.query(cold_start_query(namespace, job, lookback_s), now)
        return seconds if seconds is not None and seconds >= 0 else None

    async def query_range(self, query: str, start: float, end: float, step_s: float
                          ) -> list[tuple[float, float]]:
        """The points of the single series ``query`` returns (several: summed per instant)."""
        result = await self._get("query_range", {
            "query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"},
            "matrix")
        summed: dict[float, float] = {}
        for series in result:
            for at, raw in series.get("values", []):
                value = float(raw)
                if math.isfinite(value):
                    summed[float(at)] = summed.get(float(at), 0.0) + value
        return sorted(summed.items())

    async def observations(self, namespace: str, job: str, now: float, window: ReadWindow, *,
                           busy_utilization: float = 0.7, slo_error_ratio: float = 0.01,
                           ttft_seconds: float = 2.0) -> Observations:
        """Demand history and capacity samples of one Deployment, as the policy takes them."""
        demand = demand_query(namespace, job)
        ranges: list[tuple[float, float, float]] = [(now - window.trend_window_s, now, window.step_s)]
        # Around the same instant on earlier days, wide enough for "then" and "then + horizon".
        margin = max(window.trend_window_s, window.horizon_s, 60.0)
        for days in SEASONAL_DAYS:
            then = now - days * DAY_S
            ranges.append((then - margin, then + window.horizon_s + margin, window.seasonal_step_s))
        points: dict[float, float] = {}
        for start, end, step in ranges:
            points.update(await self.query_range(demand, start, end, step))
        rates = [RatePoint(at, rate) for at, rate in sorted(points.items())]
        capacity = await self.query_range(
            capacity_query(namespace, job, busy_utilization, slo_error_ratio, ttft_seconds),
            now - window.capacity_window_s, now, window.step_s * 4)
        samples: Sequence[CapacitySample] = [CapacitySample(at, v) for at, v in capacity if v > 0]
        return Observations(now=now, rates=rates, capacity_samples=samples)
