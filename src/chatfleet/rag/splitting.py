"""Cuts loaded Documents into the chunks that get embedded, indexed and put into prompts.

The ingestion pipeline (``rag/ingest.py``) calls ``split_documents`` in a worker process, right after
``rag/loaders.py``; sizes are ``kb.chunk_size`` and ``kb.chunk_overlap`` (Chatchat's CHUNK_SIZE 750
and OVERLAP_SIZE 150), in characters.

Each Document is split on its own, so a chunk never spans two PDF pages or two CSV rows (rows are
already small; merging them would mix records in one chunk). A Markdown chunk also gets the headings
in force where it starts (``rag/markdown.py``), which the lexical index searches with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from langchain_core.documents import Document
from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from chatfleet.rag.loaders import FileTooLarge
from chatfleet.rag.markdown import HEADINGS, heading_paths

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
    """In file order; each has its Document's metadata plus ``"chunk"``, its index in the file,
    and for Markdown ``"headings"``, the titles of the headings in force where it starts
    (outermost first; left out before the first heading)."""
    splitter: str
    """The langchain splitter class, e.g. "RecursiveCharacterTextSplitter"."""


def split_documents(documents: Sequence[Document], *, chunk_size: int = 750,
                    chunk_overlap: int = 150, file_name: str,
                    max_chunks: int | None = None) -> SplitResult:
    """Split the Documents of the file ``file_name``; chunks empty after strip are dropped.
    More than ``max_chunks`` (kb.max_file_chunks) raises ``FileTooLarge``.

    Markdown (``.md``) is cut at headings, code fences and rules first (langchain's Markdown
    separators, which keep a heading at the start of its section's chunk); everything else uses
    ``SENTENCE_SEPARATORS``.
    """
    markdown = os.path.splitext(file_name)[1].lower() == ".md"
    splitter = _splitter(markdown, chunk_size, chunk_overlap)
    chunks: list[Document] = []
    for document in documents:
        # For Markdown, create_documents finds each piece's offset in the text (start_index)
        # searching on from the previous piece's, so a repeated piece is placed where it was cut.
        pieces = [piece for piece in splitter.create_documents([document.page_content])
                  if piece.page_content.strip()]
        paths = (heading_paths(document.page_content,
                               [piece.metadata["start_index"] for piece in pieces])
                 if markdown else [[] for _ in pieces])
        for piece, path in zip(pieces, paths, strict=True):
            metadata = {**document.metadata, "chunk": len(chunks)}
            if path:
                metadata[HEADINGS] = path
            chunks.append(Document(page_content=piece.page_content, metadata=metadata))
        if max_chunks is not None and len(chunks) > max_chunks:
            raise FileTooLarge(file_name, f"it splits into more than {max_chunks} chunks, "
                               "the most one file may have",
                               "kb.max_file_chunks")
    return SplitResult(chunks=chunks, splitter=type(splitter).__name__)


def _splitter(markdown: bool, chunk_size: int,
              chunk_overlap: int) -> RecursiveCharacterTextSplitter:
    if markdown:
        return RecursiveCharacterTextSplitter.from_language(
            Language.MARKDOWN, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
            add_start_index=True)
    return RecursiveCharacterTextSplitter(
        separators=list(SENTENCE_SEPARATORS), keep_separator="end", chunk_size=chunk_size,
        chunk_overlap=chunk_overlap)
