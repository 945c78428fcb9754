"""The simulator's autoscalers and capacity measurement, on small fleets in virtual time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from chatfleet.autoscale.policy import PolicySpec
from chatfleet.bench.workload import FixedLengths
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.arrivals import ramp, shaped_arrivals, step
from chatfleet.sim.autoscalers import HPAOnQueue, KedaOnQueue, OperatorFloor, Oracle
from chatfleet.sim.capacity import replica_capacity, tuned_slots
from chatfleet.sim.experiment import hpa_with_targets
from chatfleet.sim.fleet import FleetConfig, FleetResult, simulate
from chatfleet.sim.hpa import spec_from_manifest
from chatfleet.sim.keda import scaled_object_from_manifest
from chatfleet.sim.report import Slo

HPA_DIR = Path(__file__).parents[2] / "hpa"
L4 = load_profile("llama-3-8b-l4")
LENGTHS = FixedLengths(400, 60)
COLD_START = 120.0
STEP_AT = 600.0


def stepped_load(seed: int = 3) -> list:
    """2 req/s, then 12 req/s from minute ten, for twenty minutes."""
    return list(shaped_arrivals(step(2.0, 12.0, STEP_AT), duration_s=1200, lengths=LENGTHS,
                                seed=seed).arrivals)


def fleet(autoscaler: object, requests: list | None = None) -> FleetResult:
    config = FleetConfig(profile=L4, engine_slots=16, initial_replicas=1, seed=1,
                         cold_start_s=lambda rng: COLD_START)
    return simulate(config, requests or stepped_load(), autoscaler)  # type: ignore[arg-type]


def hpa(slot_utilization: float | None = None) -> HPAOnQueue:
    """The chart's HPA (another slot target if given), with room to grow (default max 8)."""
    manifest = yaml.safe_load((HPA_DIR / "hpa.yaml").read_text())
    if slot_utilization is not None:
        manifest = hpa_with_targets(manifest, 8, slot_utilization)
    return HPAOnQueue(replace(spec_from_manifest(manifest), max_replicas=30))


def first_scale_up(result: FleetResult, after: float = 0.0) -> float:
    start = next(p.desired for p in result.timeline if p.at >= after)
    return next(p.at for p in result.timeline if p.at >= after and p.desired > start)


def test_capacity_is_lower_on_a_slower_gpu_and_slots_stop_adding_capacity() -> None:
    slo = Slo()
    l4 = replica_capacity(L4, engine_slots=16, lengths=LENGTHS, slo=slo, duration_s=300)
    a100 = replica_capacity(load_profile("llama-3-8b-a100"), engine_slots=16, lengths=LENGTHS,
                            slo=slo, duration_s=300)
    assert 0 < l4 < a100
    slots, capacity = tuned_slots(L4, lengths=LENGTHS, slo=slo, duration_s=240)
    more = replica_capacity(L4, engine_slots=slots * 2, lengths=LENGTHS, slo=slo, duration_s=240)
    assert more <= capacity * 1.02  # doubling the slots past the tuned count buys nothing


def test_the_oracle_scales_a_cold_start_before_the_step_and_the_hpa_after_it() -> None:
    requests = stepped_load()
    oracle = Oracle([float(r.at_s or 0.0) for r in requests], replica_capacity=3.0,
                    cold_start_s=COLD_START)
    ahead = first_scale_up(fleet(oracle), after=STEP_AT - 300)
    assert STEP_AT - COLD_START - 75 <= ahead <= STEP_AT - COLD_START
    assert STEP_AT <= first_scale_up(fleet(hpa()), after=STEP_AT - 60) <= STEP_AT + 60


def test_keda_scales_on_the_queue_and_its_pending_discount_orders_fewer_pods() -> None:
    manifest = yaml.safe_load((HPA_DIR / "keda-scaledobject.yaml").read_text())
    keda = fleet(KedaOnQueue(scaled_object_from_manifest(manifest), 16, 8.0))
    plain = fleet(hpa())
    assert first_scale_up(keda, after=STEP_AT - 60) <= STEP_AT + 60
    during_cold_start = [STEP_AT, STEP_AT + COLD_START]
    peak = {name: max(p.desired for p in r.timeline if during_cold_start[0] <= p.at <= during_cold_start[1])
            for name, r in (("keda", keda), ("hpa", plain))}
    assert peak["keda"] <= peak["hpa"]


def test_the_operator_floor_rises_ahead_of_a_ramp_and_the_hpa_above_it_follows() -> None:
    """A ramp from 2 to 14 req/s over 15 min under an HPA that waits for full slots (target
    0.9): the floor (the policy run every 30 s on the rates the fleet saw) rises while the load
    climbs, the HPA's minReplicas is that floor, and the fleet grows before the HPA alone's."""
    requests = list(shaped_arrivals(ramp(2.0, 14.0, 900), duration_s=1200, lengths=LENGTHS,
                                    seed=5).arrivals)
    policy = PolicySpec(min_replicas=1, max_replicas=30, cold_start_s=COLD_START,
                        replica_capacity=3.0, trend_window_s=300, lower_after_s=300)
    operator = OperatorFloor(hpa(0.9), policy)
    result = fleet(operator, requests=requests)
    floor = operator.state.floor if operator.state else 0
    assert floor >= 5  # 14 req/s at 3 req/s per replica and 85 %
    assert operator.hpa.controller.spec.min_replicas == floor
    alone = fleet(hpa(0.9), requests=requests)
    assert first_scale_up(result) < first_scale_up(alone)
