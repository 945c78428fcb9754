"""ChatFleet's own CPU per streamed request and per token, in one process, without sockets.

run.py and per_request.py read a gateway's CPU from /proc while a client, the stub and the
kernel's TCP share the machine with it: the figure that matters for a pod, and one that moves by
tens of percent on a shared machine. This calls the ASGI app directly, as uvicorn would, with an
engine that feeds the upstream parser (``engines/upstream_wire.UpstreamStream``) the bytes of a
vLLM stream (a role chunk, one chunk per token, the finish, the usage, ``[DONE]``), so what it
measures is ChatFleet's code alone: the middlewares, routing, validation, admission, the parse of
the engine's chunks, formatting, framing, metrics and the access-log middleware (no line written:
logging stays at Python's default, warning, as run.py runs ChatFleet); not uvicorn's HTTP parsing,
aiohttp's reads or the event loop's I/O, which python-floor in run.py prices. Its figures move
by a few percent between runs, so it resolves small changes, and it runs on any interpreter the
project's dependencies are installed in.

Each target is a Python interpreter and a ``src`` directory (``--target NAME=PYTHON[:SRC]``; by
default this interpreter and this checkout): two checkouts, or two interpreters, side by side.
Every round runs every target in a fresh process of its own, the order rotated; a process
streams ``--requests`` chats of 1 token and as many of ``--tokens`` (warmed up first) and reports
the CPU (``time.process_time``) a request of each. Per token is the difference over the extra
tokens, fixed the rest. Reported: the median over rounds, and each round's ratio to the first
target. Writes ``docs/benchmarks/in-process.json`` and ``.png`` (``--out`` for elsewhere).

Usage: python bench/relay_cpu/in_process.py [--target NAME=PYTHON[:SRC]]... [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import REPO, rotated

MODEL = "in-process"


@dataclass(frozen=True)
class Target:
    name: str
    python: str
    src: Path

    @classmethod
    def parse(cls, text: str) -> Target:
        """``NAME=PYTHON[:SRC]``; SRC defaults to this checkout's ``src``."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PYTHON[:SRC]")
        python, _, src = rest.partition(":")
        return cls(name, python, Path(src) if src else REPO / "src")


# --- one measuring process ------------------------------------------------------------------------


def upstream_events(tokens: int) -> list[bytes]:
    """The SSE events of a vLLM chat stream of ``tokens`` one-word tokens, one event per read."""
    head = (f'data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
            f'"model":"{MODEL}","choices":[{{"index":0,"delta":').encode()
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
    events = [head + b'{"role":"assistant","content":""}' + tail]
    events += [head + b'{"content":" w%d"}' % i + tail for i in range(tokens)]
    events.append(head + b'{},"logprobs":null,"finish_reason":"length"}]}\n\n')
    events.append(b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
                  b'"model":"' + MODEL.encode() + b'","choices":[],"usage":{"prompt_tokens":8,'
                  b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (tokens, tokens + 8))
    events.append(b"data: [DONE]\n\n")
    return events


class ReplayEngine:
    """An engine whose upstream is a recorded stream: ``generate`` feeds ``upstream_events`` to
    the parser an ``OpenAICompatEngine`` uses, a read per event, with no socket in between."""

    kind = "openai"

    def __init__(self) -> None:
        self._events: dict[int, list[bytes]] = {}

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def list_models(self) -> list[str]:
        return [MODEL]

    async def metrics_exposition(self) -> None:
        return None

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        from chatfleet.engines.upstream_wire import UpstreamStream

        tokens = request.max_tokens
        events = self._events.get(tokens) or self._events.setdefault(tokens, upstream_events(tokens))
        stream = UpstreamStream(chat=request.is_chat)
        for piece in events:
            delta = stream.feed(piece)
            if delta is not None:
                yield delta
            if stream.done:
                break
        yield stream.finish()


async def stream_one(app: Any, body: bytes) -> None:
    """One streamed chat through the ASGI app, read to its end, as uvicorn would drive it."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    statuses: list[int] = []
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.shield(ended)  # several tasks may wait here; one leaving must not cancel it
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif not message.get("more_body") and not ended.done():
            ended.set_result(None)

    path = "/v1/chat/completions"
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000), "state": {}, "extensions": {},
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), (b"user-agent", b"in-process")]}
    await loop.create_task(app(scope, receive, send))  # a task per request, as uvicorn runs it
    if statuses != [200]:
        raise RuntimeError(f"the app answered {statuses}, not one 200")


async def measure(requests: int, tokens: int) -> dict[str, Any]:
    """CPU ms a request at 1 and at ``tokens`` tokens, in this process."""
    from chatfleet.api.sse import DirectBodySend
    from chatfleet.app import create_app
    from chatfleet.settings import Settings

    app = create_app(Settings(), engine=ReplayEngine())
    served = DirectBodySend(app)  # what ``chatfleet serve`` hands uvicorn
    up, down = asyncio.Event(), asyncio.Event()

    async def lifespan() -> None:  # in a task of its own, as uvicorn runs it
        async with app.router.lifespan_context(app):
            up.set()
            await down.wait()

    hosting = asyncio.create_task(lifespan())
    await up.wait()
    ms: dict[str, float] = {}
    try:
        for length in (1, tokens):
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": length, "stream": True}).encode()
            for _ in range(max(50, requests // 10)):
                await stream_one(served, body)
            started = time.process_time()
            for _ in range(requests):
                await stream_one(served, body)
            ms[str(length)] = (time.process_time() - started) / requests * 1e3
    finally:
        down.set()
        await hosting
    return {"python": platform.python_version(), "ms_per_request": ms}


def measure_main(requests: int, tokens: int) -> None:
    # The settings come from the environment: the model served, and a data directory of its own.
    with tempfile.TemporaryDirectory() as data:
        os.environ.update({"CHATFLEET_KB__DATA_DIR": data, "CHATFLEET_ENGINE__MODEL": MODEL})
        import uvloop
        print(json.dumps(uvloop.run(measure(requests, tokens))))


# --- the interleaved run --------------------------------------------------------------------------


def run_target(target: Target, requests: int, tokens: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target.src), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([target.python, str(Path(__file__).resolve()), "--measure", "--requests",
                          str(requests), "--tokens", str(tokens)], env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{target.name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    one, many = result["ms_per_request"]["1"], result["ms_per_request"][str(tokens)]
    per_token_us = (many - one) / (tokens - 1) * 1e3
    return {"python": result["python"], "per_token_us": per_token_us,
            "fixed_us": one * 1e3 - per_token_us, "ms_per_request": result["ms_per_request"]}


def plot(path: Path, summary: list[dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [f"{row['target']}\n(Python {row['python']})" for row in summary]
    for ax, key, title in ((axes[0], "fixed_us", "fixed CPU a request (µs)"),
                           (axes[1], "per_token_us", "CPU a token (µs)")):
        ax.bar(names, [row[key] for row in summary], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("ChatFleet's own CPU, in one process, no sockets (median over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Target.parse, action="append", default=[],
                        help="NAME=PYTHON[:SRC], repeatable (default: this Python, this checkout)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000, help="per answer length, per round")
    parser.add_argument("--tokens", type=int, default=257, help="the longer answer's tokens (>= 2)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be 2 or more")
    if args.measure:
        measure_main(args.requests, args.tokens)
        return
    targets: list[Target] = args.target or [Target("chatfleet", sys.executable, REPO / "src")]
    if len({t.name for t in targets}) != len(targets):
        parser.error("target names must differ")
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for target in rotated(targets, round_):
            row = {"round": round_, "target": target.name, **run_target(target, args.requests, args.tokens)}
            rows.append(row)
            print(f"round {round_} {target.name:16s} Python {row['python']:8s} fixed "
                  f"{row['fixed_us']:6.1f} µs  per token {row['per_token_us']:5.2f} µs", file=sys.stderr)
    first = targets[0].name
    summary = []
    for target in targets:
        mine = [r for r in rows if r["target"] == target.name]
        ratios = [r["per_token_us"] / next(b["per_token_us"] for b in rows
                                           if b["round"] == r["round"] and b["target"] == first)
                  for r in mine]
        summary.append({"target": target.name, "python": mine[0]["python"], "src": str(target.src),
                        "fixed_us": statistics.median(r["fixed_us"] for r in mine),
                        "per_token_us": statistics.median(r["per_token_us"] for r in mine),
                        f"per_token_vs_{first}": [round(x, 3) for x in ratios]})
    print("| target | Python | fixed CPU a request | CPU a token | per token vs " + first + ", per round |")
    print("|---|---|---:|---:|---|")
    for row in summary:
        print(f"| {row['target']} | {row['python']} | {row['fixed_us']:.1f} µs | "
              f"{row['per_token_us']:.2f} µs | {', '.join(f'{x:.2f}' for x in row[f'per_token_vs_{first}'])} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "in-process.json").write_text(json.dumps(
        {"benchmark": "ChatFleet's own CPU, in one process (bench/relay_cpu/in_process.py)",
         "requests": args.requests, "tokens": args.tokens, "rounds": args.rounds,
         "machine": platform.machine(), "cpus": os.cpu_count(), "summary": summary, "rows": rows},
        indent=1) + "\n")
    plot(args.out / "in-process.png", summary)
    print(f"wrote {args.out / 'in-process.json'} and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
