"""What one request costs the pod's admission coordinator, in CPU and in time to a slot.

The same fixed workload runs twice, interleaved over rounds: requests through a local
``AdmissionController`` (one gateway process), and through ``PodAdmission`` to an
``AdmissionCoordinator`` in its own process over a Unix socket (what a worker does with
``server.workers`` above 1). Workload: ``--requests`` requests from ``--concurrency`` loops, each
enqueue -> wait for the slot -> one loop turn holding it -> release, against 64 slots; at
concurrency 1 every message is its own read and write, at 64 they share them. The cost
is CPU time (utime + stime from /proc) of the worker process plus the coordinator's, per request,
minus the local run's; the time to a slot is enqueue-to-grant, p50 and p99.

Usage: python bench/pod_admission/run.py [--rounds 3] [--requests 20000] [--concurrency 1,64]
       [--out docs/benchmarks/pod-admission.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLOTS = 64

COORDINATOR = """
import asyncio, sys
from chatfleet.serving.admission import AdmissionController
from chatfleet.serving.pod_coordinator import AdmissionCoordinator
async def main():
    coordinator = AdmissionCoordinator(AdmissionController(slots={slots}, max_queue=100000,
                                                           max_queue_wait_s=600), sys.argv[1])
    await coordinator.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def workload(admission, requests: int, concurrency: int) -> list[float]:  # type: ignore[no-untyped-def]
    from chatfleet.serving.admission import Priority

    waits: list[float] = []
    left = requests

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            ticket = admission.enqueue(Priority.INTERACTIVE)
            await ticket.wait()
            waits.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
            ticket.release()

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return waits


async def run_local(requests: int, concurrency: int) -> tuple[float, list[float]]:
    from chatfleet.serving.admission import AdmissionController

    admission = AdmissionController(slots=SLOTS, max_queue=100000, max_queue_wait_s=600)
    before = cpu_seconds(os.getpid())
    waits = await workload(admission, requests, concurrency)
    return cpu_seconds(os.getpid()) - before, waits


async def run_pod(requests: int, concurrency: int) -> tuple[float, list[float]]:
    from chatfleet.serving.pod_admission import PodAdmission

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "admission.sock")
        coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR.format(slots=SLOTS), path],
                                       stdout=subprocess.PIPE, text=True)
        try:
            assert coordinator.stdout is not None and coordinator.stdout.readline().strip() == "ready"
            handle = PodAdmission(max_queue=100000)
            await handle.connect(path)
            before = cpu_seconds(os.getpid()) + cpu_seconds(coordinator.pid)
            waits = await workload(handle, requests, concurrency)
            await asyncio.sleep(0.05)  # the last releases reach the coordinator
            spent = cpu_seconds(os.getpid()) + cpu_seconds(coordinator.pid) - before
            await handle.aclose()
        finally:
            coordinator.kill()
            coordinator.wait()
    return spent, waits


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", default="1,64",
                        help="comma-separated concurrencies, each run in every round")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "pod-admission.json")
    args = parser.parse_args()

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows: dict[str, list[dict[str, float]]] = {f"{mode}@{c}": [] for c in concurrencies
                                               for mode in ("local", "pod")}
    for _ in range(args.rounds):
        for concurrency in concurrencies:
            for mode, run in (("local", run_local), ("pod", run_pod)):
                spent, waits = asyncio.run(run(args.requests, concurrency))
                rows[f"{mode}@{concurrency}"].append({
                    "cpu_us_per_request": spent / args.requests * 1e6,
                    "grant_p50_us": percentile(waits, 0.5) * 1e6,
                    "grant_p99_us": percentile(waits, 0.99) * 1e6})
    summary = {name: {key: {"median": statistics.median(r[key] for r in runs),
                            "min": min(r[key] for r in runs)} for key in runs[0]}
               for name, runs in rows.items()}
    added = {c: summary[f"pod@{c}"]["cpu_us_per_request"]["median"]
             - summary[f"local@{c}"]["cpu_us_per_request"]["median"] for c in concurrencies}
    result = {"requests": args.requests, "slots": SLOTS, "rounds": args.rounds, "runs": rows,
              "summary": summary, "coordinator_cpu_us_per_request_added": added}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:9s} CPU/request {s['cpu_us_per_request']['median']:7.1f} us (min "
              f"{s['cpu_us_per_request']['min']:.1f})  time to slot p50 {s['grant_p50_us']['median']:8.1f} us"
              f"  p99 {s['grant_p99_us']['median']:8.1f} us")
    for concurrency, cost in added.items():
        print(f"added by the coordinator at concurrency {concurrency}: {cost:.1f} us of CPU per "
              "request (worker + coordinator)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
