"""Gateway CPU per one-token streamed request: the fixed cost of a request, measured directly.

run.py fits the fixed cost from two answer lengths, so its fixed term carries the noise of both
per-token figures (it moved 0.36 -> 0.53 ms between its 64- and 256-stream rows in one quiet
run). Here every request asks for one token, so a request's CPU is almost all fixed cost:
admission, the route, the engine request, the response head, the role chunk, one token and the
end. ``--requests`` of them go through each target, ``--concurrency`` at a time, from this
process's aiohttp client; each target's CPU seconds (every process of its tree, /proc) are read
before and after. Targets: ChatFleet, ``chatfleet-before`` (another checkout's ``src``,
``--before``), ``python-floor`` and ``vllm-router`` (when its venv exists), interleaved over
``--rounds`` with the order rotated. Reported: ms of CPU a request per round, the median, and
each round's ratio to ``chatfleet-before`` when it runs (a ratio within one round is what this
shared machine resolves).

Usage: python bench/relay_cpu/per_request.py [--before SRC] [--rounds 5] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from chatfleet.bench.process_cpu import tree_cpu_s
from run import MODEL, Proc, peer_bin, rotated, start_gateway, start_stub

TARGETS = ("chatfleet", "chatfleet-before", "python-floor", "vllm-router")


async def one_token_requests(url: str, requests: int, concurrency: int) -> None:
    """``requests`` one-token streamed chats through ``url``, ``concurrency`` at a time, each
    read to its end; any answer but 200 stops the run."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "p"}], "max_tokens": 1,
            "stream": True}
    left = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(f"{url}/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
                async for _ in response.content.iter_any():
                    pass

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def cpu_ms_per_request(proc: Proc, url: str, requests: int, concurrency: int) -> float:
    before, _ = tree_cpu_s(proc.popen.pid)
    asyncio.run(one_token_requests(url, requests, concurrency))
    after, _ = tree_cpu_s(proc.popen.pid)
    return 1000 * (after - before) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None, help="another checkout's src directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="per target and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.rounds < 1 or args.requests < 1 or args.concurrency < 1:
        parser.error("--rounds, --requests and --concurrency must be at least 1")
    targets = [t for t in TARGETS if t != "chatfleet-before" or args.before is not None]
    if not peer_bin("vllm-router", "vllm-router").exists():
        targets.remove("vllm-router")
        print("vllm-router: no venv (bench/relay_cpu/run.py --install); skipped", file=sys.stderr)

    log_dir = Path(tempfile.mkdtemp(prefix="per-request-logs-"))
    procs: list[Proc] = []
    per_round: dict[str, list[float]] = {t: [] for t in targets}
    try:
        stub, stub_url = start_stub(log_dir)
        procs.append(stub)
        gateways: dict[str, tuple[Proc, str]] = {}
        for target in targets:
            proc, url = start_gateway(target, stub_url, 4 * args.concurrency, log_dir,
                                      args.before.resolve() if args.before else None)
            procs.append(proc)
            gateways[target] = proc, url
            asyncio.run(one_token_requests(url, 200, args.concurrency))  # opens the pools
        for round_ in range(args.rounds):
            order = rotated(targets, round_)
            for target in order:
                ms = cpu_ms_per_request(*gateways[target], args.requests, args.concurrency)
                per_round[target].append(ms)
                print(f"round {round_} {target:17s} {ms:.3f} ms CPU a request", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.stop()

    summary: dict[str, Any] = {}
    for target, values in per_round.items():
        row: dict[str, Any] = {"ms_per_request": [round(v, 4) for v in values],
                               "median_ms": round(statistics.median(values), 4)}
        if "chatfleet-before" in per_round:
            ratios = [v / b for v, b in zip(values, per_round["chatfleet-before"])]
            row["ratio_to_before"] = [round(r, 3) for r in ratios]
            row["median_ratio_to_before"] = round(statistics.median(ratios), 3)
        summary[target] = row
    print("| target | CPU a request, median | rounds (ms) | vs before, per round |")
    print("|---|---:|---|---|")
    for target, row in summary.items():
        ratios = ", ".join(f"{r:.2f}" for r in row.get("ratio_to_before", []))
        print(f"| {target} | {row['median_ms']:.3f} ms | "
              f"{', '.join(f'{v:.3f}' for v in row['ms_per_request'])} | {ratios} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"benchmark": "per-request CPU, one-token streamed chats",
                                        "requests": args.requests, "concurrency": args.concurrency,
                                        "rounds": args.rounds, "targets": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
