"""Statistics, JSON, plots and tables from load-generator runs.

``summarize(run)`` reduces a ``loadgen.RunResult`` to a ``Summary``: latency distributions (TTFT,
inter-token latency, TPOT, end-to-end; mean, p50, p90, p99, max), throughput, goodput against an
``Slo``, and error counts. Percentiles interpolate linearly between order statistics (numpy's
default, as vLLM's benchmark_serving does). Definitions:

- TTFT: send to first content token. ITL: every gap between consecutive tokens, pooled over requests.
- TPOT: per request, the mean of its gaps, i.e. (last token - first token) / (tokens - 1).
- Counted requests: those sent at or after ``warmup_s``. Counts and latency distributions cover them.
- Rates (request and token throughput, goodput) are measured over the sending window, from
  ``warmup_s`` to when the run stopped sending (``RunResult.send_end_s``): requests finished and
  tokens received inside it (whenever they were sent), divided by its length. Dividing by the whole
  run instead would count a closed loop's drain (the last requests finishing at ever lower
  concurrency) and understate the rate by about e2e / duration. A run that sent everything at once
  has no such window and is measured from its first send to its last end.
- Goodput: requests per second finishing in the window that succeeded with TTFT <= ``Slo.ttft_s``
  and TPOT <= ``Slo.tpot_s`` (a one-token answer has no TPOT and is judged on TTFT alone).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from chatfleet.bench.loadgen import RequestRecord, RunResult

__all__ = [
    "Distribution",
    "Slo",
    "Summary",
    "cdf_points",
    "matplotlib_missing",
    "plot_runs",
    "summarize",
    "summary_table",
    "tpot_s",
    "write_json",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Distribution | None:
        """Mean, percentiles and max of ``values``; None when there are none."""
        data = np.asarray(values, dtype=float)
        if data.size == 0:
            return None
        p50, p90, p99 = np.percentile(data, [50, 90, 99])
        return cls(
            count=int(data.size),
            mean=float(data.mean()),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            max=float(data.max()),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Slo:
    """A request meets the SLO when it succeeds within both bounds (seconds)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.100

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft_s is None or record.ttft_s > self.ttft_s:
            return False
        tpot = tpot_s(record)
        return tpot is None or tpot <= self.tpot_s


def tpot_s(record: RequestRecord) -> float | None:
    """Mean time per output token after the first; None for fewer than two tokens."""
    gaps = record.itl_s
    return sum(gaps) / len(gaps) if gaps else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    label: str
    workload: str
    requests: int
    """Requests counted (sent at or after the warm-up)."""
    succeeded: int
    rejected_429: int
    errors: dict[str, int]
    """Failed requests by error class (429s included as ``http_429``)."""
    window_s: float
    """Length of the window the rates are measured over."""
    request_throughput: float
    """Successful requests finished per second."""
    output_throughput: float
    """Output tokens received per second."""
    goodput: float
    """Requests finished per second that met ``slo``."""
    slo: Slo
    slo_attainment: float
    """Fraction of counted requests meeting ``slo``."""
    output_tokens: int
    """Output tokens of the counted successful requests (the server's usage where it sent one)."""
    ttft_s: Distribution | None
    itl_s: Distribution | None
    tpot_s: Distribution | None
    e2e_s: Distribution | None
    send_lag_s: Distribution | None
    """Open loop: how late each request was sent against its schedule (client or cap lateness)."""
    cap_waits: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """The inverse of ``as_dict``, for summaries read back from JSON."""
        fields = dict(data, slo=Slo(**data["slo"]))
        for name in ("ttft_s", "itl_s", "tpot_s", "e2e_s", "send_lag_s"):
            fields[name] = Distribution(**data[name]) if data[name] is not None else None
        return cls(**fields)


def summarize(*runs: RunResult, slo: Slo = Slo(), warmup_s: float = 0.0, label: str | None = None) -> Summary:
    """Statistics of the requests sent at or after ``warmup_s`` (see the module docstring).

    Several runs of one workload (repeated rounds) are pooled: distributions over all their counted
    requests, rates as the sum of what each run's window saw over the sum of the windows.
    """
    if not runs:
        raise ValueError("summarize() needs at least one run")
    records = [record for run in runs for record in run.records if record.sent_s >= warmup_s]
    succeeded = [record for record in records if record.ok]
    window_s = finished = tokens = good = 0.0
    for run in runs:
        start, end = _rate_window(run, warmup_s)
        window_s += end - start
        ended = [
            record
            for record in run.records
            if record.e2e_s is not None and start <= record.sent_s + record.e2e_s <= end
        ]
        finished += sum(1 for record in ended if record.ok)
        good += sum(1 for record in ended if slo.met_by(record))
        tokens += sum(_tokens_between(record, start, end) for record in run.records)

    def rate(count: float) -> float:
        return count / window_s if window_s > 0 else 0.0

    gaps = [np.frombuffer(record.itl_s, dtype=float) for record in succeeded if record.itl_s]
    return Summary(
        label=label or runs[0].label,
        workload=runs[0].workload,
        requests=len(records),
        succeeded=len(succeeded),
        rejected_429=sum(1 for record in records if record.status == 429),
        errors=dict(Counter(record.error for record in records if record.error is not None)),
        window_s=window_s,
        request_throughput=rate(finished),
        output_throughput=rate(tokens),
        goodput=rate(good),
        slo=slo,
        slo_attainment=sum(1 for record in succeeded if slo.met_by(record)) / len(records)
        if records
        else 0.0,
        output_tokens=sum(record.output_tokens for record in succeeded),
        ttft_s=Distribution.of([record.ttft_s for record in succeeded if record.ttft_s is not None]),
        itl_s=Distribution.of(np.concatenate(gaps) if gaps else []),
        tpot_s=Distribution.of([tpot for record in succeeded if (tpot := tpot_s(record)) is not None]),
        e2e_s=Distribution.of([record.e2e_s for record in succeeded if record.e2e_s is not None]),
        send_lag_s=Distribution.of(
            [record.sent_s - record.scheduled_s for record in records if record.scheduled_s is not None]
        ),
        cap_waits=sum(run.cap_waits for run in runs),
    )


def _rate_window(run: RunResult, warmup_s: float) -> tuple[float, float]:
    """(start, end) in run time: warm-up to end of sending, or first send to last end without one."""
    if run.send_end_s > warmup_s:
        return warmup_s, run.send_end_s
    counted = [record for record in run.records if record.sent_s >= warmup_s]
    if not counted:
        return 0.0, 0.0
    first_send = min(record.sent_s for record in counted)
    return first_send, max(record.sent_s + (record.e2e_s or 0.0) for record in counted)


def _tokens_between(record: RequestRecord, start: float, end: float) -> int:
    """Content tokens of ``record`` received within [start, end] (run time)."""
    if record.ttft_s is None:
        return 0
    first = record.sent_s + record.ttft_s
    arrivals = first + np.concatenate(([0.0], np.cumsum(np.frombuffer(record.itl_s, dtype=float))))
    return int(np.count_nonzero((arrivals >= start) & (arrivals <= end)))


def write_json(path: Path, summaries: Sequence[Summary], *, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``{"runs": [summary, ...], **extra}`` as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"runs": [summary.as_dict() for summary in summaries], **(extra or {})}
    path.write_text(json.dumps(document, indent=2) + "\n")


def cdf_points(values: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their cumulative fractions, ready for a step plot."""
    data = np.sort(np.asarray(values, dtype=float))
    return data, np.arange(1, data.size + 1) / max(data.size, 1)


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn in this environment, with the command that fixes it; None when
    they can. The CLIs ask before a run, not after minutes of it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return (f"plots need matplotlib ({exc}), which ChatFleet's bench extra installs: "
                "`python3 -m pip install -e '.[bench]'` in a ChatFleet checkout, "
                "`python3 -m pip install 'chatfleet[bench]'` elsewhere")
    return None


def plot_runs(
    path: Path, runs: Sequence[tuple[RunResult, Summary]], *, title: str, warmup_s: float = 0.0
) -> None:
    """One PNG: TTFT and inter-token-latency CDFs of every run (requests sent from ``warmup_s``, as
    in the summary), and each run's output throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft_axes, itl_axes, throughput_axes) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run, summary in runs:
        ttfts = [record.ttft_s for record in run.records if record.ok and record.ttft_s is not None]
        ttft_axes.step(*cdf_points(ttfts), where="post", label=summary.label)
        gaps = [
            np.frombuffer(record.itl_s, dtype=float) for record in run.records if record.ok and record.itl_s
        ]
        if gaps:
            itl_axes.step(*cdf_points(np.concatenate(gaps) * 1000), where="post", label=summary.label)
    ttft_axes.set(xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF")
    itl_axes.set(xlabel="inter-token latency (ms)", ylabel="fraction of gaps", title="ITL CDF")
    labels = [summary.label for _, summary in runs]
    throughput_axes.bar(range(len(runs)), [summary.output_throughput for _, summary in runs])
    throughput_axes.set_xticks(range(len(runs)), labels, rotation=30, ha="right")
    throughput_axes.set(ylabel="output tokens/s", title="throughput")
    for axes in (ttft_axes, itl_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_table(summaries: Sequence[Summary], *, title: str = "benchmark") -> Table:
    """Metrics down, one column per run, so that runs compare side by side in a narrow terminal."""
    table = Table(title=title)
    table.add_column("metric")
    for summary in summaries:
        table.add_column(summary.label, justify="right")
    rows: list[tuple[str, Callable[[Summary], str]]] = [
        ("requests sent", lambda s: str(s.requests)),
        ("succeeded", lambda s: str(s.succeeded)),
        ("429 rejected", lambda s: str(s.rejected_429)),
        ("other errors", lambda s: str(sum(n for error, n in s.errors.items() if error != "http_429"))),
        ("requests/s", lambda s: f"{s.request_throughput:.2f}"),
        ("output tokens/s", lambda s: f"{s.output_throughput:.0f}"),
        ("goodput requests/s", lambda s: f"{s.goodput:.2f}"),
        ("SLO attainment", lambda s: f"{s.slo_attainment:.1%}"),
    ]
    for name, unit, scale in (
        ("TTFT", "ms", 1000),
        ("ITL", "ms", 1000),
        ("TPOT", "ms", 1000),
        ("e2e", "s", 1),
    ):
        attribute = f"{name.lower()}_s"
        for statistic in ("mean", "p50", "p90", "p99"):
            rows.append((f"{name} {statistic} ({unit})", _formatter(attribute, statistic, scale)))
    if any(summary.send_lag_s for summary in summaries):
        rows.append(("send lag p99 (ms)", _formatter("send_lag_s", "p99", 1000)))
    for name, cell in rows:
        table.add_row(name, *(cell(summary) for summary in summaries))
    return table


def _formatter(attribute: str, statistic: str, scale: float) -> Callable[[Summary], str]:
    def cell(summary: Summary) -> str:
        distribution: Distribution | None = getattr(summary, attribute)
        return f"{getattr(distribution, statistic) * scale:.1f}" if distribution else "-"

    return cell
