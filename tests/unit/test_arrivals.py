"""Load shapes: the arrivals follow the rate they promise, repeatably."""

from __future__ import annotations

import pytest

from chatfleet.bench.workload import FixedLengths
from chatfleet.sim.arrivals import (
    RateShape,
    bursts,
    diurnal,
    ramp,
    shaped_arrivals,
    step,
)

LENGTHS = FixedLengths(prompt_tokens=200, output_tokens=100)


def times(shape: RateShape, duration_s: float, seed: int = 0) -> list[float]:
    return [r.at_s for r in shaped_arrivals(shape, duration_s=duration_s, lengths=LENGTHS, seed=seed).arrivals]


def count(at: list[float], start: float, end: float) -> int:
    return sum(start <= t < end for t in at)


def test_a_step_changes_the_rate_at_its_time() -> None:
    at = times(step(base=5.0, peak=20.0, at_s=600.0), 1200.0)
    assert count(at, 0, 600) / 600 == pytest.approx(5.0, rel=0.1)
    assert count(at, 600, 1200) / 600 == pytest.approx(20.0, rel=0.1)
    assert at == sorted(at) and all(0 <= t < 1200 for t in at)


def test_a_ramp_grows_linearly() -> None:
    at = times(ramp(start=2.0, end=22.0, duration_s=1000.0), 1000.0)
    for start in (0, 250, 500, 750):
        expected = 2.0 + 20.0 * (start + 125) / 1000  # the rate mid-window
        assert count(at, start, start + 250) / 250 == pytest.approx(expected, rel=0.15)


def test_diurnal_peaks_mid_period_and_bursts_come_on_schedule() -> None:
    day = times(diurnal(low=1.0, high=21.0, period_s=2000.0), 2000.0)
    assert count(day, 900, 1100) / 200 == pytest.approx(20.8, rel=0.15)
    assert count(day, 0, 100) / 100 < 3.0
    burst = times(bursts(base=1.0, burst_rate=30.0, burst_s=20.0, every_s=200.0), 2000.0)
    inside = sum(count(burst, k * 200, k * 200 + 20) for k in range(10))
    assert inside / 200 == pytest.approx(30.0, rel=0.1)
    assert (len(burst) - inside) / 1800 == pytest.approx(1.0, rel=0.25)


def test_the_same_seed_gives_the_same_arrivals_and_another_seed_does_not() -> None:
    shape = step(base=5.0, peak=10.0, at_s=100.0)
    assert times(shape, 300.0, seed=3) == times(shape, 300.0, seed=3)
    assert times(shape, 300.0, seed=3) != times(shape, 300.0, seed=4)


def test_requests_carry_the_sampled_lengths_and_consecutive_indexes() -> None:
    requests = list(shaped_arrivals(step(5.0, 5.0, 0.0), duration_s=60.0, lengths=LENGTHS).arrivals)
    assert [r.index for r in requests] == list(range(len(requests)))
    assert {(r.prompt_tokens, r.output_tokens) for r in requests} == {(200, 100)}


def test_a_shape_over_its_declared_peak_is_refused() -> None:
    lying = RateShape(lambda t: 50.0, peak=10.0, description="lying shape")
    with pytest.raises(ValueError, match="over its peak"):
        list(shaped_arrivals(lying, duration_s=10.0, lengths=LENGTHS).arrivals)
    with pytest.raises(ValueError, match="burst_s"):
        bursts(base=1.0, burst_rate=5.0, burst_s=30.0, every_s=10.0)
