"""bench/peers/guidellm/run.py reads guidellm's JSON report as guidellm itself prints it.

The fixture is a real guidellm 0.8.1 report (the direct run behind docs/benchmarks/guidellm.json),
trimmed to the metric families the parser reads. The expected numbers are the ones guidellm printed
in its console tables for that run (one decimal), so a parser that took a neighbouring field (the
successful requests' tokens/s instead of all tokens received, a mean TTFT instead of the median, the
odd "median" of its per-request rates) fails here; no guidellm install is needed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.peers.guidellm.run import parse_report

FIXTURE = Path(__file__).parents[1] / "fixtures" / "guidellm-0.8.1-report.json"
PRINTED_PRECISION = 0.051
"""guidellm's console tables round to one decimal."""


@dataclass(frozen=True)
class Printed:
    """One line of guidellm's console summary for a level (Run Summary, Request Latency and Server
    Throughput tables)."""

    level: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    completed: int
    errors: int


PRINTED = (
    Printed(1, 0.4, 14.7, 73.4, 78.7, 67.7, 9, 0),
    Printed(8, 3.2, 112.5, 125.1, 151.6, 68.7, 64, 0),
    Printed(32, 12.8, 413.5, 193.6, 454.2, 70.6, 256, 0),
)


def report() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("printed", PRINTED, ids=lambda printed: f"concurrent@{printed.level}")
def test_each_level_reads_as_guidellm_printed_it(printed: Printed) -> None:
    row = {row.level: row for row in parse_report(report(), "guidellm direct")}[printed.level]
    assert row.client == "guidellm direct"
    assert row.requests_per_s == pytest.approx(printed.requests_per_s, abs=PRINTED_PRECISION)
    assert row.output_tokens_per_s == pytest.approx(printed.output_tokens_per_s, abs=PRINTED_PRECISION)
    assert row.ttft_p50_ms == pytest.approx(printed.ttft_p50_ms, abs=PRINTED_PRECISION)
    assert row.ttft_p95_ms == pytest.approx(printed.ttft_p95_ms, abs=PRINTED_PRECISION)
    assert row.itl_p50_ms == pytest.approx(printed.itl_p50_ms, abs=PRINTED_PRECISION)
    assert (row.completed, row.errors) == (printed.completed, printed.errors)


def test_levels_come_in_the_order_guidellm_ran_them() -> None:
    assert [row.level for row in parse_report(report(), "x")] == [1, 8, 32]


def test_guidellm_warnings_about_its_own_measurement_are_kept() -> None:
    first = parse_report(report(), "x")[0]
    assert len(first.client_warnings) == 1
    assert first.client_warnings[0].startswith("mean generation delay was 3% of mean time to first token")


def test_a_report_of_another_profile_is_refused() -> None:
    swept = copy.deepcopy(report())
    swept["benchmarks"][1]["config"]["strategy"]["type_"] = "throughput"
    with pytest.raises(ValueError, match="concurrent profile, got a 'throughput' benchmark"):
        parse_report(swept, "x")


def test_a_level_where_nothing_succeeded_has_no_latency_rather_than_zero() -> None:
    failed = copy.deepcopy(report())
    for family in ("time_to_first_token_ms", "inter_token_latency_ms"):
        failed["benchmarks"][0]["metrics"][family]["successful"]["count"] = 0
    row = parse_report(failed, "x")[0]
    assert math.isnan(row.ttft_p50_ms) and math.isnan(row.ttft_p95_ms) and math.isnan(row.itl_p50_ms)
