"""The fleet simulator: admission, engines, cold starts, drains and GPU-seconds in virtual time."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatfleet.bench.workload import FixedLengths, RequestSpec
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.arrivals import shaped_arrivals, step
from chatfleet.sim.autoscalers import HPAOnQueue
from chatfleet.sim.fleet import (
    FleetConfig,
    FleetResult,
    FleetView,
    RequestOutcome,
    StaticReplicas,
    simulate,
)
from chatfleet.sim.hpa import spec_from_manifest

PROFILE = load_profile("llama-3-8b-h100")
HPA_MANIFEST = Path(__file__).parents[2] / "hpa" / "hpa.yaml"


@dataclass
class Scripted:
    """Desired replicas as a function of time; records what it was shown."""

    replicas: Callable[[float], int]

    def __post_init__(self) -> None:
        self.views: list[FleetView] = []

    def desired_replicas(self, view: FleetView) -> int:
        self.views.append(view)
        return self.replicas(view.now)


def load(rate: float, seconds: float, prompt: int = 500, output: int = 200, seed: int = 1) -> list[RequestSpec]:
    return list(shaped_arrivals(step(rate, rate, 0.0), duration_s=seconds,
                                lengths=FixedLengths(prompt, output), seed=seed).arrivals)


def config(**changes: object) -> FleetConfig:
    base: dict[str, object] = {"profile": PROFILE, "engine_slots": 64, "initial_replicas": 1,
                               "cold_start_s": lambda rng: 60.0}
    return FleetConfig(**{**base, **changes})  # type: ignore[arg-type]


def outcomes(result: FleetResult) -> dict[str, int]:
    return {o.name: sum(1 for x in result.outcome if x == o) for o in RequestOutcome}


def test_a_static_fleet_serves_a_light_load_within_the_slo() -> None:
    requests = load(5.0, 120.0)
    result = simulate(config(initial_replicas=2), requests, StaticReplicas(2))
    assert outcomes(result) == {"OK": len(requests), "REJECTED": 0, "NO_ENDPOINT": 0, "CUT": 0,
                                "INVALID": 0}
    ttfts = sorted(result.ttft_s)
    assert ttfts[int(0.95 * len(ttfts))] < 0.5
    assert all(t <= 0.1 for t in result.tpot_s)
    assert math.isclose(result.gpu_seconds, 2 * result.end_s)
    assert result.end_s >= requests[-1].at_s


def test_an_overloaded_pod_queues_up_to_its_bound_then_refuses() -> None:
    requests = load(40.0, 60.0, output=400)
    result = simulate(config(engine_slots=4, max_queue=8), requests, StaticReplicas(1))
    counts = outcomes(result)
    assert counts["REJECTED"] > len(requests) / 2 and counts["OK"] > 0 and counts["CUT"] == 0
    assert sum(counts.values()) == len(requests)
    assert max(point.queued for point in result.timeline) <= 8
    assert max(point.running for point in result.timeline) <= 4


def test_a_request_that_waits_past_the_queue_limit_is_refused() -> None:
    requests = load(10.0, 30.0, output=400)
    patient = simulate(config(engine_slots=2, max_queue=1000, max_queue_wait_s=1000), requests,
                       StaticReplicas(1))
    hurried = simulate(config(engine_slots=2, max_queue=1000, max_queue_wait_s=5), requests,
                       StaticReplicas(1))
    assert outcomes(patient)["REJECTED"] == 0
    assert outcomes(hurried)["REJECTED"] > 0
    served_ttft = [t for t, o in zip(hurried.ttft_s, hurried.outcome, strict=True) if o == RequestOutcome.OK]
    assert max(served_ttft) < 5 + 1.0, "nobody is served after waiting longer than the limit"


def test_new_pods_serve_only_after_their_cold_start_and_cost_gpu_time_while_loading() -> None:
    requests = load(5.0, 200.0)
    scaler = Scripted(lambda now: 3 if now >= 30 else 1)
    result = simulate(config(cold_start_s=lambda rng: 60.0), requests, scaler)
    by_time = {round(p.at): p for p in result.timeline}
    assert by_time[75].ready == 1 and by_time[75].starting == 2
    assert by_time[90].ready == 3 and by_time[90].starting == 0
    assert math.isclose(result.gpu_seconds, result.end_s + 2 * (result.end_s - 30))
    seen = {round(v.now): v for v in scaler.views}
    assert seen[45].starting_replicas == 2 and seen[45].ready_replicas == 1


def test_scaling_in_drains_pods_without_losing_a_request() -> None:
    requests = load(20.0, 150.0, output=300)
    result = simulate(config(initial_replicas=3), requests, Scripted(lambda now: 1 if now >= 60 else 3))
    counts = outcomes(result)
    assert counts["CUT"] == 0 and counts["NO_ENDPOINT"] == 0
    assert counts["OK"] + counts["REJECTED"] == len(requests)
    assert result.timeline[-1].ready == 1


def test_with_no_ready_pod_there_is_no_endpoint() -> None:
    requests = load(5.0, 60.0)
    result = simulate(config(initial_replicas=0, cold_start_s=lambda rng: 30.0), requests, StaticReplicas(1))
    early = [o for a, o in zip(result.arrival_s, result.outcome, strict=True) if a < 30]
    late = [o for a, o in zip(result.arrival_s, result.outcome, strict=True) if a >= 30]
    assert early and set(early) == {RequestOutcome.NO_ENDPOINT}
    assert late and set(late) == {RequestOutcome.OK}


def test_the_same_inputs_give_the_same_run() -> None:
    requests = load(10.0, 60.0)
    runs = [simulate(config(), requests, StaticReplicas(1)) for _ in range(2)]
    assert list(runs[0].ttft_s) == list(runs[1].ttft_s) and runs[0].timeline == runs[1].timeline


def test_the_charts_hpa_scales_out_on_a_load_step_within_its_policies() -> None:
    """hpa/hpa.yaml as rendered by the chart: from 1 pod, +4 pods or +100% per 30 s at most."""
    spec = spec_from_manifest(yaml.safe_load(HPA_MANIFEST.read_text()))
    requests = list(shaped_arrivals(step(2.0, 40.0, 120.0), duration_s=420.0,
                                    lengths=FixedLengths(500, 200), seed=2).arrivals)
    result = simulate(config(cold_start_s=lambda rng: 60.0), requests, HPAOnQueue(spec))
    desired = [(p.at, p.desired) for p in result.timeline]
    assert all(d == 1 for at, d in desired if at < 120), "nothing to scale for before the step"
    grown = [(at, d) for at, d in desired if d > 1]
    assert grown, "the HPA never scaled out"
    first_at, first = grown[0]
    assert first_at <= 150 and first <= 5, (first_at, first)
    assert max(d for _, d in desired) <= spec.max_replicas
    ready_late = [p.ready for p in result.timeline if p.at >= first_at + 75]
    assert max(ready_late) > 1, "the new pods became ready a cold start later"


def test_a_pod_scaled_down_while_it_admits_from_its_queue_finishes_what_it_admitted() -> None:
    """Regression: a draining pod that took its last queued request into a new step was ended
    at once, losing that request and every one running on it; the run then never finished."""
    requests = load(8.0, 40.0, prompt=300, output=300)
    result = simulate(config(initial_replicas=2, engine_slots=8, drain_timeout_s=3600.0,
                             max_queue_wait_s=3600.0, end_s=7200.0),
                      requests, Scripted(lambda now: 2 if now < 30 else 1))
    counts = outcomes(result)
    assert counts["OK"] == len(requests), counts
    assert max(point.queued for point in result.timeline) > 0  # the drained pod had a queue
    assert all(not math.isnan(ttft) for ttft in result.ttft_s)


def test_a_request_longer_than_the_context_is_invalid_under_any_policy() -> None:
    requests = [RequestSpec(index=10_000, prompt_tokens=PROFILE.max_model_len, output_tokens=10, at_s=0.5),
                *load(1.0, 10.0)]
    result = simulate(config(), requests, StaticReplicas(1))
    assert outcomes(result)["INVALID"] == 1 and outcomes(result)["OK"] == len(requests) - 1
