"""The fleet simulator's prefix cache on a real prefix-annotated trace (the Mooncake synthetic trace,
examples/traces): with room for every block it finds what the trace itself repeats, and a GPU's
real KV cache finds far less (the trace reuses blocks long after their first use)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatfleet.bench.workload import TRACE_BLOCK_TOKENS, RequestSpec, load_trace, trace_replay
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.fleet import FleetConfig, FleetResult, StaticReplicas, servable, simulate

TRACE = Path(__file__).parents[2] / "examples" / "traces" / "mooncake_synthetic.jsonl"
PROFILE = load_profile("llama-3.1-8b-h200")


@pytest.fixture(scope="module")
def requests() -> list[RequestSpec]:
    arrivals = trace_replay(load_trace(TRACE)).arrivals
    return [r for r in arrivals if servable(PROFILE, r.prompt_tokens, r.output_tokens)]


def repeat_share(requests: list[RequestSpec]) -> float:
    """Share of prompt tokens in blocks whose id an earlier request already had: the trace's own
    answer to "how much could a cache that forgets nothing serve"."""
    seen: set[int] = set()
    repeated = total = 0
    for request in sorted(requests, key=lambda r: r.at_s or 0.0):
        for k, block_id in enumerate(request.prefix_ids):
            tokens = min(TRACE_BLOCK_TOKENS, request.prompt_tokens - k * TRACE_BLOCK_TOKENS)
            total += tokens
            repeated += tokens if block_id in seen else 0
            seen.add(block_id)
    return repeated / total


def one_pod(requests: list[RequestSpec], kv_capacity_tokens: int) -> FleetResult:
    """One pod that admits everything (no queue bound or wait limit), so every request is looked up."""
    profile = dataclasses.replace(PROFILE, kv_capacity_tokens=kv_capacity_tokens)
    config = FleetConfig(profile=profile, engine_slots=256, initial_replicas=1, max_queue=1_000_000,
                         max_queue_wait_s=1e9)
    return simulate(config, requests, StaticReplicas(1))


def test_an_unbounded_cache_finds_what_the_trace_repeats(requests: list[RequestSpec]) -> None:
    share = repeat_share(requests)
    assert 0.5 < share < 0.8  # examples/traces/README.md: 64% of its prompt blocks repeat an earlier one
    result = one_pod(requests, kv_capacity_tokens=10**10)
    assert result.prefix_cache_hit_rate == pytest.approx(share, abs=0.05)


def test_one_h200s_kv_cache_keeps_far_less_of_it(requests: list[RequestSpec]) -> None:
    result = one_pod(requests, kv_capacity_tokens=PROFILE.kv_capacity_tokens)
    assert 0 < result.prefix_cache_hit_rate < repeat_share(requests) - 0.3
