"""Hybrid retrieval: BM25 and dense search, fused by reciprocal rank, cut by score and top_k.

Both searches run at once (the query's embedding is computed while BM25 runs). Each hit's score is
its cosine distance to the question, halved into [0, 1] (Chatchat's direction: lower is closer);
``score_threshold`` drops hits above it, so 2.0 (Chatchat's default) keeps all and 0.5 keeps those
within 90 degrees. Hits found only by BM25 get their distance looked up, so the threshold applies to
every hit alike. Without an embeddings endpoint, retrieval is BM25 only: scores are then ``None``
and the threshold cannot apply, which the result says (``mode``).

Reciprocal rank fusion (Cormack et al., 2009): fused = sum over searches of 1 / (60 + rank). It
needs no calibration between BM25 scores and distances, which live on unrelated scales.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from chatfleet.rag.embeddings import Embedder
from chatfleet.rag.stores.base import Hit, KnowledgeStore, StoredChunk

__all__ = ["RRF_K", "RetrievalMode", "RetrievalResult", "RetrievedChunk", "Retriever"]

RRF_K = 60
"""The constant of reciprocal rank fusion; 60 is the paper's and the common default."""

CANDIDATES_PER_SEARCH = 4
"""Each search fetches this many times top_k (at least 20) candidates for the fusion."""


class RetrievalMode(StrEnum):
    HYBRID = "hybrid"
    """BM25 and dense vectors, fused."""
    LEXICAL = "lexical"
    """BM25 only: no embeddings endpoint is configured."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievedChunk:
    chunk: StoredChunk
    score: float | None
    """Halved cosine distance to the question (lower is closer); None in lexical mode."""
    fused: float
    """The reciprocal-rank-fusion score the ranking used (higher is better)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrievalResult:
    chunks: list[RetrievedChunk]
    mode: RetrievalMode
    seconds: float


def _fuse(rankings: list[list[Hit]]) -> dict[str, tuple[StoredChunk, float]]:
    fused: dict[str, tuple[StoredChunk, float]] = {}
    for hits in rankings:
        for rank, hit in enumerate(hits, start=1):
            chunk, score = fused.get(hit.chunk.id, (hit.chunk, 0.0))
            fused[hit.chunk.id] = (chunk, score + 1.0 / (RRF_K + rank))
    return fused


class Retriever:
    def __init__(self, store: KnowledgeStore, embedder: Embedder | None, *,
                 on_retrieval: Callable[[RetrievalMode, float], None] | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self._on_retrieval = on_retrieval

    @property
    def mode(self) -> RetrievalMode:
        return RetrievalMode.LEXICAL if self.embedder is None else RetrievalMode.HYBRID

    async def retrieve(self, kb: str, query: str, *, top_k: int,
                       score_threshold: float) -> RetrievalResult:
        """The best ``top_k`` chunks of ``kb`` for ``query``, best first.

        Raises ``KnowledgeBaseNotFound``, or ``EmbeddingError`` when the embeddings endpoint fails.
        """
        started = time.perf_counter()
        pool = max(20, top_k * CANDIDATES_PER_SEARCH)
        if self.embedder is None:
            lexical = await self.store.lexical_search(kb, query, pool)
            chunks = [RetrievedChunk(chunk=hit.chunk, score=None, fused=1.0 / (RRF_K + rank))
                      for rank, hit in enumerate(lexical[:top_k], start=1)]
        else:
            lexical_task = asyncio.ensure_future(self.store.lexical_search(kb, query, pool))
            try:
                vector = await self.embedder.embed_query(query)
                dense = await self.store.dense_search(kb, vector, pool)
                lexical = await lexical_task
            finally:
                lexical_task.cancel()
            distances = {hit.chunk.id: hit.score for hit in dense}
            missing = [hit.chunk.id for hit in lexical if hit.chunk.id not in distances]
            if missing:
                distances.update(await self.store.distances(kb, vector, missing))
            ranked = sorted(_fuse([lexical, dense]).items(), key=lambda item: -item[1][1])
            chunks = []
            for chunk_id, (chunk, fused) in ranked:
                distance = distances.get(chunk_id)
                if distance is not None and distance > score_threshold:
                    continue
                chunks.append(RetrievedChunk(chunk=chunk, score=distance, fused=fused))
                if len(chunks) == top_k:
                    break
        seconds = time.perf_counter() - started
        if self._on_retrieval is not None:
            self._on_retrieval(self.mode, seconds)
        return RetrievalResult(chunks=chunks, mode=self.mode, seconds=seconds)
