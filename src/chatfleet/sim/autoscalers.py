"""The autoscalers the fleet simulator compares, each an ``Autoscaler`` over a ``FleetView``.

``HPAOnQueue`` is the chart's HPA (hpa/hpa.yaml, parsed by ``sim.hpa.spec_from_manifest``) run by
the controller model of ``sim/hpa.py`` on the per-pod gauges the prometheus-adapter would serve:
``chatfleet_queue_depth`` and ``chatfleet_slot_utilization`` (running / slots), as of the last
scrape. A pod the last scrape did not see has no series yet: a missing metric to the controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatfleet.sim.fleet import FleetView
from chatfleet.sim.hpa import (
    HorizontalPodAutoscaler,
    HPASpec,
    Observation,
    PodObservation,
    PodPhase,
)

__all__ = ["HPAOnQueue", "pods_metrics"]

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
