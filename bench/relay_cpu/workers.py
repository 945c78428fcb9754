"""Relayed tokens/s with 1 and 2 ChatFleet worker processes, and what one core relays.

The relay-CPU stub (``stub.py``) paces each stream at ``--pace-ms`` (default 10 ms: one H200
decode step at batch 256, 24,700 tokens/s, shared/reference/h200-step-profile.md) and
``--streams`` (512) of them offer about 51,000 tokens/s, more than one worker relays, so the
gateway, not the stub, limits throughput (a gateway behind sends what arrived together as one
event, as it would behind a real engine); ``--tokens`` (128) tokens a stream from the aiohttp
client (``client.py``), through ``chatfleet serve``
with ``server.workers`` 1 and 2, interleaved over ``--rounds``. Per run: tokens/s (tokens over
the client's wall time), the gateway's CPU seconds (every process of its tree, from /proc) and
the share each worker spent, the stub's and the client's CPU. Per core: tokens relayed per CPU
second of the gateway, which is what one worker relays on a core of its own.

On a machine where the stub and the client share the gateway's cores (this one has two), the
2-worker run cannot have two free cores: the JSON says how much CPU the others took.
Writes docs/benchmarks/relay-workers.json and .png (``--out``).

Usage: python bench/relay_cpu/workers.py [--rounds 3] [--streams 512] [--tokens 128] [--pace-ms 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from chatfleet.bench.process_cpu import children_cpu_s
from run import REPO, Proc, rotated, run_client, start_gateway, start_stub


def one_run(workers: int, stub_url: str, streams: int, tokens: int, log_dir: Path,
            stub: Proc) -> dict[str, Any]:
    gateway, url = start_gateway("chatfleet", stub_url, streams, log_dir, workers=workers)
    try:
        before = children_cpu_s(gateway.popen.pid)
        result = run_client(gateway, stub, url, streams, tokens, timeout_s=300)
        after = children_cpu_s(gateway.popen.pid)
    finally:
        gateway.stop()
    spent = sorted((after[pid] - before.get(pid, 0.0) for pid in after), reverse=True)
    total = sum(spent) or 1.0
    return {
        "workers": workers, "ok": result["ok"], "wall_s": result["wall_s"],
        "tokens": result["tokens_received"],
        "tokens_per_s": round(result["tokens_received"] / result["wall_s"]),
        "gateway_cpu_s": result["gateway_cpu_s"],
        "tokens_per_gateway_cpu_s": round(result["tokens_received"] / result["gateway_cpu_s"]),
        "worker_cpu_share": [round(s / total, 3) for s in spent] if workers > 1 else [1.0],
        "stub_cpu_s": result["stub_cpu_s"], "client_cpu_s": result["client_cpu_s"],
    }


def plot(summary: dict[str, Any], path: Path, pace_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{w} worker{'s' if w > 1 else ''}" for w in summary]
    ax.bar(labels, [summary[w]["tokens_per_s"]["median"] for w in summary], color="#4c72b0")
    for i, w in enumerate(summary):
        ax.text(i, summary[w]["tokens_per_s"]["median"], f"{summary[w]['tokens_per_s']['median']:,.0f}/s\n"
                f"{summary[w]['tokens_per_gateway_cpu_s']['median']:,.0f} per CPU-s",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("relayed tokens/s (median)")
    ax.set_title(f"ChatFleet relayed tokens/s by worker processes, {pace_ms:g} ms pacing\n"
                 "(2-core machine, stub and client on the same cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--pace-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatfleet-workers-") as tmp:
        log_dir = Path(tmp)
        stub, stub_url = start_stub(log_dir, args.pace_ms)
        try:
            for round_ in range(args.rounds):
                for workers in rotated([1, 2], round_):
                    run = one_run(workers, stub_url, args.streams, args.tokens, log_dir, stub)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            stub.stop()

    summary: dict[int, dict[str, Any]] = {}
    for workers in (1, 2):
        mine = [r for r in runs if r["workers"] == workers and r["ok"]]
        summary[workers] = {key: {"median": statistics.median(r[key] for r in mine),
                                  "min": min(r[key] for r in mine), "max": max(r[key] for r in mine)}
                            for key in ("tokens_per_s", "tokens_per_gateway_cpu_s", "gateway_cpu_s",
                                        "stub_cpu_s", "client_cpu_s", "wall_s")}
    ratio = summary[2]["tokens_per_s"]["median"] / summary[1]["tokens_per_s"]["median"]
    per_core = summary[1]["tokens_per_gateway_cpu_s"]["median"]
    result = {"streams": args.streams, "tokens": args.tokens, "pace_ms": args.pace_ms,
              "cpus": os.cpu_count(), "runs": runs, "summary": summary,
              "two_to_one_ratio": round(ratio, 2), "tokens_per_core": per_core,
              "cores_for_25000_tokens_per_s": round(25000 / per_core, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relay-workers.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, args.out / "relay-workers.png", args.pace_ms)
    for workers, s in summary.items():
        print(f"{workers} worker(s): {s['tokens_per_s']['median']:,.0f} tokens/s (min {s['tokens_per_s']['min']:,}), "
              f"{s['tokens_per_gateway_cpu_s']['median']:,.0f} tokens per gateway CPU-second; "
              f"stub {s['stub_cpu_s']['median']:.1f} s, client {s['client_cpu_s']['median']:.1f} s CPU")
    print(f"2 workers / 1 worker: {ratio:.2f}x; one core relays {per_core:,.0f} tokens/s; "
          f"25,000 tokens/s needs {25000 / per_core:.1f} such cores")


if __name__ == "__main__":
    main()
