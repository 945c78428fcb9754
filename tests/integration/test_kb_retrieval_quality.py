"""Retrieval quality that users see: the README's own knowledge-base example, and the pgvector
store's stored terms following an analyzer change (docs/benchmarks.md, "Retrieval quality").

The README's example runs as the README says: ``chatfleet serve`` on its embedded engine, with no
embeddings endpoint (so retrieval is lexical), README.md uploaded into the KB "docs" and
``search_docs`` asked "How does admission work?" with the default top_k (3). The README is read
as it is in this checkout when the test runs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from bm25s.stopwords import STOPWORDS_EN

from chatfleet.rag.lexical import ANALYZER, BM25S_DEFAULTS
from chatfleet.rag.stores.base import ChunkDraft
from chatfleet.rag.stores.pgvector import PgVectorStore
from tests.conftest import Server, start_gateway

README = Path(__file__).resolve().parents[2] / "README.md"


def _admission_bullet(readme: str) -> str:
    """The README's "**Admission**:" list item, its lines joined."""
    match = re.search(r"^- \*\*Admission\*\*:.*?(?=^- |\Z)", readme, re.M | re.S)
    assert match, "README.md has no '- **Admission**:' bullet"
    return " ".join(match.group().split())


@pytest.fixture(scope="module")
def gateway() -> Iterator[Server]:
    server = start_gateway()
    yield server
    server.proc.terminate()


def test_the_readmes_sample_question_finds_the_admission_bullet_in_the_top_3(
        gateway: Server) -> None:
    bullet_start = " ".join(_admission_bullet(README.read_text()).split()[:12])
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert client.post("/knowledge_base/create_knowledge_base",
                           json={"knowledge_base_name": "docs"}).json()["code"] == 200
        uploaded = client.post("/knowledge_base/upload_docs",
                               data={"knowledge_base_name": "docs"},
                               files=[("files", ("README.md", README.read_bytes()))]).json()
        assert uploaded["data"]["failed_files"] == {}
        hits = client.post("/knowledge_base/search_docs", json={
            "knowledge_base_name": "docs", "query": "How does admission work?"}).json()
    assert len(hits) == 3
    texts = [" ".join(hit["page_content"].split()) for hit in hits]
    assert any(bullet_start in text for text in texts), texts
    (answer,) = [hit for hit, text in zip(hits, texts, strict=True) if bullet_start in text]
    assert answer["metadata"]["headings"] == ["ChatFleet", "What it does"]
    assert answer["score"] is None  # lexical: no embeddings endpoint


async def test_pgvector_re_analyzes_chunks_stored_under_another_analyzer_after_start(
        pg_dsn: str) -> None:
    """A database written before stemming and headings: after a restart with the default
    analyzer, once its background re-analysis is recorded, its chunks are found by stems and
    by their headings, as new uploads are."""
    before = PgVectorStore(pg_dsn, analyzer=BM25S_DEFAULTS)
    await before.start()
    try:
        await before.create_kb("ops", info="", embed_model="")
        await before.put_file("ops", "ops.md", b"x", [
            ChunkDraft(text="Requests are admitted in arrival order.",
                       metadata={"headings": ["Scheduling"]}),
            ChunkDraft(text="The engine streams tokens.", metadata={})],
            loader="TextLoader", splitter="RecursiveCharacterTextSplitter")
        assert [hit.chunk.seq for hit in await before.lexical_search("ops", "admitted", 5)] == [0]
        assert await before.lexical_search("ops", "admit scheduling", 5) == []
    finally:
        await before.aclose()

    after = PgVectorStore(pg_dsn)
    await after.start()
    conn = await asyncpg.connect(pg_dsn)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await conn.fetchval("SELECT value FROM chatfleet_meta WHERE key = "
                                  "'lexical_analyzer'") != ANALYZER.name:
            assert asyncio.get_running_loop().time() < deadline, "no re-analysis recorded"
            await asyncio.sleep(0.02)
        for query in ("admit", "admits", "scheduling", "Admitted requests"):
            assert [hit.chunk.seq for hit in await after.lexical_search("ops", query, 5)] == [0]
        lexemes = await conn.fetchval("SELECT lexemes FROM chatfleet_chunk WHERE seq = 0")
    finally:
        await conn.close()
        await after.aclose()
    assert lexemes.split() == ANALYZER.chunk_terms("Requests are admitted in arrival order.",
                                                   {"headings": ["Scheduling"]})
    assert not set(lexemes.split()) & set(STOPWORDS_EN)
