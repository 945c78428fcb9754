"""Load shapes for the fleet simulator: non-homogeneous Poisson arrivals with a rate that moves.

A recorded trace is replayed with ``bench.workload.trace_replay`` (time divided by a speed k); the
shapes here are the synthetic alternatives. Both give an ``OpenLoop`` of ``RequestSpec``s, so the
simulator and ``chatfleet bench`` read the same arrivals. Shapes are sampled by Lewis-Shedler
thinning against their peak rate and are seeded, so a simulation repeats exactly; request lengths
come from a ``LengthSampler`` (for example a trace's empirical lengths).

- ``step``: ``base`` req/s, then ``peak`` from ``at_s`` on (the load step of the scaling tables).
- ``ramp``: linear from ``start`` to ``end`` over ``duration_s``.
- ``diurnal``: a day's swing between ``low`` and ``high``, compressed into ``period_s``.
- ``bursts``: ``base`` with ``burst_rate`` for ``burst_s`` of every ``every_s``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from chatfleet.bench.workload import LengthSampler, OpenLoop, RequestSpec

__all__ = ["RateShape", "bursts", "diurnal", "ramp", "shaped_arrivals", "step"]


@dataclass(frozen=True, slots=True)
class RateShape:
    """Requests/s as a function of virtual time, with the highest rate it reaches."""

    rate: Callable[[float], float]
    peak: float
    description: str


def shaped_arrivals(shape: RateShape, *, duration_s: float, lengths: LengthSampler,
                    seed: int = 0) -> OpenLoop:
    """Arrivals over ``duration_s`` whose rate follows ``shape``."""
    if shape.peak <= 0 or duration_s <= 0:
        raise ValueError("the shape's peak rate and duration_s must be > 0")
    rng = random.Random(seed)

    def arrivals() -> Iterator[RequestSpec]:
        t, index = 0.0, 0
        while True:
            t += rng.expovariate(shape.peak)
            if t >= duration_s:
                return
            rate = shape.rate(t)
            if rate > shape.peak * (1 + 1e-9):
                raise ValueError(f"{shape.description}: rate {rate:.3f} at {t:.1f} s is over its peak")
            if rng.random() * shape.peak < rate:
                prompt_tokens, output_tokens = lengths.sample(rng)
                yield RequestSpec(index=index, prompt_tokens=prompt_tokens,
                                  output_tokens=output_tokens, at_s=t)
                index += 1

    return OpenLoop(arrivals=arrivals(), description=f"{shape.description} for {duration_s:g} s")


def step(base: float, peak: float, at_s: float) -> RateShape:
    return RateShape(lambda t: base if t < at_s else peak, max(base, peak),
                     f"step {base:g} -> {peak:g} req/s at {at_s:g} s")


def ramp(start: float, end: float, duration_s: float) -> RateShape:
    return RateShape(lambda t: start + (end - start) * min(max(t / duration_s, 0.0), 1.0),
                     max(start, end), f"ramp {start:g} -> {end:g} req/s over {duration_s:g} s")


def diurnal(low: float, high: float, period_s: float) -> RateShape:
    """Lowest at 0 and at the end of each period, highest mid-period."""
    middle, half = (high + low) / 2, (high - low) / 2
    return RateShape(lambda t: middle - half * math.cos(2 * math.pi * t / period_s), high,
                     f"diurnal {low:g}-{high:g} req/s, period {period_s:g} s")


def bursts(base: float, burst_rate: float, burst_s: float, every_s: float) -> RateShape:
    if not 0 < burst_s <= every_s:
        raise ValueError(f"need 0 < burst_s ({burst_s}) <= every_s ({every_s})")
    return RateShape(lambda t: burst_rate if t % every_s < burst_s else base, max(base, burst_rate),
                     f"bursts {burst_rate:g} req/s for {burst_s:g} s every {every_s:g} s over {base:g}")
