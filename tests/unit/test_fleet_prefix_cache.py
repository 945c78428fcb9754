"""The fleet simulator's prefix caching: trace block ids become the engines' block hashes, and the
run's hit rate is the share of prompt tokens the engines found cached."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest

from chatfleet.bench.workload import TRACE_BLOCK_TOKENS, RequestSpec
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.fleet import FleetConfig, FleetResult, StaticReplicas, simulate, trace_block_hashes

PROFILE = load_profile("llama-3-8b-h100")
SYSTEM_IDS = tuple(range(100, 106))  # a 3072-token system prompt: 6 trace blocks


def shared_prefix_requests(count: int, *, every_s: float = 1.0) -> list[RequestSpec]:
    """4096-token prompts: the shared system prompt, then 2 trace blocks of their own."""
    return [RequestSpec(index=i, prompt_tokens=4096, output_tokens=20, at_s=i * every_s,
                        prefix_ids=SYSTEM_IDS + (10_000 + 2 * i, 10_001 + 2 * i)) for i in range(count)]


def run(requests: list[RequestSpec], *, replicas: int = 1, **changes: object) -> FleetResult:
    config = FleetConfig(**{"profile": PROFILE, "engine_slots": 32, "initial_replicas": replicas, **changes})
    return simulate(config, requests, StaticReplicas(replicas))  # type: ignore[arg-type]


def test_a_shared_system_prompt_gives_the_hit_rate_of_its_share_of_the_prompt_tokens() -> None:
    requests = shared_prefix_requests(40)
    result = run(requests)
    # Every request but the first finds the 3072 system tokens cached, of 4096 looked up.
    expected = 39 * 3072 / (40 * 4096)
    assert result.prefix_cache_hit_rate == pytest.approx(expected, abs=0.005)


def test_with_prefix_caching_off_nothing_is_cached_and_first_tokens_come_later() -> None:
    requests = shared_prefix_requests(40)
    cached = run(requests)
    off = run(requests, prefix_caching=False)
    assert off.prefix_cache_hit_rate == 0.0
    assert statistics.mean(cached.ttft_s[1:]) < statistics.mean(off.ttft_s[1:]) / 2


def test_requests_without_prefix_ids_share_nothing() -> None:
    requests = [dataclasses.replace(r, prefix_ids=()) for r in shared_prefix_requests(10)]
    assert run(requests).prefix_cache_hit_rate == 0.0


def test_a_cache_too_small_for_the_prompts_in_rotation_hits_less() -> None:
    # 12 system prompts of 3072 tokens in turn; the small cache holds about 4 of them (LRU: none
    # is still there when its turn comes back), the large one all of them.
    requests = [RequestSpec(index=i, prompt_tokens=4096, output_tokens=20, at_s=float(i),
                            prefix_ids=tuple(range(1000 * (i % 12), 1000 * (i % 12) + 6)) + (10_000 + 2 * i, 10_001 + 2 * i))
                for i in range(72)]
    large = run(requests)
    small = run(requests, profile=dataclasses.replace(PROFILE, kv_capacity_tokens=16 * 1024))
    assert large.prefix_cache_hit_rate == pytest.approx(60 * 3072 / (72 * 4096), abs=0.005)
    assert small.prefix_cache_hit_rate < large.prefix_cache_hit_rate / 4


def test_random_routing_over_replicas_splits_the_cache() -> None:
    requests = shared_prefix_requests(40)
    one = run(requests).prefix_cache_hit_rate
    four = run(requests, replicas=4).prefix_cache_hit_rate
    # Each of the 4 engines computes the system prompt once: 4 misses instead of 1.
    assert four == pytest.approx(36 * 3072 / (40 * 4096), abs=0.005)
    assert four < one


# --- trace block ids -> engine block hashes ---------------------------------------------------


def test_each_trace_block_covers_its_share_of_engine_blocks() -> None:
    per_id = TRACE_BLOCK_TOKENS // 16
    a = trace_block_hashes((1, 2, 3), 1536, 16)
    b = trace_block_hashes((1, 2, 4), 1536, 16)
    assert len(a) == 3 * per_id
    assert a[:2 * per_id] == b[:2 * per_id]
    assert not set(a[2 * per_id:]) & set(b[2 * per_id:])


@pytest.mark.parametrize(("prompt_tokens", "ids", "blocks"), [
    (1000, (1, 2), 62),  # only the full engine blocks of the prompt
    (5000, (1, 2), 64),  # only blocks the ids cover
    (15, (1,), 0),
])
def test_only_full_engine_blocks_within_the_prompt_and_the_ids_are_hashed(prompt_tokens: int, ids: tuple[int, ...],
                                                                          blocks: int) -> None:
    assert len(trace_block_hashes(ids, prompt_tokens, 16)) == blocks


def test_a_block_size_that_does_not_divide_the_trace_blocks_keys_straddling_blocks_by_both() -> None:
    a = trace_block_hashes((1, 2, 3), 1536, 48)
    b = trace_block_hashes((1, 2, 4), 1536, 48)
    # Blocks ending before token 1024 lie in ids 1 and 2: 21 of them; the 22nd reaches into id 3.
    assert len(a) == 32
    assert sum(x == y for x, y in zip(a, b, strict=True)) == math.floor(1024 / 48)
