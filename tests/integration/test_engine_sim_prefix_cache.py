"""engine-sim's prefix cache, seen from outside: a second request with the same long system prompt
is served from cached blocks (vllm:prefix_cache_hits_total) and its first token comes sooner."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server, start_engine_sim
from tests.support.metrics import value

PROFILE = "llama-3-8b-h100"
MODEL = f"chatfleet-sim/{PROFILE}"
SYSTEM = "Answer from the handbook below, citing its sections. " * 520  # 27040 chars: 6760 tokens


@pytest.fixture(scope="module")
def sim() -> Server:
    server = start_engine_sim(profile=PROFILE)
    yield server
    server.proc.terminate()


def ask(sim: Server, system: str, question: str) -> dict[str, float]:
    """Send one chat request (1 output token); return how the engine's counters moved for it."""
    names = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:time_to_first_token_seconds_sum")
    before = httpx.get(sim.url + "/metrics", timeout=5).text
    body = {"model": MODEL, "max_tokens": 1,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    httpx.post(sim.v1 + "/chat/completions", json=body, timeout=30).raise_for_status()
    after = httpx.get(sim.url + "/metrics", timeout=5).text
    return {name: value(after, name) - value(before, name) for name in names}


def test_a_shared_system_prompt_is_served_from_the_prefix_cache_and_the_first_token_comes_sooner(sim) -> None:
    first = ask(sim, SYSTEM, "Where is the fire exit?")
    second = ask(sim, SYSTEM, "Who signs expense reports?")
    prompt = first["vllm:prefix_cache_queries_total"]
    assert prompt > 6760  # the whole prompt is looked up: text and template tokens
    assert first["vllm:prefix_cache_hits_total"] == 0
    # The system message's blocks, up to the first block holding the question, come from the cache.
    hits = second["vllm:prefix_cache_hits_total"]
    assert 6760 < hits < second["vllm:prefix_cache_queries_total"]
    assert hits % 16 == 0
    # Engine-side TTFT: ~0.17 s of modelled prefill for the first, one short step for the second.
    ttft = "vllm:time_to_first_token_seconds_sum"
    assert second[ttft] < first[ttft] / 3, (first, second)


def test_a_different_system_prompt_finds_nothing_cached(sim) -> None:
    other = ask(sim, SYSTEM.replace("handbook", "contract"), "Where is the fire exit?")
    assert other["vllm:prefix_cache_queries_total"] > 6760
    assert other["vllm:prefix_cache_hits_total"] == 0
