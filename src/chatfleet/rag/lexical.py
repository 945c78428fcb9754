"""BM25 over a knowledge base's chunks, updated in place as files come and go, and the analyzer
that turns text into its terms.

Chatchat rebuilds a BM25 index over the whole KB on every query (langchain's BM25Retriever,
under a lock: 10 s at 20k chunks). bm25s, the fast library for it, builds a static index: its
sparse matrix bakes each term's IDF over the whole corpus into every entry, so adding one file
means rebuilding it, O(KB) per upload. ``Bm25Index`` keeps bm25s's default scoring
(``method="lucene"``: the same formula, the same numbers; tests/unit/test_rag_lexical.py checks
it against ``bm25s.BM25``) but stores an inverted index of raw term frequencies, so adding or
removing a chunk touches only that chunk's terms and IDF is computed at query time from the
current counts.

Terms (``Analyzer``): bm25s's word pattern, with, by default, the English stopword list bm25s
ships as ``en_plus`` (NLTK's, which has the question words "how", "does", "what" that bm25s's
default list lacks) and the Snowball English stemmer that bm25s uses (PyStemmer), so "scaling",
"scales" and "scaled" meet. A chunk is indexed by its text and, once more, by its headings and
lead-in labels (``rag/markdown.py``). Measured on labelled questions about this project's own
docs (docs/benchmarks.md, "Retrieval quality"); ``BM25S_DEFAULTS`` is the analyzer before that,
kept to measure against. Both stores use the same analyzer, so the pgvector store's full-text
search sees the same terms.

Not thread-safe: the local store serialises access to a ``Bm25Index``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_EN_PLUS

from chatfleet.rag.markdown import HEADINGS, lead_in_labels

__all__ = ["ANALYZER", "BM25S_DEFAULTS", "Analyzer", "Bm25Index", "tokenize"]

K1 = 1.5
B = 0.75
"""bm25s's defaults (and Lucene's), so scores equal ``bm25s.BM25()``'s. Other values moved
recall@3 on the labelled questions by at most one (docs/benchmarks.md)."""

_WORD = re.compile(r"(?u)\b\w\w+\b")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
_stemmers = threading.local()
"""One Snowball stemmer per thread: a PyStemmer ``Stemmer`` must not be shared between threads."""


def _stem(words: list[str]) -> list[str]:
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        stemmer = _stemmers.english = Stemmer.Stemmer("english")
    return stemmer.stemWords(words)


@dataclass(frozen=True, kw_only=True, slots=True)
class Analyzer:
    """How text becomes BM25 terms. The pgvector store stores each chunk's terms and records
    ``name`` with them: a database written under another analyzer is re-analyzed after start, so
    a change to what an analyzer makes must come with a new name."""

    name: str
    stopwords: frozenset[str]
    stem: bool
    headings: bool
    """Index a chunk by its headings and lead-in labels too."""

    def tokenize(self, text: str) -> list[str]:
        """Lower-cased words of two or more characters (bm25s's pattern), stopwords dropped,
        stemmed when ``stem``; a run of CJK characters, which has no spaces to split on, gives
        its characters and its character bigrams instead of one token for the whole run."""
        tokens: list[str] = []
        lowered = text.lower()
        cursor = 0
        for run in _CJK_RUN.finditer(lowered):
            tokens.extend(self._words(lowered, cursor, run.start()))
            chars = run.group()
            tokens.extend(chars)
            tokens.extend(chars[i:i + 2] for i in range(len(chars) - 1))
            cursor = run.end()
        tokens.extend(self._words(lowered, cursor, len(lowered)))
        return tokens

    def _words(self, lowered: str, start: int, end: int) -> list[str]:
        words = [w for w in _WORD.findall(lowered, start, end) if w not in self.stopwords]
        return _stem(words) if self.stem and words else words

    def chunk_terms(self, text: str, metadata: Mapping[str, Any]) -> list[str]:
        """The terms a chunk is indexed by: its text's, then (``headings``) those of its
        headings (``metadata["headings"]``) and of its lead-in labels, which so count twice."""
        if not self.headings:
            return self.tokenize(text)
        headings = metadata.get(HEADINGS)
        titles = [h for h in headings if isinstance(h, str)] if isinstance(headings, list) else []
        return self.tokenize("\n".join([text, *titles, *lead_in_labels(text)]))


ANALYZER = Analyzer(name="words+en_plus+snowball_en+headings",
                    stopwords=frozenset(STOPWORDS_EN_PLUS), stem=True, headings=True)
"""The analyzer both stores use."""

BM25S_DEFAULTS = Analyzer(name="words+en", stopwords=frozenset(STOPWORDS_EN), stem=False,
                        headings=False)
"""bm25s's default tokens and stopwords, nothing more: the analyzer before ``ANALYZER``, which
scripts/bench_retrieval.py measures against it."""


def tokenize(text: str) -> list[str]:
    """``ANALYZER``'s terms of ``text`` (a question, or a chunk without its headings)."""
    return ANALYZER.tokenize(text)


class Bm25Index:
    """An inverted index of term frequencies, keyed by integer document ids the caller chooses.

    Each document gets a slot (a row of the length array); each term's postings are kept as a
    dict and, once a query has needed them, as numpy arrays that the next change to that term
    drops. A query is then a few vector operations per query term.
    """

    def __init__(self) -> None:
        self._postings: dict[str, dict[int, int]] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._slot_of: dict[int, int] = {}
        self._doc_of_slot: list[int] = []
        self._lengths = np.zeros(64, dtype=np.float64)
        self._total_length = 0.0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self._slot_of

    def add(self, doc_id: int, tokens: Iterable[str]) -> None:
        if doc_id in self._slot_of:
            raise KeyError(f"document {doc_id} is already indexed")
        slot = len(self._doc_of_slot)
        self._doc_of_slot.append(doc_id)
        self._slot_of[doc_id] = slot
        if slot >= len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        counts = Counter(tokens)
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[slot] = tf
            self._arrays.pop(term, None)
        length = float(sum(counts.values()))
        self._lengths[slot] = length
        self._total_length += length

    def remove(self, doc_id: int, tokens: Iterable[str]) -> None:
        """Forget a document; ``tokens`` must be the ones it was added with. Its slot stays
        empty (length 0, in no posting)."""
        slot = self._slot_of.pop(doc_id)
        for term in set(tokens):
            posting = self._postings.get(term)
            if posting is not None:
                posting.pop(slot, None)
                self._arrays.pop(term, None)
                if not posting:
                    del self._postings[term]
        self._total_length -= self._lengths[slot]
        self._lengths[slot] = 0.0

    def _posting_arrays(self, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        arrays = self._arrays.get(term)
        if arrays is None:
            posting = self._postings.get(term)
            if not posting:
                return None
            arrays = (np.fromiter(posting.keys(), dtype=np.int64, count=len(posting)),
                      np.fromiter(posting.values(), dtype=np.float64, count=len(posting)))
            self._arrays[term] = arrays
        return arrays

    def search(self, query_tokens: Iterable[str], k: int) -> list[tuple[int, float]]:
        """The ``k`` best (doc_id, score) pairs, best first; documents sharing no term are left out."""
        n_docs = len(self._slot_of)
        if n_docs == 0 or k <= 0:
            return []
        avg_length = self._total_length / n_docs
        scores = np.zeros(len(self._doc_of_slot), dtype=np.float64)
        for term in set(query_tokens):
            arrays = self._posting_arrays(term)
            if arrays is None:
                continue
            slots, tf = arrays
            df = len(slots)
            idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
            lengths = self._lengths[slots]
            scores[slots] += idf * tf / (tf + K1 * (1.0 - B + B * lengths / avg_length))
        matched = np.flatnonzero(scores > 0)
        if len(matched) > k:
            matched = matched[np.argpartition(-scores[matched], k - 1)[:k]]
        order = sorted(matched.tolist(), key=lambda slot: (-scores[slot], self._doc_of_slot[slot]))
        return [(self._doc_of_slot[slot], float(scores[slot])) for slot in order]
