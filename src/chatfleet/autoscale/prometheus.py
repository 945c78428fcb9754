"""What the operator reads from Prometheus for one tick, over its HTTP API.

Two series, both per Deployment (``namespace`` and ``job``: the chart's Prometheus job is the
Deployment's name):

- demand: the recording rule ``namespace_job:chatfleet_requests:rate5m`` (docs/metrics.md), read
  with ``/api/v1/query_range`` over the recent trend window, and around the same instant 1, 2 and
  7 days ago, so the policy can see seasonality without pulling a week at full resolution;
- capacity: requests/s answered ``ok`` per ready replica, kept only at instants when the fleet was
  busy (slot utilisation >= ``busy_utilization``) and within its TTFT SLO (the share of answers
  slower than the policy's ``slo.ttftSeconds``, a bucket bound of ``chatfleet_ttft_seconds``, at
  most ``slo_error_ratio``): what one replica really serves at SLO, which the policy learns from.

Only the HTTP API is used (no client library): a Prometheus, Thanos or Mimir query frontend all
answer it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from chatfleet.autoscale.policy import DAY_S, CapacitySample, Observations, RatePoint

__all__ = ["PrometheusError", "PrometheusReader", "capacity_query", "demand_query",
           "ttft_slo_error_query"]

SEASONAL_DAYS = (1, 2, 7)
"""Days back the policy's seasonal forecast looks at (policy.forecast_rate)."""


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or answered with an error: the tick changes nothing."""


def _selector(namespace: str, job: str) -> str:
    def quote(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"')
    return f'namespace="{quote(namespace)}",job="{quote(job)}"'


def demand_query(namespace: str, job: str) -> str:
    """Requests/s arriving at the Deployment (the recording rule, one series)."""
    return f"sum(namespace_job:chatfleet_requests:rate5m{{{_selector(namespace, job)}}})"


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

    async def query_range(self, query: str, start: float, end: float, step_s: float
                          ) -> list[tuple[float, float]]:
        """The points of the single series ``query`` returns (several: summed per instant)."""
        try:
            response = await self._client.get(
                f"{self.base_url}/api/v1/query_range",
                params={"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                        "step": f"{step_s:g}"})
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
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"expected a matrix, got {data.get('resultType')!r}")
        summed: dict[float, float] = {}
        for series in data.get("result", []):
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
