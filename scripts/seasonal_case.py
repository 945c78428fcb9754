"""The operator's seasonal forecast on a load it has seen before: a workday step, two days running.

The traces are an hour long, so docs/autoscaling.md's table never lets the policy look back a
day. Here the load is generated (sim/arrivals.py): a night rate, a step up at 09:00 and down at
18:00, two days, with the conv trace's request lengths, on the same L4 fleet as the table. The
HPA sees the 09:00 step only when the queue forms; the operator on day 2 has day 1 in its history
and raises the floor one cold start before 09:00. Reported: the whole run, and the half hour after
each day's step. Seeds fixed.

    python scripts/seasonal_case.py --out docs/autoscaling/seasonal.json    # about 6 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from chatfleet.autoscale.policy import DAY_S
from chatfleet.bench.workload import EmpiricalLengths, load_trace
from chatfleet.engines.engine_model import load_profile
from chatfleet.sim.arrivals import RateShape, shaped_arrivals
from chatfleet.sim.experiment import for_requests
from chatfleet.sim.report import meets_slo, scored_arrivals

ROOT = Path(__file__).resolve().parents[1]
CONV_L4_SLOTS = 16
"""What `chatfleet simulate` tunes for conv on llama-3-8b-l4 (docs/autoscaling.md, Slots and capacity)."""
START_H, END_H = 9.0, 18.0


def workday(night: float, day: float) -> RateShape:
    def rate(t: float) -> float:
        hour = (t % DAY_S) / 3600
        return day if START_H <= hour < END_H else night
    return RateShape(rate, max(night, day), f"{night:g} req/s, {day:g} req/s 09:00-18:00")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--night", type=float, default=0.3)
    parser.add_argument("--day", type=float, default=3.0)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--cold-start", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = load_trace(ROOT.parent / "shared/traces/azure2023_conv.csv")
    lengths = EmpiricalLengths.from_trace(rows)
    requests = list(shaped_arrivals(workday(args.night, args.day), duration_s=args.days * DAY_S,
                                    lengths=lengths, seed=0).arrivals)
    # The table's conv fleet: L4s with the slots sim/capacity.py tunes for conv's lengths.
    experiment = for_requests(requests, lengths=lengths, cold_start_s=args.cold_start,
                              profile=load_profile("llama-3-8b-l4"), hpa_dir=ROOT / "hpa",
                              engine_slots=CONV_L4_SLOTS)
    print(f"{len(requests)} requests over {args.days} days, {args.night:g} -> {args.day:g} req/s "
          f"at 09:00, cold start {args.cold_start:g} s (L4, {CONV_L4_SLOTS} slots, "
          f"{experiment.replica_capacity:.2f} req/s per replica)")
    results, out = {}, {}
    for policy in ("oracle", "hpa", "operator"):
        started = time.perf_counter()
        results[policy] = experiment.run(policy)
        report = experiment.report(policy, results[policy], results.get("oracle"))
        met = meets_slo(results[policy], experiment.slo)
        arrived = scored_arrivals(results[policy])
        after_step = []
        for day in range(args.days):
            step = day * DAY_S + START_H * 3600
            window = [m for at, m in zip(arrived, met, strict=True) if step <= at < step + 1800]
            after_step.append(sum(window) / len(window))
        out[policy] = {**report.as_dict(), "slo_after_step_by_day": after_step,
                       "wall_s": round(time.perf_counter() - started, 1)}
        print(f"{policy:>9}: SLO {report.slo_attainment:.1%}, {report.gpu_seconds_vs_oracle:.2f}x "
              f"oracle GPU-s; first 30 min after 09:00 by day: "
              f"{', '.join(f'{v:.1%}' for v in after_step)} ({out[policy]['wall_s']} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"night": args.night, "day": args.day, "days": args.days,
                                        "cold_start_s": args.cold_start, "policies": out},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
