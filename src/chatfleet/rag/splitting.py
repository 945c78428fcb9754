"""Cuts loaded Documents into the chunks that get embedded, indexed and put into prompts.

The ingestion pipeline (``rag/ingest.py``) calls ``split_documents`` in a worker thread, right after
``rag/loaders.py``; sizes are ``kb.chunk_size`` and ``kb.chunk_overlap`` (Chatchat's CHUNK_SIZE 750
and OVERLAP_SIZE 150), in characters.

Each Document is split on its own, so a chunk never spans two PDF pages or two CSV rows (rows are
already small; merging them would mix records in one chunk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from langchain_core.documents import Document
from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

__all__ = ["SENTENCE_SEPARATORS", "SplitResult", "split_documents"]

SENTENCE_SEPARATORS: tuple[str, ...] = (
    "\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", "；", "; ", "，", ", ", " ", "",
)
"""Tried in order: paragraphs, lines, then Chinese and Latin sentence ends, clause marks, words,
and characters as the last resort. Each separator stays at the end of the piece before it, so a
chunk ends with its sentence's full stop instead of the next chunk starting with it."""


@dataclass(frozen=True)
class SplitResult:
    chunks: list[Document]
    """In file order; each has its Document's metadata plus ``"chunk"``, its index in the file."""
    splitter: str
    """The langchain splitter class, e.g. "RecursiveCharacterTextSplitter"."""


def split_documents(documents: Sequence[Document], *, chunk_size: int = 750,
                    chunk_overlap: int = 150, file_name: str) -> SplitResult:
    """Split the Documents of the file ``file_name``; chunks empty after strip are dropped.

    Markdown (``.md``) is cut at headings, code fences and rules first (langchain's Markdown
    separators, which keep a heading at the start of its section's chunk); everything else uses
    ``SENTENCE_SEPARATORS``.
    """
    splitter = _splitter_for(file_name, chunk_size, chunk_overlap)
    chunks: list[Document] = []
    for document in documents:
        for text in splitter.split_text(document.page_content):
            if text.strip():
                chunks.append(Document(page_content=text,
                                       metadata={**document.metadata, "chunk": len(chunks)}))
    return SplitResult(chunks=chunks, splitter=type(splitter).__name__)


def _splitter_for(file_name: str, chunk_size: int,
                  chunk_overlap: int) -> RecursiveCharacterTextSplitter:
    if os.path.splitext(file_name)[1].lower() == ".md":
        return RecursiveCharacterTextSplitter.from_language(
            Language.MARKDOWN, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    return RecursiveCharacterTextSplitter(
        separators=list(SENTENCE_SEPARATORS), keep_separator="end", chunk_size=chunk_size,
        chunk_overlap=chunk_overlap)
