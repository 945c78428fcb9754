"""Peer benchmark: Langchain-Chatchat 0.3.1.3 and ChatFleet, same upstream, same prompts, same KB.

One run on this machine: one ``chatfleet engine-sim`` (the LLM and /v1/embeddings) serves both;
ChatFleet's gateway (local store, embeddings from the engine-sim) and Chatchat's API
(``bench/peers/chatchat/peer.py``, its defaults: FAISS, api_concurrencies 5) each get the same
small knowledge base; then, per concurrency level, closed-loop users stream plain chat
(/chat/chat/completions) and knowledge-base chat (/chat/kb_chat) for a bounded time, and the
script prints throughput, TTFT (first chunk with content) and end-to-end p50/p95 and errors.

Usage: python bench/peers/compare.py [--quick] [--levels 1,8,32,128] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench" / "peers" / "chatchat")]

from peer import ChatchatPeer

from tests.conftest import start_engine_sim, start_gateway, upstream_env
from tests.support.procs import free_port

PROFILE = "llama-3-8b-l4"
LLM = f"chatfleet-sim/{PROFILE}"
EMBED = "chatfleet-sim/hashed-embedding"
KB = "peers"
MAX_TOKENS = 64
DOCS = {
    "admission.md": "# Admission\n\nThe gateway lets engine_slots requests through to vLLM and "
                    "holds the rest in a bounded queue; past the bound it answers 429.",
    "scaling.md": "# Scaling\n\nThe HPA scales the pods on chatfleet_queue_depth; the operator "
                  "sets the HPA's floor from a forecast one cold start ahead.",
    "drain.md": "# Drain\n\nOn SIGTERM a pod stops being ready, finishes its accepted streams and "
                "exits; new requests get 503 with Retry-After.",
}
QUESTIONS = ("What happens past the queue bound?", "What does the HPA scale on?",
             "What does a pod do on SIGTERM?", "Who sets the HPA's floor?")


@dataclass
class Level:
    system: str
    route: str
    users: int
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def row(self) -> str:
        def pct(values: list[float], q: float) -> str:
            if not values:
                return "-"
            ordered = sorted(values)
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f}"
        done = len(self.e2e)
        rate = done / self.seconds if self.seconds else 0.0
        return (f"| {self.system} | {self.route} | {self.users} | {done} | {rate:.2f} | "
                f"{pct(self.ttft, 0.5)} | {pct(self.ttft, 0.95)} | {pct(self.e2e, 0.5)} | "
                f"{pct(self.e2e, 0.95)} | {self.errors} |")


def body(route: str, i: int) -> dict:
    question = QUESTIONS[i % len(QUESTIONS)]
    if route == "kb_chat":
        return {"query": question, "kb_name": KB, "model": LLM, "max_tokens": MAX_TOKENS,
                "stream": True, "top_k": 3}
    return {"messages": [{"role": "user", "content": question}], "model": LLM,
            "max_tokens": MAX_TOKENS, "stream": True}


async def one(client: httpx.AsyncClient, path: str, payload: dict, level: Level) -> None:
    started = time.perf_counter()
    first: float | None = None
    try:
        async with client.stream("POST", path, json=payload) as response:
            if response.status_code != 200:
                level.errors += 1
                return
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        first = time.perf_counter()
    except (httpx.HTTPError, ValueError):
        level.errors += 1
        return
    if first is None:
        level.errors += 1
        return
    level.ttft.append(first - started)
    level.e2e.append(time.perf_counter() - started)


async def run_level(url: str, system: str, route: str, users: int, seconds: float) -> Level:
    level = Level(system, route, users)
    path = "/chat/kb_chat" if route == "kb_chat" else "/chat/chat/completions"
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def user(u: int) -> None:
            i = u
            while time.perf_counter() < deadline:
                await one(client, path, body(route, i), level)
                i += users

        await asyncio.gather(*(user(u) for u in range(users)))
        level.seconds = time.perf_counter() - started
    return level


def load_kb(url: str, chatchat: bool) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        create = {"knowledge_base_name": KB}
        if chatchat:
            create |= {"vector_store_type": "faiss", "embed_model": EMBED}
        assert client.post("/knowledge_base/create_knowledge_base", json=create).json()["code"] == 200
        files = [("files", (name, text.encode())) for name, text in DOCS.items()]
        answer = client.post("/knowledge_base/upload_docs", data={"knowledge_base_name": KB},
                             files=files).json()
        assert answer["data"]["failed_files"] == {}, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="levels 1 and 8, 10 s each")
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    levels = (1, 8) if args.quick else tuple(int(x) for x in args.levels.split(","))
    seconds = 10.0 if args.quick else args.seconds
    sim = start_engine_sim(profile=PROFILE, max_num_seqs=max(levels))
    gateway = start_gateway({**upstream_env(sim, admission__engine_slots=max(levels),
                                            admission__max_queue=4 * max(levels)),
                             "CHATFLEET_ENGINE__MODEL": LLM,
                             "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1,
                             "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED})
    try:
        with ChatchatPeer(upstream=sim.v1, llm=LLM, embed=EMBED, port=free_port()) as chatchat:
            systems = {"chatchat 0.3.1.3": chatchat.url, "chatfleet": gateway.url}
            for name, url in systems.items():
                load_kb(url, chatchat=name.startswith("chatchat"))
            print("| system | route | users | answers | answers/s | TTFT p50 ms | TTFT p95 ms "
                  "| e2e p50 ms | e2e p95 ms | errors |")
            print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for route in ("chat", "kb_chat"):
                for users in levels:
                    for name, url in systems.items():
                        level = asyncio.run(run_level(url, name, route, users, seconds))
                        print(level.row(), flush=True)
    finally:
        gateway.proc.terminate()
        sim.proc.terminate()


if __name__ == "__main__":
    main()
