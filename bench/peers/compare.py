"""Peer benchmark: ChatFleet against Langchain-Chatchat 0.3.1.3, and against its engines alone.

One run on this machine, three comparisons, each on one upstream shared by both sides:

1. **peers**: one ``chatfleet engine-sim`` (the LLM and /v1/embeddings) behind both ChatFleet's
   gateway (local store, embeddings from the engine-sim) and Chatchat's API
   (``bench/peers/chatchat/peer.py``, its defaults: FAISS, api_concurrencies 5), each with the same
   small knowledge base; closed-loop users stream plain chat (/chat/chat/completions) and
   knowledge-base chat (/chat/kb_chat) with the same questions.
2. **gateway cost, engine-sim**: the same engine-sim's /v1/chat/completions directly and through
   ChatFleet's /v1/chat/completions.
3. **gateway cost, vLLM**: vLLM's CPU build (a tiny random-weight Llama, tests/support/vllm_cpu.py)
   directly and through a second ChatFleet gateway (skip with ``--no-vllm``), vLLM's processes on
   half the CPUs and the gateway and load client on the other half (``cores_apart``).

Comparisons 2 and 3 run each side in two halves, A B B A, pooled, so drift of the shared upstream
falls on both. Per concurrency level it prints answers/s, TTFT (first chunk with content) and
end-to-end p50/p95, content chunks per answer (equal when both sides' answers are as long), and
errors with their reasons; it writes docs/benchmarks/peers.json and peers.png.

Usage: python bench/peers/compare.py [--quick] [--levels 1,8,32,128] [--seconds 20] [--no-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench" / "peers" / "chatchat")]

from peer import VERSION as CHATCHAT_VERSION
from peer import ChatchatPeer

from tests.conftest import Server, start_engine_sim, start_gateway
from tests.support.procs import free_port
from tests.support.vllm_cpu import VLLMServer, ensure_vllm_env

OUT = REPO / "docs" / "benchmarks"
PROFILE = "llama-3-8b-h100"
"""engine-sim's profile: the one calibrated against published vLLM figures (docs/engine-model.md)."""
LLM = f"chatfleet-sim/{PROFILE}"
EMBED = "chatfleet-sim/hashed-embedding"
KB = "peers"
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
VLLM_LEVELS = (1, 8, 32)
"""vLLM on one CPU core: beyond 32 streams it only queues."""


@dataclass
class Level:
    """One (comparison, system, route, users) measurement."""

    comparison: str
    system: str
    route: str
    users: int
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    """Chunks with content per answer: equal on both sides when the answers are as long."""
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def merged(self, other: Level) -> Level:
        """This measurement and another of the same system, route and users, pooled."""
        return Level(self.comparison, self.system, self.route, self.users,
                     self.ttft_s + other.ttft_s, self.e2e_s + other.e2e_s, self.chunks + other.chunks,
                     self.errors + other.errors, self.seconds + other.seconds)

    @property
    def answers_per_s(self) -> float:
        return len(self.e2e_s) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {"comparison": self.comparison, "system": self.system, "route": self.route,
                "users": self.users, "answers": len(self.e2e_s), "seconds": round(self.seconds, 2),
                "answers_per_s": round(self.answers_per_s, 3),
                "ttft_ms": {"p50": pct_ms(self.ttft_s, 0.5), "p95": pct_ms(self.ttft_s, 0.95)},
                "e2e_ms": {"p50": pct_ms(self.e2e_s, 0.5), "p95": pct_ms(self.e2e_s, 0.95)},
                "content_chunks_mean": round(sum(self.chunks) / len(self.chunks), 1) if self.chunks else None,
                "errors": dict(self.errors)}


def pct_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


@dataclass(frozen=True)
class Target:
    """Where one system takes a route's requests, and the body it takes."""

    system: str
    url: str
    path: str
    body: Callable[[int], dict]


async def one(session: aiohttp.ClientSession, url: str, target: Target, i: int, level: Level) -> None:
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    try:
        async with session.post(url, json=target.body(i)) as response:
            if response.status != 200:
                level.errors[f"HTTP {response.status}: {(await response.read())[:120]!r}"] += 1
                return
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    level.errors[f"error event: {str(chunk['error'])[:120]}"] += 1
                    return
                choices = chunk.get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        level.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
        return
    if first is None:
        level.errors["no content"] += 1
        return
    level.ttft_s.append(first - started)
    level.e2e_s.append(time.perf_counter() - started)
    level.chunks.append(chunks)


async def run_level(target: Target, comparison: str, route: str, users: int, seconds: float) -> Level:
    """``users`` closed-loop users for ``seconds``; answers still streaming at the end are waited
    for and counted (the rate divides by the whole time). The client is aiohttp: httpx costs
    several ms of CPU per request at this concurrency, CPU the servers share on a small machine."""
    level = Level(comparison, target.system, route, users)
    url = target.url + target.path
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=users),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def user(u: int) -> None:
            i = u
            while time.perf_counter() < deadline:
                await one(session, url, target, i, level)
                i += users

        await asyncio.gather(*(user(u) for u in range(users)))
        level.seconds = time.perf_counter() - started
    return level


def chatchat_body(route: str, max_tokens: int) -> Callable[[int], dict]:
    def body(i: int) -> dict:
        question = QUESTIONS[i % len(QUESTIONS)]
        if route == "kb_chat":
            return {"query": question, "kb_name": KB, "model": LLM, "max_tokens": max_tokens,
                    "stream": True, "top_k": 3}
        return {"messages": [{"role": "user", "content": question}], "model": LLM,
                "max_tokens": max_tokens, "stream": True}
    return body


def openai_body(model: str, max_tokens: int) -> Callable[[int], dict]:
    """A fixed-length answer (ignore_eos), so both sides generate the same tokens."""
    def body(i: int) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    return body


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


def gateway_env(upstream_url: str, model: str, slots: int) -> dict[str, str]:
    """A gateway whose queue is never the limit: slots for every user, the engine bounds."""
    return {"CHATFLEET_ENGINE__KIND": "openai", "CHATFLEET_ENGINE__URL": upstream_url,
            "CHATFLEET_ENGINE__MODEL": model, "CHATFLEET_ADMISSION__ENGINE_SLOTS": str(slots),
            "CHATFLEET_ADMISSION__MAX_QUEUE": str(4 * slots)}


@contextmanager
def stopping(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.proc.terminate()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc), e.g. vLLM's API server, engine core and worker."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


@contextmanager
def cores_apart(engine_pid: int) -> Iterator[tuple[list[int], list[int]]]:
    """Pin the engine's processes to half the CPUs and this process (the load client, and the
    gateway it starts meanwhile) to the other half, as on a GPU node, where vLLM's CPU-side
    processes do not share cores with the gateway. vLLM's CPU build keeps its worker and engine
    core busy at 1.3-1.8 of 2 cores (top), so unpinned, the gateway measured its wait for CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus, other_cpus = cpus[:max(1, len(cpus) // 2)], cpus[max(1, len(cpus) // 2):] or cpus
    for pid in process_tree(engine_pid):
        os.sched_setaffinity(pid, engine_cpus)
    os.sched_setaffinity(0, other_cpus)
    try:
        yield engine_cpus, other_cpus
    finally:
        os.sched_setaffinity(0, cpus)


def compare(targets: list[Target], comparison: str, route: str, levels: tuple[int, ...],
            seconds: float, results: list[Level], *, interleave: bool = False) -> None:
    """Each target at each level for ``seconds``; with ``interleave``, in two halves ordered
    A B B A and pooled, so drift of a shared upstream (vLLM on CPU) falls on both sides alike."""
    for users in levels:
        order = [*targets, *reversed(targets)] if interleave else targets
        window = seconds / 2 if interleave else seconds
        pooled: dict[str, Level] = {}
        for target in order:
            level = asyncio.run(run_level(target, comparison, route, users, window))
            pooled[target.system] = pooled[target.system].merged(level) if target.system in pooled else level
        for target in targets:
            results.append(pooled[target.system])
            print_row(pooled[target.system])


def print_row(level: Level) -> None:
    s = level.summary()
    errors = "; ".join(f"{n}x {reason}" for reason, n in level.errors.items()) or "0"
    print(f"| {s['comparison']} | {s['system']} | {s['route']} | {s['users']} | {s['answers']} | "
          f"{s['answers_per_s']:.2f} | {s['ttft_ms']['p50']} | {s['ttft_ms']['p95']} | "
          f"{s['e2e_ms']['p50']} | {s['e2e_ms']['p95']} | {s['content_chunks_mean']} | {errors} |",
          flush=True)


def ratios(results: list[Level], comparison: str, base: str, other: str) -> list[dict[str, Any]]:
    """Per route and level: other's throughput over base's, and both p95 TTFTs."""
    index = {(r.comparison, r.system, r.route, r.users): r for r in results}
    rows = []
    for (comp, system, route, users), b in index.items():
        o = index.get((comp, other, route, users))
        if comp != comparison or system != base or o is None:
            continue
        rows.append({"route": route, "users": users,
                     "throughput_ratio": round(o.answers_per_s / b.answers_per_s, 2) if b.answers_per_s else None,
                     f"{base}_ttft_p95_ms": pct_ms(b.ttft_s, 0.95), f"{other}_ttft_p95_ms": pct_ms(o.ttft_s, 0.95)})
    return rows


def plot(path: Path, results: list[Level]) -> None:
    """Answers/s and p95 TTFT by users: the peer comparison's two routes, then the gateway costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(comp, route) for comp, route in dict.fromkeys((r.comparison, r.route) for r in results)]
    figure, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for column, (comp, route) in enumerate(panels):
        chosen = [r for r in results if r.comparison == comp and r.route == route]
        for system in dict.fromkeys(r.system for r in chosen):
            series = [r for r in chosen if r.system == system]
            users = [r.users for r in series]
            axes[0][column].plot(users, [r.answers_per_s for r in series], "o-", label=system)
            axes[1][column].plot(users, [(pct_ms(r.ttft_s, 0.95) or float("nan")) for r in series],
                                 "o-", label=system)
        axes[0][column].set(title=f"{comp}: {route}", ylabel="answers/s")
        axes[1][column].set(ylabel="TTFT p95 (ms)", yscale="log")
        levels = sorted({r.users for r in chosen})
        for ax in (axes[0][column], axes[1][column]):
            ax.set(xscale="log", xlabel="concurrent users")
            ax.set_xticks(levels, [str(users) for users in levels])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    figure.suptitle("ChatFleet vs Chatchat 0.3.1.3 on one engine-sim; ChatFleet vs its engines alone")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: ``kind`` of the text, above 0 (else a usage error that says so)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    return parse


def user_levels(text: str) -> tuple[int, ...]:
    """``--levels``: positive whole numbers, comma-separated, e.g. 1,8,32."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of user counts, "
                                         "e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text}: every level must be at least 1 user")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="levels 1 and 8, 8 s each")
    parser.add_argument("--levels", type=user_levels, default=(1, 8, 32, 128),
                        help="concurrent users, comma-separated (default 1,8,32,128)")
    parser.add_argument("--seconds", type=positive(float), default=20.0, help="per level")
    parser.add_argument("--max-tokens", type=positive(int), default=64, help="answer length cap")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM comparison")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    levels = (1, 8) if args.quick else args.levels
    seconds = 8.0 if args.quick else args.seconds
    results: list[Level] = []
    load_before = os.getloadavg()
    started = time.time()
    print("| comparison | system | route | users | answers | answers/s | TTFT p50 ms | TTFT p95 ms "
          "| e2e p50 ms | e2e p95 ms | chunks/answer | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    with ExitStack() as stack:
        sim = stack.enter_context(stopping(start_engine_sim(profile=PROFILE, max_num_seqs=max(levels))))
        gateway = stack.enter_context(stopping(start_gateway({
            **gateway_env(sim.v1, LLM, max(levels)),
            "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1, "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED})))
        chatchat = stack.enter_context(ChatchatPeer(upstream=sim.v1, llm=LLM, embed=EMBED, port=free_port()))
        load_kb(chatchat.url, chatchat=True)
        load_kb(gateway.url, chatchat=False)
        for route, path in (("chat", "/chat/chat/completions"), ("kb_chat", "/chat/kb_chat")):
            body = chatchat_body(route, args.max_tokens)
            compare([Target(f"chatchat {CHATCHAT_VERSION}", chatchat.url, path, body),
                     Target("chatfleet", gateway.url, path, body)], "peers", route, levels, seconds, results)
        direct = openai_body(LLM, args.max_tokens)
        compare([Target("engine-sim", sim.url, "/v1/chat/completions", direct),
                 Target("chatfleet", gateway.url, "/v1/chat/completions", direct)],
                "gateway cost (engine-sim)", "chat", levels, seconds, results, interleave=True)
    if not args.no_vllm:
        python, model_dir = ensure_vllm_env()
        vllm_levels = tuple(users for users in levels if users in VLLM_LEVELS) or levels[:2]
        with ExitStack() as stack:
            vllm = stack.enter_context(VLLMServer(python, model_dir, max_num_seqs=max(vllm_levels)))
            split = stack.enter_context(cores_apart(vllm.pid))  # before the gateway starts: it inherits
            vllm_gateway = stack.enter_context(stopping(start_gateway(
                gateway_env(vllm.base_url, vllm.served_model_name, max(vllm_levels)))))
            body = openai_body(vllm.served_model_name, args.max_tokens)
            compare([Target("vllm-cpu", vllm.root_url, "/v1/chat/completions", body),
                     Target("chatfleet", vllm_gateway.url, "/v1/chat/completions", body)],
                    "gateway cost (vLLM CPU)", "chat", vllm_levels, seconds, results, interleave=True)

    report = {
        "settings": {"levels": levels, "seconds_per_level": seconds, "max_tokens": args.max_tokens,
                     "engine_sim_profile": PROFILE, "chatchat": CHATCHAT_VERSION,
                     "vllm_levels": None if args.no_vllm else VLLM_LEVELS, "questions": QUESTIONS,
                     "vllm_cpus_vs_others": None if args.no_vllm else split},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "wall_s": round(time.time() - started)},
        "ratios": {"chatfleet_over_chatchat": ratios(results, "peers", f"chatchat {CHATCHAT_VERSION}", "chatfleet"),
                   "chatfleet_over_engine_sim": ratios(results, "gateway cost (engine-sim)", "engine-sim", "chatfleet"),
                   "chatfleet_over_vllm": ratios(results, "gateway cost (vLLM CPU)", "vllm-cpu", "chatfleet")},
        "levels": [level.summary() for level in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(args.out / "peers.png", results)
    print("\nratios (ChatFleet / baseline):")
    for name, rows in report["ratios"].items():
        for row in rows:
            print(f"  {name} {row}")
    print(f"wrote {args.out / 'peers.json'} and peers.png in {report['machine']['wall_s']} s")


if __name__ == "__main__":
    main()
