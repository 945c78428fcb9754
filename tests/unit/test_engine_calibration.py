"""The H100 profile against published vLLM figures, replayed in virtual time, and the replay itself.

Published figures are in /work/shared/reference/engine-figures.md; docs/engine-model.md tabulates
model against published. Each figure is asserted within 25%, except those the model is known not
to reproduce, which are strict xfails that explain why (they fail loudly if the model ever does).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from chatfleet.engines.engine_model import EngineCore, load_profile
from chatfleet.sim.engine_replay import (
    ReplayRequest,
    ReplaySummary,
    replay,
    sharegpt_like_workload,
)

TOLERANCE = 0.25
H100 = "llama-3-8b-h100"
VLLM_BLOG_0_6_0 = 'vLLM blog "vLLM v0.6.0: 2.7x throughput improvement", 2024-09-05'
VLLM_PR_18566 = "vllm-project/vllm PR #18566"
PR = VLLM_PR_18566


@pytest.fixture(scope="module")
def light_load() -> ReplaySummary:
    """Poisson arrivals at 1 request/s for 5 minutes: a few requests decode at a time."""
    return replay(EngineCore(load_profile(H100)), sharegpt_like_workload(300, seed=0, request_rate=1.0)).summary


@pytest.fixture(scope="module")
def saturated() -> ReplaySummary:
    """1000 requests all sent at t=0, as in the PR's benchmark run."""
    return replay(EngineCore(load_profile(H100)), sharegpt_like_workload(1000, seed=0)).summary


@dataclass(frozen=True)
class Figure:
    id: str
    setup: str  # the fixture replaying the published setup
    published: float
    measure: Callable[[ReplaySummary], float]
    source: str


FIGURES = [
    Figure("light load mean ITL is about 13 ms", "light_load", 0.013, lambda s: s.mean_itl_s, VLLM_BLOG_0_6_0),
    Figure("light load median ITL is about 13 ms", "light_load", 0.013, lambda s: s.median_itl_s, VLLM_BLOG_0_6_0),
    Figure("saturated output throughput is 6583 tok/s", "saturated", 6583, lambda s: s.output_tokens_per_s, PR),
    Figure("saturated total throughput is 14029 tok/s", "saturated", 14029, lambda s: s.total_tokens_per_s, PR),
    Figure("saturated request rate is 32.4 req/s", "saturated", 32.4, lambda s: s.requests_per_s, PR),
    Figure("saturated median ITL is 25.4 ms", "saturated", 0.0254, lambda s: s.median_itl_s, PR),
    Figure("saturated median TPOT is 48.8 ms", "saturated", 0.0488, lambda s: s.median_tpot_s, PR),
]


@pytest.mark.parametrize("figure", FIGURES, ids=[f.id for f in FIGURES])
def test_the_h100_profile_reproduces_the_published_figure_within_25_percent(
    figure: Figure, request: pytest.FixtureRequest
) -> None:
    modelled = figure.measure(request.getfixturevalue(figure.setup))
    assert modelled == pytest.approx(figure.published, rel=TOLERANCE), f"{figure.id} ({figure.source})"


@pytest.mark.xfail(
    strict=True,
    reason="the model has no HTTP front end or client: with 1000 requests sent at once, vLLM's API server "
    "takes seconds to accept and tokenize them, which the published 9.6 s includes; the engine alone "
    "prefills all 1000 prompts in about 5 s (mean TTFT about 2.7 s)",
)
def test_the_h100_profile_reproduces_the_published_saturated_mean_ttft(saturated: ReplaySummary) -> None:
    assert saturated.mean_ttft_s == pytest.approx(9.6, rel=TOLERANCE)


def test_the_saturated_run_fits_the_kv_cache_without_preemption(saturated: ReplaySummary) -> None:
    assert saturated.num_preemptions == 0


# --- the workload stand-in --------------------------------------------------------------------


def test_sharegpt_like_lengths_have_the_published_means_and_pass_vllms_sampler_filter() -> None:
    workload = sharegpt_like_workload(5000, seed=7)
    assert statistics.fmean(r.prompt_tokens for r in workload) == pytest.approx(230, rel=0.03)
    assert statistics.fmean(r.output_tokens for r in workload) == pytest.approx(203, rel=0.03)
    assert all(r.prompt_tokens >= 4 and r.output_tokens >= 4 for r in workload)
    assert all(r.prompt_tokens <= 1024 and r.prompt_tokens + r.output_tokens <= 2048 for r in workload)


def test_sharegpt_like_workload_is_deterministic_and_its_lengths_do_not_depend_on_the_rate() -> None:
    at_once = sharegpt_like_workload(200, seed=3)
    poisson = sharegpt_like_workload(200, seed=3, request_rate=4.0)
    assert at_once == sharegpt_like_workload(200, seed=3)
    assert all(r.arrival_s == 0.0 for r in at_once)
    lengths = [(r.prompt_tokens, r.output_tokens) for r in at_once]
    assert lengths == [(r.prompt_tokens, r.output_tokens) for r in poisson]
    assert sharegpt_like_workload(200, seed=4) != at_once


def test_poisson_arrivals_start_at_zero_and_average_the_requested_rate() -> None:
    arrivals = [r.arrival_s for r in sharegpt_like_workload(4000, seed=1, request_rate=4.0)]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert (len(arrivals) - 1) / arrivals[-1] == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_requests": 0}, "num_requests must be at least 1"), ({"num_requests": 5, "request_rate": 0.0}, "> 0")],
    ids=["no requests", "zero rate"],
)
def test_sharegpt_like_workload_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sharegpt_like_workload(**kwargs)  # type: ignore[arg-type]


# --- replay mechanics -------------------------------------------------------------------------


def test_a_request_arriving_mid_step_joins_at_the_next_step_boundary() -> None:
    profile = load_profile("tiny-cpu")
    by_hand = EngineCore(profile)
    by_hand.add_request("a", prompt_tokens=100, output_tokens=5)
    first_step_s = by_hand.step().duration_s
    by_hand.add_request("b", prompt_tokens=50, output_tokens=5)
    second_step_s = by_hand.step().duration_s

    arrival_b = first_step_s / 2
    report = replay(
        EngineCore(profile),
        [
            ReplayRequest(arrival_s=0.0, prompt_tokens=100, output_tokens=5),
            ReplayRequest(arrival_s=arrival_b, prompt_tokens=50, output_tokens=5),
        ],
    )
    a, b = report.requests
    assert a.ttft_s == pytest.approx(first_step_s)
    assert b.ttft_s == pytest.approx(first_step_s + second_step_s - arrival_b)


def test_an_idle_engine_jumps_to_the_next_arrival() -> None:
    requests = [ReplayRequest(arrival_s=t, prompt_tokens=40, output_tokens=10) for t in (5.0, 3600.0)]
    report = replay(EngineCore(load_profile("tiny-cpu")), requests)
    first, second = report.requests
    assert second.ttft_s == pytest.approx(first.ttft_s) and second.e2e_s == pytest.approx(first.e2e_s)
    assert report.summary.makespan_s == pytest.approx(3595.0 + second.e2e_s)
    assert report.summary.num_steps == 20


def test_replay_reports_latencies_consistent_with_each_other() -> None:
    report = replay(EngineCore(load_profile("tiny-cpu")), sharegpt_like_workload(100, seed=2, request_rate=20.0))
    for result in report.requests:
        assert 0 < result.ttft_s <= result.e2e_s
        if result.output_tokens > 1:
            assert result.tpot_s is not None and result.max_itl_s is not None
            assert result.tpot_s == pytest.approx((result.e2e_s - result.ttft_s) / (result.output_tokens - 1))
            assert result.max_itl_s >= result.tpot_s - 1e-12
    summary = report.summary
    assert summary.num_requests == 100 and math.isfinite(summary.median_itl_s)
    assert summary.output_tokens_per_s * summary.makespan_s == pytest.approx(
        sum(r.output_tokens for r in report.requests)
    )


def test_replay_refuses_a_core_that_already_holds_requests() -> None:
    core = EngineCore(load_profile("tiny-cpu"))
    core.add_request("x", prompt_tokens=4, output_tokens=4)
    with pytest.raises(ValueError, match="empty EngineCore"):
        replay(core, [ReplayRequest(arrival_s=0.0, prompt_tokens=4, output_tokens=4)])
