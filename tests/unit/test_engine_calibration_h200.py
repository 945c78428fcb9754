"""The llama-3.1-8b-h200 profile against the H200 step measurement, through the real EngineCore.

tests/fixtures/h200-step-profile.json (provenance in tests/fixtures/README.md) holds step times of a
Llama-3-8B-shaped decoder on an H200: prefill chunks, decode batches, mixed steps, long-context
decode and prefill chunks after cached context. Each CUDA-graph row is rebuilt as the step a real
``EngineCore`` schedules for that shape; the step's ``duration_s`` minus the profile's engine CPU
terms is its GPU time, which must be within 25% of the measurement, with a median error of at most
10% over the table (the issue's targets). docs/engine-model.md tabulates the residuals.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatfleet.engines.engine_model import EngineCore, EngineProfile, load_profile
from chatfleet.sim.engine_replay import replay, sharegpt_like_workload

MEASUREMENT = json.loads((Path(__file__).parents[1] / "fixtures" / "h200-step-profile.json").read_text())
H200 = load_profile("llama-3.1-8b-h200")
WORST, MEDIAN = 0.25, 0.10


@dataclass(frozen=True)
class Row:
    id: str
    decodes: int  # sequences decoding one token each, at `context` tokens (attending to context + 1)
    context: int
    chunk: int  # a prefill chunk of this many tokens, after `offset` tokens of its prompt are cached
    offset: int
    graph_ms: float


def _rows() -> list[Row]:
    m = MEASUREMENT
    rows = [Row(f"prefill {r['tokens']}", 0, 0, r["tokens"], 0, r["graph_ms"]) for r in m["prefill"]]
    rows += [
        Row(f"decode B={r['batch']} ctx {r['context']}", r["batch"], r["context"], 0, 0, r["graph_ms"])
        for r in m["decode"] + m["long_decode"]
    ]
    rows += [
        Row(f"mixed {r['batch']} decodes + {r['chunk']} chunk", r["batch"], r["context"], r["chunk"], 0, r["graph_ms"])
        for r in m["mixed"]
    ]
    rows += [
        Row(f"{r['chunk']} chunk after {r['offset']} cached", 0, 0, r["chunk"], r["offset"], r["graph_ms"])
        for r in m["chunk_at_offset"]
    ]
    return rows


ROWS = _rows()


def gpu_seconds_of(profile: EngineProfile, row: Row) -> float:
    """Schedule the row's step on a real core and return its duration minus the engine CPU terms."""
    # The decoder measured decodes at 131,072 tokens of context: one position past the model's
    # max_model_len, so the harness lifts the limit (and sizes budget, seats and KV for the shape).
    harness = dataclasses.replace(profile, max_model_len=max(row.context, row.offset + row.chunk) + 8)
    core = EngineCore(
        harness,
        max_num_seqs=row.decodes + 1,
        max_num_batched_tokens=max(row.decodes * row.context, 1),
        kv_capacity_tokens=row.decodes * (row.context + 16) + row.offset + row.chunk + 64,
    )
    for i in range(row.decodes):
        core.add_request(f"d{i}", prompt_tokens=row.context, output_tokens=4)
    if row.decodes:
        assert core.step().num_prefill_tokens == row.decodes * row.context  # all prompts in one step
    if row.chunk:
        core.add_request("chunk", prompt_tokens=row.offset + row.chunk, output_tokens=1)
        core.max_num_batched_tokens = row.decodes + row.chunk
        for _ in range(row.offset // row.chunk):
            core.step()  # the prompt's earlier chunks, now cached
    outcome = core.step()
    assert outcome.num_decode_seqs == row.decodes and outcome.num_prefill_tokens == row.chunk
    num_seqs = row.decodes + (1 if row.chunk else 0)
    return outcome.duration_s - profile.step_overhead_s - profile.per_seq_overhead_s * num_seqs


def relative_error(row: Row) -> float:
    return gpu_seconds_of(H200, row) * 1e3 / row.graph_ms - 1


def test_the_measurement_covers_every_kind_of_step() -> None:
    kinds = {row.id.split()[0] for row in ROWS}
    assert {"prefill", "decode", "mixed", "8192"} <= kinds
    assert len(ROWS) == 53 and max(row.context for row in ROWS) == 131072
    assert max(row.offset for row in ROWS) == 122880


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_each_measured_step_is_reproduced_within_25_percent(row: Row) -> None:
    assert abs(relative_error(row)) <= WORST


def test_the_median_error_over_the_whole_table_is_at_most_10_percent() -> None:
    errors = [abs(relative_error(row)) for row in ROWS]
    assert statistics.median(errors) <= MEDIAN, f"median {statistics.median(errors):.1%}"


def test_long_prompt_chunks_cost_more_the_later_they_come_as_measured() -> None:
    chunks = [row for row in ROWS if row.id.endswith("cached")]
    modelled = [gpu_seconds_of(H200, row) for row in chunks]
    assert modelled == sorted(modelled)
    assert modelled[-1] / modelled[0] == pytest.approx(chunks[-1].graph_ms / chunks[0].graph_ms, rel=0.25)


def test_the_profile_uses_the_measured_roofline_inputs() -> None:
    assert H200.hbm_bandwidth_bytes_per_s == pytest.approx(MEASUREMENT["copy_bandwidth_bytes_per_s"], rel=1e-3)
    assert H200.flops_per_s == pytest.approx(MEASUREMENT["gemm_flops_per_s"], rel=1e-3)
    assert H200.weight_bytes == pytest.approx(MEASUREMENT["weights_gb"] * 1e9, rel=1e-3)


def test_the_engine_cpu_term_gives_the_published_light_load_itl() -> None:
    """vLLM nightly-benchmark table (H200, Llama-3.1-8B, ShareGPT, 1 req/s): ITL 8.6 ms."""
    summary = replay(EngineCore(H200), sharegpt_like_workload(300, seed=0, request_rate=1.0)).summary
    assert summary.mean_itl_s == pytest.approx(0.0086, rel=0.05)


def test_the_h200_serves_llama_3_1s_full_context() -> None:
    core = EngineCore(H200)
    core.add_request("long", prompt_tokens=131_072 - 256, output_tokens=256)
    steps = [core.step() for _ in range(16)]
    assert sum(s.num_prefill_tokens for s in steps) == 131_072 - 256 and steps[-1].emitted
    with pytest.raises(ValueError, match="max_model_len of 131072"):
        core.add_request("over", prompt_tokens=131_072, output_tokens=1)


# --- KV capacity from GPU memory (docs/engine-model.md, "KV capacity") ---------------------------

GIB = 2**30
DRIVER_RESERVED_GIB = 79.65 - 79.22  # H100: nvidia-smi 81,559 MiB vs vLLM's total_gpu_memory 79.22 GiB


@dataclass(frozen=True)
class Gpu:
    profile: str
    nvidia_smi_mib: int


GPUS = [Gpu("llama-3.1-8b-h200", 143_771), Gpu("llama-3-8b-h100", 81_559), Gpu("llama-3-8b-a100", 81_920),
        Gpu("llama-3-8b-l4", 23_034)]  # fmt: skip


@pytest.mark.parametrize("gpu", GPUS, ids=[g.profile for g in GPUS])
def test_kv_capacity_is_derived_from_the_gpus_memory(gpu: Gpu) -> None:
    profile = load_profile(gpu.profile)
    total_gib = gpu.nvidia_smi_mib / 1024 - DRIVER_RESERVED_GIB
    reserve_gib = 1.79 + 1.26 * profile.max_num_batched_tokens / 8192 + profile.max_num_seqs * 128_256 * 4 / GIB
    kv_bytes = (total_gib * 0.9 - profile.weight_bytes / GIB - reserve_gib) * GIB
    expected = int(kv_bytes // profile.kv_bytes_per_token) // profile.block_size * profile.block_size
    assert profile.kv_capacity_tokens == expected
