"""``chatfleet bench run --trace`` with a Mooncake trace, against a real gateway in front of
engine-sim: requests that share leading block ids share a leading prompt text, and the engine's
prefix cache serves those blocks (``vllm:prefix_cache_hits_total`` grows)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from chatfleet.bench.cli import bench_app
from chatfleet.bench.workload import PromptSynthesizer, load_trace, trace_replay
from tests.conftest import Server, start_engine_sim, start_gateway, upstream_env
from tests.support.metrics import value

SCALE = 1 / 16  # 512-token trace blocks become 32 tokens: two of the engine's 16-token blocks
CAP = 600


def write_slice(path: Path) -> Path:
    """24 requests over 3 s: each starts with one of three 4-block shared prefixes, then 1-3 blocks
    of its own; the last one is far over the cap."""
    rng = random.Random(11)
    lines, fresh = [], 100
    for i in range(24):
        shared = rng.randrange(3)
        own = rng.randint(1, 3) if i < 23 else 60
        ids = [shared * 10 + j for j in range(4)] + list(range(fresh, fresh + own))
        fresh += own
        lines.append(json.dumps({"timestamp": i * 125, "output_length": 4, "hash_ids": ids,
                                 "input_length": 512 * len(ids) - rng.randint(0, 300)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Server, Server]]:
    sim = start_engine_sim(max_num_seqs=16)
    gateway = start_gateway(upstream_env(sim))
    yield sim, gateway
    gateway.proc.terminate()
    sim.proc.terminate()


def test_prompts_with_equal_leading_ids_start_with_equal_text(tmp_path: Path) -> None:
    workload = trace_replay(load_trace(write_slice(tmp_path / "slice.jsonl")), prompt_scale=SCALE,
                            max_prompt_tokens=CAP)
    specs = list(workload.arrivals)
    synth = PromptSynthesizer(0)
    prompts = [synth.prompt(s.index, s.prompt_tokens, s.prefix_ids, s.prefix_block_tokens) for s in specs]
    assert all(s.prefix_block_tokens == 32 for s in specs)
    assert max(s.prompt_tokens for s in specs) == CAP and len(specs[-1].prefix_ids) == CAP // 32 + 1
    for spec, prompt in zip(specs, prompts, strict=True):
        assert len(prompt) == 4 * spec.prompt_tokens
    shared_chars = 4 * 32 * 4  # four shared blocks of 32 tokens, 4 characters each
    for a, b in [(a, b) for a in range(len(specs)) for b in range(a + 1, len(specs))]:
        same = specs[a].prefix_ids[:4] == specs[b].prefix_ids[:4]
        assert (prompts[a][:shared_chars] == prompts[b][:shared_chars]) == same
        if same:  # the blocks after the shared prefix are each request's own
            assert prompts[a][shared_chars:shared_chars + 128] != prompts[b][shared_chars:shared_chars + 128]


def test_a_mooncake_trace_replays_through_the_gateway_and_hits_the_engines_prefix_cache(
        stack: tuple[Server, Server], tmp_path: Path) -> None:
    sim, gateway = stack
    trace, out = write_slice(tmp_path / "slice.jsonl"), tmp_path / "run.json"
    before = httpx.get(sim.url + "/metrics", timeout=5).text
    outcome = CliRunner().invoke(bench_app, [
        "run", "--url", gateway.v1, "--model", "chatfleet-sim/tiny-cpu", "--trace", str(trace),
        "--prompt-scale", str(SCALE), "--max-prompt-tokens", str(CAP), "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["requests"], run["succeeded"]) == (24, 24)
    after = httpx.get(sim.url + "/metrics", timeout=5).text
    hits = value(after, "vllm:prefix_cache_hits_total") - value(before, "vllm:prefix_cache_hits_total")
    queries = (value(after, "vllm:prefix_cache_queries_total")
               - value(before, "vllm:prefix_cache_queries_total"))
    # 21 of the 24 requests find their 128-token shared prefix cached (the first of each of the
    # three prefixes does not): at least 21 x 112 tokens (the template may shift the blocks).
    assert hits >= 21 * 112, (hits, queries)
    assert hits < queries


def test_prompt_shaping_applies_to_a_trace_only() -> None:
    outcome = CliRunner().invoke(bench_app, ["run", "--model", "m", "--rate", "5", "--duration", "1",
                                             "--prompt-scale", "0.5"])
    assert outcome.exit_code == 2
    assert "apply to --trace only" in " ".join(outcome.output.split())
