"""The engine model's prefix cache: what vLLM v1's automatic prefix caching does to a request's
prefill, its KV blocks and the hit counters (blocks of 4 tokens, from test_engine_model's profile)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from chatfleet.engines import engine_model
from chatfleet.engines.engine_model import EngineCore, StepOutcome, chain_block_hashes
from tests.unit.test_engine_model import make_profile, run_to_completion

BLOCK = 4


def blocks(tag: str, count: int) -> tuple[int, ...]:
    """Chained hashes of ``count`` blocks whose contents are named ``tag``."""
    return chain_block_hashes((tag, i) for i in range(count))


def serve(core: EngineCore, request_id: str, prompt_tokens: int, hashes: tuple[int, ...], output_tokens: int = 1
          ) -> list[StepOutcome]:
    core.add_request(request_id, prompt_tokens=prompt_tokens, output_tokens=output_tokens, block_hashes=hashes)
    return run_to_completion(core)


# --- the hash chain ---------------------------------------------------------------------------


def test_equal_block_contents_give_equal_hashes() -> None:
    assert chain_block_hashes([(1, 2), (3, 4), (5, 6)]) == chain_block_hashes([(1, 2), (3, 4), (5, 6)])
    assert len(chain_block_hashes(range(100))) == 100


def test_a_different_first_block_changes_every_later_hash() -> None:
    a = chain_block_hashes(["system", "x", "y", "z"])
    b = chain_block_hashes(["other", "x", "y", "z"])
    assert all(ha != hb for ha, hb in zip(a, b, strict=True))


def test_prompts_share_hashes_up_to_the_first_block_that_differs_and_none_after() -> None:
    a = chain_block_hashes(["s", "t", "u", "v"])
    b = chain_block_hashes(["s", "t", "X", "v"])
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]


# --- reuse at admission -----------------------------------------------------------------------


def test_a_second_request_with_a_cached_prefix_prefills_only_its_uncached_tail_and_runs_faster() -> None:
    # A compute-bound profile (1e9 FLOP/s), so a step's time follows its prefill tokens.
    core = EngineCore(make_profile(flops_per_s=1e9))
    shared = blocks("system", 10)  # 40 tokens
    first = serve(core, "a", 42, shared)[0]
    second = serve(core, "b", 42, shared)[0]
    assert first.num_prefill_tokens == 42
    assert second.num_prefill_tokens == 2  # 40 tokens came from the cache
    assert second.emitted == (("b", 1),)
    assert second.duration_s < first.duration_s / 5
    assert (core.prefix_cache_queries, core.prefix_cache_hits) == (84, 40)


def test_a_fully_cached_prompt_recomputes_its_last_block_so_that_a_token_can_be_sampled() -> None:
    core = EngineCore(make_profile())
    shared = blocks("system", 10)
    serve(core, "a", 40, shared)
    again = serve(core, "b", 40, shared)[0]
    # As vLLM: at most prompt - 1 tokens from the cache, in whole blocks: 36, so 4 are computed.
    assert again.num_prefill_tokens == 4
    assert core.prefix_cache_hits == 36


def test_only_the_leading_run_of_cached_blocks_is_reused() -> None:
    core = EngineCore(make_profile())
    serve(core, "a", 40, blocks("system", 10))
    # Shares the first 3 blocks; its 4th differs, so its 5th (equal content, other parent) misses.
    mixed = chain_block_hashes([("system", 0), ("system", 1), ("system", 2), "mine", ("system", 4)])
    outcome = serve(core, "b", 20, mixed)[0]
    assert outcome.num_prefill_tokens == 8
    assert core.prefix_cache_hits == 12


def test_requests_without_block_hashes_share_nothing() -> None:
    core = EngineCore(make_profile())
    serve(core, "a", 40, ())
    assert serve(core, "b", 40, ())[0].num_prefill_tokens == 40
    assert (core.prefix_cache_queries, core.prefix_cache_hits) == (80, 0)


def test_blocks_cached_by_a_running_request_serve_the_next_one_and_count_once_in_kv_usage() -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=400)  # 100 blocks
    shared = blocks("system", 4)
    core.add_request("a", prompt_tokens=16, output_tokens=50, block_hashes=shared)
    core.step()  # "a" computed and cached its 4 blocks and is decoding
    core.add_request("b", prompt_tokens=17, output_tokens=50, block_hashes=shared)
    outcome = core.step()
    assert outcome.num_prefill_tokens == 1 and outcome.num_decode_seqs == 1
    # "a": 4 shared blocks + 1 for its first generated token; "b": 1 for its 17th token.
    assert core.kv_usage == pytest.approx(6 / 100)
    core.abort_request("b")  # its own block is freed; the shared ones stay: "a" holds them
    assert core.kv_usage == pytest.approx(5 / 100)
    core.abort_request("a")
    assert core.kv_usage == 0.0


# --- freeing and eviction ---------------------------------------------------------------------


def lru_scenario() -> EngineCore:
    """8 blocks of 4 tokens. "a" then "b" (4 blocks each) finish: all 8 blocks are cached and free,
    "a"'s freed first. Then "c" (2 new blocks) forces two evictions."""
    core = EngineCore(make_profile(), kv_capacity_tokens=32)
    serve(core, "a", 16, blocks("a", 4))
    serve(core, "b", 16, blocks("b", 4))
    assert core.kv_usage == 0.0  # cached blocks nobody holds are free
    serve(core, "c", 8, blocks("c", 2))
    return core


@pytest.mark.parametrize(
    ("tag", "expected_hit_tokens"),
    [
        ("a", 8),  # freed first, tail first: its blocks 3 and 2 went; 0 and 1 are left
        ("b", 16),  # freed later: untouched
        ("c", 8),  # the newest
    ],
)
def test_eviction_takes_the_least_recently_freed_blocks_and_a_requests_tail_first(
    tag: str, expected_hit_tokens: int
) -> None:
    core = lru_scenario()
    hits_before = core.prefix_cache_hits
    serve(core, "probe", 17, blocks(tag, 4))
    assert core.prefix_cache_hits - hits_before == expected_hit_tokens


def test_a_cached_block_a_running_request_holds_is_never_evicted() -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=64)  # 16 blocks
    core.add_request("holder", prompt_tokens=16, output_tokens=30, block_hashes=blocks("held", 4))
    core.step()
    run_to_completion_of(core, "gone", 16, blocks("gone", 4))
    assert core.kv_usage == pytest.approx(5 / 16)  # "holder": 4 prompt blocks + 1 for its output
    # The 11 free blocks: 7 never cached and "gone"'s 4. A 44-token prompt takes all 11.
    core.add_request("big", prompt_tokens=44, output_tokens=1, block_hashes=blocks("big", 11))
    core.step()
    hits_before = core.prefix_cache_hits
    core.add_request("probe-held", prompt_tokens=17, output_tokens=1, block_hashes=blocks("held", 4))
    core.add_request("probe-gone", prompt_tokens=17, output_tokens=1, block_hashes=blocks("gone", 4))
    run_to_completion(core)
    assert core.prefix_cache_hits - hits_before == 16  # all of "held"'s blocks, none of "gone"'s
    assert core.num_preemptions_total == 0


def run_to_completion_of(core: EngineCore, request_id: str, prompt_tokens: int, hashes: tuple[int, ...]
                         ) -> list[StepOutcome]:
    """Step until ``request_id`` (1 output token) has finished; other requests keep running."""
    core.add_request(request_id, prompt_tokens=prompt_tokens, output_tokens=1, block_hashes=hashes)
    outcomes = []
    while not outcomes or request_id not in outcomes[-1].finished:
        outcomes.append(core.step())
        assert len(outcomes) < 100
    return outcomes


def test_an_aborted_requests_computed_blocks_stay_cached() -> None:
    core = EngineCore(make_profile())
    core.add_request("a", prompt_tokens=40, output_tokens=100, block_hashes=blocks("s", 10))
    core.step()
    core.abort_request("a")
    assert core.kv_usage == 0.0
    assert serve(core, "b", 41, blocks("s", 10))[0].num_prefill_tokens == 1


def test_a_preempted_request_finds_its_own_prompt_blocks_cached_when_it_resumes() -> None:
    # 16 blocks: "old" and "new" (prompt 20, 40 tokens out) cannot both finish; "new" is preempted.
    core = EngineCore(make_profile(), kv_capacity_tokens=64)
    core.add_request("old", prompt_tokens=20, output_tokens=40, block_hashes=blocks("old", 5))
    core.add_request("new", prompt_tokens=20, output_tokens=40, block_hashes=blocks("new", 5))
    outcomes = run_to_completion(core)
    preempted_at = next(i for i, o in enumerate(outcomes) if o.preempted)
    emitted_before = max(n for o in outcomes[:preempted_at] for rid, n in o.emitted if rid == "new")
    resumed_at = next(
        i for i, o in enumerate(outcomes) if i > preempted_at and any(rid == "new" for rid, _ in o.emitted)
    )
    recomputed = sum(o.num_prefill_tokens for o in outcomes[preempted_at + 1 : resumed_at + 1])
    # Without the cache it recomputes 20 + emitted_before tokens (test_engine_model); with it,
    # the prompt blocks that were not evicted meanwhile are reused.
    assert 0 < recomputed < 20 + emitted_before
    assert [n for o in outcomes for rid, n in o.emitted if rid == "new"] == list(range(1, 41))
    # Queries count first admissions only, as vLLM's counter (re-admissions are counted apart).
    assert core.prefix_cache_queries == 40
    assert core.prefix_cache_hits == 0


# --- switched off -----------------------------------------------------------------------------


def mixed_workload(core: EngineCore, with_hashes: bool) -> list[StepOutcome]:
    for i in range(30):
        prompt = 9 + 13 * i % 60
        hashes = blocks(f"group{i % 3}", prompt // BLOCK) if with_hashes else ()
        core.add_request(f"r{i}", prompt_tokens=prompt, output_tokens=3 + 11 * i % 40, block_hashes=hashes)
    return run_to_completion(core)


def test_with_prefix_caching_off_the_core_behaves_as_without_block_hashes() -> None:
    off = EngineCore(make_profile(), kv_capacity_tokens=256, enable_prefix_caching=False)
    plain = EngineCore(make_profile(), kv_capacity_tokens=256)
    cached = EngineCore(make_profile(), kv_capacity_tokens=256)
    outcomes_off = mixed_workload(off, with_hashes=True)
    assert outcomes_off == mixed_workload(plain, with_hashes=False)
    assert (off.prefix_cache_queries, off.prefix_cache_hits) == (0, 0)
    # The same workload with the cache on does less prefill work: the comparison can fail.
    outcomes_cached = mixed_workload(cached, with_hashes=True)
    assert sum(o.num_prefill_tokens for o in outcomes_cached) < sum(o.num_prefill_tokens for o in outcomes_off)
    assert cached.prefix_cache_hits > 0


def test_the_core_with_a_prefix_cache_is_deterministic() -> None:
    def run() -> tuple[list[StepOutcome], int]:
        core = EngineCore(make_profile(), kv_capacity_tokens=128)
        return mixed_workload(core, with_hashes=True), core.prefix_cache_hits

    assert run() == run()


def test_more_block_hashes_than_full_prompt_blocks_are_refused() -> None:
    core = EngineCore(make_profile())
    with pytest.raises(ValueError, match="hash only the full blocks"):
        core.add_request("a", prompt_tokens=15, output_tokens=1, block_hashes=blocks("s", 4))


# --- bookkeeping under churn ------------------------------------------------------------------


def churn(core: EngineCore, check: bool) -> tuple[list[StepOutcome], int]:
    """300 requests from 5 prompt families with random lengths and aborts on a 48-block cache;
    with ``check``, the block accounting is verified after every step."""
    rng = random.Random(7)
    outcomes: list[StepOutcome] = []
    live: list[str] = []
    for i in range(300):
        prompt = rng.randint(1, 60)
        family = rng.randrange(5)
        core.add_request(f"r{i}", prompt_tokens=prompt, output_tokens=rng.randint(1, 20),
                         block_hashes=blocks(f"f{family}", prompt // BLOCK))
        live.append(f"r{i}")
        if rng.random() < 0.1:
            core.abort_request(live.pop(rng.randrange(len(live))))
        for _ in range(rng.randint(0, 3)):
            outcomes.append(core.step())
            if check:
                assert_consistent(core)
    outcomes += run_to_completion(core)
    return outcomes, core.prefix_cache_hits


def assert_consistent(core: EngineCore) -> None:
    cache = core._cache
    running = core._running
    holders = Counter(h for r in running for h in r.held)
    assert {h: n for h, n in cache._refs.items() if n > 0} == dict(holders)
    # A shared cached block is one block, however many requests reference it.
    own = sum(r.num_blocks - len(r.held) for r in running)
    assert own + len(holders) + core._num_free == core.num_blocks_total
    assert cache.num_evictable == sum(1 for n in cache._refs.values() if n <= 0) <= core._num_free
    assert all(len(r.held) <= r.num_blocks for r in running)


def test_block_accounting_holds_through_admissions_preemptions_aborts_and_evictions() -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=48 * BLOCK, max_num_seqs=6)
    outcomes, hits = churn(core, check=True)
    assert core.num_preemptions_total > 0 and hits > 0  # the run exercised what it checks
    assert core.kv_usage == 0.0 and core._cache.num_evictable > 0


def test_compacting_the_free_queue_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = churn(EngineCore(make_profile(), kv_capacity_tokens=48 * BLOCK, max_num_seqs=6), check=False)
    monkeypatch.setattr(engine_model, "_STALE_SLACK", 0)  # compact at every chance
    assert churn(EngineCore(make_profile(), kv_capacity_tokens=48 * BLOCK, max_num_seqs=6), check=True) == reference
