"""Ingestion: bytes of an uploaded file in, a stored file with its chunks (and embeddings) out.

Load (langchain loader) and split (langchain splitter) run in worker threads, embeddings are
requested in concurrent batches, and the store writes the file and its chunks in one transaction.
Any failure before that write leaves the knowledge base unchanged. Called by the upload,
update and recreate routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from chatfleet.rag.embeddings import Embedder
from chatfleet.rag.loaders import EmptyDocument, check_extension, load_document
from chatfleet.rag.splitting import split_documents
from chatfleet.rag.stores.base import ChunkDraft, FileRecord, KnowledgeStore

__all__ = ["Ingestor", "SplitOptions"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitOptions:
    chunk_size: int
    chunk_overlap: int

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size is {self.chunk_size}; it must be at least 1")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"chunk_overlap is {self.chunk_overlap}; it must be at least 0 and "
                             f"smaller than chunk_size ({self.chunk_size})")


class Ingestor:
    def __init__(self, store: KnowledgeStore, embedder: Embedder | None, *,
                 on_chunks: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self._on_chunks = on_chunks

    async def ingest(self, kb: str, file_name: str, content: bytes,
                     split: SplitOptions) -> FileRecord:
        """Store one file (replacing one of the same name). Raises the loaders' errors
        (``UnsupportedFileType``, ``EmptyDocument``, ``UnreadableDocument``), ``EmbeddingError``,
        or ``KnowledgeBaseNotFound``; in each case nothing was stored."""
        check_extension(file_name)
        if not content:
            raise EmptyDocument(file_name)
        loaded = await asyncio.to_thread(load_document, file_name, content)
        result = await asyncio.to_thread(split_documents, loaded.documents,
                                         chunk_size=split.chunk_size,
                                         chunk_overlap=split.chunk_overlap, file_name=file_name)
        if not result.chunks:
            raise EmptyDocument(file_name)
        texts = [chunk.page_content for chunk in result.chunks]
        vectors = await self.embedder.embed_documents(texts) if self.embedder is not None else None
        drafts = [ChunkDraft(text=text, metadata=dict(chunk.metadata),
                             embedding=None if vectors is None else vectors[i])
                  for i, (text, chunk) in enumerate(zip(texts, result.chunks, strict=True))]
        record = await self.store.put_file(kb, file_name, content, drafts, loader=loaded.loader,
                                           splitter=result.splitter)
        if self._on_chunks is not None:
            self._on_chunks(len(drafts))
        return record
