"""What a fleet run is worth: SLO attainment, GPU-seconds, refusals, and how the scaling moved.

SLO (the issue's): a request meets it when it was answered, its TTFT is at most ``ttft_s`` (plus
an allowance per prompt token, ``Slo``) and its mean time per output token at most ``tpot_s``; refused, unrouted and cut requests miss it. So do
requests the engine can never serve (``RequestOutcome.INVALID``: over max_model_len or the whole KV
cache, a 400 under any policy), counted apart in ``invalid``; ``exclude_invalid`` leaves them out
of the attainment's denominator instead. The
"biggest step" is the largest rise of the arrival rate between consecutive ``window_s`` windows;
reaction and recovery are measured from its start.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from chatfleet.sim.fleet import FleetResult, RequestOutcome

__all__ = ["PolicyReport", "Slo", "biggest_step", "meets_slo", "scored_arrivals", "summarize",
           "ttft_quantile"]


@dataclass(frozen=True, slots=True)
class Slo:
    """TTFT at most ``ttft_s`` plus ``ttft_per_1k_prompt_tokens_s`` for each 1,000 prompt tokens
    (0 by default: one bound for every prompt), and mean TPOT at most ``tpot_s``. The per-token
    allowance is for long-context traffic: a 64k-token prompt takes seconds to prefill on an idle
    H200, so a flat 2 s TTFT would call a fleet of any size failing."""

    ttft_s: float = 2.0
    tpot_s: float = 0.100
    ttft_per_1k_prompt_tokens_s: float = 0.0

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or self.ttft_per_1k_prompt_tokens_s < 0:
            raise ValueError(f"SLO bounds must be positive (the per-token TTFT allowance may be 0), got "
                             f"ttft {self.ttft_s} s, tpot {self.tpot_s} s, "
                             f"{self.ttft_per_1k_prompt_tokens_s} s per 1k prompt tokens")

    def ttft_bound_s(self, prompt_tokens: int) -> float:
        return self.ttft_s + self.ttft_per_1k_prompt_tokens_s * prompt_tokens / 1000


@dataclass(frozen=True, slots=True)
class PolicyReport:
    policy: str
    requests: int
    slo_attainment: float
    ttft_p99_s: float | None
    """p99 TTFT of the answered requests (refused ones are counted in ``rejected``); None: none."""
    gpu_seconds: float
    gpu_seconds_vs_oracle: float | None
    rejected: int
    """429s plus requests that found no ready pod."""
    invalid: int
    """Requests the engine can never serve (over max_model_len or its whole KV cache)."""
    slo_excludes_invalid: bool
    """True: ``slo_attainment`` is over the servable requests only; False: invalid ones missed it."""
    cut: int
    peak_replicas: int
    peak_overshoot: int
    """Replicas desired after the biggest step beyond what its peak needs (capacity-based)."""
    reversals_per_hour: float
    reaction_s: float | None
    """From the biggest step to the first scale-up decision in reach of it (from one cold start
    before it): negative when the policy scaled ahead of the step."""
    recovery_s: float | None
    """From the biggest step to the first window at or above the SLO target again."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def meets_slo(result: FleetResult, slo: Slo, *, exclude_invalid: bool = False) -> list[bool]:
    """Per scored request, in arrival order: met or not. Invalid requests miss, or are left out
    with ``exclude_invalid``."""
    return [outcome == RequestOutcome.OK and ttft <= slo.ttft_bound_s(prompt)
            and (math.isnan(tpot) or tpot <= slo.tpot_s)
            for outcome, ttft, tpot, prompt in zip(result.outcome, result.ttft_s, result.tpot_s,
                                                   result.prompt_tokens, strict=True)
            if not (exclude_invalid and outcome == RequestOutcome.INVALID)]


def scored_arrivals(result: FleetResult, *, exclude_invalid: bool = False) -> list[float]:
    """Arrival times of the requests ``meets_slo`` scores, in the same order."""
    return [at for at, outcome in zip(result.arrival_s, result.outcome, strict=True)
            if not (exclude_invalid and outcome == RequestOutcome.INVALID)]


def ttft_quantile(result: FleetResult, q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of TTFT over answered requests; None when none was."""
    answered = sorted(ttft for ttft, outcome in zip(result.ttft_s, result.outcome, strict=True)
                      if outcome == RequestOutcome.OK and not math.isnan(ttft))
    if not answered:
        return None
    return answered[min(len(answered) - 1, max(0, math.ceil(q * len(answered)) - 1))]


def _window_rates(arrivals: Sequence[float], window_s: float, end_s: float) -> list[float]:
    counts = [0] * max(1, math.ceil(end_s / window_s))
    for at in arrivals:
        counts[min(int(at // window_s), len(counts) - 1)] += 1
    return [count / window_s for count in counts]


def biggest_step(arrivals: Sequence[float], window_s: float, end_s: float) -> tuple[float, float]:
    """(start of the window with the largest rise in arrival rate, that window's rate)."""
    rates = _window_rates(arrivals, window_s, end_s)
    if len(rates) < 2:
        return 0.0, rates[0]
    _, index = max((rates[i] - rates[i - 1], i) for i in range(1, len(rates)))
    return index * window_s, rates[index]


def summarize(name: str, result: FleetResult, *, slo: Slo, replica_capacity: float,
              oracle_gpu_seconds: float | None = None, window_s: float = 60.0,
              target: float = 0.99, lookahead_s: float = 0.0,
              exclude_invalid: bool = False) -> PolicyReport:
    """The report's numbers; ``lookahead_s`` (the cold start) is how early before the biggest
    step a scale-up still counts as the reaction to it."""
    met = meets_slo(result, slo, exclude_invalid=exclude_invalid)
    outcomes = list(result.outcome)
    desired = [point.desired for point in result.timeline]
    moves = [b - a for a, b in itertools.pairwise(desired) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    hours = max(result.end_s, 1.0) / 3600
    step_at, step_rate = biggest_step(result.arrival_s, window_s, result.end_s)
    since = step_at - lookahead_s
    before = [p.desired for p in result.timeline if p.at < since]
    base = before[-1] if before else (desired[0] if desired else 0)
    reaction = next((p.at - step_at for p in result.timeline if p.at >= since and p.desired > base),
                    None)
    needed = math.ceil(step_rate / replica_capacity) if replica_capacity > 0 else 0
    after = [p.desired for p in result.timeline if step_at <= p.at <= step_at + 900]
    recovery = None
    windows = math.ceil(result.end_s / window_s)
    scored = list(zip(scored_arrivals(result, exclude_invalid=exclude_invalid), met, strict=True))
    for w in range(int(step_at // window_s), windows):
        inside = [m for at, m in scored if w * window_s <= at < (w + 1) * window_s]
        if inside and sum(inside) / len(inside) >= target:
            recovery = w * window_s - step_at
            break
    return PolicyReport(
        policy=name, requests=len(outcomes),
        slo_attainment=sum(met) / len(met) if met else 1.0,
        ttft_p99_s=ttft_quantile(result, 0.99),
        gpu_seconds=result.gpu_seconds,
        gpu_seconds_vs_oracle=result.gpu_seconds / oracle_gpu_seconds if oracle_gpu_seconds else None,
        rejected=sum(1 for o in outcomes if o in (RequestOutcome.REJECTED, RequestOutcome.NO_ENDPOINT)),
        invalid=sum(1 for o in outcomes if o == RequestOutcome.INVALID),
        slo_excludes_invalid=exclude_invalid,
        cut=sum(1 for o in outcomes if o == RequestOutcome.CUT),
        peak_replicas=max(desired, default=0),
        peak_overshoot=max(0, max(after, default=0) - needed),
        reversals_per_hour=reversals / hours,
        reaction_s=reaction, recovery_s=recovery)
