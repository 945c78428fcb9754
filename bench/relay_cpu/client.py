"""The load client of the relay-CPU benchmark (bench/relay_cpu/run.py), in a process of its own.

Imports, connects nothing, prints ``ready`` and waits for a line on stdin; then opens ``--streams``
concurrent streaming chat completions of ``--tokens`` tokens at once against ``--url`` (an OpenAI
base URL on 127.0.0.1, ``.../v1``), reads them to the end and prints one JSON line: streams that
ended with ``data: [DONE]`` and HTTP 200, tokens received (words of the content: the stub's tokens
are one word each, so a gateway that coalesces deltas counts the same), errors by kind, wall time
and this process's own CPU seconds over the workload. The caller reads the gateway's CPU from /proc
between ``go`` and that line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter

import aiohttp


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one(session: aiohttp.ClientSession, url: str, model: str, tokens: int) -> tuple[int, bool, str | None]:
    body = {"model": model, "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Count for me."}]}
    words, done = 0, False
    try:
        async with session.post(url + "/chat/completions", json=body) as response:
            if response.status != 200:
                return 0, False, f"http_{response.status}"
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    if done:
                        return words, False, "data_after_done"
                    event = json.loads(payload)
                    if "error" in event:
                        return words, False, "error_event"
                    for choice in event.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            words += len(content.split())
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return words, False, type(exc).__name__
    return words, done, None if done else "no_done"


async def run(url: str, model: str, streams: int, tokens: int, timeout_s: float,
              api_key: str | None) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu0, t0 = cpu_s(), time.monotonic()
        results = await asyncio.gather(*(one(session, url, model, tokens) for _ in range(streams)))
        wall, cpu = time.monotonic() - t0, cpu_s() - cpu0
    errors = Counter(error for _, _, error in results if error)
    return {
        "streams": streams,
        "tokens_asked": tokens,
        "done": sum(1 for _, done, error in results if done and not error),
        "tokens_received": sum(words for words, _, _ in results),
        "errors": dict(errors),
        "wall_s": round(wall, 4),
        "client_cpu_s": round(cpu, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--api-key-env", default=None, help="a variable holding a bearer token to send")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        sys.exit("the client only targets 127.0.0.1")
    result = asyncio.run(run(args.url, args.model, args.streams, args.tokens, args.timeout,
                             os.environ.get(args.api_key_env) if args.api_key_env else None))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
