"""The operator's policy, one behaviour per test: forecast, learned capacity, bounds, hysteresis."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chatfleet.autoscale.policy import (
    DAY_S,
    CapacitySample,
    Observations,
    PolicySpec,
    PolicyState,
    RatePoint,
    decide,
    forecast_rate,
    learned_capacity,
)

SPEC = PolicySpec(min_replicas=1, max_replicas=30, cold_start_s=120, replica_capacity=2.0,
                  target_utilization=0.8, trend_window_s=600, lower_after_s=600)


def flat(rate: float, now: float = 10_000, every: float = 15, span: float = 600) -> list[RatePoint]:
    return [RatePoint(now - span + i * every, rate) for i in range(int(span / every) + 1)]


def ramp(start: float, per_s: float, now: float = 10_000, every: float = 15,
         span: float = 600) -> list[RatePoint]:
    return [RatePoint(now - span + i * every, start + per_s * i * every)
            for i in range(int(span / every) + 1)]


def test_a_steady_load_gets_the_replicas_it_needs_at_the_target_utilization() -> None:
    decision = decide(SPEC, Observations(now=10_000, rates=flat(10.0)), None)
    assert decision.needed == 7  # 10 req/s / (2 req/s x 0.8) = 6.25
    assert decision.floor == 7 and decision.reason.startswith("raised to 7")
    assert decision.forecast_rate == pytest.approx(10.0)


def test_a_rising_load_is_projected_one_cold_start_ahead() -> None:
    points = ramp(4.0, per_s=0.01)  # +0.01 req/s each second, 10 req/s at now
    assert points[-1].rate == pytest.approx(10.0)
    assert forecast_rate(points, 10_000, horizon_s=120, trend_window_s=600) == pytest.approx(11.2)
    assert forecast_rate(points, 10_000, horizon_s=300, trend_window_s=600) == pytest.approx(13.0)


def test_a_trend_needs_half_a_window_of_history_before_it_is_projected() -> None:
    """The first minutes of a ramp (a fresh operator, a new deployment) give the level only."""
    points = ramp(4.0, per_s=0.05, span=240)  # 16 req/s at now, 240 s of a 600 s window
    assert forecast_rate(points, 10_000, horizon_s=300, trend_window_s=600) == pytest.approx(16.0)


def test_a_steep_trend_is_projected_to_at_most_double_the_level() -> None:
    points = ramp(1.0, per_s=0.015)  # 10 req/s at now, +4.5 req/s every 300 s
    assert forecast_rate(points, 10_000, horizon_s=300, trend_window_s=600) == pytest.approx(14.5)
    assert forecast_rate(points, 10_000, horizon_s=1200, trend_window_s=600) == pytest.approx(20.0)


def test_a_falling_load_is_not_projected_down() -> None:
    points = ramp(16.0, per_s=-0.01)  # falling to 10 req/s
    assert forecast_rate(points, 10_000, horizon_s=300, trend_window_s=600) == pytest.approx(10.0)


def test_yesterday_at_this_hour_raises_the_forecast_before_the_rise() -> None:
    """Yesterday the rate doubled over the next cold start; today it is flat so far."""
    now, horizon = 3 * DAY_S, 300.0
    yesterday = now - DAY_S
    history = ([RatePoint(yesterday - 60 + i * 15, 5.0) for i in range(9)]
               + [RatePoint(yesterday + horizon - 60 + i * 15, 10.0) for i in range(9)]
               + flat(6.0, now=now))
    assert forecast_rate(history, now, horizon, trend_window_s=600) == pytest.approx(12.0)
    without_history = flat(6.0, now=now)
    assert forecast_rate(without_history, now, horizon, trend_window_s=600) == pytest.approx(6.0)


def test_capacity_is_learned_once_there_are_enough_busy_samples() -> None:
    samples = [CapacitySample(i, rate) for i, rate in enumerate([3.0, 3.2, 2.8, 9.0, 3.1])]
    assert learned_capacity(samples[:4], configured=2.0, needed=5) == 2.0
    assert learned_capacity(samples, configured=2.0, needed=5) == 3.1  # the median ignores 9.0
    decision = decide(SPEC, Observations(now=10_000, rates=flat(10.0), capacity_samples=samples), None)
    assert decision.replica_capacity == 3.1
    assert decision.needed == 5  # 10 / (3.1 x 0.8) = 4.03


@pytest.mark.parametrize(("rate", "floor", "words"), [
    (100.0, 30, "capped at maxReplicas 30"),
    (0.0, 1, "held at minReplicas 1"),
])
def test_the_floor_stays_within_the_bounds_and_says_so(rate: float, floor: int, words: str) -> None:
    decision = decide(SPEC, Observations(now=10_000, rates=flat(rate)), None)
    assert decision.floor == floor and words in decision.reason


def test_no_history_keeps_the_minimum() -> None:
    decision = decide(SPEC, Observations(now=10_000, rates=[]), None)
    assert decision.floor == SPEC.min_replicas and decision.forecast_rate == 0.0


def test_the_floor_rises_at_once_and_falls_only_after_the_lower_figure_holds() -> None:
    state = decide(SPEC, Observations(now=10_000, rates=flat(10.0)), None).state
    assert state.floor == 7
    low = Observations(now=10_100, rates=flat(3.0, now=10_100))
    first = decide(SPEC, low, state)
    assert first.floor == 7 and first.needed == 2 and "lowering after 600 s more" in first.reason
    later = decide(SPEC, Observations(now=10_600, rates=flat(3.0, now=10_600)), first.state)
    assert later.floor == 7 and "lowering after 100 s more" in later.reason
    done = decide(SPEC, Observations(now=10_700, rates=flat(3.0, now=10_700)), later.state)
    assert done.floor == 2 and done.reason.startswith("lowered to 2")
    assert done.state == PolicyState(floor=2)


def test_a_rise_during_the_wait_cancels_the_lowering() -> None:
    state = PolicyState(floor=7, lower_since=10_000)
    back_up = decide(SPEC, Observations(now=10_500, rates=flat(10.0, now=10_500)), state)
    assert back_up.floor == 7 and back_up.state == PolicyState(floor=7)
    low_again = decide(SPEC, Observations(now=10_700, rates=flat(3.0, now=10_700)), back_up.state)
    assert low_again.floor == 7, "the wait starts over after the load came back"


def test_the_same_observations_give_the_same_decision() -> None:
    observations = Observations(now=10_000, rates=ramp(4.0, per_s=0.01))
    assert decide(SPEC, observations, None) == decide(SPEC, observations, None)


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 5, "max_replicas": 4}, "max_replicas"),
    ({"replica_capacity": 0.0}, "replica_capacity"),
    ({"target_utilization": 1.5}, "target_utilization"),
])
def test_a_bad_policy_is_refused_with_the_field_to_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SPEC, **changes)
