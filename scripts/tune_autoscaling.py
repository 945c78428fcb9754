"""Sweep the chart's HPA and KEDA targets on the fleet simulator; the chart's defaults come from it.

Runs, on one experiment (default: the conv trace at x1.5 on L4s, 120 s cold start, the table's
reference case in docs/autoscaling.md), the HPA and the KEDA ScaledObject with every pair of
targetQueueDepthPerPod x targetSlotUtilization below, the operator's floor over each of those
HPAs, a few operator policies over the chart's HPA, and the oracle as the cost yardstick.
Prints a table and writes the rows as JSON. The pair that meets the SLO best at the lowest cost
is what charts/chatfleet/values.yaml ships (docs/autoscaling.md says so).

    python scripts/tune_autoscaling.py --out docs/autoscaling/tuning.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from chatfleet.bench.workload import load_trace
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.experiment import hpa_with_targets, keda_with_targets, prepare

ROOT = Path(__file__).resolve().parents[1]
QUEUE_TARGETS = (8.0, 2.0)
SLOT_TARGETS = (0.9, 0.7, 0.5, 0.4, 0.3)
OPERATOR_VARIANTS = ((0.85, 600.0), (0.85, 300.0), (1.0, 600.0), (1.0, 300.0))
"""The policy's targetUtilization and lowerAfterSeconds, over the chart's HPA."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=ROOT.parent / "shared/traces/azure2023_conv.csv")
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--cold-start", type=float, default=120.0)
    parser.add_argument("--profile", default="llama-3-8b-l4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    experiment = prepare(load_trace(args.trace), speed=args.speed, cold_start_s=args.cold_start,
                         profile=load_profile(args.profile), hpa_dir=ROOT / "hpa", seed=args.seed)
    oracle = experiment.run("oracle")
    print(f"{args.trace.name} x{args.speed:g}, cold start {args.cold_start:g} s, {args.profile} "
          f"with {experiment.engine_slots} slots, {experiment.replica_capacity:.2f} req/s per replica")
    print(f"{'autoscaler':>10} {'queue/pod':>9} {'slots':>5} {'SLO':>7} {'vs oracle':>9} "
          f"{'429s':>5} {'reversals/h':>11}")
    rows = []
    for kind in ("hpa", "operator", "keda"):
        for queue in QUEUE_TARGETS:
            for slots in SLOT_TARGETS:
                started = time.perf_counter()
                if kind == "hpa":
                    scaler = experiment.hpa(hpa_with_targets(experiment.hpa_manifest, queue, slots))
                elif kind == "operator":
                    scaler = experiment.operator(hpa_with_targets(experiment.hpa_manifest, queue, slots))
                else:
                    scaler = experiment.keda(keda_with_targets(experiment.keda_manifest, queue, slots))
                report = experiment.report(kind, experiment.run(kind, scaler), oracle)
                rows.append({"autoscaler": kind, "target_queue_depth_per_pod": queue,
                             "target_slot_utilization": slots, **report.as_dict(),
                             "wall_s": round(time.perf_counter() - started, 1)})
                print(f"{kind:>10} {queue:>9g} {slots:>5g} {report.slo_attainment:>7.1%} "
                      f"{report.gpu_seconds_vs_oracle:>8.2f}x {report.rejected:>5} "
                      f"{report.reversals_per_hour:>11.1f}", flush=True)
    print(f"{'operator':>10} {'util':>9} {'lower':>5}   (over the chart's HPA)")
    for utilization, lower_after in OPERATOR_VARIANTS:
        scaler = experiment.operator(target_utilization=utilization, lower_after_s=lower_after)
        report = experiment.report("operator", experiment.run("operator", scaler), oracle)
        rows.append({"autoscaler": "operator-policy", "target_utilization": utilization,
                     "lower_after_s": lower_after, **report.as_dict()})
        print(f"{'operator':>10} {utilization:>9g} {lower_after:>5g} {report.slo_attainment:>7.1%} "
              f"{report.gpu_seconds_vs_oracle:>8.2f}x {report.rejected:>5} "
              f"{report.reversals_per_hour:>11.1f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "trace": args.trace.name, "speed": args.speed, "cold_start_s": args.cold_start,
            "profile": args.profile, "seed": args.seed, "engine_slots": experiment.engine_slots,
            "replica_capacity": experiment.replica_capacity, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
