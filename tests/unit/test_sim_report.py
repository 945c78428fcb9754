"""What a fleet run is worth (sim/report.py), on fleet results built by hand."""

from __future__ import annotations

import math
from array import array

import pytest

from chatfleet.sim.fleet import FleetResult, RequestOutcome, TimelinePoint
from chatfleet.sim.report import Slo, biggest_step, meets_slo, summarize, ttft_quantile

OK, REJECTED, CUT, INVALID = (RequestOutcome.OK, RequestOutcome.REJECTED, RequestOutcome.CUT,
                              RequestOutcome.INVALID)


def result(requests: list[tuple[float, RequestOutcome, float, float]],
           desired: list[int], gpu_seconds: float = 1000.0, every: float = 15.0,
           prompt_tokens: list[int] | None = None) -> FleetResult:
    """requests: (arrival, outcome, ttft, tpot); desired: one replica count per sync."""
    return FleetResult(
        arrival_s=array("d", [r[0] for r in requests]),
        outcome=array("b", [r[1] for r in requests]),
        ttft_s=array("d", [r[2] for r in requests]), tpot_s=array("d", [r[3] for r in requests]),
        prompt_tokens=array("l", prompt_tokens or [1000] * len(requests)),
        timeline=tuple(TimelinePoint(i * every, d, d, 0, 0, 0, 0.0) for i, d in enumerate(desired)),
        gpu_seconds=gpu_seconds, end_s=max(len(desired) * every, max(r[0] for r in requests) + 1))


def test_a_request_meets_the_slo_only_when_answered_fast_enough_on_both_counts() -> None:
    slo = Slo(ttft_s=2.0, tpot_s=0.1)
    run = result([(0, OK, 1.0, 0.05), (1, OK, 2.5, 0.05), (2, OK, 1.0, 0.2), (3, REJECTED, math.nan, math.nan),
                  (4, CUT, 1.0, math.nan), (5, OK, 0.5, math.nan), (6, INVALID, math.nan, math.nan)], [1])
    # One-token answers have no TPOT and meet it; the too-long request misses it, or is not
    # scored at all with exclude_invalid.
    assert meets_slo(run, slo) == [True, False, False, False, False, True, False]
    assert meets_slo(run, slo, exclude_invalid=True) == [True, False, False, False, False, True]
    report = summarize("p", run, slo=slo, replica_capacity=1.0)
    assert report.slo_attainment == pytest.approx(2 / 7)
    assert (report.rejected, report.cut, report.invalid, report.requests) == (1, 1, 1, 7)
    assert not report.slo_excludes_invalid
    excluded = summarize("p", run, slo=slo, replica_capacity=1.0, exclude_invalid=True)
    assert excluded.slo_attainment == pytest.approx(2 / 6) and excluded.slo_excludes_invalid


def test_a_per_token_ttft_allowance_gives_long_prompts_their_prefill_time() -> None:
    # TTFT 3 s for a 500-token and for a 32k-token prompt: both miss a flat 2 s; with 0.1 s per
    # 1k prompt tokens the long one has 5.2 s and meets it, the short one still has 2.05 s.
    run = result([(0, OK, 3.0, 0.05), (1, OK, 3.0, 0.05)], [1], prompt_tokens=[500, 32_000])
    assert meets_slo(run, Slo()) == [False, False]
    assert meets_slo(run, Slo(ttft_per_1k_prompt_tokens_s=0.1)) == [False, True]
    with pytest.raises(ValueError, match="per 1k prompt tokens"):
        Slo(ttft_per_1k_prompt_tokens_s=-1)


def test_reversals_count_changes_of_direction_not_steps() -> None:
    run = result([(0, OK, 1.0, 0.05)], [2, 3, 4, 4, 6, 5, 5, 4, 7, 7], every=360.0)  # one hour
    report = summarize("p", run, slo=Slo(), replica_capacity=1.0)
    assert report.reversals_per_hour == pytest.approx(2.0)  # up..., down..., up
    assert report.peak_replicas == 7


def test_the_biggest_step_is_the_largest_rise_between_windows() -> None:
    arrivals = [i * 1.0 for i in range(60)] + [60 + i * 0.25 for i in range(240)] + \
               [120 + i * 0.1 for i in range(600)]
    assert biggest_step(arrivals, 60.0, 180.0) == (120.0, 10.0)  # 1 -> 4 -> 10 req/s


def test_reaction_and_recovery_are_measured_from_the_biggest_step() -> None:
    slow = [(at, OK, 5.0 if 120 <= at < 240 else 0.5, 0.05) for at in
            [i * 1.0 for i in range(120)] + [120 + i * 0.1 for i in range(1800)]]
    late = result(slow, [1] * 10 + [4] * 10)  # scales up at 150 s, 30 s after the step
    report = summarize("late", late, slo=Slo(), replica_capacity=2.0)
    assert report.reaction_s == pytest.approx(30.0)
    assert report.recovery_s == pytest.approx(120.0)  # the 240-300 s window is the first good one
    assert report.peak_overshoot == 0  # 10 req/s needs 5 at 2 req/s each; it asked for 4

    early = result(slow, [1] * 4 + [6] * 16)  # scaled at 60 s, a cold start (60 s) ahead
    ahead = summarize("early", early, slo=Slo(), replica_capacity=2.0, lookahead_s=60.0)
    assert ahead.reaction_s == pytest.approx(-60.0)
    assert ahead.peak_overshoot == 1
    assert summarize("early", early, slo=Slo(), replica_capacity=2.0).reaction_s is None


def test_cost_is_reported_against_the_oracle() -> None:
    run = result([(0, OK, 1.0, 0.05)], [1], gpu_seconds=1150.0)
    assert summarize("p", run, slo=Slo(), replica_capacity=1.0,
                     oracle_gpu_seconds=1000.0).gpu_seconds_vs_oracle == pytest.approx(1.15)
    assert summarize("p", run, slo=Slo(), replica_capacity=1.0).gpu_seconds_vs_oracle is None


def test_ttft_p99_is_over_answered_requests_only() -> None:
    answered = [(i, OK, 0.1 * (i + 1), 0.05) for i in range(100)]  # TTFT 0.1 .. 10.0 s
    run = result([*answered, (100, REJECTED, math.nan, math.nan), (101, CUT, 50.0, math.nan)], [1])
    assert ttft_quantile(run, 0.99) == pytest.approx(9.9)
    assert summarize("p", run, slo=Slo(), replica_capacity=1.0).ttft_p99_s == pytest.approx(9.9)
    assert ttft_quantile(result([(0, REJECTED, math.nan, math.nan)], [1]), 0.99) is None
