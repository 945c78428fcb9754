"""The autoscalers the fleet simulator compares, each an ``Autoscaler`` over a ``FleetView``.

- ``HPAOnQueue``: the chart's HPA (``autoscaling.mode: hpa``).
- ``KedaOnQueue``: the chart's ScaledObject (``mode: keda``), pending-pod discount included.
- ``OperatorFloor``: the HPA with the operator's floor (autoscale/policy.py, the code the kopf
  operator runs) written into its minReplicas every ``tick_s``.
- ``Oracle``: knows the arrivals to come; sizes the fleet for the peak rate one cold start ahead.

``HPAOnQueue`` is the chart's HPA (hpa/hpa.yaml, parsed by ``sim.hpa.spec_from_manifest``) run by
the controller model of ``sim/hpa.py`` on the per-pod gauges the prometheus-adapter would serve:
``chatfleet_queue_depth`` and ``chatfleet_slot_utilization`` (running / slots), as of the last
scrape. A pod the last scrape did not see has no series yet: a missing metric to the controller.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from chatfleet.autoscale.policy import (
    DAY_S,
    Observations,
    PolicySpec,
    PolicyState,
    RatePoint,
    decide,
)
from chatfleet.sim.fleet import FleetView
from chatfleet.sim.hpa import (
    HorizontalPodAutoscaler,
    HPASpec,
    Observation,
    PodObservation,
    PodPhase,
)
from chatfleet.sim.keda import (
    ScaledObject,
    ScaledObjectSpec,
    pending_pod_allowance,
    queue_trigger_value,
    slot_trigger_value,
)

__all__ = ["HPAOnQueue", "KedaOnQueue", "OperatorFloor", "Oracle", "pods_metrics"]

QUEUE_METRIC = "chatfleet_queue_depth"
SLOTS_METRIC = "chatfleet_slot_utilization"


def pods_metrics(view: FleetView) -> tuple[PodObservation, ...]:
    """The pods the HPA's selector matches, with the Pods metrics the adapter serves for each;
    live pods created since the last scrape have none yet."""
    scraped = tuple(
        PodObservation(phase=PodPhase.RUNNING, ready=sample.ready, deleting=sample.terminating,
                       metrics={QUEUE_METRIC: float(sample.queue_depth),
                                SLOTS_METRIC: sample.running / sample.engine_slots})
        for sample in view.pods)
    unseen = view.ready_replicas + view.starting_replicas - sum(not p.deleting for p in scraped)
    return scraped + tuple(PodObservation(phase=PodPhase.RUNNING, ready=False)
                           for _ in range(max(0, unseen)))


@dataclass
class HPAOnQueue:
    spec: HPASpec
    controller: HorizontalPodAutoscaler = field(init=False)

    def __post_init__(self) -> None:
        self.controller = HorizontalPodAutoscaler(self.spec)

    def desired_replicas(self, view: FleetView) -> int:
        replicas = view.ready_replicas + view.starting_replicas
        observation = Observation(spec_replicas=replicas, pods=pods_metrics(view))
        return self.controller.step(view.now, observation).desired


@dataclass
class KedaOnQueue:
    """The ScaledObject's two triggers, in the chart's order: queue (with the pending-pod
    discount), then slot utilisation."""

    spec: ScaledObjectSpec
    engine_slots: int
    target_queue_depth_per_pod: float
    allowance: float | None = None
    scaled: ScaledObject = field(init=False)
    next_poll_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.scaled = ScaledObject(self.spec)

    def desired_replicas(self, view: FleetView) -> int:
        pods = pods_metrics(view)
        allowance = pending_pod_allowance(self.engine_slots, self.target_queue_depth_per_pod,
                                          self.allowance)
        values = (queue_trigger_value(pods, allowance), slot_trigger_value(pods))
        current = view.ready_replicas + view.starting_replicas
        if view.now >= self.next_poll_s:
            self.next_poll_s = view.now + self.spec.polling_interval_s
            polled = self.scaled.poll(view.now, current, values)
            if polled.desired is not None:
                return polled.desired
        return self.scaled.hpa_step(view.now, Observation(spec_replicas=current, pods=pods),
                                    values).desired


@dataclass
class OperatorFloor:
    """The HPA, with minReplicas set by the operator's policy from the arrival rates it saw.

    The rate history is what the operator reads from Prometheus (autoscale/prometheus.py): every
    scrape within the trend window, one point a minute before that, back ``history_s`` (a week
    and a day by default, for the policy's seasonal look at 1, 2 and 7 days back)."""

    hpa: HPAOnQueue
    policy: PolicySpec
    tick_s: float = 30.0
    history_s: float = 8 * DAY_S
    older_step_s: float = 60.0
    state: PolicyState | None = None
    next_tick_s: float = 0.0
    recent: deque[RatePoint] = field(default_factory=deque)
    older: deque[RatePoint] = field(default_factory=deque)

    def remember(self, point: RatePoint) -> None:
        self.recent.append(point)
        while self.recent and self.recent[0].at < point.at - self.policy.trend_window_s:
            old = self.recent.popleft()
            if not self.older or old.at - self.older[-1].at >= self.older_step_s:
                self.older.append(old)
        while self.older and self.older[0].at < point.at - self.history_s:
            self.older.popleft()

    def desired_replicas(self, view: FleetView) -> int:
        self.remember(RatePoint(view.now, view.arrival_rate))
        if view.now >= self.next_tick_s:
            self.next_tick_s = view.now + self.tick_s
            rates = (*self.older, *self.recent)
            decision = decide(self.policy, Observations(view.now, rates), self.state)
            self.state = decision.state
            controller = self.hpa.controller
            controller.spec = replace(controller.spec, min_replicas=decision.floor)
        return self.hpa.desired_replicas(view)


@dataclass
class Oracle:
    """Sizes the fleet for the highest arrival rate from a minute ago to a cold start (plus one
    sync) ahead, knowing every arrival in advance: the yardstick the others' cost is measured
    against.

    It plans with the same headroom as the operator (``target_utilization`` of a replica's
    capacity): at exactly the measured capacity a replica is at its SLO edge, and the per-pod
    share of a fleet's load varies around the mean."""

    arrivals_s: Sequence[float]
    replica_capacity: float
    cold_start_s: float
    target_utilization: float = 0.85
    min_replicas: int = 1
    window_s: float = 60.0
    sync_s: float = 15.0

    def rate_at(self, at: float) -> float:
        lo = bisect.bisect_left(self.arrivals_s, at)
        hi = bisect.bisect_left(self.arrivals_s, at + self.window_s)
        return (hi - lo) / self.window_s

    def desired_replicas(self, view: FleetView) -> int:
        # From a window back (what arrived then is still running: scaling below it cuts
        # requests at the drain timeout) to a cold start and a sync ahead.
        horizon = self.cold_start_s + self.sync_s
        peak = max(self.rate_at(view.now + offset) for offset in
                   range(-int(self.window_s), int(horizon) + 1, int(self.sync_s)))
        return max(self.min_replicas,
                   math.ceil(peak / (self.replica_capacity * self.target_utilization) - 1e-9))
