"""Random routing against the endpoint picker in the fleet simulator, at equal GPU-seconds.

The conversation trace (Azure 2023, one hour, ``../shared/traces``) replayed at x1.5 on L4 pods
(24 slots, the tuned figure of docs/autoscaling.md), 120 s cold start, seed 0, by default; the
code trace as docs/autoscaling.md runs it with ``--trace .../azure2023_code.csv --speed 1
--profile llama-3-8b-a100 --engine-slots 8 --name sim-routing-code``:

1. **equal fleets**: static fleets of N replicas, N from well under static-at-peak up to it, run
   to the same end (``TAIL_S`` after the last arrival; a request still running then is cut and
   misses the SLO). Both routings hold the same pods for the same time, so GPU-seconds are equal
   and SLO attainment compares directly; ``epp`` also without KV usage (a picker run without
   ``--engine-metrics-port``).
2. **one slow pod**: the same fleets with pod 0 at half speed (a degraded GPU, a noisy neighbour).
3. **the chart's HPA**: the fleet scales on its queue; GPU-seconds are reported for each routing.

Per run: SLO attainment (TTFT <= 2 s, TPOT <= 100 ms), requests that missed it, p99 TTFT of the
answered ones, 429s (and 503s), GPU-seconds; and for each routing the smallest equal fleet at
99 % or more. Writes docs/benchmarks/<name>.json and <name>.png. About 5 minutes on 2 cores for
conv (``--jobs 2``: 3).

Usage: python bench/sim_routing/compare.py [--trace PATH] [--speed 1.5] [--profile P]
       [--engine-slots N] [--name sim-routing] [--jobs 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from chatfleet.bench.workload import load_trace
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.experiment import Experiment, prepare
from chatfleet.sim.fleet import RequestOutcome, StaticReplicas, simulate
from chatfleet.sim.picker import Routing
from chatfleet.sim.report import meets_slo, ttft_quantile

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "azure2023_conv.csv"
OUT = ROOT / "docs" / "benchmarks"
COLD_START_S, SLOW_SPEED, TARGET = 120.0, 0.5, 0.99
TAIL_S = 300.0
ROUTINGS = {"random": Routing("random"), "epp": Routing("epp"),
            "epp, no KV": Routing("epp", kv_poll_interval_s=None)}


@dataclass(frozen=True)
class Case:
    fleet: str
    """``static N``, ``static N, pod 0 at 0.5x`` or ``hpa``."""
    replicas: int | None
    slow: bool
    routing: str


@dataclass(frozen=True)
class Outcome:
    slo_attainment: float
    missed: int
    ttft_p99_s: float | None
    rejected_429: int
    no_endpoint_503: int
    cut: int
    gpu_seconds: float
    wall_s: float


_experiment: Experiment | None = None


def _init(trace: Path, speed: float, profile: str, slots: int, duration_s: float | None) -> None:
    global _experiment
    _experiment = prepare(load_trace(trace), speed=speed, cold_start_s=COLD_START_S,
                          profile=load_profile(profile), hpa_dir=ROOT / "hpa", engine_slots=slots,
                          duration_s=duration_s, seed=0)


def run(case: Case) -> Outcome:
    assert _experiment is not None
    experiment = replace(_experiment, routing=ROUTINGS[case.routing])
    started = time.perf_counter()
    if case.replicas is None:
        result = experiment.run("hpa")
    else:
        end_s = max(experiment.arrivals) + TAIL_S
        config = replace(experiment.fleet_config(case.replicas), end_s=end_s)
        if case.slow:
            config = replace(config, pod_speed=lambda index: SLOW_SPEED if index == 0 else 1.0)
        result = simulate(config, experiment.requests, StaticReplicas(case.replicas))
    met = meets_slo(result, experiment.slo)
    outcomes = list(result.outcome)
    return Outcome(slo_attainment=sum(met) / len(met), missed=len(met) - sum(met),
                   ttft_p99_s=ttft_quantile(result, 0.99),
                   rejected_429=outcomes.count(RequestOutcome.REJECTED),
                   no_endpoint_503=outcomes.count(RequestOutcome.NO_ENDPOINT),
                   cut=outcomes.count(RequestOutcome.CUT),
                   gpu_seconds=result.gpu_seconds, wall_s=time.perf_counter() - started)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (slo, ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"random": "C0", "epp": "C1", "epp, no KV": "C2"}
    for slow in (False, True):
        for routing, color in styles.items():
            points = sorted((r["gpu_seconds"], r["slo_attainment"], r["ttft_p99_s"]) for r in rows
                            if r["replicas"] is not None and r["slow"] is slow
                            and r["routing"] == routing)
            if not points:
                continue
            label = f"{routing}{', pod 0 at 0.5x' if slow else ''}"
            line = "--" if slow else "-"
            gpu_hours = [p[0] / 3600 for p in points]
            slo.plot(gpu_hours, [100 * p[1] for p in points], line, color=color, marker="o",
                     markersize=3, label=label)
            ttft.plot(gpu_hours, [p[2] for p in points], line, color=color, marker="o",
                      markersize=3, label=label)
    for routing, marker in (("random", "*"), ("epp", "*")):
        hpa = next(r for r in rows if r["replicas"] is None and r["routing"] == routing)
        slo.plot([hpa["gpu_seconds"] / 3600], [100 * hpa["slo_attainment"]], marker,
                 color=styles[routing], markersize=11, label=f"{routing}, chart's HPA")
    slo.axhline(100 * TARGET, color="black", linestyle=":", linewidth=0.8)
    slo.set_ylim(bottom=max(0, slo.get_ylim()[0]))
    slo.set_xlabel("GPU-hours (static fleets of N pods)")
    slo.set_ylabel("SLO attainment (%)")
    slo.legend(fontsize=7)
    ttft.axhline(2.0, color="black", linestyle=":", linewidth=0.8)
    ttft.set_yscale("log")
    ttft.set_xlabel("GPU-hours (static fleets of N pods)")
    ttft.set_ylabel("p99 TTFT of answered requests (s)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--profile", default="llama-3-8b-l4")
    parser.add_argument("--engine-slots", type=int, default=24)
    parser.add_argument("--name", default="sim-routing", help="output file names, without suffix")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the first 10 minutes, fewer fleets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    duration_s = 600.0 if args.quick else None
    setup = (args.trace, args.speed, args.profile, args.engine_slots, duration_s)
    _init(*setup)
    assert _experiment is not None
    peak = _experiment.static_replicas
    sizes = sorted({max(1, round(peak * share)) for share in
                    ((0.6, 0.8, 1.0) if args.quick else (0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0))})
    cases = [Case(f"static {n}", n, False, routing) for n in sizes for routing in ROUTINGS]
    cases += [Case(f"static {n}, pod 0 at {SLOW_SPEED:g}x", n, True, routing)
              for n in sizes for routing in ("random", "epp")]
    cases += [Case("hpa", None, False, routing) for routing in ("random", "epp")]
    print(f"{args.trace.name} x{args.speed:g}: {len(_experiment.requests)} requests, {args.profile} "
          f"with {args.engine_slots} slots, {_experiment.replica_capacity:.3f} req/s per replica, static at peak "
          f"{peak}; {len(cases)} runs")
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, initializer=_init,
                                 initargs=setup) as pool:
            outcomes = list(pool.map(run, cases))
    else:
        outcomes = [run(case) for case in cases]
    rows = [{**asdict(case), **asdict(outcome)} for case, outcome in zip(cases, outcomes, strict=True)]
    print("| fleet | routing | SLO | missed | p99 TTFT s | 429s | 503s | cut | GPU-s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        p99 = "-" if r["ttft_p99_s"] is None else f"{r['ttft_p99_s']:.2f}"
        print(f"| {r['fleet']} | {r['routing']} | {r['slo_attainment']:.2%} | {r['missed']:,} | {p99} | "
              f"{r['rejected_429']:,} | {r['no_endpoint_503']:,} | {r['cut']:,} | {r['gpu_seconds']:,.0f} |")
    comparisons = []
    by_fleet: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_fleet.setdefault(r["fleet"], {})[r["routing"]] = r
    print("\n| fleet | SLO random -> epp | missed random / epp | p99 TTFT random / epp | "
          "GPU-s epp / random |")
    print("| --- | --- | ---: | ---: | ---: |")
    for fleet, runs in by_fleet.items():
        a, b = runs["random"], runs["epp"]
        comparison = {
            "fleet": fleet, "slo_points": 100 * (b["slo_attainment"] - a["slo_attainment"]),
            "missed_ratio": a["missed"] / b["missed"] if b["missed"] else math.inf,
            "ttft_p99_ratio": (a["ttft_p99_s"] / b["ttft_p99_s"]
                               if a["ttft_p99_s"] and b["ttft_p99_s"] else None),
            "gpu_seconds_ratio": b["gpu_seconds"] / a["gpu_seconds"]}
        comparisons.append(comparison)
        p99 = "-" if comparison["ttft_p99_ratio"] is None else f"{comparison['ttft_p99_ratio']:.2f}x"
        print(f"| {fleet} | {a['slo_attainment']:.2%} -> {b['slo_attainment']:.2%} "
              f"({comparison['slo_points']:+.2f} points) | {comparison['missed_ratio']:.2f}x | {p99} | "
              f"{comparison['gpu_seconds_ratio']:.4f} |")
    smallest = {}
    for routing in ROUTINGS:
        enough = [r for r in rows if r["replicas"] is not None and not r["slow"]
                  and r["routing"] == routing and r["slo_attainment"] >= TARGET]
        best = min(enough, key=lambda r: r["replicas"], default=None)
        smallest[routing] = None if best is None else {"replicas": best["replicas"],
                                                       "gpu_seconds": best["gpu_seconds"]}
        print(f"smallest equal fleet at >= {TARGET:.0%}, {routing}: "
              + ("none" if best is None
                 else f"{best['replicas']} pods, {best['gpu_seconds']:,.0f} GPU-s"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({
        "trace": args.trace.name, "speed": args.speed, "duration_s": duration_s,
        "profile": args.profile, "engine_slots": args.engine_slots, "cold_start_s": COLD_START_S, "seed": 0,
        "replica_capacity": _experiment.replica_capacity, "static_at_peak": peak,
        "requests": len(_experiment.requests),
        "slo": {"ttft_s": _experiment.slo.ttft_s, "tpot_s": _experiment.slo.tpot_s},
        "routings": {name: {"kind": r.kind, "poll_interval_s": r.poll_interval_s,
                            "kv_poll_interval_s": r.kv_poll_interval_s} for name, r in ROUTINGS.items()},
        "slow_pod_speed": SLOW_SPEED, "static_tail_s": TAIL_S, "runs": rows, "comparisons": comparisons,
        "smallest_fleet_at_target": {"target": TARGET, **smallest}}, indent=2) + "\n")
    plot(rows, args.out / f"{args.name}.png",
         f"Fleet simulator, {args.trace.stem} x{args.speed:g} on {args.profile}: random routing vs "
         "the endpoint picker")
    print(f"wrote {args.out / args.name}.json and .png")


if __name__ == "__main__":
    main()
