"""The local store's BM25 index (bm25s's numbers, kept up to date file by file) and the analyzer
that makes the terms of chunks and questions for both stores."""

from __future__ import annotations

import random

import bm25s
import pytest

from chatfleet.rag.lexical import ANALYZER, BM25S_DEFAULTS, Bm25Index, tokenize

WORDS = ["kubernetes", "pod", "replica", "gateway", "queue", "engine", "token", "latency", "vector", "index", "chunk", "file", "answer", "question", "policy", "scale", "cold", "start", "prompt", "cache", "batch", "slot", "drain", "metric"]


def _corpus(n: int, seed: int = 7) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def test_scores_equal_bm25s_lucene_scores_on_the_same_tokens() -> None:
    corpus = _corpus(300)
    reference = bm25s.BM25()  # method="lucene", k1=1.5, b=0.75
    reference.index([list(doc) for doc in corpus], show_progress=False)
    index = Bm25Index()
    for doc_id, tokens in enumerate(corpus):
        index.add(doc_id, tokens)
    for query in (["queue", "slot"], ["vector"], ["cold", "start", "pod", "replica"]):
        ours = dict(index.search(query, k=300))
        expected = reference.get_scores(query)
        for doc_id in range(len(corpus)):
            assert ours.get(doc_id, 0.0) == pytest.approx(float(expected[doc_id]), rel=1e-5, abs=1e-6)


def test_an_index_built_by_adds_and_removes_ranks_like_one_built_from_scratch() -> None:
    corpus = _corpus(200, seed=3)
    churned = Bm25Index()
    for doc_id, tokens in enumerate(corpus):
        churned.add(doc_id, tokens)
    removed = set(range(0, 200, 3))
    for doc_id in removed:
        churned.remove(doc_id, corpus[doc_id])
    fresh = Bm25Index()
    for doc_id, tokens in enumerate(corpus):
        if doc_id not in removed:
            fresh.add(doc_id, tokens)
    query = ["engine", "token", "latency"]
    assert churned.search(query, k=20) == pytest.approx(fresh.search(query, k=20))
    assert len(churned) == 200 - len(removed)
    assert not any(doc_id in removed for doc_id, _ in churned.search(query, k=200))


def test_documents_sharing_no_query_term_are_left_out() -> None:
    index = Bm25Index()
    index.add(1, tokenize("the gateway holds the queue"))
    index.add(2, tokenize("vLLM batches requests on the GPU"))
    assert [doc_id for doc_id, _ in index.search(tokenize("which queue?"), k=10)] == [1]
    assert index.search(tokenize("photosynthesis"), k=10) == []


def test_adding_a_document_twice_is_refused() -> None:
    index = Bm25Index()
    index.add(1, ["queue"])
    with pytest.raises(KeyError, match="already indexed"):
        index.add(1, ["queue"])


def test_tokens_drop_english_stopwords_and_split_chinese_into_characters_and_bigrams() -> None:
    assert tokenize("The queue is FULL") == ["queue", "full"]
    assert tokenize("知识库") == ["知", "识", "库", "知识", "识库"]
    assert tokenize("pgvector 检索") == ["pgvector", "检", "索", "检索"]


def test_questions_lose_their_question_words_and_words_meet_at_their_stems() -> None:
    assert tokenize("How does scaling work?") == ["scale", "work"]
    assert tokenize("Which replicas scaled?") == ["replica", "scale"]
    assert tokenize("检索 works, 知识") == ["检", "索", "检索", "work", "知", "识", "知识"]
    # bm25s's defaults, the analyzer before: its shorter stopword list, no stems
    assert BM25S_DEFAULTS.tokenize("How does scaling work?") == ["how", "does", "scaling", "work"]


def test_a_chunk_is_indexed_by_its_text_then_its_headings_and_lead_in_labels() -> None:
    text = "- **Admission**: slots, then the queue.\n- more"
    headings = {"headings": ["ChatFleet", "What it does"], "source": "README.md"}
    assert ANALYZER.chunk_terms(text, headings) == [
        "admiss", "slot", "queue", "chatfleet", "admiss"]
    assert ANALYZER.chunk_terms(text, {}) == ["admiss", "slot", "queue", "admiss"]
    assert ANALYZER.chunk_terms(text, {"headings": "not a list"}) == ANALYZER.chunk_terms(text, {})
    assert BM25S_DEFAULTS.chunk_terms(text, headings) == BM25S_DEFAULTS.tokenize(text)
