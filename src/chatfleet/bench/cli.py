"""``chatfleet bench``: run a load test against a local OpenAI-compatible server, or compare results.

The top-level CLI mounts ``bench_app``. ``run`` takes exactly one workload shape (``--concurrency``,
``--rate`` or ``--trace``), prints a table and optionally writes JSON and a PNG; ``compare`` prints
the table for several JSON files written by ``run --out``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from chatfleet.bench.loadgen import (
    LoadConfig,
    NonLocalTargetError,
    discover_model,
    require_local,
    run_event_loop,
    run_load,
)
from chatfleet.bench.report import (
    Slo,
    Summary,
    matplotlib_missing,
    plot_runs,
    summarize,
    summary_table,
    write_json,
)
from chatfleet.bench.workload import (
    EmpiricalLengths,
    FixedLengths,
    LengthSampler,
    Workload,
    closed_loop,
    load_trace,
    poisson,
    trace_replay,
)
from chatfleet.exits import ExitCode, fail

__all__ = ["bench_app"]

bench_app = typer.Typer(
    name="bench",
    help="Load-test a local OpenAI-compatible server (the gateway, engine-sim or vLLM): TTFT, ITL, goodput.",
    no_args_is_help=True,
)

_console = Console()


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be greater than 0, got {value:g}")
    return value


@bench_app.command("run")
def run_command(
    url: Annotated[
        str, typer.Option(help="Base URL with /v1; 127.0.0.1 or localhost only.")
    ] = "http://127.0.0.1:8000/v1",
    model: Annotated[
        str | None, typer.Option(help="Model id; default: the first one GET /models lists.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Closed loop: N workers sending back to back.")
    ] = None,
    ramp: Annotated[
        float, typer.Option(min=0.0, help="Closed loop: start the workers spread over S seconds.")
    ] = 0.0,
    rate: Annotated[
        float | None, typer.Option(callback=_positive, help="Open loop: Poisson arrivals, req/s.")
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help=(
            "Open loop: replay this trace (CSV, or Mooncake JSON lines whose hash_ids become "
            "shared prompt prefixes).")),
    ] = None,
    speed: Annotated[float, typer.Option(callback=_positive, help="Trace time is divided by this.")] = 1.0,
    trace_start: Annotated[
        float, typer.Option(min=0.0, help="Start the replay at this trace time (s).")
    ] = 0.0,
    trace_rows: Annotated[int | None, typer.Option(min=1, help="Replay at most this many rows.")] = None,
    prompt_scale: Annotated[
        float, typer.Option(min=0.0001, max=1.0, help=(
            "Trace: multiply prompt lengths and prefix blocks by this (keeps which blocks repeat)."))
    ] = 1.0,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(min=1, help="Trace: cut longer prompts, keeping their leading blocks.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(callback=_positive, help="Stop sending after S seconds.")
    ] = None,
    max_requests: Annotated[int | None, typer.Option(min=1, help="Stop after sending N requests.")] = None,
    prompt_tokens: Annotated[
        int, typer.Option(min=1, help="Prompt length (about 4 characters a token).")
    ] = 256,
    output_tokens: Annotated[
        int, typer.Option(min=1, help="Output length, exact (max_tokens + ignore_eos).")
    ] = 128,
    lengths_from: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Sample lengths from this trace's rows instead."),
    ] = None,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Open loop: cap on requests outstanding.")] = 1024,
    warmup: Annotated[
        float, typer.Option(min=0.0, help="Do not count requests sent in the first S seconds.")
    ] = 0.0,
    slo_ttft_ms: Annotated[float, typer.Option(callback=_positive, help="Goodput SLO: TTFT bound.")] = 2000.0,
    slo_tpot_ms: Annotated[
        float, typer.Option(callback=_positive, help="Goodput SLO: mean TPOT bound.")
    ] = 100.0,
    seed: Annotated[int, typer.Option(help="Seed of arrivals, sampled lengths and prompts.")] = 0,
    label: Annotated[str | None, typer.Option(help="Name of this run in tables and plots.")] = None,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Write the summary as JSON here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Write TTFT/ITL CDFs and throughput (PNG).")
    ] = None,
) -> None:
    """Send one workload and report TTFT, ITL, TPOT, e2e, throughput and goodput."""
    try:
        require_local(url)
    except NonLocalTargetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from exc
    if plot is not None and (missing := matplotlib_missing()):
        raise typer.BadParameter(f"{missing}; or leave out --plot", param_hint="--plot")
    workload = _workload(
        concurrency=concurrency,
        ramp=ramp,
        rate=rate,
        trace=trace,
        speed=speed,
        trace_start=trace_start,
        trace_rows=trace_rows,
        prompt_scale=prompt_scale,
        max_prompt_tokens=max_prompt_tokens,
        lengths=_lengths(prompt_tokens, output_tokens, lengths_from, trace),
        seed=seed,
    )
    if trace is None and duration is None and max_requests is None:
        raise typer.BadParameter(
            "--concurrency and --rate run until stopped: give --duration and/or --max-requests",
            param_hint="--duration",
        )
    config = LoadConfig(
        url=url,
        model=model or _discover_model(url),
        max_requests=max_requests,
        duration_s=duration,
        max_in_flight=max_in_flight,
        seed=seed,
    )
    result = run_event_loop(run_load(workload, config, label=label or ""))
    if result.records and all(record.status is None for record in result.records):
        errors = sorted({record.error or "no answer" for record in result.records})
        fail(f"no request reached {url} ({', '.join(errors)}): start the server, or point at it "
             "with --url", ExitCode.UNREACHABLE)
    summary = summarize(
        result, slo=Slo(ttft_s=slo_ttft_ms / 1000, tpot_s=slo_tpot_ms / 1000), warmup_s=warmup
    )
    _console.print(summary_table([summary], title=f"{summary.workload} -> {url} ({config.model})"))
    if result.cap_waits:
        _console.print(
            f"[yellow]{result.cap_waits} arrivals waited for the --max-in-flight cap ({max_in_flight})."
        )
    if out is not None:
        write_json(out, [summary])
    if plot is not None:
        plot_runs(plot, [(result, summary)], title=summary.workload, warmup_s=warmup)


@bench_app.command("compare")
def compare_command(
    results: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="JSON files from run --out.")
    ],
) -> None:
    """Print the runs of several result files side by side."""
    summaries = [
        Summary.from_dict(run) for path in results for run in json.loads(path.read_text()).get("runs", [])
    ]
    _console.print(summary_table(summaries, title="comparison"))


def _discover_model(url: str) -> str:
    """The server's first model; exits 3 when it cannot be reached, 1 when it lists none."""
    try:
        return run_event_loop(discover_model(url))
    except httpx.TransportError as exc:
        fail(
            f"cannot reach {url} to list its models ({exc or type(exc).__name__}): start the server "
            "(`chatfleet serve`, `chatfleet engine-sim` or vLLM), or point at it with --url",
            ExitCode.UNREACHABLE,
        )
    except (httpx.HTTPStatusError, ValueError) as exc:
        fail(f"could not list the models at {url}/models ({exc}): pass --model MODEL", ExitCode.REFUSED)


def _lengths(
    prompt_tokens: int, output_tokens: int, lengths_from: Path | None, trace: Path | None
) -> LengthSampler:
    if lengths_from is None:
        return FixedLengths(prompt_tokens, output_tokens)
    if trace is not None:
        raise typer.BadParameter(
            "a trace brings its own lengths; drop --lengths-from", param_hint="--lengths-from"
        )
    try:
        return EmpiricalLengths.from_trace(load_trace(lengths_from))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lengths-from") from exc


def _workload(
    *,
    concurrency: int | None,
    ramp: float,
    rate: float | None,
    trace: Path | None,
    speed: float,
    trace_start: float,
    trace_rows: int | None,
    prompt_scale: float,
    max_prompt_tokens: int | None,
    lengths: LengthSampler,
    seed: int,
) -> Workload:
    chosen = [
        name
        for name, value in (("--concurrency", concurrency), ("--rate", rate), ("--trace", trace))
        if value
    ]
    if len(chosen) != 1:
        raise typer.BadParameter(
            f"give exactly one of --concurrency, --rate and --trace (got {', '.join(chosen) or 'none'})"
        )
    if trace is None and (speed != 1.0 or trace_start or trace_rows is not None or prompt_scale != 1.0
                          or max_prompt_tokens is not None):
        raise typer.BadParameter(
            "--speed, --trace-start, --trace-rows, --prompt-scale and --max-prompt-tokens apply to "
            "--trace only")
    if concurrency is None and ramp:
        raise typer.BadParameter("--ramp applies to --concurrency only")
    if concurrency is not None:
        return closed_loop(concurrency=concurrency, lengths=lengths, seed=seed, ramp_s=ramp)
    if rate is not None:
        return poisson(rate_per_s=rate, lengths=lengths, seed=seed)
    assert trace is not None
    try:
        return trace_replay(load_trace(trace), speed=speed, start_s=trace_start, max_rows=trace_rows,
                            prompt_scale=prompt_scale, max_prompt_tokens=max_prompt_tokens)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--trace") from exc
