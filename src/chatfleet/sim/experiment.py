"""One fleet experiment: a trace at a speed, a GPU profile, a cold start, and the policies to
compare on it. ``chatfleet simulate`` and scripts/tune_autoscaling.py both build on it, so the
tuning sweep and the published table run exactly the same fleet.

Per-replica capacity is measured on one simulated pod (sim/capacity.py), with the slots tuned
the same way unless given. Every policy starts from the replicas the oracle would have at 0 s
(static-at-peak from its own count), and runs the same requests with the same seed and the same
routing between pods (sim/picker.py: random, or the endpoint picker).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from chatfleet.autoscale.policy import PolicySpec
from chatfleet.bench.workload import (
    LengthSampler,
    RequestSpec,
    TraceRow,
    trace_replay,
)
from chatfleet.engines.engine_model import EngineProfile
from chatfleet.sim.autoscalers import HPAOnQueue, KedaOnQueue, OperatorFloor, Oracle
from chatfleet.sim.capacity import replica_capacity, servable_lengths, tuned_slots
from chatfleet.sim.fleet import (
    Autoscaler,
    FleetConfig,
    FleetResult,
    FleetView,
    StaticReplicas,
    simulate,
)
from chatfleet.sim.hpa import spec_from_manifest
from chatfleet.sim.keda import scaled_object_from_manifest
from chatfleet.sim.picker import Routing
from chatfleet.sim.report import PolicyReport, Slo, summarize

__all__ = ["POLICIES", "Experiment", "for_requests", "hpa_with_targets", "keda_with_targets",
           "load_manifests", "prepare"]

POLICIES = ("static", "hpa", "keda", "operator", "oracle")
REACTION_LOOKAHEAD_S = 75.0
"""A scale-up this long plus a cold start before the biggest step still counts as the reaction to
it (the oracle's horizon: a cold start, a sync and a minute's rate window ahead)."""


def hpa_with_targets(manifest: dict[str, Any], queue_per_pod: float,
                     slot_utilization: float) -> dict[str, Any]:
    """The chart's HPA with other targets for its two Pods metrics (queue, slot utilisation)."""
    tuned = copy.deepcopy(manifest)
    queue, slots = tuned["spec"]["metrics"]
    queue["pods"]["target"]["averageValue"] = f"{queue_per_pod:g}"
    slots["pods"]["target"]["averageValue"] = f"{round(slot_utilization * 1000)}m"
    return tuned


def keda_with_targets(manifest: dict[str, Any], queue_per_pod: float,
                      slot_utilization: float) -> dict[str, Any]:
    """The chart's ScaledObject with other thresholds for its queue and slot triggers."""
    tuned = copy.deepcopy(manifest)
    queue, slots = tuned["spec"]["triggers"]
    queue["metadata"]["threshold"] = f"{queue_per_pod:g}"
    slots["metadata"]["threshold"] = f"{slot_utilization:g}"
    return tuned


@dataclass(frozen=True)
class Experiment:
    requests: list[RequestSpec]
    profile: EngineProfile
    engine_slots: int
    replica_capacity: float
    cold_start_s: float
    max_replicas: int
    hpa_manifest: dict[str, Any]
    keda_manifest: dict[str, Any]
    slo: Slo = field(default_factory=Slo)
    seed: int = 0
    routing: Routing = Routing()
    unservable_share: float = 0.0
    """Share of the trace the engine can never serve; ``replica_capacity`` is for the rest."""
    prefix_caching: bool = True
    exclude_invalid: bool = False
    """Leave requests the engine can never serve out of SLO attainment (default: they miss it)."""

    @cached_property
    def arrivals(self) -> list[float]:
        return [float(r.at_s or 0.0) for r in self.requests]

    @cached_property
    def oracle(self) -> Oracle:
        """Stateless, so one serves every run."""
        return Oracle(self.arrivals, self.replica_capacity, self.cold_start_s)

    @cached_property
    def static_replicas(self) -> int:
        """Enough for the busiest minute (static-at-peak), within max_replicas."""
        end = self.arrivals[-1]
        peak = max(self.oracle.rate_at(at) for at in range(0, int(end) + 1, 15))
        return min(self.max_replicas, max(1, math.ceil(peak / self.replica_capacity)))

    def hpa(self, manifest: dict[str, Any] | None = None) -> HPAOnQueue:
        spec = spec_from_manifest(manifest or self.hpa_manifest)
        return HPAOnQueue(replace(spec, max_replicas=self.max_replicas))

    def keda(self, manifest: dict[str, Any] | None = None) -> KedaOnQueue:
        manifest = manifest or self.keda_manifest
        spec = scaled_object_from_manifest(manifest)
        # The queue trigger's threshold is the chart's targetQueueDepthPerPod, the pending
        # discount's base.
        queue_per_pod = float(manifest["spec"]["triggers"][0]["metadata"]["threshold"])
        return KedaOnQueue(replace(spec, max_replica_count=self.max_replicas), self.engine_slots,
                           queue_per_pod)

    def operator(self, hpa_manifest: dict[str, Any] | None = None, *,
                 target_utilization: float = 1.0, lower_after_s: float = 600.0) -> OperatorFloor:
        """The operator's floor over the HPA; defaults: hpa/chatfleetpolicy.yaml's."""
        return OperatorFloor(self.hpa(hpa_manifest), PolicySpec(
            min_replicas=1, max_replicas=self.max_replicas, cold_start_s=self.cold_start_s,
            replica_capacity=self.replica_capacity, target_utilization=target_utilization,
            lower_after_s=lower_after_s))

    def autoscaler(self, policy: str) -> Autoscaler:
        factories: dict[str, Callable[[], Autoscaler]] = {
            "static": lambda: StaticReplicas(self.static_replicas), "hpa": self.hpa,
            "keda": self.keda, "operator": self.operator, "oracle": lambda: self.oracle}
        return factories[policy]()

    def run(self, policy: str, autoscaler: Autoscaler | None = None) -> FleetResult:
        """Simulate one policy (or ``autoscaler``, started like ``policy``) over the requests."""
        # Every policy starts from the fleet the oracle would have at 0 s: sized before the trace
        # began, so the first cold start is nobody's handicap.
        initial = (self.static_replicas if policy == "static" else
                   self.oracle.desired_replicas(FleetView(0.0, (), 0, 0, 0.0)))
        return simulate(self.fleet_config(initial), self.requests, autoscaler or self.autoscaler(policy))

    def fleet_config(self, initial_replicas: int) -> FleetConfig:
        """The fleet every run of this experiment simulates, starting with ``initial_replicas``."""
        return FleetConfig(profile=self.profile, engine_slots=self.engine_slots,
                           initial_replicas=initial_replicas, seed=self.seed, routing=self.routing,
                           prefix_caching=self.prefix_caching,
                           cold_start_s=lambda rng: self.cold_start_s * rng.uniform(0.9, 1.1))

    def report(self, name: str, result: FleetResult, oracle: FleetResult | None) -> PolicyReport:
        return summarize(name, result, slo=self.slo, replica_capacity=self.replica_capacity,
                         oracle_gpu_seconds=oracle.gpu_seconds if oracle else None,
                         lookahead_s=self.cold_start_s + REACTION_LOOKAHEAD_S,
                         exclude_invalid=self.exclude_invalid)


def load_manifests(hpa_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's HPA and ScaledObject as shipped in ``hpa_dir`` (hpa/ of a checkout)."""
    manifests = []
    for name in ("hpa.yaml", "keda-scaledobject.yaml"):
        path = hpa_dir / name
        if not path.exists():
            raise ValueError(f"{path} not found: run from a ChatFleet checkout or pass --hpa-dir")
        manifests.append(yaml.safe_load(path.read_text()))
    return manifests[0], manifests[1]


def for_requests(requests: list[RequestSpec], *, lengths: LengthSampler, cold_start_s: float,
                 profile: EngineProfile, hpa_dir: Path, engine_slots: int | None = None,
                 max_replicas: int = 64, seed: int = 0, routing: Routing = Routing(),
                 unservable_share: float = 0.0, prefix_caching: bool = True,
                 exclude_invalid: bool = False, slo: Slo = Slo()) -> Experiment:
    """The experiment for these requests: the replica's slots (tuned unless given) and its
    capacity measured with requests of ``lengths``, and the chart's autoscalers."""
    if not requests:
        raise ValueError("no requests to simulate")
    hpa_manifest, keda_manifest = load_manifests(hpa_dir)
    if engine_slots is None:
        engine_slots, capacity = tuned_slots(profile, lengths=lengths, slo=slo, seed=seed)
    else:
        capacity = replica_capacity(profile, engine_slots=engine_slots, lengths=lengths, slo=slo,
                                    seed=seed)
    return Experiment(requests=requests, profile=profile, engine_slots=engine_slots,
                      replica_capacity=capacity, cold_start_s=cold_start_s,
                      max_replicas=max_replicas, hpa_manifest=hpa_manifest,
                      keda_manifest=keda_manifest, slo=slo, seed=seed, routing=routing,
                      unservable_share=unservable_share, prefix_caching=prefix_caching,
                      exclude_invalid=exclude_invalid)


def prepare(rows: list[TraceRow], *, speed: float, cold_start_s: float, profile: EngineProfile,
            hpa_dir: Path, engine_slots: int | None = None, duration_s: float | None = None,
            max_replicas: int = 64, seed: int = 0, routing: Routing = Routing(),
            prefix_caching: bool = True, exclude_invalid: bool = False, slo: Slo = Slo()) -> Experiment:
    """The experiment for a trace replayed at ``speed`` (its first ``duration_s`` only); the
    replica's capacity is measured on the trace's lengths that the engine can serve."""
    requests = [r for r in trace_replay(rows, speed=speed).arrivals
                if duration_s is None or float(r.at_s or 0.0) < duration_s]
    if not requests:
        raise ValueError("no requests left in the trace for that speed and duration")
    lengths, unservable = servable_lengths(profile, [(r.prompt_tokens, r.output_tokens) for r in rows])
    return for_requests(requests, lengths=lengths,
                        cold_start_s=cold_start_s, profile=profile, hpa_dir=hpa_dir,
                        engine_slots=engine_slots, max_replicas=max_replicas, seed=seed,
                        routing=routing, unservable_share=unservable, prefix_caching=prefix_caching,
                        exclude_invalid=exclude_invalid, slo=slo)
