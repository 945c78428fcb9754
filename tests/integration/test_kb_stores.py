"""The ``KnowledgeStore`` contract (``chatfleet/rag/stores/base.py``), checked on every store.

Each test gets an empty, started store of each kind in ``STORES``: the pgvector store on a
database of its own on the session's real PostgreSQL (``pg_dsn``). The tests at the end are
pgvector's own: two replicas sharing one database, and the HNSW index the dense query must use.

Vectors are small and hand-made (dimension 8) so that the expected order and distances can be
read off the test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from pgvector.asyncpg import register_vector

from chatfleet.rag.lexical import ANALYZER, BM25S_DEFAULTS, Analyzer
from chatfleet.rag.stores import local
from chatfleet.rag.stores.base import (
    ChunkDraft,
    FileChanged,
    Hit,
    KnowledgeBaseExists,
    KnowledgeBaseNotFound,
    KnowledgeStore,
    StaleChunks,
    StoredChunk,
    Vector,
)
from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.stores.pgvector import (
    PgVectorStore,
    dense_search_sql,
    hnsw_index_name,
)
from tests.support.stores import STORES

DIM = 8
KB = "kb1"
MISSING = "no_such_kb"


def unit(*components: float) -> Vector:
    """The unit vector along ``components`` (padded with zeros to ``DIM``)."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[:len(components)] = components
    return vector / np.linalg.norm(vector)


def axis(i: int) -> Vector:
    return unit(*([0.0] * i + [1.0]))


def drafts(*texts: str, vectors: Sequence[Vector | None] | None = None) -> list[ChunkDraft]:
    embeddings = vectors if vectors is not None else [None] * len(texts)
    return [ChunkDraft(text=text, metadata={"source": "test", "n": n}, embedding=embedding)
            for n, (text, embedding) in enumerate(zip(texts, embeddings, strict=True))]


async def put(store: KnowledgeStore, file_name: str, chunks: Sequence[ChunkDraft],
              *, kb: str = KB, content: bytes = b"content") -> None:
    await store.put_file(kb, file_name, content, chunks, loader="TextLoader",
                         splitter="RecursiveCharacterTextSplitter")


def texts(results: Sequence[Hit | StoredChunk]) -> list[str]:
    """The texts of search hits or of listed chunks, in order."""
    return [r.chunk.text if isinstance(r, Hit) else r.text for r in results]


# The KB -----------------------------------------------------------------------------------------

async def test_a_created_kb_is_listed_and_got_with_its_fields(store: KnowledgeStore) -> None:
    assert await store.list_kbs() == []
    created = await store.create_kb(KB, info="manuals", embed_model="bge-m3")
    assert (created.name, created.info, created.embed_model) == (KB, "manuals", "bge-m3")
    assert (created.vector_store, created.file_count) == (store.kind, 0)
    assert abs(created.created_at - time.time()) < 60
    await store.create_kb("kb0", info="", embed_model="")
    assert [kb.name for kb in await store.list_kbs()] == ["kb0", KB]
    assert await store.get_kb(KB) == created
    assert await store.get_kb(MISSING) is None


async def test_creating_a_kb_that_exists_raises_knowledge_base_exists(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="first", embed_model="")
    with pytest.raises(KnowledgeBaseExists):
        await store.create_kb(KB, info="second", embed_model="")
    kb = await store.get_kb(KB)
    assert kb is not None and kb.info == "first"


async def test_a_deleted_kb_is_gone_and_deleting_it_again_raises_not_found(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("alpha"))
    await store.delete_kb(KB)
    assert await store.get_kb(KB) is None
    assert await store.list_kbs() == []
    with pytest.raises(KnowledgeBaseNotFound):
        await store.delete_kb(KB)


async def test_update_kb_info_changes_the_info_only(store: KnowledgeStore) -> None:
    before = await store.create_kb(KB, info="old", embed_model="m")
    await store.update_kb_info(KB, "new")
    after = await store.get_kb(KB)
    assert after is not None
    assert (after.info, after.embed_model, after.created_at) == ("new", "m", before.created_at)


CALLS_ON_A_MISSING_KB: dict[str, Callable[[KnowledgeStore], Awaitable[object]]] = {
    "delete_kb": lambda s: s.delete_kb(MISSING),
    "update_kb_info": lambda s: s.update_kb_info(MISSING, "info"),
    "list_files": lambda s: s.list_files(MISSING),
    "get_file": lambda s: s.get_file(MISSING, "a.txt"),
    "put_file": lambda s: put(s, "a.txt", drafts("alpha", vectors=[axis(0)]), kb=MISSING),
    "delete_file": lambda s: s.delete_file(MISSING, "a.txt"),
    "delete_file keeping content": lambda s: s.delete_file(MISSING, "a.txt", keep_content=True),
    "list_chunks": lambda s: s.list_chunks(MISSING, "a.txt"),
    "lexical_search": lambda s: s.lexical_search(MISSING, "alpha", 3),
    "dense_search": lambda s: s.dense_search(MISSING, axis(0), 3),
    "distances": lambda s: s.distances(MISSING, axis(0), ["1"]),
}


@pytest.mark.parametrize("method", list(CALLS_ON_A_MISSING_KB))
async def test_every_method_raises_not_found_for_a_missing_kb(store: KnowledgeStore,
                                                              method: str) -> None:
    await store.create_kb(KB, info="", embed_model="")  # another KB's data must not matter
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]))
    with pytest.raises(KnowledgeBaseNotFound) as raised:
        await CALLS_ON_A_MISSING_KB[method](store)
    assert raised.value.kb == MISSING


# Files ------------------------------------------------------------------------------------------

async def test_put_file_then_list_files_shows_size_chunks_version_and_tools(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    record = await store.put_file(KB, "a.txt", b"12345", drafts("one", "two", "three"),
                                  loader="TextLoader", splitter="RecursiveCharacterTextSplitter")
    assert (record.kb, record.file_name, record.size_bytes) == (KB, "a.txt", 5)
    assert (record.chunk_count, record.version) == (3, 1)
    assert (record.loader, record.splitter) == ("TextLoader", "RecursiveCharacterTextSplitter")
    assert record.created_at == record.modified_at
    await put(store, "b.txt", drafts("four"))
    assert [(f.file_name, f.chunk_count) for f in await store.list_files(KB)] == [("a.txt", 3),
                                                                                  ("b.txt", 1)]
    assert (await store.list_files(KB))[0] == record
    kb = await store.get_kb(KB)
    assert kb is not None and kb.file_count == 2


async def test_a_file_stored_with_custom_docs_is_listed_as_such_until_it_is_split_again(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    record = await store.put_file(KB, "a.txt", b"x", drafts("mine"), loader="custom docs",
                                  splitter="custom docs", custom_docs=True)
    assert record.custom_docs and (await store.list_files(KB))[0].custom_docs
    await put(store, "a.txt", drafts("split"))
    assert not (await store.list_files(KB))[0].custom_docs


async def test_edit_chunks_changes_and_deletes_by_id_and_keeps_every_other_chunk_and_id(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("alpha", "bravo", "charlie", "delta"))
    before = await store.list_chunks(KB, "a.txt")
    record = await store.edit_chunks(KB, "a.txt", {
        before[1].id: ChunkDraft(text="bravo edited zulu", metadata={"n": 1, "edited": True}),
        before[2].id: None})
    assert (record.version, record.chunk_count, record.custom_docs) == (2, 3, True)
    after = await store.list_chunks(KB, "a.txt")
    assert [(c.id, c.text) for c in after] == [(before[0].id, "alpha"),
                                               (before[1].id, "bravo edited zulu"),
                                               (before[3].id, "delta")]
    assert after[1].metadata == {"n": 1, "edited": True}
    assert texts(await store.lexical_search(KB, "zulu", 5)) == ["bravo edited zulu"]
    assert await store.lexical_search(KB, "charlie", 5) == []
    assert (await store.list_files(KB))[0] == record


async def test_edit_chunks_naming_a_chunk_the_file_lacks_changes_nothing(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("alpha", "bravo"))
    await put(store, "b.txt", drafts("other"))
    (alpha, _) = await store.list_chunks(KB, "a.txt")
    (other,) = await store.list_chunks(KB, "b.txt")
    for stale in (other.id, "999999", "not-an-id"):
        with pytest.raises(StaleChunks) as caught:
            await store.edit_chunks(KB, "a.txt", {alpha.id: None, stale: None})
        assert caught.value.chunk_ids == (stale,)
    assert texts(await store.list_chunks(KB, "a.txt")) == ["alpha", "bravo"]
    assert [f.version for f in await store.list_files(KB)] == [1, 1]
    with pytest.raises(KnowledgeBaseNotFound):
        await store.edit_chunks(MISSING, "a.txt", {alpha.id: None})


async def test_edit_chunks_puts_the_new_embedding_in_dense_search(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("alpha", "bravo", vectors=[axis(0), axis(1)]))
    alpha, bravo = await store.list_chunks(KB, "a.txt")
    await store.edit_chunks(KB, "a.txt", {alpha.id: ChunkDraft(text="alpha moved",
                                                               embedding=axis(2))})
    assert texts(await store.dense_search(KB, axis(2), 1)) == ["alpha moved"]
    assert texts(await store.dense_search(KB, axis(1), 1)) == ["bravo"]
    with pytest.raises(ValueError, match="dimension"):
        await store.edit_chunks(KB, "a.txt", {bravo.id: ChunkDraft(
            text="wrong", embedding=np.ones(DIM * 2, dtype=np.float32))})
    assert texts(await store.list_chunks(KB, "a.txt")) == ["alpha moved", "bravo"]


async def test_replacing_a_file_bumps_its_version_and_searches_see_only_the_new_chunks(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    first = await store.put_file(KB, "a.txt", b"old", drafts("alpha old", "beta old",
                                                             vectors=[axis(0), axis(1)]),
                                 loader="TextLoader", splitter="S1")
    second = await store.put_file(KB, "a.txt", b"newer", drafts("alpha new",
                                                                vectors=[axis(2)]),
                                  loader="PyPDFLoader", splitter="S2")
    assert (second.version, second.chunk_count, second.size_bytes) == (2, 1, 5)
    assert (second.loader, second.splitter) == ("PyPDFLoader", "S2")
    assert second.created_at == first.created_at
    assert second.modified_at >= first.modified_at
    assert await store.list_files(KB) == [second]
    assert await store.get_file(KB, "a.txt") == b"newer"
    assert texts(await store.list_chunks(KB, "a.txt")) == ["alpha new"]
    assert texts(await store.lexical_search(KB, "alpha beta old", 10)) == ["alpha new"]
    assert texts(await store.dense_search(KB, axis(0), 10)) == ["alpha new"]


async def test_get_file_returns_the_exact_bytes_and_none_for_an_unknown_file(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    content = bytes(range(256)) * 4
    await put(store, "blob.bin", drafts("x"), content=content)
    assert await store.get_file(KB, "blob.bin") == content
    assert await store.get_file(KB, "other.bin") is None


async def test_delete_file_removes_its_bytes_row_and_chunks(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]))
    await put(store, "b.txt", drafts("beta", vectors=[axis(1)]))
    assert await store.delete_file(KB, "a.txt") is True
    assert [f.file_name for f in await store.list_files(KB)] == ["b.txt"]
    assert await store.get_file(KB, "a.txt") is None
    assert await store.list_chunks(KB, "a.txt") == []
    assert await store.lexical_search(KB, "alpha", 5) == []
    assert texts(await store.dense_search(KB, axis(0), 5)) == ["beta"]
    assert await store.delete_file(KB, "a.txt") is False


async def test_delete_file_keeping_content_keeps_the_bytes_and_drops_the_chunks(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]), content=b"original")
    assert await store.delete_file(KB, "a.txt", keep_content=True) is True
    assert await store.get_file(KB, "a.txt") == b"original"
    assert [(f.file_name, f.chunk_count) for f in await store.list_files(KB)] == [("a.txt", 0)]
    assert await store.list_chunks(KB, "a.txt") == []
    assert await store.lexical_search(KB, "alpha", 5) == []
    assert await store.dense_search(KB, axis(0), 5) == []
    assert await store.delete_file(KB, "b.txt", keep_content=True) is False


async def test_list_chunks_returns_a_files_chunks_in_order_with_their_metadata(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    words = [f"chunk{n}" for n in range(12)]
    await put(store, "a.txt", drafts(*words))
    await put(store, "b.txt", drafts("other"))
    chunks = await store.list_chunks(KB, "a.txt")
    assert texts(chunks) == words
    assert [c.seq for c in chunks] == list(range(12))
    assert [c.metadata for c in chunks] == [{"source": "test", "n": n} for n in range(12)]
    assert {(c.kb, c.file_name) for c in chunks} == {(KB, "a.txt")}
    assert len({c.id for c in chunks}) == 12
    assert await store.list_chunks(KB, "missing.txt") == []


# Lexical search ---------------------------------------------------------------------------------

async def test_lexical_search_ranks_the_chunk_with_the_rare_query_word_first(
        store: KnowledgeStore) -> None:
    """Each chunk has "the" once, so the zebra chunk leads on BM25 (the rare word weighs most)
    and on PostgreSQL's ts_rank_cd alike (it matches two query words; ts_rank_cd has no IDF, so a
    chunk repeating "the" could beat it there)."""
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("a cat sat on the mat", "the dog ate a bone",
                                     "a zebra ran across the plain", "the bird sang at dawn"))
    hits = await store.lexical_search(KB, "The ZEBRA", 3)
    assert texts(hits)[:1] == ["a zebra ran across the plain"]
    assert hits[0].score > 0
    assert hits[0].chunk.metadata == {"source": "test", "n": 2}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[1:] == [] or hits[0].score > hits[1].score


async def test_lexical_search_returns_nothing_for_words_in_no_chunk(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("the cat sat on the mat", "the dog ate a bone"))
    assert await store.lexical_search(KB, "aardvark", 5) == []
    assert await store.lexical_search(KB, "", 5) == []


async def test_lexical_search_reads_query_text_as_words_never_as_syntax(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("it's a zebra", "an unrelated line"))
    for query in ("zebra'); DROP TABLE x; --", "zebra & !(a | b) <-> :*", "zebra \\ ' \"",
                  "''' zebra"):
        assert texts(await store.lexical_search(KB, query, 5))[:1] == ["it's a zebra"], query
    assert await store.lexical_search(KB, "!&|()'\\:*", 5) == []


# Dense search and distances ---------------------------------------------------------------------

async def test_dense_search_returns_the_nearest_by_cosine_scored_by_halved_distance(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    vectors = [axis(1), unit(1, 1), unit(-1), axis(0)]
    await put(store, "a.txt", drafts("orthogonal", "diagonal", "opposite", "same",
                                     vectors=vectors))
    hits = await store.dense_search(KB, axis(0), 3)
    assert texts(hits) == ["same", "diagonal", "orthogonal"]
    assert [h.score for h in hits] == pytest.approx([0.0, (1 - np.sqrt(0.5)) / 2, 0.5], abs=1e-5)
    everything = await store.dense_search(KB, axis(0), 10)
    assert texts(everything)[-1] == "opposite"
    assert everything[-1].score == pytest.approx(1.0, abs=1e-5)


async def test_dense_search_leaves_out_chunks_without_an_embedding(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("embedded", "bare", "also embedded",
                                     vectors=[axis(0), None, axis(1)]))
    assert texts(await store.dense_search(KB, axis(0), 10)) == ["embedded", "also embedded"]
    assert texts(await store.lexical_search(KB, "bare", 10)) == ["bare"]


async def test_dense_search_with_a_query_of_another_dimension_raises_value_error(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("embedded", vectors=[axis(0)]))
    with pytest.raises(ValueError, match="dimension"):
        await store.dense_search(KB, np.ones(DIM * 2, dtype=np.float32) / 4, 3)


async def test_distances_match_numpy_for_the_chunks_that_have_an_embedding(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    rng = np.random.default_rng(7)
    vectors = [unit(*rng.standard_normal(DIM)) for _ in range(9)]
    await put(store, "a.txt", drafts(*(f"c{n}" for n in range(10)), vectors=[*vectors, None]))
    chunks = await store.list_chunks(KB, "a.txt")
    query = unit(*rng.standard_normal(DIM))
    asked = [chunks[n].id for n in (0, 3, 8, 9)]
    distances = await store.distances(KB, query, asked)
    expected = {chunks[n].id: (1 - float(np.dot(vectors[n], query))) / 2 for n in (0, 3, 8)}
    assert distances == pytest.approx(expected, abs=1e-5)


# Isolation and failures -------------------------------------------------------------------------

async def test_a_kb_recreated_under_the_same_name_does_not_see_the_old_chunks(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]))
    await store.delete_kb(KB)
    await store.create_kb(KB, info="", embed_model="m")
    assert await store.list_files(KB) == []
    assert await store.lexical_search(KB, "alpha", 5) == []
    assert await store.dense_search(KB, axis(0), 5) == []
    assert await store.get_file(KB, "a.txt") is None


async def test_two_kbs_do_not_see_each_others_chunks(store: KnowledgeStore) -> None:
    for kb, word, vector in (("kb_a", "alpha", axis(0)), ("kb_b", "beta", axis(1))):
        await store.create_kb(kb, info="", embed_model="m")
        await put(store, "same.txt", drafts(f"{word} shared", vectors=[vector]), kb=kb)
    for kb, word in (("kb_a", "alpha"), ("kb_b", "beta")):
        assert texts(await store.lexical_search(kb, "alpha beta shared", 5)) == [f"{word} shared"]
        assert texts(await store.dense_search(kb, axis(0), 5)) == [f"{word} shared"]
        assert [c.kb for c in await store.list_chunks(kb, "same.txt")] == [kb]


async def test_a_put_file_with_mixed_dimensions_fails_and_leaves_the_old_file_intact(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]), content=b"v1")
    mixed = drafts("new one", "new two", vectors=[axis(0), np.ones(DIM + 1, dtype=np.float32)])
    with pytest.raises(ValueError, match="dimension"):
        await put(store, "a.txt", mixed, content=b"v2")
    await assert_only_alpha_v1(store)


async def test_a_put_file_failing_midway_leaves_the_old_file_intact(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]), content=b"v1")
    chunks = drafts(*(f"new {n}" for n in range(100)), vectors=[axis(1)] * 100)
    chunks[60] = ChunkDraft(text="unserialisable", metadata={"bad": object()}, embedding=axis(1))
    with pytest.raises(TypeError, match="JSON serializable"):
        await put(store, "a.txt", chunks, content=b"v2")
    await assert_only_alpha_v1(store)


async def test_a_file_whose_dimension_differs_from_the_kbs_vectors_is_refused(
        store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    await put(store, "a.txt", drafts("alpha", vectors=[axis(0)]), content=b"v1")
    with pytest.raises(ValueError, match="dimension"):
        await put(store, "b.txt", drafts("wide", vectors=[np.ones(16, dtype=np.float32) / 4]))
    await assert_only_alpha_v1(store)


async def assert_only_alpha_v1(store: KnowledgeStore) -> None:
    """The KB holds exactly what the tests above put first: a.txt, version 1, one chunk."""
    assert [(f.file_name, f.version, f.chunk_count) for f in await store.list_files(KB)] == [
        ("a.txt", 1, 1)]
    assert await store.get_file(KB, "a.txt") == b"v1"
    assert texts(await store.list_chunks(KB, "a.txt")) == ["alpha"]
    assert texts(await store.dense_search(KB, axis(0), 5)) == ["alpha"]
    assert await store.lexical_search(KB, "new", 5) == []


async def test_searches_during_a_put_file_all_succeed_and_see_one_whole_version(
        store: KnowledgeStore) -> None:
    """20 searches run while a 2000-chunk replacement is stored; put_file is atomic, so each
    sees every chunk of either the old file or the new one, never a mix."""
    await store.create_kb(KB, info="", embed_model="m")
    n = 2000
    await put(store, "a.txt", drafts(*(f"alpha old {i}" for i in range(n)), vectors=[axis(0)] * n))
    replacement = drafts(*(f"alpha new {i}" for i in range(n)), vectors=[unit(1, 1)] * n)

    async def search(i: int) -> set[str]:
        hits = await (store.lexical_search(KB, "alpha", 50) if i % 2 else
                      store.dense_search(KB, axis(0), 50))
        assert len(hits) == 50
        return {hit.chunk.text.split()[1] for hit in hits}

    results = await asyncio.gather(put(store, "a.txt", replacement),
                                   *(search(i) for i in range(20)))
    assert all(versions in ({"old"}, {"new"}) for versions in results[1:])
    assert [(f.version, f.chunk_count) for f in await store.list_files(KB)] == [(2, n)]


async def test_a_20k_chunk_file_is_stored_and_searchable(store: KnowledgeStore) -> None:
    await store.create_kb(KB, info="", embed_model="m")
    n = 20_000
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await put(store, "big.txt", drafts(*(f"line {i} word{i}" for i in range(n)), vectors=list(vectors)))
    assert [(f.file_name, f.chunk_count) for f in await store.list_files(KB)] == [("big.txt", n)]
    assert texts(await store.lexical_search(KB, "word12345", 3)) == ["line 12345 word12345"]
    assert texts(await store.dense_search(KB, vectors[777], 1)) == ["line 777 word777"]


# pgvector's own ---------------------------------------------------------------------------------

async def started_pgvector(stack: AsyncExitStack, dsn: str, count: int) -> list[PgVectorStore]:
    """``count`` PgVectorStores on one database, started at once (as replicas starting
    together would be), closed with ``stack``."""
    stores = [PgVectorStore(dsn, pool_size=4) for _ in range(count)]
    for instance in stores:
        stack.push_async_callback(instance.aclose)
    await asyncio.gather(*(instance.start() for instance in stores))
    return stores


_FILE_TABLE_BEFORE_CUSTOM_DOCS = {
    "local": ("CREATE TABLE file (kb TEXT NOT NULL REFERENCES kb(name) ON DELETE CASCADE, "
              "file_name TEXT NOT NULL, content BLOB, size INTEGER NOT NULL, loader TEXT NOT NULL, "
              "splitter TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL, "
              "modified_at REAL NOT NULL, PRIMARY KEY (kb, file_name))"),
    "pgvector": ("CREATE TABLE chatfleet_file (kb text NOT NULL REFERENCES chatfleet_kb (name) "
                 "ON DELETE CASCADE, file_name text NOT NULL, content bytea NOT NULL, "
                 "size bigint NOT NULL, loader text NOT NULL, splitter text NOT NULL, "
                 "version integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
                 "modified_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (kb, file_name))"),
}
"""The file table as the first release made it, before ``custom_docs``."""


@pytest.mark.parametrize("kind", ["local", "pgvector"])
async def test_a_store_made_before_custom_docs_is_migrated_at_start_and_keeps_its_files(
        kind: str, request: pytest.FixtureRequest) -> None:
    """Upgrading the gateway must not lose (or fail to read) the knowledge bases it had."""
    store = STORES[kind](request)
    await store.start()
    await store.create_kb(KB, info="", embed_model="")
    await put(store, "a.txt", drafts("kept"))
    await store.aclose()
    if kind == "local":
        db = sqlite3.connect(request.getfixturevalue("tmp_path") / "kb" / "kb.sqlite3")
        with db:
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute("PRAGMA legacy_alter_table = ON")  # the chunks keep referring to "file"
            db.execute("ALTER TABLE file RENAME TO file_new")
            db.execute(_FILE_TABLE_BEFORE_CUSTOM_DOCS[kind])
            db.execute("INSERT INTO file SELECT kb, file_name, content, size, loader, splitter, "
                       "version, created_at, modified_at FROM file_new")
            db.execute("DROP TABLE file_new")
        db.close()
    else:
        conn = await asyncpg.connect(request.getfixturevalue("pg_dsn"))
        await conn.execute("ALTER TABLE chatfleet_file DROP COLUMN custom_docs")
        await conn.close()
    store = STORES[kind](request)
    await store.start()
    try:
        assert [(f.file_name, f.custom_docs) for f in await store.list_files(KB)] == [
            ("a.txt", False)]
        assert texts(await store.lexical_search(KB, "kept", 5)) == ["kept"]
        await store.put_file(KB, "b.txt", b"x", drafts("mine"), loader="custom docs",
                             splitter="custom docs", custom_docs=True)
        assert [f.custom_docs for f in await store.list_files(KB)] == [False, True]
    finally:
        await store.aclose()


async def test_pgvector_replicas_starting_together_on_an_empty_database_all_start(
        pg_dsn: str) -> None:
    async with AsyncExitStack() as stack:
        stores = await started_pgvector(stack, pg_dsn, 4)
        await stores[0].create_kb(KB, info="", embed_model="")
        assert [[kb.name for kb in await s.list_kbs()] for s in stores] == [[KB]] * 4


async def test_pgvector_replicas_see_each_others_uploads_at_once(pg_dsn: str) -> None:
    async with AsyncExitStack() as stack:
        writer, reader = await started_pgvector(stack, pg_dsn, 2)
        await writer.create_kb(KB, info="", embed_model="m")
        await put(writer, "a.txt", drafts("alpha", "zebra", vectors=[axis(0), axis(1)]))
        assert texts(await reader.lexical_search(KB, "zebra", 5)) == ["zebra"]
        assert texts(await reader.dense_search(KB, axis(0), 1)) == ["alpha"]
        await put(reader, "a.txt", drafts("zebra again", vectors=[axis(0)]))
        assert texts(await writer.dense_search(KB, axis(1), 5)) == ["zebra again"]
        assert [f.version for f in await writer.list_files(KB)] == [2]


async def test_pgvector_dense_search_uses_the_hnsw_index_of_its_dimension(pg_dsn: str) -> None:
    dim = 16
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((2000, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    async with AsyncExitStack() as stack:
        (store,) = await started_pgvector(stack, pg_dsn, 1)
        for kb in ("kb_a", "kb_b"):
            await store.create_kb(kb, info="", embed_model="m")
            await put(store, "a.txt", drafts(*(f"c{i}" for i in range(len(vectors))),
                                             vectors=list(vectors)), kb=kb)
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        await register_vector(conn)
        plan = "\n".join(row[0] for row in await conn.fetch(
            "EXPLAIN " + dense_search_sql(dim), vectors[0], "kb_a", 5))
        assert hnsw_index_name(dim) in plan, plan
        hits = await store.dense_search("kb_b", vectors[0], 5)
        assert texts(hits)[0] == "c0" and {h.chunk.kb for h in hits} == {"kb_b"}


async def test_pgvector_plans_a_new_large_kb_with_its_indexes_right_after_the_upload(
        pg_dsn: str) -> None:
    """The first KB's upload builds the index; a second KB's large upload must not leave the
    planner believing that KB holds one row until autovacuum's next round (a minute away)."""
    dim = 16
    vectors = np.random.default_rng(9).standard_normal((1500, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    async with AsyncExitStack() as stack:
        (store,) = await started_pgvector(stack, pg_dsn, 1)
        for kb in ("first", "second"):
            await store.create_kb(kb, info="", embed_model="m")
            await put(store, "a.txt", drafts(*(f"c{i}" for i in range(len(vectors))),
                                             vectors=list(vectors)), kb=kb)
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        await register_vector(conn)

        async def plan() -> str:
            rows = await conn.fetch("EXPLAIN " + dense_search_sql(dim), vectors[0], "second", 5)
            return "\n".join(row[0] for row in rows)

        deadline = asyncio.get_running_loop().time() + 10
        while hnsw_index_name(dim) not in (latest := await plan()):
            assert asyncio.get_running_loop().time() < deadline, latest
            await asyncio.sleep(0.1)


async def test_pgvector_start_waits_for_no_other_transaction_when_the_schema_is_complete(
        pg_dsn: str) -> None:
    """A replica starting (each scale-up) must not hold off the others' listings, downloads,
    searches and uploads: while a transaction that wrote the file and chunk tables stays open, a
    start that asked for a lock on either table (ALTER TABLE's ACCESS EXCLUSIVE, CREATE INDEX's
    SHARE, each taken even with nothing to do) would wait for it, and the next readers or
    writers behind that."""
    async with AsyncExitStack() as stack:
        (first,) = await started_pgvector(stack, pg_dsn, 1)
        await first.create_kb(KB, info="", embed_model="")
        await put(first, "a.txt", drafts("kept"))
        writer = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(writer.close)
        async with writer.transaction():
            await writer.execute("UPDATE chatfleet_file SET version = version")
            await writer.execute("UPDATE chatfleet_chunk SET seq = seq")
            second = PgVectorStore(pg_dsn, pool_size=2)
            stack.push_async_callback(second.aclose)
            await asyncio.wait_for(second.start(), timeout=10)
            assert [f.file_name for f in await second.list_files(KB)] == ["a.txt"]


# pgvector's re-analysis after an analyzer change ------------------------------------------------

OLD_TEXT = "Requests are admitted in arrival order, item {}."
"""A stored chunk's text. ANALYZER stems "admitted" (a search for it looks for "admit"), which
BM25S_DEFAULTS, the analyzer before it, kept as it is; "order" is one term under both."""
POSITION_KEY = "lexical_reanalysis"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    """Poll ``check`` until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def recorded(conn: asyncpg.Connection, analyzer: Analyzer) -> bool:
    """Whether ``chatfleet_meta`` names ``analyzer`` as the one that made the stored terms."""
    return await conn.fetchval("SELECT value FROM chatfleet_meta WHERE key = "
                               "'lexical_analyzer'") == analyzer.name


async def position(conn: asyncpg.Connection) -> int | None:
    """The last chunk id a re-analysis committed; None when none is under way."""
    value = await conn.fetchval("SELECT value FROM chatfleet_meta WHERE key = $1", POSITION_KEY)
    return None if value is None else json.loads(value)["after"]


async def blocked_on_a_lock(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND wait_event_type = 'Lock'") > 0


async def row_lock_held(stack: AsyncExitStack, dsn: str,
                        chunk_id: int) -> asyncpg.transaction.Transaction:
    """A transaction of its own connection holding ``chunk_id``'s row lock (a re-analysis batch
    reaching it waits there) until the caller rolls it back; the connection closes with ``stack``."""
    holder = await asyncpg.connect(dsn)
    stack.push_async_callback(holder.close)
    hold = holder.transaction()
    await hold.start()
    await holder.execute("SELECT FROM chatfleet_chunk WHERE id = $1 FOR UPDATE", chunk_id)
    return hold


async def stopped_at(conn: asyncpg.Connection, chunk_id: int) -> bool:
    """Whether the re-analysis committed up to ``chunk_id`` and waits on a row lock."""
    return await position(conn) == chunk_id and await blocked_on_a_lock(conn)


async def stored_under_the_old_analyzer(conn: asyncpg.Connection, dsn: str, count: int
                                        ) -> list[int]:
    """``count`` chunks of one file, stored as the release before ANALYZER stored them; their
    ids in order."""
    old = PgVectorStore(dsn, analyzer=BM25S_DEFAULTS)
    await old.start()
    try:
        await eventually(lambda: recorded(conn, BM25S_DEFAULTS))
        await old.create_kb(KB, info="", embed_model="")
        await put(old, "a.txt", drafts(*(OLD_TEXT.format(i) for i in range(count))))
    finally:
        await old.aclose()
    return [row["id"] for row in await conn.fetch("SELECT id FROM chatfleet_chunk ORDER BY id")]


async def lexemes(conn: asyncpg.Connection) -> dict[int, str]:
    return {row["id"]: row["lexemes"] for row in await conn.fetch(
        "SELECT id, lexemes FROM chatfleet_chunk")}


def new_terms(text: str) -> str:
    return " ".join(ANALYZER.chunk_terms(text, {}))


async def test_pgvector_re_analyzes_in_the_background_and_then_records_the_analyzer(
        pg_dsn: str) -> None:
    """Also for a database made before ``chatfleet_meta``, which records no analyzer."""
    async with AsyncExitStack() as stack:
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        ids = await stored_under_the_old_analyzer(conn, pg_dsn, 25)
        await conn.execute("DROP TABLE chatfleet_meta")
        store = PgVectorStore(pg_dsn, reanalyze_batch=4)
        stack.push_async_callback(store.aclose)
        await store.start()
        await eventually(lambda: recorded(conn, ANALYZER))
        assert await position(conn) is None
        assert await lexemes(conn) == {
            chunk_id: new_terms(OLD_TEXT.format(i)) for i, chunk_id in enumerate(ids)}
        assert len(await store.lexical_search(KB, "admitted", 50)) == 25


async def test_pgvector_re_analysis_stopped_midway_resumes_where_it_stopped(pg_dsn: str) -> None:
    """A transaction holding chunk 12's row stops the re-analysis (batches of 4) there: searches
    and uploads work meanwhile, the store closes, and the next start goes on from chunk 12."""
    async with AsyncExitStack() as stack:
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        ids = await stored_under_the_old_analyzer(conn, pg_dsn, 20)
        hold = await row_lock_held(stack, pg_dsn, ids[12])
        store = PgVectorStore(pg_dsn, reanalyze_batch=4)
        await store.start()
        await eventually(lambda: stopped_at(conn, ids[11]))

        admitted = await store.lexical_search(KB, "admitted", 50)
        assert sorted(hit.chunk.seq for hit in admitted) == list(range(12))  # done: stems
        assert len(await store.lexical_search(KB, "order", 50)) == 20  # one term in both
        await put(store, "b.txt", drafts("Admitted meanwhile."))
        assert "Admitted meanwhile." in texts(await store.lexical_search(KB, "admitted", 50))

        await asyncio.wait_for(store.aclose(), timeout=10)
        await hold.rollback()
        assert await position(conn) == ids[11] and await recorded(conn, BM25S_DEFAULTS)
        await conn.execute("UPDATE chatfleet_chunk SET lexemes = 'done' WHERE id <= $1", ids[11])
        resumed = PgVectorStore(pg_dsn, reanalyze_batch=4)
        stack.push_async_callback(resumed.aclose)
        await resumed.start()
        await eventually(lambda: recorded(conn, ANALYZER))
        stored = await lexemes(conn)
        assert [stored[chunk_id] for chunk_id in ids[:12]] == ["done"] * 12  # not done again
        assert [stored[chunk_id] for chunk_id in ids[12:]] == [
            new_terms(OLD_TEXT.format(i)) for i in range(12, 20)]
        assert await position(conn) is None


async def test_pgvector_re_analysis_runs_on_one_replica_and_another_takes_over_if_it_stops(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="chatfleet.rag.stores.pgvector")
    async with AsyncExitStack() as stack:
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        ids = await stored_under_the_old_analyzer(conn, pg_dsn, 12)
        hold = await row_lock_held(stack, pg_dsn, ids[4])
        first = PgVectorStore(pg_dsn, reanalyze_batch=4)
        stack.push_async_callback(first.aclose)
        await first.start()
        await eventually(lambda: stopped_at(conn, ids[3]))
        caplog.clear()
        second = PgVectorStore(pg_dsn, reanalyze_batch=4, reanalyze_retry_s=0.05)
        stack.push_async_callback(second.aclose)
        await second.start()

        def messages(start: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

        async def skipped_thrice() -> bool:
            return len(messages("another replica is re-analyzing")) >= 3

        await eventually(skipped_thrice)
        assert messages("re-analyzing chunks") == []
        await first.aclose()
        await hold.rollback()
        await eventually(lambda: recorded(conn, ANALYZER))
        [took_over] = messages("re-analyzing chunks")
        assert took_over.endswith(f"after chunk {ids[3]}")


async def test_pgvector_re_analysis_keeps_the_terms_of_a_chunk_edited_after_it_read_it(
        pg_dsn: str) -> None:
    """An edit (``edit_chunks``) that commits between the re-analysis's read of a chunk and its
    write already stored the new text's terms: the old text's must not overwrite them."""
    async with AsyncExitStack() as stack:
        conn = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(conn.close)
        ids = await stored_under_the_old_analyzer(conn, pg_dsn, 8)
        editor = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(editor.close)
        edit = editor.transaction()
        await edit.start()
        edited = "Tokens stream from the engine."
        await editor.execute("UPDATE chatfleet_chunk SET text = $2, lexemes = $3 WHERE id = $1",
                             ids[5], edited, new_terms(edited))
        store = PgVectorStore(pg_dsn, reanalyze_batch=4)
        stack.push_async_callback(store.aclose)
        await store.start()
        await eventually(lambda: stopped_at(conn, ids[3]))  # read chunk 5, waits to write it
        await edit.commit()
        await eventually(lambda: recorded(conn, ANALYZER))
        assert await lexemes(conn) == {chunk_id: new_terms(edited if chunk_id == ids[5] else
                                                           OLD_TEXT.format(i))
                                       for i, chunk_id in enumerate(ids)}


async def test_a_chinese_question_finds_the_chunk_that_shares_its_words(store) -> None:
    """Chinese has no spaces: both stores index characters and bigrams, so '检索' matches a chunk
    that writes it inside a longer run."""
    await store.create_kb(KB, info="", embed_model="")
    await store.put_file(KB, "zh.txt", b"zh", [ChunkDraft(text="中文检索很好"),
                                                ChunkDraft(text="向量数据库")],
                         loader="TextLoader", splitter="RecursiveCharacterTextSplitter")
    hits = await store.lexical_search(KB, "如何检索", 5)
    assert [hit.chunk.text for hit in hits] == ["中文检索很好"]


# Two instances on one store: a pod's worker processes ------------------------------------------

async def started_pair(kind: str, request: pytest.FixtureRequest) -> tuple[KnowledgeStore, ...]:
    """Two instances of ``kind`` on one store (one ``data_dir``, or one database), as two worker
    processes of a pod hold them; closed by the test's finalizer."""
    pair = tuple(STORES[kind](request) for _ in range(2))
    for instance in pair:
        await instance.start()
    return pair


async def close(*stores: KnowledgeStore) -> None:
    for instance in stores:
        await instance.aclose()


@pytest.mark.parametrize("kind", list(STORES))
async def test_two_instances_on_one_store_see_each_others_writes_at_once(
        kind: str, request: pytest.FixtureRequest) -> None:
    one, two = await started_pair(kind, request)
    try:
        await one.create_kb(KB, info="", embed_model="m")
        await put(one, "a.txt", drafts("alpha", "zebra", vectors=[axis(0), axis(1)]))
        assert texts(await two.lexical_search(KB, "zebra", 5)) == ["zebra"]
        assert texts(await two.dense_search(KB, axis(0), 1)) == ["alpha"]
        chunks = await two.list_chunks(KB, "a.txt")
        await two.edit_chunks(KB, "a.txt", {chunks[1].id: ChunkDraft(
            text="yak", metadata={}, embedding=axis(1))})
        assert texts(await one.lexical_search(KB, "yak zebra", 5)) == ["yak"]
        assert [c.id for c in await one.list_chunks(KB, "a.txt")] == [c.id for c in chunks]
        await put(two, "b.txt", drafts("bravo", vectors=[axis(2)]))
        await one.delete_file(KB, "a.txt")
        assert texts(await two.dense_search(KB, axis(0), 5)) == ["bravo"]
        await two.delete_kb(KB)
        with pytest.raises(KnowledgeBaseNotFound):
            await one.lexical_search(KB, "bravo", 5)
        await two.create_kb(KB, info="", embed_model="m")
        await put(two, "c.txt", drafts("charlie", vectors=[axis(3)]))
        assert texts(await one.dense_search(KB, axis(2), 5)) == ["charlie"]
    finally:
        await close(one, two)


@pytest.mark.parametrize("kind", list(STORES))
async def test_two_instances_writing_one_kb_at_once_lose_nothing(
        kind: str, request: pytest.FixtureRequest) -> None:
    """The KB exists before both start (each knows it): 40 uploads, 20 through each, at once."""
    first = STORES[kind](request)
    await first.start()
    await first.create_kb(KB, info="", embed_model="m")
    await first.aclose()
    one, two = await started_pair(kind, request)
    try:
        await asyncio.gather(*(put((one, two)[i % 2], f"f{i}.txt", drafts(
            *(f"word{i} chunk{n}" for n in range(50)), vectors=[unit(1, i)] * 50))
            for i in range(40)))
        for instance in (one, two):
            assert len(await instance.list_files(KB)) == 40
            for i in range(40):
                hits = await instance.lexical_search(KB, f"word{i}", 100)
                assert {hit.chunk.file_name for hit in hits} == {f"f{i}.txt"}
                assert len(hits) == 50
    finally:
        await close(one, two)


@pytest.mark.parametrize("kind", list(STORES))
async def test_a_conditional_write_loses_to_another_instances_write_in_between(
        kind: str, request: pytest.FixtureRequest) -> None:
    one, two = await started_pair(kind, request)
    try:
        await one.create_kb(KB, info="", embed_model="m")
        await put(one, "a.txt", drafts("alpha"))
        record_one, = await one.list_files(KB)
        record_two, = await two.list_files(KB)
        await one.put_file(KB, "a.txt", b"v2", drafts("bravo"), loader="l", splitter="s",
                           replaces=record_one)
        with pytest.raises(FileChanged) as raised:
            await two.put_file(KB, "a.txt", b"v3", drafts("charlie"), loader="l", splitter="s",
                               replaces=record_two)
        assert not raised.value.deleted
        for instance in (one, two):
            assert texts(await instance.lexical_search(KB, "alpha bravo charlie", 5)) == ["bravo"]
    finally:
        await close(one, two)


async def test_a_local_store_further_behind_than_the_change_log_reloads_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_CHANGE_LOG_KEEP", 3)
    monkeypatch.setattr(local, "_PRUNE_EVERY", 1)
    one, two = LocalStore(tmp_path), LocalStore(tmp_path)
    await one.start()
    await two.start()
    try:
        await one.create_kb(KB, info="", embed_model="")
        await one.create_kb("other", info="", embed_model="")
        await put(one, "gone.txt", drafts("kilo"), kb="other")
        assert texts(await two.lexical_search("other", "kilo", 5)) == ["kilo"]
        for n in range(6):
            await put(one, f"f{n}.txt", drafts(f"lima{n}"))
        await one.delete_kb("other")
        assert texts(await two.lexical_search(KB, "lima0 lima5", 5)) == ["lima0", "lima5"]
        with pytest.raises(KnowledgeBaseNotFound):
            await two.lexical_search("other", "kilo", 5)
    finally:
        await close(one, two)
