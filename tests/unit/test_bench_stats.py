"""The benchmark's arithmetic, on hand-made records: percentiles, TPOT, SLO, rates, arrival times."""

from __future__ import annotations

import dataclasses
import itertools
import random
from array import array
from dataclasses import dataclass

import pytest

from chatfleet.bench.loadgen import (
    NonLocalTargetError,
    RequestRecord,
    RunResult,
    require_local,
)
from chatfleet.bench.report import Distribution, Slo, summarize, tpot_s
from chatfleet.bench.workload import (
    EmpiricalLengths,
    FixedLengths,
    PromptSynthesizer,
    RequestSpec,
    TraceRow,
    poisson,
    trace_replay,
)


def record(
    *,
    sent_s: float = 0.0,
    ttft_s: float | None = 0.1,
    itl_s: tuple[float, ...] = (),
    error: str | None = None,
    status: int = 200,
    index: int = 0,
) -> RequestRecord:
    """A finished request whose last token is also its end (e2e = TTFT + the gaps)."""
    e2e_s = (ttft_s or 0.0) + sum(itl_s)
    tokens = 0 if ttft_s is None else 1 + len(itl_s)
    return RequestRecord(
        index=index,
        prompt_tokens=8,
        max_tokens=tokens,
        scheduled_s=None,
        sent_s=sent_s,
        status=status,
        error=error,
        ttft_s=ttft_s,
        itl_s=array("d", itl_s),
        e2e_s=e2e_s,
        content_chunks=tokens,
    )


def run(*records: RequestRecord, send_end_s: float, cap_waits: int = 0) -> RunResult:
    return RunResult(
        label="run",
        workload="hand-made",
        url="http://127.0.0.1:1/v1",
        model="m",
        started_at_unix=0.0,
        wall_s=max(r.sent_s + (r.e2e_s or 0.0) for r in records),
        send_end_s=send_end_s,
        max_in_flight=8,
        cap_waits=cap_waits,
        records=list(records),
    )


@dataclass(frozen=True)
class PercentileCase:
    name: str
    values: list[float]
    expected: Distribution | None


PERCENTILE_CASES = [
    PercentileCase("no values have no distribution", [], None),
    PercentileCase(
        "one value is every statistic",
        [7.0],
        Distribution(count=1, mean=7.0, p50=7.0, p90=7.0, p99=7.0, max=7.0),
    ),
    # ranks (n-1)q: p50 at 1.5 -> 2.5; p90 at 2.7 -> 3 + 0.7; p99 at 2.97 -> 3 + 0.97
    PercentileCase(
        "four values interpolate linearly between order statistics",
        [4.0, 1.0, 3.0, 2.0],
        Distribution(count=4, mean=2.5, p50=2.5, p90=3.7, p99=3.97, max=4.0),
    ),
    # ranks on 0..10: p50 at 5 -> 5; p90 at 9 -> 9; p99 at 9.9 -> 9 + 0.9 * 91
    PercentileCase(
        "an outlier moves p99 and the mean but not the median",
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100],
        Distribution(count=11, mean=145 / 11, p50=5.0, p90=9.0, p99=90.9, max=100.0),
    ),
]


@pytest.mark.parametrize("case", PERCENTILE_CASES, ids=[c.name for c in PERCENTILE_CASES])
def test_distribution_statistics_match_hand_computed_percentiles(case: PercentileCase) -> None:
    got = Distribution.of(case.values)
    if case.expected is None:
        assert got is None
    else:
        assert got is not None
        assert dataclasses.asdict(got) == pytest.approx(dataclasses.asdict(case.expected))


def test_tpot_is_the_mean_gap_after_the_first_token_and_undefined_for_one_token() -> None:
    assert tpot_s(record(itl_s=(0.1, 0.2, 0.3))) == pytest.approx(0.2)
    assert tpot_s(record(itl_s=())) is None


@dataclass(frozen=True)
class SloCase:
    name: str
    request: RequestRecord
    met: bool


SLO = Slo(ttft_s=2.0, tpot_s=0.1)
SLO_CASES = [
    SloCase("fast request meets it", record(ttft_s=0.5, itl_s=(0.05, 0.05)), True),
    SloCase("TTFT exactly at the bound meets it", record(ttft_s=2.0, itl_s=(0.05,)), True),
    SloCase("TTFT just over the bound misses it", record(ttft_s=2.001, itl_s=(0.05,)), False),
    SloCase("mean TPOT exactly at the bound meets it", record(ttft_s=0.5, itl_s=(0.1, 0.1)), True),
    SloCase("mean TPOT just over the bound misses it", record(ttft_s=0.5, itl_s=(0.05, 0.1502)), False),
    SloCase(
        "one slow gap is fine when the mean is within", record(ttft_s=0.5, itl_s=(0.01, 0.01, 0.25)), True
    ),
    SloCase("a one-token answer is judged on TTFT alone", record(ttft_s=1.0), True),
    SloCase("a failed request never meets it", record(ttft_s=0.1, error="http_429", status=429), False),
    SloCase(
        "a request without a token never meets it", record(ttft_s=None, error="incomplete_stream"), False
    ),
]


@pytest.mark.parametrize("case", SLO_CASES, ids=[c.name for c in SLO_CASES])
def test_slo_is_met_only_within_both_bounds(case: SloCase) -> None:
    assert SLO.met_by(case.request) is case.met


def test_summary_counts_rates_and_goodput_over_the_sending_window() -> None:
    # Window [0, 4]. A: tokens at 1.0, 1.5, 2.0, TPOT 0.5, meets the SLO, ends inside.
    # B: tokens at 3.5, 4.2 (after the window), meets the SLO but ends outside.
    # C: one token at 2.1, TTFT over the bound, ends inside. D: rejected.
    summary = summarize(
        run(
            record(sent_s=0.0, ttft_s=1.0, itl_s=(0.5, 0.5), index=0),
            record(sent_s=3.0, ttft_s=0.5, itl_s=(0.7,), index=1),
            record(sent_s=0.0, ttft_s=2.1, index=2),
            record(sent_s=1.0, ttft_s=None, error="http_429", status=429, index=3),
            send_end_s=4.0,
        ),
        slo=Slo(ttft_s=2.0, tpot_s=0.75),
    )
    assert (summary.requests, summary.succeeded, summary.rejected_429) == (4, 3, 1)
    assert summary.errors == {"http_429": 1}
    assert summary.window_s == 4.0
    assert summary.request_throughput == pytest.approx(2 / 4)  # A and C
    assert summary.output_throughput == pytest.approx(5 / 4)  # 3 of A, 1 of B, 1 of C
    assert summary.goodput == pytest.approx(1 / 4)  # A
    assert summary.slo_attainment == pytest.approx(2 / 4)  # A and B, of all four counted
    assert summary.output_tokens == 3 + 2 + 1
    assert summary.ttft_s is not None and summary.ttft_s.p50 == pytest.approx(1.0)
    assert summary.itl_s is not None and summary.itl_s.count == 3


def test_requests_sent_during_the_warmup_are_not_counted_but_their_tokens_in_the_window_are() -> None:
    # Window [2, 6]: the warm-up request's tokens at 1.0 (before) and 2.5 (inside) count by arrival time.
    summary = summarize(
        run(
            record(sent_s=0.0, ttft_s=1.0, itl_s=(1.5,), index=0),
            record(sent_s=3.0, ttft_s=0.2, itl_s=(0.1,), index=1),
            send_end_s=6.0,
        ),
        warmup_s=2.0,
    )
    assert summary.requests == 1
    assert summary.window_s == 4.0
    assert summary.output_throughput == pytest.approx(3 / 4)
    assert summary.request_throughput == pytest.approx(2 / 4)


def test_a_run_sent_all_at_once_is_measured_from_first_send_to_last_end() -> None:
    summary = summarize(
        run(record(ttft_s=0.5, itl_s=(0.5,)), record(ttft_s=1.0, itl_s=(1.0,), index=1), send_end_s=0.0)
    )
    assert summary.window_s == 2.0
    assert summary.output_throughput == pytest.approx(4 / 2)


def test_pooled_runs_add_their_windows_and_pool_their_latencies() -> None:
    first = run(record(ttft_s=0.1, itl_s=(0.1,)), send_end_s=2.0)
    second = run(record(ttft_s=0.3, itl_s=(0.1, 0.1, 0.1)), send_end_s=2.0, cap_waits=3)
    summary = summarize(first, second, label="both")
    assert summary.label == "both"
    assert summary.window_s == 4.0
    assert summary.output_throughput == pytest.approx(6 / 4)
    assert summary.ttft_s is not None and summary.ttft_s.mean == pytest.approx(0.2)
    assert summary.cap_waits == 3


def test_trace_replay_divides_trace_time_by_the_speed_from_the_start_offset() -> None:
    rows = [TraceRow(t, 10 + i, 5 + i) for i, t in enumerate([0.0, 1.0, 3.0, 7.0, 8.0])]
    arrivals = list(trace_replay(rows, speed=2.0, start_s=1.0, max_rows=3).arrivals)
    assert [a.at_s for a in arrivals] == [0.0, 1.0, 3.0]
    assert [(a.prompt_tokens, a.output_tokens) for a in arrivals] == [(11, 6), (12, 7), (13, 8)]


def test_trace_replay_refuses_a_start_past_the_last_row() -> None:
    with pytest.raises(ValueError, match="no rows at or after start offset 9"):
        trace_replay([TraceRow(0.0, 1, 1)], start_s=9.0)


def test_poisson_arrivals_have_the_asked_mean_rate_and_repeat_with_the_seed() -> None:
    def first(n: int, seed: int) -> list[RequestSpec]:
        return list(
            itertools.islice(poisson(rate_per_s=20.0, lengths=FixedLengths(4, 2), seed=seed).arrivals, n)
        )

    arrivals = first(20_000, seed=1)
    assert arrivals[-1].at_s == pytest.approx(20_000 / 20.0, rel=0.03)
    assert first(50, seed=1) == arrivals[:50]
    assert first(50, seed=2) != arrivals[:50]


def test_empirical_lengths_draw_only_observed_pairs() -> None:
    lengths = EmpiricalLengths.from_trace([TraceRow(0.0, 100, 7), TraceRow(1.0, 20, 300)])
    rng = random.Random(0)
    assert {lengths.sample(rng) for _ in range(100)} == {(100, 7), (20, 300)}


def test_prompts_have_four_characters_a_token_and_differ_between_requests() -> None:
    synthesizer = PromptSynthesizer(seed=3)
    assert len(synthesizer.prompt(0, 100)) == 400
    assert len(synthesizer.prompt(0, 20_000)) == 80_000
    assert synthesizer.prompt(5, 50) == PromptSynthesizer(seed=3).prompt(5, 50)
    assert synthesizer.prompt(5, 50)[:16] != synthesizer.prompt(6, 50)[:16]


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://10.0.0.5:8000/v1", False),
        ("https://api.openai.com/v1", False),
        ("http://127.0.0.1.example.com/v1", False),
        ("ftp://127.0.0.1/v1", False),
    ],
)
def test_only_loopback_http_targets_are_accepted(url: str, local: bool) -> None:
    if local:
        require_local(url)
    else:
        with pytest.raises(NonLocalTargetError, match="only targets"):
            require_local(url)
