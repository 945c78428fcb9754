"""Routing between pods in the fleet simulator (sim/picker.py): random as before, or the endpoint
picker's scoring on load polled with a delay."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from chatfleet.bench.workload import FixedLengths, RequestSpec
from chatfleet.engines.engine_model import load_profile
from chatfleet.routing.scoring import PodLoad, RoutingSpec
from chatfleet.sim.arrivals import shaped_arrivals, step
from chatfleet.sim.fleet import FleetConfig, FleetResult, RequestOutcome, StaticReplicas, simulate
from chatfleet.sim.picker import PolledLoad, Routing

L4 = load_profile("llama-3-8b-l4")


def steady(rate: float, duration_s: float, seed: int = 5) -> list:
    return list(shaped_arrivals(step(rate, rate, 0.0), duration_s=duration_s,
                                lengths=FixedLengths(300, 40), seed=seed).arrivals)


def outcomes(result: FleetResult) -> Counter[str]:
    return Counter(RequestOutcome(o).name for o in result.outcome)


def test_random_routing_is_the_default_and_unchanged_bit_for_bit() -> None:
    """The digest was taken with the simulator before it had routing (main at d436c99), and taken
    again when the engine model's step time changed (the H200 fit, issue 15: new L4 profile, same
    simulator): the same seeded run must give the same outcomes, TTFTs and TPOTs to the last bit."""
    requests = list(shaped_arrivals(step(4.0, 9.0, 60.0), duration_s=180,
                                    lengths=FixedLengths(300, 40), seed=5).arrivals)
    config = FleetConfig(profile=L4, engine_slots=8, max_queue=6, initial_replicas=3, seed=2)
    assert config.routing == Routing("random")
    result = simulate(config, requests, StaticReplicas(3))
    digest = hashlib.sha256(b"".join(a.tobytes() for a in (result.outcome, result.ttft_s,
                                                            result.tpot_s))).hexdigest()
    assert (len(requests), outcomes(result)["REJECTED"], result.gpu_seconds) == (1294, 108, 549.4662860497481)
    assert digest == "4012e911e79ab89eedc5d88d1dc8aead90e38340ec387fcc5f831d2277403b29"


@pytest.mark.parametrize("kv_poll_interval_s", [0.5, None])
def test_epp_never_sends_to_a_stalled_pods_full_queue_while_the_other_pod_has_room(
        kv_poll_interval_s: float | None) -> None:
    """Pod 0 runs at 1/10,000 speed: whatever it takes stays. Its gateway answers 429 to a request
    that finds its 8 slots and 4 queue places taken, so under epp no request may be refused: the
    healthy pod has room throughout, and the picker sees pod 0 fill (its last poll plus what it
    sent since). At random, half the requests go to pod 0 and most of those are refused."""
    requests = steady(1.0, 300)

    def run(routing: Routing) -> Counter[str]:
        config = FleetConfig(profile=L4, engine_slots=8, max_queue=4, max_queue_wait_s=1000,
                             initial_replicas=2, seed=2, end_s=360, routing=routing,
                             pod_speed=lambda index: 1e-4 if index == 0 else 1.0)
        return outcomes(simulate(config, requests, StaticReplicas(2)))

    epp = run(Routing("epp", kv_poll_interval_s=kv_poll_interval_s))
    assert epp["REJECTED"] == 0 and epp["NO_ENDPOINT"] == 0
    assert epp["CUT"] <= 8 + 4  # at most what pod 0 can hold ever went there
    assert epp["OK"] == len(requests) - epp["CUT"]
    at_random = run(Routing("random"))
    assert at_random["REJECTED"] > len(requests) / 4


def test_the_picker_sees_a_pod_as_of_its_last_poll_plus_what_it_sent_since() -> None:
    state = {"running": 0, "kv": 0.0}

    def read_load() -> PodLoad:
        return PodLoad("pod-0", 8, 8, state["running"], 0, 0, 0, 16)

    polled = PolledLoad(0.0, Routing("epp", poll_interval_s=0.05, kv_poll_interval_s=0.5),
                        read_load, lambda: state["kv"])
    polled.sent()
    polled.observe(0.01)  # before the request starts at 0.01: no poll since 0.0
    state["running"], state["kv"] = 1, 0.2
    view = polled.view(0.03)
    assert (view.running, view.pending, view.kv_usage, view.age_s) == (0, 1, 0.0, pytest.approx(0.03))
    polled.observe(0.12)  # the polls at 0.05 and 0.10 saw the request running, no KV poll yet
    state["running"] = 0
    view = polled.view(0.12)
    assert (view.running, view.pending, view.kv_usage, view.age_s) == (1, 0, 0.0, pytest.approx(0.02))
    polled.observe(0.5)
    assert polled.view(0.5).kv_usage == 0.2 and polled.view(0.5).running == 0


def test_a_burst_between_two_polls_is_spread_by_what_the_picker_sent() -> None:
    """20 requests in the same millisecond reach two idle pods (8 slots, 4 queue places each):
    no poll falls between them, so only the picker's own count keeps them off one pod."""
    requests = [RequestSpec(index=i, prompt_tokens=300, output_tokens=40, at_s=1.0 + i * 5e-5)
                for i in range(20)]
    config = FleetConfig(profile=L4, engine_slots=8, max_queue=4, initial_replicas=2, seed=2,
                         routing=Routing("epp"))
    result = simulate(config, requests, StaticReplicas(2))
    assert outcomes(result) == Counter({"OK": 20})


def test_a_pod_whose_load_is_older_than_the_staleness_bound_gets_nothing() -> None:
    """Polled every 10 s with a 2 s bound, the picker has a usable view only in the first 2 s
    after each poll: every other request is a 503 (no endpoint), none reaches a gateway."""
    requests = steady(2.0, 60)
    config = FleetConfig(profile=L4, engine_slots=8, initial_replicas=2, seed=2, routing=Routing(
        "epp", poll_interval_s=10.0, spec=RoutingSpec(stale_after_s=2.0)))
    result = simulate(config, requests, StaticReplicas(2))
    for at, outcome in zip(result.arrival_s, result.outcome, strict=True):
        fresh = at % 10.0 <= 2.0
        assert (outcome == RequestOutcome.NO_ENDPOINT) == (not fresh), at


def test_epp_meets_the_slo_for_more_requests_on_an_equal_fleet() -> None:
    """Three equal pods near their capacity: least-loaded picks queue less than random ones.
    (3.5 then 8 req/s: near three L4 pods' capacity since the H200 fit of the step time, issue 15.)"""
    requests = list(shaped_arrivals(step(3.5, 8.0, 60.0), duration_s=180,
                                    lengths=FixedLengths(300, 40), seed=5).arrivals)

    def run(kind: str) -> FleetResult:
        config = FleetConfig(profile=L4, engine_slots=8, max_queue=6, initial_replicas=3, seed=2,
                             routing=Routing(kind))
        return simulate(config, requests, StaticReplicas(3))

    random_run, epp_run = run("random"), run("epp")
    assert outcomes(epp_run)["REJECTED"] < outcomes(random_run)["REJECTED"] / 2
    assert epp_run.gpu_seconds == pytest.approx(random_run.gpu_seconds, rel=0.02)


def test_bad_routing_is_refused_with_what_to_choose() -> None:
    with pytest.raises(ValueError, match="unknown routing 'magic'; choose from random, epp"):
        Routing("magic")
    with pytest.raises(ValueError, match="poll intervals must be > 0"):
        Routing("epp", poll_interval_s=0)
    with pytest.raises(ValueError, match="use it with routing epp"):
        Routing("random", prefix_affinity=True)


def test_prefix_affinity_sends_prompts_that_start_alike_to_one_pod_whose_cache_holds_them() -> None:
    """Sixteen system prompts of 4 trace blocks (2,048 tokens; 32k in all, more than an L4's
    21,888 tokens of KV), each request adding a block of its own, over four lightly loaded pods:
    the least-loaded picker alone sends every prompt to every pod, whose LRU cache then loses them
    between turns; keyed on the first block, each pod serves about four prompts, which it keeps."""
    prompts = 16
    requests = [RequestSpec(index=i, prompt_tokens=5 * 512 - 100, output_tokens=20, at_s=i * 0.25,
                            prefix_ids=tuple(range(10 * (i % prompts), 10 * (i % prompts) + 4)) + (1000 + i,))
                for i in range(400)]

    def run(affinity: bool) -> FleetResult:
        config = FleetConfig(profile=L4, engine_slots=8, initial_replicas=4, seed=2,
                             routing=Routing("epp", prefix_affinity=affinity))
        return simulate(config, requests, StaticReplicas(4))

    spread, kept = run(False), run(True)
    # At best every request but each prompt's first finds its 2,048 shared tokens cached.
    best = 2048 / (5 * 512 - 100) * (400 - prompts) / 400
    assert kept.prefix_cache_hit_rate > 0.9 * best
    assert spread.prefix_cache_hit_rate < kept.prefix_cache_hit_rate - 0.25
    assert outcomes(kept)["OK"] == outcomes(spread)["OK"] == 400
