"""``chatfleet simulate``: replay a trace against a fleet under each autoscaling policy, compare.

Each policy runs the same arrivals through the same fleet model (sim/fleet.py): ``static`` (the
fleet sized for the peak), ``hpa`` (the chart's HPA, hpa/hpa.yaml), ``keda`` (the chart's
ScaledObject), ``operator`` (the HPA with the operator policy's floor) and ``oracle`` (sized for
the coming peak, knowing the future). Per-replica capacity is measured on one simulated pod
first (sim/capacity.py). ``--routing`` picks how the Service spreads requests over the ready pods:
``random`` (kube-proxy) or ``epp`` (the endpoint picker's scoring on polled load, sim/picker.py).
Requests the engine can never serve (over ``--max-model-len`` or its whole KV cache) are counted
in their own ``invalid`` column and miss the SLO unless ``--exclude-invalid``. Prints a table,
writes a JSON report and optional PNG plots.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from chatfleet.bench.report import matplotlib_missing
from chatfleet.bench.workload import load_trace
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.experiment import POLICIES, prepare
from chatfleet.sim.fleet import FleetResult
from chatfleet.sim.picker import ROUTINGS, Routing
from chatfleet.sim.report import PolicyReport, Slo

__all__ = ["POLICIES", "ROUTINGS", "simulate_command"]

_ROOT = Path(__file__).resolve().parents[3]
_console = Console(width=140)  # the table is wider than a pipe's default 80 columns


def _ttft_p95(result: FleetResult, window_s: float) -> tuple[list[float], list[float]]:
    """TTFT p95 of the requests answered in each window (by arrival), minutes and seconds."""
    by_window: dict[int, list[float]] = {}
    for at, ttft in zip(result.arrival_s, result.ttft_s, strict=True):
        if not math.isnan(ttft):
            by_window.setdefault(int(at // window_s), []).append(ttft)
    windows = sorted(by_window)
    p95 = [sorted(by_window[w])[int(0.95 * (len(by_window[w]) - 1))] for w in windows]
    return [(w + 0.5) * window_s / 60 for w in windows], p95


def _plot(results: dict[str, FleetResult], directory: Path, title: str, ttft_slo_s: float) -> Path:
    """Replicas (ready solid, desired dashed) with the load, queued requests, TTFT p95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    figure, (replicas, queue, ttft) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for index, (name, result) in enumerate(results.items()):
        color = f"C{index}"
        times = [p.at / 60 for p in result.timeline]
        replicas.step(times, [p.ready for p in result.timeline], where="post", color=color,
                      label=f"{name} ready")
        replicas.step(times, [p.desired for p in result.timeline], where="post", color=color,
                      linestyle="--", linewidth=0.8)
        queue.plot(times, [p.queued for p in result.timeline], color=color, label=name)
        ttft.plot(*_ttft_p95(result, 60.0), color=color, label=name)
    first = next(iter(results.values()))
    load = replicas.twinx()
    load.plot([p.at / 60 for p in first.timeline], [p.arrival_rate for p in first.timeline],
              color="grey", alpha=0.4)
    load.set_ylabel("arrivals (req/s, grey)")
    replicas.set_ylabel("replicas (ready; desired dashed)")
    queue.set_ylabel("queued requests")
    ttft.axhline(ttft_slo_s, color="black", linestyle=":", linewidth=0.8)
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT p95 per minute (s)")
    ttft.set_xlabel("minutes")
    for axes in (replicas, queue, ttft):
        axes.legend(loc="upper left", fontsize=7)
    replicas.set_title(title)
    figure.tight_layout()
    path = directory / "replicas-queue-ttft.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def simulate_command(
    trace: Annotated[Path, typer.Option(exists=True, dir_okay=False, help=(
        "Trace CSV (arrived_at, num_prefill_tokens, num_decode_tokens) or Mooncake JSON lines "
        "(timestamp ms, input_length, output_length, hash_ids: prompt block ids for the prefix "
        "cache). A 19-minute one: examples/traces/azure2023_conv_ramp.csv in a ChatFleet checkout."))],
    speed: Annotated[float, typer.Option(min=0.01, help="Trace time is divided by this.")] = 1.0,
    cold_start: Annotated[float, typer.Option(min=0, help="Seconds from a new pod to ready.")] = 120.0,
    policies: Annotated[str, typer.Option(help=f"Comma-separated, from {', '.join(POLICIES)}.")] = ",".join(POLICIES),
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Write PNG plots into this folder.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    duration: Annotated[float | None, typer.Option(min=1, help="Simulate only this many seconds of (sped-up) trace.")] = None,
    profile: Annotated[str, typer.Option(help=(
        "Engine profile of every replica; the default is fitted to an H200 measurement."))] = "llama-3.1-8b-h200",
    max_model_len: Annotated[int | None, typer.Option(
        min=1, help="Override the profile's max_model_len (prompt + output tokens).")] = None,
    exclude_invalid: Annotated[bool, typer.Option(
        "--exclude-invalid", help="Leave requests the engine can never serve out of SLO attainment "
                                  "(default: they count as missed).")] = False,
    prefix_caching: Annotated[bool, typer.Option(
        "--prefix-caching/--no-prefix-caching", help="Engines reuse cached prompt blocks of "
                                                     "requests whose trace gives hash_ids.")] = True,
    engine_slots: Annotated[int | None, typer.Option(
        min=1, help="Gateway slots = vLLM max-num-seqs; default: the fewest that reach the best "
                    "per-replica capacity.")] = None,
    slo_ttft: Annotated[float, typer.Option(
        min=0.001, help="SLO: seconds to the first token (plus --slo-ttft-per-1k-tokens).")] = 2.0,
    slo_ttft_per_1k_tokens: Annotated[float, typer.Option(
        min=0, help="SLO: seconds of TTFT allowed per 1,000 prompt tokens on top of --slo-ttft, for "
                    "long-context traffic (a 64k prompt takes seconds to prefill on an idle GPU).")] = 0.0,
    slo_tpot: Annotated[float, typer.Option(
        min=0.001, help="SLO: mean seconds per output token after the first.")] = 0.1,
    max_replicas: Annotated[int, typer.Option(min=1)] = 64,
    hpa_dir: Annotated[Path, typer.Option(help="Folder with hpa.yaml and keda-scaledobject.yaml.")] = _ROOT / "hpa",
    routing: Annotated[str, typer.Option(help=(
        "How requests are spread over the ready pods: random (a ClusterIP Service) or epp (the "
        "endpoint picker's scoring, as chatfleet epp runs it, on load polled every --poll-interval)."
    ))] = "random",
    poll_interval: Annotated[float, typer.Option(
        min=0.001, help="epp: seconds between the picker's polls of each pod's load.")] = 0.05,
    prefix_affinity: Annotated[bool, typer.Option(
        "--prefix-affinity", help="epp: send prompts that start with the same trace block to the same "
                                  "pod while it is about as loaded as the least (chatfleet epp "
                                  "--prefix-chars), so its prefix cache holds them.")] = False,
) -> None:
    """Replay a trace against the fleet under each autoscaling policy and compare them."""
    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    try:
        how = Routing(kind=routing, poll_interval_s=poll_interval, prefix_affinity=prefix_affinity)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--routing") from exc
    if plots is not None and (missing := matplotlib_missing()):
        raise typer.BadParameter(f"{missing}; or leave out --plots", param_hint="--plots")
    try:
        rows = load_trace(trace)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--trace") from exc
    try:
        engine = load_profile(profile)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc
    if max_model_len is not None:
        engine = replace(engine, max_model_len=max_model_len)
    try:
        experiment = prepare(rows, speed=speed, cold_start_s=cold_start, profile=engine,
                             hpa_dir=hpa_dir, engine_slots=engine_slots, duration_s=duration,
                             max_replicas=max_replicas, seed=seed, routing=how,
                             prefix_caching=prefix_caching, exclude_invalid=exclude_invalid,
                             slo=Slo(ttft_s=slo_ttft, tpot_s=slo_tpot,
                                     ttft_per_1k_prompt_tokens_s=slo_ttft_per_1k_tokens))
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    order = sorted(chosen, key=lambda name: name != "oracle")  # the oracle first: the others' yardstick
    results: dict[str, FleetResult] = {}
    reports: dict[str, PolicyReport] = {}
    with Progress(console=_console, transient=True) as progress:
        task = progress.add_task("simulating", total=len(order))
        for name in order:
            progress.update(task, description=f"simulating {name}")
            results[name] = experiment.run(name)
            reports[name] = experiment.report(name, results[name], results.get("oracle"))
            progress.advance(task)
    requests, capacity, engine_slots = (len(experiment.requests), experiment.replica_capacity,
                                        experiment.engine_slots)
    slo = experiment.slo
    oracle = results.get("oracle")
    hit_rate = oracle.prefix_cache_hit_rate if oracle is not None else None
    unservable = experiment.unservable_share

    table = Table(title=(
        f"{trace.name} x{speed:g}, cold start {cold_start:g} s, {requests} requests, {profile} "
        f"(max_model_len {engine.max_model_len}) with {engine_slots} slots: {capacity:.2f} req/s per "
        f"replica ({unservable:.1%} of the trace unservable, left out of it), {routing} routing"
        + (" with prefix affinity" if prefix_affinity else "")
        + ("" if hit_rate is None else f", prefix cache hits {hit_rate:.1%}")),
        caption=(f"SLO: TTFT <= {slo.ttft_s:g} s"
                 + (f" + {slo.ttft_per_1k_prompt_tokens_s:g} s per 1k prompt tokens"
                    if slo.ttft_per_1k_prompt_tokens_s else "")
                 + f", TPOT <= {slo.tpot_s * 1000:g} ms; "
                 + ("attainment over the servable requests only (--exclude-invalid)" if exclude_invalid
                    else "invalid requests (never servable) count as missed")))
    for column in ("policy", "SLO", "TTFT p99 s", "GPU-s", "vs oracle", "429s", "invalid", "peak",
                   "overshoot", "reversals/h", "reaction s", "recovery s"):
        table.add_column(column, justify="right")
    for name in chosen:
        r = reports[name]
        table.add_row(name, f"{r.slo_attainment:.1%}", _opt(r.ttft_p99_s, "{:.2f}"),
                      f"{r.gpu_seconds:,.0f}",
                      "" if r.gpu_seconds_vs_oracle is None else f"{r.gpu_seconds_vs_oracle:.2f}x",
                      str(r.rejected), str(r.invalid), str(r.peak_replicas), str(r.peak_overshoot),
                      f"{r.reversals_per_hour:.1f}", _opt(r.reaction_s), _opt(r.recovery_s))
    _console.print(table)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({
            "trace": trace.name, "speed": speed, "cold_start_s": cold_start, "seed": seed,
            "profile": profile, "max_model_len": engine.max_model_len, "engine_slots": engine_slots,
            "replica_capacity": capacity, "unservable_share": unservable,
            "prefix_caching": prefix_caching, "prefix_cache_hit_rate": hit_rate,
            "requests": requests, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                                          "ttft_per_1k_prompt_tokens_s": slo.ttft_per_1k_prompt_tokens_s,
                                          "exclude_invalid": exclude_invalid},
            "routing": {"kind": how.kind, "poll_interval_s": how.poll_interval_s,
                        "prefix_affinity": how.prefix_affinity,
                        "kv_poll_interval_s": how.kv_poll_interval_s},
            "policies": {name: reports[name].as_dict() for name in chosen}}, indent=2) + "\n")
    if plots is not None:
        path = _plot({name: results[name] for name in chosen}, plots,
                     f"{trace.name} x{speed:g}, cold start {cold_start:g} s", slo.ttft_s)
        _console.print(f"plot: {path}")


def _opt(value: float | None, form: str = "{:.0f}") -> str:
    return "-" if value is None else form.format(value)

