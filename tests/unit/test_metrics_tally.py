"""HistogramTally: a histogram fed through a tally exports what ``observe`` would have."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from chatfleet.telemetry.metrics import ITL_BUCKETS, HistogramTally


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("itl_seconds", "gaps", ["model"], buckets=ITL_BUCKETS,
                               registry=registry)


def test_a_tally_exports_what_observe_would_have() -> None:
    rng = random.Random(7)
    amounts = ([0.0, 0.001, 0.0010001, ITL_BUCKETS[-1], ITL_BUCKETS[-1] * 2, 1e9]
               + [rng.expovariate(1 / 0.03) for _ in range(500)])
    direct_registry, direct = _histogram()
    tallied_registry, tallied = _histogram()
    tally = HistogramTally(tallied.labels("m"), flush_every=7)
    for amount in amounts:
        direct.labels("m").observe(amount)
        tally.observe(amount, at=0.0)
    for _ in range(5):
        direct.labels("m").observe(0.0)
    tally.observe(0.0, at=0.0, times=5)
    tally.flush()
    tallied_samples, direct_samples = _samples(tallied_registry), _samples(direct_registry)
    assert tallied_samples.keys() == direct_samples.keys()
    for key, value in direct_samples.items():
        if key[0].endswith("_sum"):  # added in another order: equal to the last bits
            assert abs(tallied_samples[key] - value) <= 1e-9 * value
        else:
            assert tallied_samples[key] == value, key


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Every sample but the creation time, by name and ``le``."""
    return {(sample.name, sample.labels.get("le", "")): sample.value
            for metric in registry.collect() for sample in metric.samples
            if not sample.name.endswith("_created")}


def test_observations_reach_the_histogram_within_flush_every_or_flush_after_s() -> None:
    registry, histogram = _histogram()
    tally = HistogramTally(histogram.labels("m"), flush_every=4, flush_after_s=0.1)

    def count() -> float:
        return registry.get_sample_value("itl_seconds_count", {"model": "m"}) or 0.0

    tally.observe(0.02, at=0.2)  # the first observation: long after the last flush (none)
    assert count() == 1
    for at in (0.21, 0.22, 0.23):
        tally.observe(0.02, at=at)
    assert count() == 1  # 3 waiting, 0.03 s since the last flush
    tally.observe(0.02, at=0.24)
    assert count() == 5  # flush_every reached
    tally.observe(0.5, at=0.25)
    assert count() == 5
    tally.observe(0.01, at=0.35)
    assert count() == 7  # flush_after_s passed
    tally.observe(0.01, at=0.36)
    tally.flush()  # the stream's end
    assert count() == 8
    assert registry.get_sample_value("itl_seconds_sum", {"model": "m"}) == pytest.approx(
        0.02 * 5 + 0.5 + 0.01 * 2)
