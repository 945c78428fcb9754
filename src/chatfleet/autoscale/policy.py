"""The operator's policy: observations in, the HPA's floor (minReplicas) out. Pure and deterministic.

The HPA reacts to the queue it sees now; a GPU pod it adds is ready only a cold start later. The
policy looks one cold start ahead: it forecasts the arrival rate at ``now + cold_start`` (recent
trend, plus the same hour of earlier days when the history covers them), divides by what one
replica serves within the SLO (learned from the fleet's own throughput when it was busy and met
the SLO, the configured figure until then), and asks for that many replicas as a floor. The HPA
stays the fast loop above the floor.

The floor rises at once and falls only after the lower figure has held for ``lower_after_s``
(hysteresis): lowering it late costs GPU-seconds, lowering it early costs a cold start.

The same function runs in the operator (autoscale/operator.py) and in the fleet simulator, so
what the simulator measures is what the cluster runs. State that must survive between ticks is
passed in and returned (``PolicyState``), never kept here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = [
    "CapacitySample",
    "Decision",
    "Observations",
    "PolicySpec",
    "PolicyState",
    "RatePoint",
    "decide",
    "forecast_rate",
    "learned_capacity",
]

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class RatePoint:
    """The fleet's arrival rate (requests/s) measured over the window ending at ``at`` (s)."""

    at: float
    rate: float


@dataclass(frozen=True, slots=True)
class CapacitySample:
    """Requests/s one ready replica completed while the fleet was busy and within its SLO."""

    at: float
    per_replica_rate: float


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """What the ChatFleetPolicy resource says."""

    min_replicas: int
    max_replicas: int
    cold_start_s: float
    """Seconds from asking for a pod to it serving: the forecast horizon."""
    replica_capacity: float
    """Requests/s one replica serves within the SLO, used until enough is learned."""
    target_utilization: float = 1.0
    """Share of a replica's capacity the floor plans to use. 1.0: the floor is what the forecast
    needs at full capacity and the HPA above it carries the headroom (planning headroom in both
    cost 7 % more GPU-seconds for no attainment in docs/autoscaling.md's sweep)."""
    trend_window_s: float = 600.0
    """History the short-term trend is fitted on."""
    lower_after_s: float = 600.0
    """The floor falls only after a lower figure has held this long."""
    min_capacity_samples: int = 5
    """Busy, within-SLO samples needed before the learned capacity replaces the configured one."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if self.cold_start_s < 0 or self.replica_capacity <= 0:
            raise ValueError("cold_start_s must be >= 0 and replica_capacity > 0")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization {self.target_utilization} is not in (0, 1]")


@dataclass(frozen=True, slots=True)
class Observations:
    """What the operator read from Prometheus for one tick."""

    now: float
    rates: Sequence[RatePoint]
    """Arrival-rate history, oldest first, up to ``now``."""
    capacity_samples: Sequence[CapacitySample] = ()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the previous tick decided, carried to the next."""

    floor: int
    lower_since: float | None = None
    """When a floor below ``floor`` was first proposed (and has been since), else None."""


@dataclass(frozen=True, slots=True)
class Decision:
    floor: int
    reason: str
    forecast_rate: float
    replica_capacity: float
    needed: int
    """Replicas the forecast needs, before bounds and hysteresis."""
    state: PolicyState


def _trend(points: Sequence[RatePoint]) -> tuple[float, float]:
    """Least-squares line through the points: (rate at the last point, slope per second)."""
    n = len(points)
    mean_t = sum(p.at for p in points) / n
    mean_r = sum(p.rate for p in points) / n
    var_t = sum((p.at - mean_t) ** 2 for p in points)
    if var_t == 0:
        return mean_r, 0.0
    slope = sum((p.at - mean_t) * (p.rate - mean_r) for p in points) / var_t
    return mean_r + slope * (points[-1].at - mean_t), slope


def _between(points: Sequence[RatePoint], times: Sequence[float], start: float,
             end: float) -> Sequence[RatePoint]:
    """The points with ``start <= at <= end``; ``times`` are their ``at``, ascending."""
    return points[bisect.bisect_left(times, start):bisect.bisect_right(times, end)]


def _rate_near(points: Sequence[RatePoint], times: Sequence[float], at: float,
               within_s: float) -> float | None:
    """The mean rate of the points within ``within_s`` of ``at``, or None if there are none."""
    near = _between(points, times, at - within_s, at + within_s)
    return sum(p.rate for p in near) / len(near) if near else None


def forecast_rate(points: Sequence[RatePoint], now: float, horizon_s: float,
                  trend_window_s: float) -> float:
    """The arrival rate expected at ``now + horizon_s``.

    Short term: the recent level plus its trend, projected over the horizon (a falling trend is
    not projected: the floor must not drop on a guess). The trend is projected only once the
    history spans half the trend window, and by at most the level itself (doubling): a slope
    fitted on the first minutes of a ramp, projected over a long cold start, would ask for a
    fleet many times the peak and hold it for ``lower_after_s``. Seasonality, when the history holds the
    same time on earlier days: yesterday's change from now to now + horizon, applied to today's
    level, and the larger of the two forecasts wins.
    """
    times = [p.at for p in points]  # oldest first (Observations.rates): bisect, not scan
    recent = _between(points, times, now - trend_window_s, now)
    if not recent:
        return 0.0
    level, slope = _trend(recent)
    level = max(level, 0.0)
    span = recent[-1].at - recent[0].at
    rise = max(slope, 0.0) * horizon_s if span >= trend_window_s / 2 else 0.0
    short_term = level + min(rise, level)
    seasonal = []
    # Averaged over half the horizon (at least 30 s) around each instant, so "then" and "later"
    # do not overlap much even for a short cold start.
    within_s = max(min(trend_window_s, horizon_s) / 2, 30.0)
    for days_back in (1, 2, 7):
        then = _rate_near(points, times, now - days_back * DAY_S, within_s)
        later = _rate_near(points, times, now - days_back * DAY_S + horizon_s, within_s)
        if then is not None and later is not None and then > 0:
            seasonal.append(level * later / then)
    if seasonal:
        return max(short_term, sum(seasonal) / len(seasonal))
    return short_term


def learned_capacity(samples: Sequence[CapacitySample], configured: float, needed: int) -> float:
    """Requests/s per replica: the median of the busy, within-SLO samples once there are
    ``needed`` of them (robust to a few odd ticks), else the configured figure."""
    rates = sorted(s.per_replica_rate for s in samples if s.per_replica_rate > 0)
    if len(rates) < needed:
        return configured
    middle = len(rates) // 2
    return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2


def decide(spec: PolicySpec, observations: Observations, state: PolicyState | None) -> Decision:
    """The floor for now, with the reason a person reading the resource's status needs."""
    state = state or PolicyState(floor=spec.min_replicas)
    now = observations.now
    capacity = learned_capacity(observations.capacity_samples, spec.replica_capacity,
                                spec.min_capacity_samples)
    rate = forecast_rate(observations.rates, now, spec.cold_start_s, spec.trend_window_s)
    needed = math.ceil(rate / (capacity * spec.target_utilization) - 1e-9) if rate > 0 else 0
    proposed = min(max(needed, spec.min_replicas), spec.max_replicas)
    basis = (f"forecast {rate:.2f} req/s in {spec.cold_start_s:.0f} s / "
             f"{capacity:.2f} req/s per replica at {spec.target_utilization:.0%}")
    bound = ""
    if needed > spec.max_replicas:
        bound = f"; capped at maxReplicas {spec.max_replicas}"
    elif needed < spec.min_replicas:
        bound = f"; held at minReplicas {spec.min_replicas}"

    if proposed >= state.floor:
        verb = "raised" if proposed > state.floor else "kept"
        new_state = PolicyState(floor=proposed)
        reason = f"{verb} to {proposed}: {basis} needs {needed}{bound}"
        return Decision(proposed, reason, rate, capacity, needed, new_state)

    lower_since = state.lower_since if state.lower_since is not None else now
    held = now - lower_since
    if held >= spec.lower_after_s:
        reason = (f"lowered to {proposed}: {basis} needs {needed}{bound}, "
                  f"for {held:.0f} s >= {spec.lower_after_s:.0f} s")
        return Decision(proposed, reason, rate, capacity, needed, PolicyState(floor=proposed))
    reason = (f"kept at {state.floor}: {basis} needs {needed}{bound}; lowering after "
              f"{spec.lower_after_s - held:.0f} s more")
    return Decision(state.floor, reason, rate, capacity, needed,
                    replace(state, lower_since=lower_since))
