"""Deterministic "feature hashing" embeddings: dense retrieval without an embedding model.

This is NOT a language model and knows nothing of meaning: it stands in for one, so that the
dense half of retrieval (embedding, storing, cosine search, fusion) can be run and tested
anywhere, fast and reproducibly. ``chatfleet engine-sim`` serves it at ``/v1/embeddings``; tests
call it directly to know which vectors to expect.

A text's tokens are its lower-cased words (``\\w+``) and, for each run of CJK characters (which
has no spaces to split on), the run's characters and character bigrams. Each distinct token adds
``1 + log(tf)`` (sublinear term frequency) to one dimension, with a sign, both picked by a stable
hash of the token (blake2b: Python's ``hash()`` of a str changes with every process). The sum is
L2-normalized, so texts that share words have a high cosine similarity and texts that share none
are near-orthogonal.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_DIM", "hashed_embedding", "hashed_embeddings"]

DEFAULT_DIM = 256

_WORD = re.compile(r"\w+")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
"""Hiragana, katakana, CJK ideographs (with extension A and compatibility) and Hangul syllables."""


def _tokens(text: str) -> list[str]:
    """Words outside CJK runs; characters and bigrams inside them.

    A CJK run gives no word token of its own: ``\\w+`` would match the whole run, often a whole
    sentence, which another text almost never repeats.
    """
    lowered = text.lower()
    tokens: list[str] = []
    cursor = 0
    for run in _CJK_RUN.finditer(lowered):
        tokens.extend(_WORD.findall(lowered, cursor, run.start()))
        chars = run.group()
        tokens.extend(chars)
        tokens.extend(chars[i:i + 2] for i in range(len(chars) - 1))
        cursor = run.end()
    tokens.extend(_WORD.findall(lowered, cursor))
    return tokens


@lru_cache(maxsize=1 << 16)
def _bucket(token: str, dim: int) -> tuple[int, float]:
    """The dimension and sign of ``token``: the same in every process and on every machine."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little") % dim, (1.0 if digest[4] & 1 else -1.0)


def hashed_embedding(text: str, dim: int = DEFAULT_DIM) -> npt.NDArray[np.float32]:
    """A unit vector of ``dim`` float32s for ``text``.

    A text without tokens (empty, or only punctuation), or whose tokens happen to cancel out,
    gets the first basis vector, so the result is always a unit vector and never NaN.
    """
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    vector = np.zeros(dim, dtype=np.float64)
    for token, tf in Counter(_tokens(text)).items():
        index, sign = _bucket(token, dim)
        vector[index] += sign * (1.0 + math.log(tf))
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        vector[0] = 1.0
        norm = 1.0
    return (vector / norm).astype(np.float32)


def hashed_embeddings(texts: Sequence[str], dim: int = DEFAULT_DIM) -> npt.NDArray[np.float32]:
    """``hashed_embedding`` of each text, as the rows of an ``(len(texts), dim)`` array."""
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    out = np.empty((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        out[row] = hashed_embedding(text, dim)
    return out
