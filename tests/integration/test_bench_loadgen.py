"""The load generator against a real ``chatfleet engine-sim`` (tiny-cpu profile) on a free port.

Counts and token totals must be exact; timings must be plausible for the profile's step time;
trace replay must send each request at its scheduled time; non-local targets are refused.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from chatfleet.bench.cli import bench_app
from chatfleet.bench.loadgen import LoadConfig, NonLocalTargetError, RunResult, run_load
from chatfleet.bench.report import summarize
from chatfleet.bench.workload import (
    FixedLengths,
    OpenLoop,
    TraceRow,
    closed_loop,
    load_trace,
    poisson,
    trace_replay,
)
from chatfleet.engines.engine_model import load_profile
from tests.conftest import Server, start_engine_sim, start_gateway, upstream_env

MODEL = "chatfleet-sim/tiny-cpu"
TRACE = Path(__file__).resolve().parents[1] / "fixtures" / "azure2023_conv_head200.csv"
"""The first 200 rows of the shared conversation trace (tests/fixtures/README.md)."""


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    server = start_engine_sim(max_num_seqs=64)
    yield server
    server.proc.terminate()


def config(sim: Server, **overrides: object) -> LoadConfig:
    return LoadConfig(url=sim.v1, model=MODEL, **overrides)  # type: ignore[arg-type]


def tiny_cpu_step_s(batch: int, context_tokens: int) -> float:
    """The tiny-cpu profile's decode step for ``batch`` sequences of ``context_tokens`` each."""
    return load_profile("tiny-cpu").step_seconds(
        num_new_tokens=batch, num_seqs=batch, context_tokens_read=batch * context_tokens, attention_flops=0.0
    )


async def test_closed_loop_sends_the_asked_number_of_requests_with_exact_output_lengths(sim: Server) -> None:
    result = await run_load(
        closed_loop(concurrency=8, lengths=FixedLengths(32, 16)), config(sim, max_requests=40)
    )
    assert len(result.records) == 40
    assert sorted(r.index for r in result.records) == list(range(40))
    assert all(r.ok and r.status == 200 for r in result.records), {r.error for r in result.records}
    assert all(r.usage_output_tokens == r.content_chunks == 16 for r in result.records)
    assert all(len(r.itl_s) == 15 for r in result.records)
    assert summarize(result).output_tokens == 40 * 16


async def test_token_timings_are_paced_by_the_profiles_step_time(sim: Server) -> None:
    result = await run_load(
        closed_loop(concurrency=8, lengths=FixedLengths(32, 32)), config(sim, max_requests=16)
    )
    summary = summarize(result)
    step_s = tiny_cpu_step_s(batch=8, context_tokens=32 + 5 + 32)
    assert summary.itl_s is not None and summary.ttft_s is not None
    # The engine steps in real time, so tokens cannot come faster than one a step; on a shared
    # two-core machine they may come later, but not by more than a few steps' worth.
    assert 0.8 * step_s <= summary.itl_s.p50 <= step_s + 0.025
    assert step_s <= summary.ttft_s.p50 <= 0.5


async def test_trace_replay_sends_each_row_at_its_trace_time_divided_by_the_speed(sim: Server) -> None:
    # 40 real arrivals from the conversation trace, replayed 8x faster: about 2.5 s of sending.
    # Lengths are cut to fit the tiny-cpu profile; only the times matter here.
    rows = [
        TraceRow(row.arrived_at_s, min(row.prompt_tokens, 256), min(row.output_tokens, 8))
        for row in load_trace(TRACE)
    ]
    workload = trace_replay(rows, speed=8.0, start_s=rows[100].arrived_at_s, max_rows=40)
    expected = [spec.at_s for spec in workload.arrivals]
    result = await run_load(workload, config(sim))
    assert len(result.records) == 40
    assert all(r.ok for r in result.records), {r.error for r in result.records}
    assert [r.scheduled_s for r in result.records] == expected
    lateness = [r.sent_s - r.scheduled_s for r in result.records if r.scheduled_s is not None]
    assert min(lateness) >= -0.005
    assert max(lateness) <= 0.05
    assert expected[-1] == pytest.approx((rows[139].arrived_at_s - rows[100].arrived_at_s) / 8.0)


async def test_open_loop_stops_scheduling_at_the_duration(sim: Server) -> None:
    def workload() -> OpenLoop:
        return poisson(rate_per_s=40.0, lengths=FixedLengths(16, 4), seed=7)

    due = len(list(itertools.takewhile(lambda spec: spec.at_s < 1.0, workload().arrivals)))  # type: ignore[operator]
    result = await run_load(workload(), config(sim, duration_s=1.0))
    assert len(result.records) == due
    assert result.send_end_s == 1.0
    assert all(r.ok for r in result.records)


async def test_arrivals_beyond_the_in_flight_cap_wait_and_are_counted(sim: Server) -> None:
    workload = poisson(rate_per_s=200.0, lengths=FixedLengths(16, 32), seed=1)
    result = await run_load(workload, config(sim, max_requests=20, max_in_flight=2))
    assert len(result.records) == 20
    assert result.cap_waits > 0
    assert max(r.sent_s - r.scheduled_s for r in result.records if r.scheduled_s is not None) > 0.05


async def test_an_http_error_is_recorded_with_its_status(sim: Server) -> None:
    result: RunResult = await run_load(
        closed_loop(concurrency=1, lengths=FixedLengths(8, 4)),
        LoadConfig(url=sim.v1, model="no-such-model", max_requests=2),
    )
    assert [(r.status, r.error, r.ttft_s) for r in result.records] == [(404, "http_404", None)] * 2


async def test_gateway_rejections_are_recorded_as_429_with_retry_after(sim: Server) -> None:
    gateway = start_gateway(upstream_env(sim, admission__engine_slots=1, admission__max_queue=0))
    try:
        result = await run_load(
            closed_loop(concurrency=4, lengths=FixedLengths(8, 64)), config(gateway, max_requests=12)
        )
    finally:
        gateway.proc.terminate()
    rejected = [r for r in result.records if r.status == 429]
    assert rejected and any(r.ok for r in result.records)
    assert all(
        r.error == "http_429" and r.retry_after_s is not None and r.retry_after_s > 0 for r in rejected
    )
    assert summarize(result).rejected_429 == len(rejected)


def test_a_non_local_target_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(NonLocalTargetError, match="only targets"):
        LoadConfig(url="http://192.0.2.10:8000/v1", model=MODEL)


def test_the_cli_refuses_a_non_local_url() -> None:
    outcome = CliRunner().invoke(
        bench_app,
        ["run", "--url", "http://example.com/v1", "--model", MODEL, "--concurrency", "1", "--duration", "1"],
    )
    assert outcome.exit_code == 2
    assert "only targets" in outcome.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "2", "--rate", "5", "--duration", "1"], "exactly one of"),
        (["--duration", "1"], "exactly one of"),
        (["--concurrency", "2"], "--duration and/or --max-requests"),
        (["--rate", "5", "--speed", "2", "--duration", "1"], "apply to --trace only"),
        (["--rate", "0", "--duration", "1"], "must be greater than 0"),
    ],
    ids=["rate and concurrency together", "no workload", "no bound", "speed without trace", "zero rate"],
)
def test_the_cli_rejects_contradictory_or_missing_flags(flags: list[str], message: str) -> None:
    outcome = CliRunner().invoke(bench_app, ["run", "--model", MODEL, *flags])
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.split())


def test_the_cli_runs_a_workload_and_writes_json_and_a_plot(sim: Server, tmp_path: Path) -> None:
    out, plot = tmp_path / "run.json", tmp_path / "run.png"
    outcome = CliRunner().invoke(
        bench_app,
        ["run", "--url", sim.v1, "--concurrency", "4", "--max-requests", "8", "--prompt-tokens", "16",
         "--output-tokens", "8", "--label", "cli", "--out", str(out), "--plot", str(plot)],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["label"], run["requests"], run["succeeded"], run["output_tokens"]) == ("cli", 8, 8, 64)
    assert plot.read_bytes().startswith(b"\x89PNG")
    compared = CliRunner().invoke(bench_app, ["compare", str(out), str(out)])
    assert compared.exit_code == 0 and "output tokens/s" in compared.output


def test_the_model_is_discovered_from_the_server_when_not_given(sim: Server) -> None:
    assert httpx.get(sim.v1 + "/models").json()["data"][0]["id"] == MODEL
    outcome = CliRunner().invoke(
        bench_app, ["run", "--url", sim.v1, "--concurrency", "1", "--max-requests", "1"]
    )
    assert outcome.exit_code == 0, outcome.output
    assert MODEL in outcome.output
