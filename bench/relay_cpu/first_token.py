"""Time to first token through each gateway: at rest and while it relays N other streams.

Issue 13's TTFT target (added TTFT at 256 streams <= 2 ms p50 / 10 ms p99) is read by
scripts/bench_gateway.py against engine-sim, whose decode steps (70-150 ms on the L4 profile) make
TTFT a multiple of a step: a gateway's delay of a few ms moves a request to another step, or not,
and its p99 can come out negative. Here the upstream is the relay stub (``stub.py``), whose first
token is sent as soon as the request arrives, so what a gateway adds is what is measured.

Per load level N: a background client (``client.py``, its own process) opens N streams of
``--tokens`` tokens through the target, all at once, so their tokens reach the gateway in bursts
every 20 ms as an engine's steps do; after ``--lead-s`` this process sends ``--probes`` one-token
streamed requests, one every ``--gap-ms`` (not in phase with the stub's pacing), and times each
from sending it to the first byte of text (the role chunk does not count). Targets: ``direct``
(the stub itself), ChatFleet with 1 and 2 worker processes (and ``chatfleet-before``, another
checkout's ``src`` given with ``--before``), ``python-floor`` (the bare relay on
ChatFleet's stack) and ``vllm-router`` (when its venv exists). Rounds are interleaved: in each
round every level runs every target, the order rotated. Added TTFT is a target's percentile minus
direct's, pooled over the rounds (interpolated: ``chatfleet.bench.report.Distribution``).

Writes ``docs/benchmarks/first-token.json`` and ``.png`` (``--out`` to put them elsewhere).
Usage: python bench/relay_cpu/first_token.py [--levels 0,64,256] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from chatfleet.bench.report import Distribution
from run import HERE, MODEL, REPO, Proc, peer_bin, rotated, start_gateway, start_stub

TARGETS = ("direct", "chatfleet", "chatfleet-2w", "python-floor", "vllm-router")


def stream_counts(text: str) -> list[int]:
    """``--levels``: comma-separated whole numbers of background streams, 0 or more."""
    levels = [int(n) for n in text.split(",")]
    if any(n < 0 for n in levels):
        raise ValueError(text)
    return levels


async def probe_ttfts(url: str, probes: int, gap_s: float) -> list[float]:
    """Seconds to the first text of ``probes`` one-token streams, one started every ``gap_s``."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1,
            "stream": True}

    async def one(session: aiohttp.ClientSession) -> float:
        started = time.perf_counter()
        async with session.post(f"{url}/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"probe answered {response.status}: {await response.text()}")
            first = None
            async for line in response.content:
                if first is None and b'"content":"' in line and b'"content":""' not in line:
                    first = time.perf_counter() - started
            if first is None:
                raise RuntimeError("a probe's stream had no text")
            return first

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one(session)  # a connection to reuse: the probes time requests, not TCP handshakes
        tasks = []
        for _ in range(probes):
            tasks.append(asyncio.create_task(one(session)))
            await asyncio.sleep(gap_s)
        return list(await asyncio.gather(*tasks))


def measure(url: str, level: int, *, tokens: int, lead_s: float, probes: int, gap_s: float) -> dict[str, Any]:
    """One run: ``level`` background streams of ``tokens`` through ``url``; ``lead_s`` after they
    start, ``probes`` probes ``gap_s`` apart, timed."""
    background = None
    if level:
        background = subprocess.Popen(
            [sys.executable, str(HERE / "client.py"), "--url", url, "--model", MODEL, "--streams",
             str(level), "--tokens", str(tokens), "--timeout", "120"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert background.stdin is not None and background.stdout is not None
        if background.stdout.readline().strip() != "ready":
            raise RuntimeError("the background client did not start")
        background.stdin.write("go\n")
        background.stdin.flush()
        time.sleep(lead_s)
    ttfts = asyncio.run(probe_ttfts(url, probes, gap_s))
    load: dict[str, Any] = {}
    if background is not None:
        out, _ = background.communicate(timeout=180)
        load = json.loads(out.strip().splitlines()[-1])
        if load["done"] != level:
            raise RuntimeError(f"background streams failed through {url}: {load}")
    return {"ttfts_ms": [round(1000 * t, 3) for t in ttfts], "background": load}


def summarize(runs: list[dict[str, Any]], targets: list[str], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        pooled = {t: [x for r in runs if r["target"] == t and r["level"] == level for x in r["ttfts_ms"]]
                  for t in targets}
        direct = Distribution.of(pooled["direct"])
        assert direct is not None
        for target in targets:
            ttft = Distribution.of(pooled[target])
            assert ttft is not None
            rows.append({"level": level, "target": target, "probes": ttft.count,
                         "p50_ms": round(ttft.p50, 3), "p99_ms": round(ttft.p99, 3),
                         "added_p50_ms": round(ttft.p50 - direct.p50, 3),
                         "added_p99_ms": round(ttft.p99 - direct.p99, 3)})
    return rows


def plot(path: Path, rows: list[dict[str, Any]], targets: list[str], levels: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(targets) - 1)
    for ax, key, title in ((axes[0], "added_p50_ms", "added TTFT p50"), (axes[1], "added_p99_ms", "added TTFT p99")):
        for i, target in enumerate(t for t in targets if t != "direct"):
            values = [next(r[key] for r in rows if r["level"] == level and r["target"] == target)
                      for level in levels]
            ax.bar([x + i * width for x in range(len(levels))], values, width, label=target)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(levels))], [f"{n} streams" for n in levels])
        ax.set(ylabel="ms over the stub alone", title=title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Time to first token added by each gateway (relay stub, 20 ms pacing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=stream_counts, default="0,64,256",
                        help="background streams, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=60, help="timed requests per run")
    parser.add_argument("--gap-ms", type=float, default=47.0, help="between probes (not a multiple of 20)")
    parser.add_argument("--tokens", type=int, default=256, help="per background stream (20 ms each)")
    parser.add_argument("--lead-s", type=float, default=1.0, help="background streams running before probes")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--quick", action="store_true", help="1 round, 20 probes, levels 0 and 64")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout's src: also run it as chatfleet-before (1 worker)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.probes, args.levels = 1, 20, [0, 64]
    levels = args.levels
    targets = [t for t in args.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"--targets: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    if "direct" not in targets:
        targets.insert(0, "direct")
    if args.before is not None:
        targets.insert(2, "chatfleet-before")
    skipped = {}
    if "vllm-router" in targets and not peer_bin("vllm-router", "vllm-router").exists():
        targets.remove("vllm-router")
        skipped["vllm-router"] = "no venv (bench/relay_cpu/run.py --install)"
    if args.probes * args.gap_ms / 1000 + args.lead_s > args.tokens * 0.02:
        parser.error("the background streams would end before the probes: raise --tokens")

    log_dir = Path(tempfile.mkdtemp(prefix="first-token-logs-"))
    top = max(levels) + args.probes + 16
    procs: list[Proc] = []
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        stub, stub_url = start_stub(log_dir)
        procs.append(stub)
        urls = {"direct": f"{stub_url}/v1"}
        for target in targets[1:]:
            name, workers = ("chatfleet", 2) if target == "chatfleet-2w" else (target, 1)
            proc, urls[target] = start_gateway(name, stub_url, top, log_dir,
                                               args.before.resolve() if args.before else None, workers=workers)
            procs.append(proc)
            measure(urls[target], 8, tokens=16, lead_s=0.2, probes=5, gap_s=0.047)  # opens the pools
        for round_ in range(args.rounds):
            order = rotated(targets, round_)
            for level in levels:
                for target in order:
                    run = measure(urls[target], level, tokens=args.tokens, lead_s=args.lead_s,
                                  probes=args.probes, gap_s=args.gap_ms / 1000)
                    runs.append(run | {"target": target, "level": level, "round": round_})
                    ttft = Distribution.of(run["ttfts_ms"])
                    assert ttft is not None
                    print(f"round {round_} {target:13s} {level:4d} streams: TTFT p50 {ttft.p50:7.2f} ms, "
                          f"max {ttft.max:7.2f} ms", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.stop()

    rows = summarize(runs, targets, levels)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "first-token", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "skipped": skipped, "elapsed_s": round(time.monotonic() - started, 1), "summary": rows, "runs": runs,
    }
    (args.out / "first-token.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(args.out / "first-token.png", rows, targets, levels)
    print("| streams | target | TTFT p50 | TTFT p99 | added p50 | added p99 |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['level']} | {r['target']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['added_p50_ms']:+.2f} ms | {r['added_p99_ms']:+.2f} ms |")
    print(f"wrote {args.out / 'first-token.json'} and .png ({time.monotonic() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
