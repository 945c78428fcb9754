"""engines/hashed_embeddings.py: the stand-in embedding model of engine-sim and the RAG tests."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from chatfleet.engines.hashed_embeddings import (
    DEFAULT_DIM,
    hashed_embedding,
    hashed_embeddings,
)

TEXTS = ["Kubernetes scales the gateway's pods", "向量检索与知识库问答", "", "naïve café ÜBER"]


def cosine(a: str, b: str) -> float:
    return float(hashed_embedding(a) @ hashed_embedding(b))


def test_the_same_text_gives_the_same_vector_in_another_process_with_another_hash_seed() -> None:
    script = ("import sys; from chatfleet.engines.hashed_embeddings import hashed_embeddings; "
              "sys.stdout.write(hashed_embeddings(sys.argv[1:]).tobytes().hex())")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, *TEXTS], check=True, capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert bytes.fromhex(out) == hashed_embeddings(TEXTS).tobytes()


@pytest.mark.parametrize("dim", [1, 7, 64, DEFAULT_DIM, 1024])
def test_every_vector_is_float32_of_unit_length(dim: int) -> None:
    for text in [*TEXTS, "word " * 1000, "!!! ...", "a"]:
        vector = hashed_embedding(text, dim)
        assert vector.dtype == np.float32 and vector.shape == (dim,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


def test_texts_that_share_words_are_closer_than_texts_that_share_none() -> None:
    query = "how does the gateway queue requests"
    related = "The gateway holds requests in a bounded queue before the engine"
    unrelated = "Bake bread at 220 degrees for forty minutes"
    assert cosine(query, related) > 0.4
    # Not 0: in 256 dimensions "bake" and "queue" share a bucket; one collision between texts of
    # 6 and 8 tokens is 1/sqrt(48), about 0.14.
    assert abs(cosine(query, unrelated)) < 0.2


def test_case_does_not_matter_and_a_repeated_word_counts_less_than_linearly() -> None:
    assert np.array_equal(hashed_embedding("Hello World"), hashed_embedding("hello world"))
    # Term frequency is sublinear: ten "cat"s do not drown one "dog".
    assert cosine("cat " * 10 + "dog", "dog") > 0.25


def test_chinese_text_is_split_into_characters_and_bigrams() -> None:
    query = "知识库问答怎么用"
    related = "知识库问答的使用方法"
    unrelated = "今天天气很好"
    assert cosine(query, related) > 0.4
    # Not 0: in 256 dimensions "bake" and "queue" share a bucket; one collision between texts of
    # 6 and 8 tokens is 1/sqrt(48), about 0.14.
    assert abs(cosine(query, unrelated)) < 0.2
    # A CJK run inside latin text is still found.
    assert cosine("deploy 知识库 now", "知识库") > 0.5


def test_a_text_without_tokens_gets_the_first_basis_vector_not_nan() -> None:
    for text in ("", "   ", "?!.,;"):
        vector = hashed_embedding(text, 8)
        assert vector.tolist() == [1.0] + [0.0] * 7


def test_the_batch_helper_stacks_the_single_vectors() -> None:
    batch = hashed_embeddings(TEXTS, 32)
    assert batch.shape == (len(TEXTS), 32) and batch.dtype == np.float32
    for row, text in zip(batch, TEXTS, strict=True):
        assert np.array_equal(row, hashed_embedding(text, 32))
    assert hashed_embeddings([], 32).shape == (0, 32)


def test_a_dimension_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        hashed_embedding("text", 0)
    with pytest.raises(ValueError, match="at least 1"):
        hashed_embeddings(["text"], 0)
