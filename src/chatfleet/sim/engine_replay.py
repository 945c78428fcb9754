"""Replay a workload through one engine model in virtual time, and measure it like vLLM's benchmark.

``replay`` drives an ``EngineCore`` step by step, adding each step's modelled duration to a virtual
clock: requests join at the first step boundary at or after their arrival, and when the engine is
idle the clock jumps to the next arrival. Each token counts as emitted at the end of the step that
produced it. The report has per-request TTFT, TPOT and end-to-end latency and the aggregates
``benchmarks/benchmark_serving.py`` prints (throughputs, mean/median TTFT, ITL, TPOT), so the model
can be checked against published runs (tests/unit/test_engine_calibration.py).

``sharegpt_like_workload`` stands in for vLLM's ShareGPT sampler, which cannot be downloaded here.
"""

from __future__ import annotations

import math
import random
import statistics
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from chatfleet.engines.engine_model import EngineCore

__all__ = [
    "ReplayReport",
    "ReplayRequest",
    "ReplaySummary",
    "RequestResult",
    "replay",
    "sharegpt_like_workload",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    """Exactly how many tokens the request generates (as with vLLM's ``ignore_eos``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestResult:
    """Latencies of one replayed request, in virtual seconds from its arrival."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float
    tpot_s: float | None
    """Mean time between its tokens, (e2e - ttft) / (output_tokens - 1); None for one-token outputs."""
    max_itl_s: float | None
    """Its longest gap between two tokens (a preemption or a long prefill step shows here)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplaySummary:
    """Aggregates as vLLM's serving benchmark computes them.

    ITL statistics are over every gap between consecutive tokens of all requests; TPOT statistics
    are over requests. The makespan runs from the first arrival to the last token.
    """

    num_requests: int
    num_steps: int
    num_preemptions: int
    makespan_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    mean_ttft_s: float
    median_ttft_s: float
    mean_itl_s: float
    median_itl_s: float
    median_tpot_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayReport:
    requests: tuple[RequestResult, ...]
    """In the order of the input requests."""
    summary: ReplaySummary


def replay(core: EngineCore, requests: Sequence[ReplayRequest]) -> ReplayReport:
    """Run ``requests`` through ``core`` (which must be empty) until all have finished."""
    if core.has_work():
        raise ValueError("replay needs an empty EngineCore; this one already holds requests")
    if not requests:
        raise ValueError("replay needs at least one request")
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    first_token_at = [math.nan] * len(requests)
    last_token_at = [math.nan] * len(requests)
    finished_at = [math.nan] * len(requests)
    max_itl: list[float | None] = [None] * len(requests)
    all_itls = array("d")
    index_of: dict[str, int] = {}
    preemptions_before = core.num_preemptions_total

    now = requests[order[0]].arrival_s
    start = now
    next_arrival = 0
    num_steps = 0
    while next_arrival < len(order) or core.has_work():
        while next_arrival < len(order) and requests[order[next_arrival]].arrival_s <= now:
            i = order[next_arrival]
            request_id = str(i)
            core.add_request(
                request_id, prompt_tokens=requests[i].prompt_tokens, output_tokens=requests[i].output_tokens
            )
            index_of[request_id] = i
            next_arrival += 1
        if not core.has_work():
            now = requests[order[next_arrival]].arrival_s
            continue
        outcome = core.step()
        num_steps += 1
        if not outcome.emitted and not outcome.preempted and outcome.duration_s == 0.0:
            raise RuntimeError("the engine core holds requests but scheduled none; this is a scheduler bug")
        now += outcome.duration_s
        for request_id, generated in outcome.emitted:
            i = index_of[request_id]
            if generated == 1:
                first_token_at[i] = now
            else:
                gap = now - last_token_at[i]
                all_itls.append(gap)
                longest = max_itl[i]
                if longest is None or gap > longest:
                    max_itl[i] = gap
            last_token_at[i] = now
        for request_id in outcome.finished:
            finished_at[index_of.pop(request_id)] = now

    results = tuple(
        RequestResult(
            arrival_s=r.arrival_s,
            prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens,
            ttft_s=first_token_at[i] - r.arrival_s,
            e2e_s=finished_at[i] - r.arrival_s,
            tpot_s=(finished_at[i] - first_token_at[i]) / (r.output_tokens - 1) if r.output_tokens > 1 else None,
            max_itl_s=max_itl[i],
        )
        for i, r in enumerate(requests)
    )
    return ReplayReport(
        requests=results,
        summary=_summarise(
            results,
            all_itls,
            makespan_s=now - start,
            num_steps=num_steps,
            num_preemptions=core.num_preemptions_total - preemptions_before,
        ),
    )


def _summarise(
    results: Sequence[RequestResult], itls: array[float], *, makespan_s: float, num_steps: int, num_preemptions: int
) -> ReplaySummary:
    output_tokens = sum(r.output_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    tpots = [r.tpot_s for r in results if r.tpot_s is not None]
    return ReplaySummary(
        num_requests=len(results),
        num_steps=num_steps,
        num_preemptions=num_preemptions,
        makespan_s=makespan_s,
        requests_per_s=len(results) / makespan_s,
        output_tokens_per_s=output_tokens / makespan_s,
        total_tokens_per_s=(output_tokens + prompt_tokens) / makespan_s,
        mean_ttft_s=statistics.fmean(ttfts),
        median_ttft_s=statistics.median(ttfts),
        mean_itl_s=statistics.fmean(itls) if itls else math.nan,
        median_itl_s=statistics.median(itls) if itls else math.nan,
        median_tpot_s=statistics.median(tpots) if tpots else math.nan,
    )


# vLLM's ShareGPT sampler (benchmarks/benchmark_dataset.py) keeps a conversation's first prompt and
# answer only if both have at least 4 tokens, the prompt at most 1024 and the two at most 2048.
_MIN_LEN = 4
_MAX_PROMPT = 1024
_MAX_TOTAL = 2048
# Lognormal (mu, sigma) of prompt and output lengths. The sigmas are a judgement (ShareGPT lengths
# are heavy-tailed); the mus were solved so the *filtered* means are the published 230 and 203.
_PROMPT_MU, _PROMPT_SIGMA = 5.149, 1.0
_OUTPUT_MU, _OUTPUT_SIGMA = 4.861, 1.0


def sharegpt_like_workload(num_requests: int, *, seed: int = 0, request_rate: float = math.inf) -> list[ReplayRequest]:
    """Synthetic ShareGPT-like requests: 230 prompt / 203 output tokens on average, deterministic per seed.

    Lengths are drawn from independent lognormals and filtered as vLLM's ShareGPT sampler filters
    real conversations. ``request_rate`` is requests per second of a Poisson process whose first
    arrival is at 0 (vLLM's benchmark client); ``inf`` sends everything at 0. The lengths depend on
    the seed only, not on the rate. This is not ShareGPT: results that hinge on the longest
    outputs (the makespan of a saturated run) move with the seed and the tail of these lognormals.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s (inf: all at once), got {request_rate}")
    rng = random.Random(seed)
    lengths: list[tuple[int, int]] = []
    while len(lengths) < num_requests:
        prompt = round(rng.lognormvariate(_PROMPT_MU, _PROMPT_SIGMA))
        output = round(rng.lognormvariate(_OUTPUT_MU, _OUTPUT_SIGMA))
        if prompt < _MIN_LEN or output < _MIN_LEN or prompt > _MAX_PROMPT or prompt + output > _MAX_TOTAL:
            continue
        lengths.append((prompt, output))
    arrival = 0.0
    workload = []
    for prompt, output in lengths:
        workload.append(ReplayRequest(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output))
        if math.isfinite(request_rate):
            arrival += rng.expovariate(request_rate)
    return workload
