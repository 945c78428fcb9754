"""The engine model's scheduler and step time: the behaviour the simulated engine and simulator rely on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest

from chatfleet.engines.engine_model import (
    EngineCore,
    EngineProfile,
    StepOutcome,
    available_profiles,
    load_profile,
)

SHIPPED_PROFILES = ["llama-3-8b-a100", "llama-3-8b-h100", "llama-3-8b-l4", "llama-3.1-8b-h200", "tiny-cpu"]


# Round numbers: reading the weights takes 1 ms, compute runs 1e6 tokens/s, KV blocks hold 4 tokens.
BASE_PROFILE = EngineProfile(
    name="test", description="unit-test profile", params=5e5, weight_bytes=1e9, kv_bytes_per_token=1000, layers=2,
    hidden=8, hbm_bandwidth_bytes_per_s=1e12, flops_per_s=1e12, step_overhead_s=0.001, per_seq_overhead_s=1e-5,
    max_num_seqs=8, max_num_batched_tokens=64, kv_capacity_tokens=4096, block_size=4, max_model_len=2048,
    sources=("made up for tests",),
)  # fmt: skip


def make_profile(**overrides: object) -> EngineProfile:
    return dataclasses.replace(BASE_PROFILE, **overrides)  # type: ignore[arg-type]


def run_to_completion(core: EngineCore, max_steps: int = 100_000) -> list[StepOutcome]:
    outcomes = []
    while core.has_work():
        outcomes.append(core.step())
        assert len(outcomes) < max_steps, "the core did not drain"
    return outcomes


def tokens_in(outcome: StepOutcome) -> int:
    return outcome.num_prefill_tokens + outcome.num_decode_seqs


# --- scheduler limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadCase:
    id: str
    requests: list[tuple[int, int]]  # (prompt_tokens, output_tokens)
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 64
    kv_capacity_tokens: int = 4096


LOAD_CASES = [
    LoadCase("more requests than seats", [(10, 20)] * 30, max_num_seqs=4),
    LoadCase("long prompts under a small budget", [(300, 5)] * 6, max_num_batched_tokens=32),
    LoadCase("mixed lengths", [(p, o) for p in (1, 7, 64, 129) for o in (1, 3, 40)]),
    LoadCase("kv cache smaller than the demand", [(40, 60)] * 10, kv_capacity_tokens=256),
    LoadCase("one seat", [(5, 5)] * 5, max_num_seqs=1),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.id for c in LOAD_CASES])
def test_running_requests_never_exceed_max_num_seqs(case: LoadCase) -> None:
    core = EngineCore(make_profile(), max_num_seqs=case.max_num_seqs, kv_capacity_tokens=case.kv_capacity_tokens)
    for i, (prompt, output) in enumerate(case.requests):
        core.add_request(f"r{i}", prompt_tokens=prompt, output_tokens=output)
    for outcome in run_to_completion(core):
        assert outcome.num_running <= case.max_num_seqs
        assert outcome.num_decode_seqs <= case.max_num_seqs


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.id for c in LOAD_CASES])
def test_tokens_scheduled_in_a_step_never_exceed_the_budget(case: LoadCase) -> None:
    core = EngineCore(
        make_profile(), max_num_batched_tokens=case.max_num_batched_tokens, kv_capacity_tokens=case.kv_capacity_tokens
    )
    for i, (prompt, output) in enumerate(case.requests):
        core.add_request(f"r{i}", prompt_tokens=prompt, output_tokens=output)
    outcomes = run_to_completion(core)
    assert all(0 < tokens_in(o) <= case.max_num_batched_tokens for o in outcomes)


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.id for c in LOAD_CASES])
def test_every_request_emits_exactly_its_output_tokens_in_order_and_finishes_once(case: LoadCase) -> None:
    core = EngineCore(
        make_profile(),
        max_num_seqs=case.max_num_seqs,
        max_num_batched_tokens=case.max_num_batched_tokens,
        kv_capacity_tokens=case.kv_capacity_tokens,
    )
    for i, (prompt, output) in enumerate(case.requests):
        core.add_request(f"r{i}", prompt_tokens=prompt, output_tokens=output)
    emitted: dict[str, list[int]] = {}
    finished: list[str] = []
    for outcome in run_to_completion(core):
        for request_id, generated in outcome.emitted:
            emitted.setdefault(request_id, []).append(generated)
        finished.extend(outcome.finished)
    assert sorted(finished) == sorted(f"r{i}" for i in range(len(case.requests)))
    for i, (_, output) in enumerate(case.requests):
        assert emitted[f"r{i}"] == list(range(1, output + 1))
    assert core.kv_usage == 0.0


# --- prefill and decode -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkCase:
    id: str
    prompt_tokens: int
    budget: int
    chunks: list[int]


CHUNK_CASES = [
    ChunkCase("prompt within the budget is one chunk", 50, 64, [50]),
    ChunkCase("prompt equal to the budget is one chunk", 64, 64, [64]),
    ChunkCase("long prompt is split into budget-sized chunks", 150, 64, [64, 64, 22]),
    ChunkCase("prompt one over the budget leaves a one-token chunk", 65, 64, [64, 1]),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c.id for c in CHUNK_CASES])
def test_chunked_prefill_splits_a_long_prompt_across_steps(case: ChunkCase) -> None:
    core = EngineCore(make_profile(), max_num_batched_tokens=case.budget)
    core.add_request("a", prompt_tokens=case.prompt_tokens, output_tokens=3)
    outcomes = run_to_completion(core)
    prefill_steps = outcomes[: len(case.chunks)]
    assert [o.num_prefill_tokens for o in prefill_steps] == case.chunks
    assert [o.emitted for o in prefill_steps] == [()] * (len(case.chunks) - 1) + [(("a", 1),)]


def test_first_token_comes_with_prefill_completion_then_one_token_per_step() -> None:
    core = EngineCore(make_profile(), max_num_batched_tokens=64)
    core.add_request("a", prompt_tokens=100, output_tokens=4)
    outcomes = run_to_completion(core)
    assert [o.emitted for o in outcomes] == [(), (("a", 1),), (("a", 2),), (("a", 3),), (("a", 4),)]
    assert [o.num_decode_seqs for o in outcomes] == [0, 0, 1, 1, 1]
    assert [o.finished for o in outcomes] == [(), (), (), (), ("a",)]


def test_decoding_requests_are_served_before_new_prefills_take_the_rest_of_the_budget() -> None:
    core = EngineCore(make_profile(), max_num_batched_tokens=64)
    core.add_request("a", prompt_tokens=10, output_tokens=5)
    core.step()
    core.add_request("b", prompt_tokens=100, output_tokens=5)
    outcome = core.step()
    assert outcome.num_decode_seqs == 1
    assert outcome.num_prefill_tokens == 63
    assert outcome.emitted == (("a", 2),)


@dataclass(frozen=True)
class AdmissionCase:
    id: str
    max_num_seqs: int
    expected_finish_order: list[str]


ADMISSION_CASES = [
    AdmissionCase("one seat serves requests one after the other in arrival order", 1, ["r0", "r1", "r2", "r3"]),
    AdmissionCase("two seats admit the two oldest first", 2, ["r0", "r1", "r2", "r3"]),
]


@pytest.mark.parametrize("case", ADMISSION_CASES, ids=[c.id for c in ADMISSION_CASES])
def test_waiting_requests_are_admitted_first_come_first_served(case: AdmissionCase) -> None:
    core = EngineCore(make_profile(), max_num_seqs=case.max_num_seqs)
    for i in range(4):
        core.add_request(f"r{i}", prompt_tokens=5, output_tokens=5)
    finish_order = [rid for o in run_to_completion(core) for rid in o.finished]
    assert finish_order == case.expected_finish_order


def test_admission_stops_at_the_oldest_waiting_request_that_does_not_fit_even_if_a_later_one_would() -> None:
    # 8 blocks of 4 tokens: "big" takes 5, "next" needs 4 of the 3 left, "small" would fit in 1.
    core = EngineCore(make_profile(), kv_capacity_tokens=32)
    core.add_request("big", prompt_tokens=20, output_tokens=1)
    core.add_request("next", prompt_tokens=16, output_tokens=1)
    core.add_request("small", prompt_tokens=4, output_tokens=1)
    first = core.step()
    assert first.emitted == (("big", 1),)
    assert first.num_waiting == 2
    assert core.step().emitted == (("next", 1), ("small", 1))


# --- KV cache and preemption ------------------------------------------------------------------


def test_kv_blocks_are_allocated_as_tokens_are_scheduled() -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=400)  # 100 blocks of 4 tokens
    core.add_request("a", prompt_tokens=10, output_tokens=10)
    core.step()  # 10 prompt tokens computed: 3 blocks
    assert core.kv_usage == pytest.approx(0.03)
    core.step()
    core.step()  # 12 tokens computed: still 3 blocks
    assert core.kv_usage == pytest.approx(0.03)
    core.step()  # 13 tokens computed: a 4th block
    assert core.kv_usage == pytest.approx(0.04)


def test_a_full_kv_cache_preempts_the_newest_request_which_still_completes_with_all_its_tokens() -> None:
    # 16 blocks of 4 tokens = 64 tokens; two requests needing 60 tokens each cannot run together.
    core = EngineCore(make_profile(), kv_capacity_tokens=64)
    core.add_request("old", prompt_tokens=20, output_tokens=40)
    core.add_request("new", prompt_tokens=20, output_tokens=40)
    outcomes = run_to_completion(core)
    preempted = [rid for o in outcomes for rid in o.preempted]
    assert preempted and set(preempted) == {"new"}
    assert core.num_preemptions_total == len(preempted)
    new_tokens = [n for o in outcomes for rid, n in o.emitted if rid == "new"]
    assert new_tokens == list(range(1, 41))
    preempted_at = next(i for i, o in enumerate(outcomes) if o.preempted)
    assert outcomes[preempted_at].num_waiting == 1


def test_a_preempted_request_recomputes_prompt_and_generated_tokens_before_emitting_again() -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=64)
    core.add_request("old", prompt_tokens=20, output_tokens=40)
    core.add_request("new", prompt_tokens=20, output_tokens=40)
    outcomes = run_to_completion(core)
    preempted_at = next(i for i, o in enumerate(outcomes) if o.preempted)
    emitted_before = max(n for o in outcomes[:preempted_at] for rid, n in o.emitted if rid == "new")
    resumed_at = next(
        i for i, o in enumerate(outcomes) if i > preempted_at and any(rid == "new" for rid, _ in o.emitted)
    )
    recomputed = sum(o.num_prefill_tokens for o in outcomes[preempted_at + 1 : resumed_at + 1])
    assert recomputed == 20 + emitted_before
    assert ("new", emitted_before + 1) in outcomes[resumed_at].emitted


def test_a_preempted_request_goes_to_the_front_of_the_waiting_queue() -> None:
    # "later" needs one block and a seat frees when "new" is preempted, but it must wait behind "new".
    core = EngineCore(make_profile(), max_num_seqs=2, kv_capacity_tokens=64)
    core.add_request("old", prompt_tokens=20, output_tokens=40)
    core.add_request("new", prompt_tokens=20, output_tokens=40)
    core.add_request("later", prompt_tokens=3, output_tokens=1)
    outcomes = run_to_completion(core)
    preempted_at = next(i for i, o in enumerate(outcomes) if o.preempted)
    new_resumed_at = next(
        i for i, o in enumerate(outcomes) if i > preempted_at and any(rid == "new" for rid, _ in o.emitted)
    )
    later_started_at = next(i for i, o in enumerate(outcomes) if any(rid == "later" for rid, _ in o.emitted))
    assert later_started_at >= new_resumed_at


# --- abort and validation ---------------------------------------------------------------------


def test_aborting_a_running_request_frees_its_kv_and_its_seat() -> None:
    core = EngineCore(make_profile(), max_num_seqs=1)
    core.add_request("a", prompt_tokens=30, output_tokens=100)
    core.add_request("b", prompt_tokens=5, output_tokens=2)
    core.step()
    assert core.kv_usage > 0 and core.num_running == 1 and core.num_waiting == 1
    assert core.abort_request("a") is True
    assert core.kv_usage == 0.0 and core.num_running == 0
    outcome = core.step()
    assert outcome.emitted == (("b", 1),)


def test_aborting_a_waiting_request_removes_it_and_unknown_ids_return_false() -> None:
    core = EngineCore(make_profile())
    core.add_request("a", prompt_tokens=5, output_tokens=2)
    assert core.abort_request("a") is True
    assert core.abort_request("a") is False
    assert core.abort_request("never-seen") is False
    assert not core.has_work()


def test_an_aborted_id_can_be_reused() -> None:
    core = EngineCore(make_profile())
    core.add_request("a", prompt_tokens=5, output_tokens=2)
    core.abort_request("a")
    core.add_request("a", prompt_tokens=5, output_tokens=2)
    assert [rid for o in run_to_completion(core) for rid in o.finished] == ["a"]


def test_a_step_with_nothing_to_do_takes_no_time() -> None:
    outcome = EngineCore(make_profile()).step()
    assert outcome == StepOutcome(
        duration_s=0.0, emitted=(), finished=(), preempted=(), num_prefill_tokens=0, num_decode_seqs=0,
        num_running=0, num_waiting=0,
    )  # fmt: skip


@dataclass(frozen=True)
class BadRequestCase:
    id: str
    prompt_tokens: int
    output_tokens: int
    message: str
    request_id: str = "b"


BAD_REQUESTS = [
    BadRequestCase("a duplicate id is refused", 5, 5, "already in the engine", request_id="a"),
    BadRequestCase("zero output tokens are refused", 5, 0, "at least 1"),
    BadRequestCase("an empty prompt is refused", 0, 5, "at least 1"),
    BadRequestCase("more than max_model_len is refused", 2000, 49, "max_model_len of 2048"),
    BadRequestCase("more than the kv cache holds is refused", 1000, 100, "KV cache of 1024 tokens"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c.id for c in BAD_REQUESTS])
def test_add_request_rejects_requests_it_could_never_serve(case: BadRequestCase) -> None:
    core = EngineCore(make_profile(), kv_capacity_tokens=1024)
    core.add_request("a", prompt_tokens=5, output_tokens=5)
    with pytest.raises(ValueError, match=case.message):
        core.add_request(case.request_id, prompt_tokens=case.prompt_tokens, output_tokens=case.output_tokens)


def test_the_core_is_deterministic() -> None:
    def run() -> list[StepOutcome]:
        core = EngineCore(make_profile(), kv_capacity_tokens=256)
        for i in range(20):
            core.add_request(f"r{i}", prompt_tokens=7 + 13 * i % 50, output_tokens=3 + 11 * i % 40)
        return run_to_completion(core)

    assert run() == run()


# --- step time --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTimeCase:
    id: str
    num_new_tokens: int
    num_seqs: int
    context_tokens_read: int
    attention_flops: float
    expected_s: float
    overrides: tuple[tuple[str, float], ...] = ()


# make_profile: CPU 1 ms + 10 us per sequence; weights 1 ms to read; dense 1 us per token at full efficiency;
# KV 1 ns per token of context; attention 1 ps per FLOP. GEMM time = hypot(weights, dense).
STEP_TIME_CASES = [
    StepTimeCase("one decoding sequence is memory-bound", 1, 1, 100, 0.0,
                 0.001 + 1e-5 + math.hypot(1e-3, 1e-6) + 1e-7),
    StepTimeCase("kv reads add to a memory-bound step", 4, 4, 500_000, 0.0,
                 0.001 + 4e-5 + math.hypot(1e-3, 4e-6) + 5e-4),
    StepTimeCase("a large prefill chunk is compute-bound", 5000, 1, 5000, 0.0,
                 0.001 + 1e-5 + math.hypot(1e-3, 5e-3) + 5e-6),
    StepTimeCase("weights and dense flops of a mid-size batch both count", 1000, 1, 0, 0.0, 0.001 + 1e-5 + math.sqrt(2e-6)),
    StepTimeCase(
        "attention flops add at their own efficiency", 5000, 1, 5000, 1e9,
        0.001 + 1e-5 + math.hypot(1e-3, 5e-3) + 5e-6 + 2e-3, (("attention_efficiency", 0.5),),
    ),
    StepTimeCase(
        "the gpu floor adds and dense efficiency slows compute-bound gemms", 5000, 1, 0, 0.0,
        0.001 + 1e-5 + 0.002 + math.hypot(1e-3, 1e-2), (("gpu_step_floor_s", 0.002), ("dense_efficiency", 0.5)),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", STEP_TIME_CASES, ids=[c.id for c in STEP_TIME_CASES])
def test_step_time_is_cpu_plus_gpu_floor_gemms_kv_read_and_attention(case: StepTimeCase) -> None:
    seconds = make_profile(**dict(case.overrides)).step_seconds(
        num_new_tokens=case.num_new_tokens,
        num_seqs=case.num_seqs,
        context_tokens_read=case.context_tokens_read,
        attention_flops=case.attention_flops,
    )
    assert seconds == pytest.approx(case.expected_s)


def test_h100_decode_is_memory_bound_at_small_batch_and_prefill_compute_bound() -> None:
    profile = load_profile("llama-3-8b-h100")
    fixed_s = profile.step_overhead_s + profile.per_seq_overhead_s + profile.gpu_step_floor_s
    weights_s = profile.weight_bytes / profile.hbm_bandwidth_bytes_per_s
    decode = profile.step_seconds(num_new_tokens=1, num_seqs=1, context_tokens_read=300, attention_flops=0.0)
    prefill = profile.step_seconds(num_new_tokens=8192, num_seqs=1, context_tokens_read=8192, attention_flops=0.0)
    assert decode - fixed_s == pytest.approx(weights_s, rel=0.01)
    assert prefill - fixed_s == pytest.approx(
        2 * profile.params * 8192 / (profile.dense_efficiency * profile.flops_per_s), rel=0.01
    )


def test_tiny_cpu_decode_steps_take_a_few_milliseconds_and_grow_with_the_batch() -> None:
    decode_step_s = []
    for batch in (1, 16, 64):
        core = EngineCore(load_profile("tiny-cpu"))
        for i in range(batch):
            core.add_request(f"r{i}", prompt_tokens=300, output_tokens=50)
        outcome = core.step()
        while outcome.num_prefill_tokens:
            outcome = core.step()
        assert outcome.num_decode_seqs == batch
        decode_step_s.append(outcome.duration_s)
    assert decode_step_s == sorted(decode_step_s) and decode_step_s[0] < decode_step_s[-1]
    assert 0.004 <= decode_step_s[0] <= 0.006


# --- profiles ---------------------------------------------------------------------------------


def test_the_shipped_profiles_are_available_and_load() -> None:
    assert available_profiles() == SHIPPED_PROFILES
    for name in SHIPPED_PROFILES:
        profile = load_profile(name)
        assert profile.name == name and profile.sources
        assert profile.max_model_len <= profile.kv_capacity_tokens


def test_the_tiny_cpu_profile_says_it_is_synthetic() -> None:
    assert "synthetic" in load_profile("tiny-cpu").description.lower()


def test_an_unknown_profile_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown engine profile 'llama-9'.*llama-3-8b-h100.*tiny-cpu"):
        load_profile("llama-9")


def test_a_profile_name_cannot_reach_outside_the_profiles_folder() -> None:
    with pytest.raises(ValueError, match="unknown engine profile"):
        load_profile("../engine_model")


@dataclass(frozen=True)
class BadProfileCase:
    id: str
    overrides: dict[str, object]
    message: str


BAD_PROFILES = [
    BadProfileCase("zero bandwidth", {"hbm_bandwidth_bytes_per_s": 0}, "hbm_bandwidth_bytes_per_s must be > 0"),
    BadProfileCase("negative flops", {"flops_per_s": -1.0}, "flops_per_s must be > 0"),
    BadProfileCase("negative overhead", {"step_overhead_s": -0.001}, "step_overhead_s must be >= 0"),
    BadProfileCase("negative gpu floor", {"gpu_step_floor_s": -0.001}, "gpu_step_floor_s must be >= 0"),
    BadProfileCase("zero dense efficiency", {"dense_efficiency": 0.0}, r"dense_efficiency must be in \(0, 1\]"),
    BadProfileCase("attention above peak", {"attention_efficiency": 1.5}, r"attention_efficiency must be in \(0, 1\]"),
    BadProfileCase("no seats", {"max_num_seqs": 0}, "max_num_seqs must be > 0"),
    BadProfileCase("kv cache smaller than a block", {"kv_capacity_tokens": 3}, "holds no block of 4 tokens"),
    BadProfileCase("no sources", {"sources": ()}, "sources must cite"),
]


@pytest.mark.parametrize("case", BAD_PROFILES, ids=[c.id for c in BAD_PROFILES])
def test_an_invalid_profile_is_refused_with_the_field_named(case: BadProfileCase) -> None:
    with pytest.raises(ValueError, match=case.message):
        make_profile(**case.overrides)


def test_profile_data_round_trips_and_unknown_keys_are_refused() -> None:
    profile = load_profile("llama-3-8b-h100")
    assert EngineProfile.from_dict(profile.to_dict()) == profile
    with pytest.raises(ValueError, match=r"unknown profile keys \['gpu'\]"):
        EngineProfile.from_dict({**profile.to_dict(), "gpu": "h100"})
    incomplete = profile.to_dict()
    del incomplete["flops_per_s"]
    with pytest.raises(ValueError, match="incomplete profile data"):
        EngineProfile.from_dict(incomplete)


def test_engine_overrides_replace_profile_defaults_and_are_validated() -> None:
    profile = make_profile()
    core = EngineCore(profile, max_num_seqs=3, max_num_batched_tokens=10, kv_capacity_tokens=40)
    assert (core.max_num_seqs, core.max_num_batched_tokens, core.num_blocks_total) == (3, 10, 10)
    defaults = EngineCore(dataclasses.replace(profile, max_num_seqs=5))
    assert defaults.max_num_seqs == 5
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 1"):
        EngineCore(profile, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="holds no KV block"):
        EngineCore(profile, kv_capacity_tokens=3)
