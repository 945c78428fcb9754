"""Admission exactness across worker processes: a burst of streams at a pod of 2 workers.

``python -m chatfleet serve --workers 2`` with ``engine_slots=8`` and ``max_queue=16`` relays to
the relay-CPU stub (``stub.py``, 20 ms per chunk), and ``--streams`` (300) streamed requests of
``--tokens`` (32) tokens arrive at once, each on its own connection (so the kernel spreads them
over both workers). Checks, from outside:

- the stub's own count of the most streams it ever had open at once: must be <= 8;
- every request either streamed its whole answer (200, every token, ``data: [DONE]``) or was
  refused with 429 and a Retry-After header: no other status, no connection error, none lost;
- after the burst the pod's /metrics shows an empty queue and no request running.

Writes docs/benchmarks/admission-burst.json (``--out``).

Usage: python bench/relay_cpu/admission_burst.py [--streams 300] [--tokens 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from run import HOST, MODEL, REPO, Proc, free_port, start_stub


async def one(client: httpx.AsyncClient, url: str, tokens: int) -> dict[str, object]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": True}
    try:
        async with client.stream("POST", url, json=body) as response:
            text = (await response.aread()).decode()
            words = len(re.findall(r'"content":" t\d+"', text))
            return {"status": response.status_code,
                    "retry_after": response.headers.get("retry-after"),
                    "tokens": words, "done": text.rstrip().endswith("data: [DONE]")}
    except httpx.HTTPError as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


async def burst(url: str, streams: int, tokens: int) -> list[dict[str, object]]:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, url, tokens) for _ in range(streams)))


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "admission-burst.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chatfleet-burst-") as tmp:
        log_dir = Path(tmp)
        gw_port = free_port()
        stub, stub_url = start_stub(log_dir)
        gateway = None
        try:
            gateway = Proc("chatfleet", [sys.executable, "-m", "chatfleet", "serve", "--host", HOST,
                                         "--port", str(gw_port), "--workers", str(args.workers)], {
                "CHATFLEET_ENGINE__KIND": "openai", "CHATFLEET_ENGINE__URL": f"{stub_url}/v1",
                "CHATFLEET_ENGINE__MODEL": MODEL, "CHATFLEET_ADMISSION__ENGINE_SLOTS": "8",
                "CHATFLEET_ADMISSION__MAX_QUEUE": "16", "CHATFLEET_SERVER__LOG_LEVEL": "warning",
                "CHATFLEET_KB__DATA_DIR": str(log_dir / "kb")}, log_dir)
            gateway.wait_ready(f"http://{HOST}:{gw_port}/readyz", 60)
            started = time.monotonic()
            results = asyncio.run(burst(f"http://{HOST}:{gw_port}/v1/chat/completions",
                                        args.streams, args.tokens))
            elapsed = time.monotonic() - started
            stats = httpx.get(f"{stub_url}/stats").json()
            metrics = httpx.get(f"http://{HOST}:{gw_port}/metrics").text
        finally:
            if gateway is not None:
                gateway.stop()
            stub.stop()

    statuses = Counter(str(r["status"]) for r in results)
    complete = sum(1 for r in results if r["status"] == 200 and r["tokens"] == args.tokens and r["done"])
    refused_ok = sum(1 for r in results if r["status"] == 429 and r.get("retry_after"))
    result = {
        "workers": args.workers, "engine_slots": 8, "max_queue": 16, "streams": args.streams,
        "tokens": args.tokens, "seconds": round(elapsed, 2), "statuses": dict(statuses),
        "complete_answers": complete, "refused_with_retry_after": refused_ok,
        "lost": args.streams - complete - refused_ok,
        "stub_max_open": stats["max_open"], "stub_streams": stats["streams"],
        "queue_depth_after": metric(metrics, "chatfleet_queue_depth"),
        "running_after": metric(metrics, "chatfleet_requests_running"),
        "errors": sorted({str(r["error"]) for r in results if r.get("error")})[:5],
    }
    result["exact"] = (result["stub_max_open"] <= 8 and result["lost"] == 0
                       and result["queue_depth_after"] == 0 and result["running_after"] == 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["exact"] else 1)


if __name__ == "__main__":
    main()
