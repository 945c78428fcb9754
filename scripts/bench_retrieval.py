"""Retrieval quality on ChatFleet's own docs: recall@1/3/5 and MRR of each retrieval variant.

Reproduce: ``python scripts/bench_retrieval.py`` (about a minute). It reads the labelled questions
of ``tests/fixtures/retrieval_labels.jsonl`` (each: a question, and the file and phrase of the
chunk that answers it; tests/fixtures/README.md says how they were made) and the docs they are
about, as they are in this checkout: README.md and docs/*.md except docs/benchmarks.md, which
quotes the questions. For each variant it makes a fresh store, uploads those files through the
gateway's own ingestion (``Ingestor``: loaders and splitting in a worker process, chunk size 750 /
overlap 150, then ``put_file``) and asks every question through its ``Retriever`` (top 10, the
default score threshold). A retrieved chunk answers when it comes from the label's file and
contains the label's phrase (whitespace collapsed), so chunk boundaries may move.

Variants: the lexical analyzer before this benchmark (bm25s's tokens and stopwords,
``BM25S_DEFAULTS``), the same with stemming and a larger stopword list, and the default
(``ANALYZER``: that plus headings and lead-in labels); each alone (lexical: what a gateway
without ``kb.embeddings.url`` does) and fused with dense search (hybrid); on the local store
(BM25) and on pgvector (PostgreSQL full-text rank). The dense vectors are engine-sim's
``/v1/embeddings``: feature-hashed words, NOT a language model and with no notion of meaning, so
the hybrid rows measure the fusion with a weak lexical-ish signal, not what a real embedding model
would add. "dense alone" is that signal by itself. Each variant is also asked the README's sample
question, "How does admission work?", over a KB holding README.md alone, as the README's curl
example builds it.

Writes ``docs/benchmarks/retrieval-quality.json`` (per variant and per question) and
``retrieval-quality.png``; prints the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bm25s.stopwords import STOPWORDS_EN_PLUS

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # tests.support.postgres, bench_gateway

from bench_gateway import HOST, Server, free_port

from chatfleet.rag.embeddings import Embedder
from chatfleet.rag.ingest import Ingestor, SplitOptions
from chatfleet.rag.lexical import ANALYZER, BM25S_DEFAULTS, Analyzer
from chatfleet.rag.retrieval import Retriever
from chatfleet.rag.stores.base import KnowledgeStore, StoredChunk
from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.stores.pgvector import PgVectorStore
from tests.support.postgres import PostgresServer

LABELS = REPO / "tests" / "fixtures" / "retrieval_labels.jsonl"
EMBED_MODEL = "chatfleet-sim/hashed-embedding"
KB = "docs"
TOP = 10
"""Hits asked for per question: recall@1/3/5 and MRR (@10) are read off them."""
SAMPLE_QUESTION = "How does admission work?"
SAMPLE_PHRASE = "interactive before batch"
"""In the README's "**Admission**:" bullet, the section that answers the sample question."""
SPLIT = SplitOptions(chunk_size=750, chunk_overlap=150)

STEMMED = Analyzer(name="words+en_plus+snowball_en", stopwords=frozenset(STOPWORDS_EN_PLUS),
                   stem=True, headings=False)
"""``ANALYZER`` without its headings: what stemming and the stopwords add, apart."""
ANALYZERS = {"before (bm25s defaults)": BM25S_DEFAULTS, "+ stems, en_plus stopwords": STEMMED,
             "default (+ headings, labels)": ANALYZER}


@dataclass(frozen=True, kw_only=True, slots=True)
class Label:
    question: str
    kind: str
    expect: tuple[tuple[str, str], ...]
    """(file name in the KB, phrase with whitespace collapsed)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    name: str
    store: str
    analyzer: Analyzer | None
    """None: dense search alone."""
    hybrid: bool


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def corpus() -> list[Path]:
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md")
                                        if p.name != "benchmarks.md")]


def load_labels(files: list[Path]) -> list[Label]:
    """The labels, each phrase checked against its file as it is now: a phrase that is gone
    (the docs changed) stops the run, naming the label to fix."""
    texts = {str(path.relative_to(REPO)): _collapse(path.read_text()) for path in files}
    labels, stale = [], []
    for line in LABELS.read_text().splitlines():
        entry = json.loads(line)
        for expect in entry["expect"]:
            if _collapse(expect["phrase"]) not in texts.get(expect["file"], ""):
                stale.append(f"{entry['question']!r}: {expect['file']} has no {expect['phrase']!r}")
        labels.append(Label(question=entry["question"], kind=entry["kind"], expect=tuple(
            (Path(e["file"]).name, _collapse(e["phrase"])) for e in entry["expect"])))
    if stale:
        raise SystemExit("labels to update in " + str(LABELS) + ":\n  " + "\n  ".join(stale))
    return labels


def answers(chunk: StoredChunk, label: Label) -> bool:
    return any(chunk.file_name == name and phrase in _collapse(chunk.text)
               for name, phrase in label.expect)


class Fixture:
    """engine-sim (the embeddings) and PostgreSQL, for every variant of the run."""

    def __init__(self, stack: contextlib.ExitStack, work: Path) -> None:
        port = free_port()
        engine = Server("engine-sim", ["engine-sim", "--host", HOST, "--port", str(port),
                                       "--embedding-model", EMBED_MODEL, "--log-level", "warning"],
                        log_dir=work)
        stack.callback(engine.stop)
        engine.wait_ready(f"http://{HOST}:{port}/health")
        self.embeddings_url = f"http://{HOST}:{port}/v1"
        self.postgres = PostgresServer()
        stack.callback(self.postgres.stop)
        self.postgres.start()
        self.work = work
        self._databases = 0

    @contextlib.asynccontextmanager
    async def store(self, kind: str, analyzer: Analyzer) -> AsyncIterator[KnowledgeStore]:
        self._databases += 1
        store: KnowledgeStore
        if kind == "local":
            store = LocalStore(self.work / f"kb-{self._databases}", analyzer=analyzer)
        else:
            store = PgVectorStore(self.postgres.create_database(f"bench_{self._databases}"),
                                  analyzer=analyzer)
        await store.start()
        try:
            yield store
        finally:
            await store.aclose()


async def ingest(store: KnowledgeStore, embedder: Embedder | None, files: list[Path]) -> int:
    await store.create_kb(KB, info="", embed_model="" if embedder is None else EMBED_MODEL)
    ingestor = Ingestor(store, embedder)
    try:
        records = [await ingestor.ingest(KB, path.name, path.read_bytes(), SPLIT) for path in files]
    finally:
        ingestor.close()
    return sum(record.chunk_count for record in records)


async def ranks(store: KnowledgeStore, embedder: Embedder | None, variant: Variant,
                labels: list[Label]) -> list[int | None]:
    """The rank (from 1) of the first answering chunk among the top ``TOP``, per label."""
    retriever = Retriever(store, embedder if variant.hybrid else None)
    out: list[int | None] = []
    for label in labels:
        if variant.analyzer is None:  # dense alone
            assert embedder is not None
            vector = await embedder.embed_query(label.question)
            chunks = [hit.chunk for hit in await store.dense_search(KB, vector, TOP)]
        else:
            result = await retriever.retrieve(KB, label.question, top_k=TOP, score_threshold=2.0)
            chunks = [hit.chunk for hit in result.chunks]
        out.append(next((rank for rank, chunk in enumerate(chunks, start=1)
                         if answers(chunk, label)), None))
    return out


def metrics(found: list[int | None]) -> dict[str, float]:
    n = len(found)
    return {**{f"recall@{k}": sum(1 for r in found if r is not None and r <= k) / n
               for k in (1, 3, 5)},
            "mrr@10": sum(1 / r for r in found if r is not None) / n}


async def run_variant(fixture: Fixture, variant: Variant, labels: list[Label],
                      files: list[Path]) -> dict[str, Any]:
    """The labelled questions over all the docs, then the README's sample over README.md alone."""
    embedder = None
    if variant.hybrid or variant.analyzer is None:
        embedder = Embedder(base_url=fixture.embeddings_url, model=EMBED_MODEL)
        await embedder.start()
    analyzer = variant.analyzer or ANALYZER
    sample = Label(question=SAMPLE_QUESTION, kind="sample", expect=(("README.md", SAMPLE_PHRASE),))
    try:
        async with fixture.store(variant.store, analyzer) as store:
            chunks = await ingest(store, embedder, files)
            found = await ranks(store, embedder, variant, labels)
        async with fixture.store(variant.store, analyzer) as store:
            await ingest(store, embedder, [REPO / "README.md"])
            (sample_rank,) = await ranks(store, embedder, variant, [sample])
    finally:
        if embedder is not None:
            await embedder.aclose()
    by_kind = {kind: metrics([r for r, label in zip(found, labels, strict=True)
                              if label.kind == kind])["recall@3"]
               for kind in sorted({label.kind for label in labels})}
    return {"name": variant.name, "store": variant.store, "hybrid": variant.hybrid,
            "analyzer": None if variant.analyzer is None else variant.analyzer.name,
            "chunks": chunks, **metrics(found), "recall@3_by_kind": by_kind,
            "readme_sample_rank": sample_rank,
            "ranks": {label.question: rank for label, rank in zip(labels, found, strict=True)}}


def analyzer_cost(files: list[Path]) -> dict[str, float]:
    """Microseconds per chunk to make a chunk's terms, per analyzer (ingestion and the local
    store's start-up pay it for every chunk)."""
    from chatfleet.rag.loaders import load_document
    from chatfleet.rag.splitting import split_documents
    chunks = [chunk for path in files for chunk in split_documents(
        load_document(path.name, path.read_bytes()).documents, file_name=path.name).chunks]
    cost = {}
    for name, analyzer in ANALYZERS.items():
        started = time.perf_counter()
        for _ in range(20):
            for chunk in chunks:
                analyzer.chunk_terms(chunk.page_content, chunk.metadata)
        cost[name] = (time.perf_counter() - started) / (20 * len(chunks)) * 1e6
    return cost


def variants() -> list[Variant]:
    out = [Variant(name=f"lexical, {name}", store="local", analyzer=analyzer, hybrid=False)
           for name, analyzer in ANALYZERS.items()]
    out += [Variant(name=f"hybrid, {name}", store="local", analyzer=analyzer, hybrid=True)
            for name, analyzer in (("before (bm25s defaults)", BM25S_DEFAULTS),
                                   ("default (+ headings, labels)", ANALYZER))]
    out.append(Variant(name="dense alone (hashed)", store="local", analyzer=None, hybrid=False))
    out += [Variant(name=f"lexical, {name}", store="pgvector", analyzer=analyzer, hybrid=False)
            for name, analyzer in (("before (bm25s defaults)", BM25S_DEFAULTS),
                                   ("default (+ headings, labels)", ANALYZER))]
    return out


def table(results: list[dict[str, Any]]) -> str:
    kinds = list(results[0]["recall@3_by_kind"])
    lines = ["| store | variant | recall@1 | recall@3 | recall@5 | MRR@10 | "
             + " | ".join(f"recall@3, {kind}" for kind in kinds) + " | README sample, rank |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|"]
    for r in results:
        sample = r["readme_sample_rank"] or "not in top 10"
        lines.append(f"| {r['store']} | {r['name']} | {r['recall@1']:.2f} | {r['recall@3']:.2f} | "
                     f"{r['recall@5']:.2f} | {r['mrr@10']:.2f} | "
                     + " | ".join(f"{r['recall@3_by_kind'][k]:.2f}" for k in kinds)
                     + f" | {sample} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    measures = ["recall@1", "recall@3", "recall@5", "mrr@10"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(results)
    x = np.arange(len(measures))
    for i, r in enumerate(results):
        ax.bar(x + (i - (len(results) - 1) / 2) * width, [r[m] for m in measures], width,
               label=f"{r['store']}: {r['name']}")
    ax.set_xticks(x, measures)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of {len(results[0]['ranks'])} questions")
    ax.set_title("Retrieval quality on ChatFleet's own docs (dense = hashed words, not semantic)")
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def fixture_stack() -> Iterator[Fixture]:
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(
            prefix="chatfleet-bench-retrieval-") as work:
        yield Fixture(stack, Path(work))


async def measure(files: list[Path], labels: list[Label]) -> list[dict[str, Any]]:
    with fixture_stack() as fixture:
        return [await run_variant(fixture, variant, labels, files) for variant in variants()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" /
                        "retrieval-quality.json")
    args = parser.parse_args()
    files = corpus()
    labels = load_labels(files)
    started = time.perf_counter()
    results = asyncio.run(measure(files, labels))
    report = {"date": time.strftime("%Y-%m-%d"), "questions": len(labels),
              "files": [str(path.relative_to(REPO)) for path in files],
              "top_k": TOP, "chunk_size": SPLIT.chunk_size, "chunk_overlap": SPLIT.chunk_overlap,
              "analyzer_us_per_chunk": analyzer_cost(files), "variants": results,
              "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    print("\nanalyzer cost, µs per chunk:", {k: round(v, 1)
                                               for k, v in report["analyzer_us_per_chunk"].items()})
    for r in results:
        missed = [q for q, rank in r["ranks"].items() if rank is None or rank > 3]
        print(f"\n{r['store']} / {r['name']}: {len(missed)} not in the top 3")
        for question in missed:
            print(f"  rank {r['ranks'][question] or '-'}: {question}")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {report['seconds']} s")


if __name__ == "__main__":
    main()
