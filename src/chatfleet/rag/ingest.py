"""Ingestion: bytes of an uploaded file in, a stored file with its chunks (and embeddings) out.

Load (langchain loader) and split (langchain splitter) run in a worker *process*, embeddings are
requested in concurrent batches, and the store writes the file and its chunks in one transaction.
Any failure before that write leaves the knowledge base unchanged. Called by the upload,
update and recreate routes.

Why a process and not a thread: parsing and splitting a large file is seconds of Python that
holds the GIL, and a thread doing it stalled the gateway's event loop for 70-125 ms at a time
(asyncio debug mode, tests/integration/test_event_loop.py), which every stream's tokens wait
behind. The pool is started on first use (the worker imports langchain: about a second, and
100-150 MB), with ``workers`` processes (``kb.ingest_workers``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from chatfleet.rag.embeddings import Embedder
from chatfleet.rag.loaders import (
    EmptyDocument,
    LoadedDocument,
    UnreadableDocument,
    check_extension,
    load_document,
)
from chatfleet.rag.splitting import SplitResult, split_documents
from chatfleet.rag.stores.base import CUSTOM_DOCS, ChunkDraft, FileRecord, KnowledgeStore

__all__ = ["IngestBusy", "Ingestor", "SplitOptions"]


class IngestBusy(Exception):
    """All ingestion slots are taken and as many requests wait as may: come back later."""

    retry_after_s = 5

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"{running} ingestions are running and {waiting} are waiting, the most "
                         f"this replica takes (kb.max_queued_uploads); retry in "
                         f"{self.retry_after_s} s")


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


def _load_and_split(file_name: str, content: bytes, split: SplitOptions) -> tuple[LoadedDocument,
                                                                                  SplitResult]:
    """Runs in the worker process."""
    loaded = load_document(file_name, content)
    return loaded, split_documents(loaded.documents, chunk_size=split.chunk_size,
                                   chunk_overlap=split.chunk_overlap, file_name=file_name)


class Ingestor:
    """Ingests files. Requests that ingest take a slot first (``slot()``): two per worker process
    run at once (one splitting while the other's chunks are embedded and stored), up to
    ``max_waiting`` more wait, and beyond that ``IngestBusy``: uploads are bounded like chat
    requests, so a burst of them cannot pile up files in memory and on disk without limit."""

    def __init__(self, store: KnowledgeStore, embedder: Embedder | None, *, workers: int = 1,
                 max_waiting: int = 16, on_chunks: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._on_chunks = on_chunks
        self._running = 2 * workers
        self._slots = asyncio.Semaphore(self._running)
        self._waiting = 0
        self._max_waiting = max_waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold an ingestion slot for one request's files. Raises ``IngestBusy`` at once when
        all are taken and ``max_waiting`` requests already wait."""
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise IngestBusy(self._running, self._waiting)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stop the worker processes (waits for none: a stopping gateway has drained)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _in_worker(self, file_name: str, content: bytes,
                         split: SplitOptions) -> tuple[LoadedDocument, SplitResult]:
        if self._pool is None:
            # spawn, not fork: the gateway has threads (fork would copy their locks held).
            self._pool = ProcessPoolExecutor(self._workers, mp_context=get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _load_and_split, file_name, content,
                                              split)
        except BrokenProcessPool:
            self.close()  # the next upload starts a new worker
            raise UnreadableDocument(file_name, "the worker process reading it died (out of "
                                                "memory?)") from None

    async def ingest(self, kb: str, file_name: str, content: bytes, split: SplitOptions, *,
                     replaces: FileRecord | None = None) -> FileRecord:
        """Store one file (replacing one of the same name; only the one ``replaces`` describes
        when given, see ``KnowledgeStore.put_file``). Raises the loaders' errors
        (``UnsupportedFileType``, ``EmptyDocument``, ``UnreadableDocument``), ``EmbeddingError``,
        ``KnowledgeBaseNotFound`` or ``FileChanged``; in each case nothing was stored."""
        check_extension(file_name)
        if not content:
            raise EmptyDocument(file_name)
        loaded, result = await self._in_worker(file_name, content, split)
        if not result.chunks:
            raise EmptyDocument(file_name)
        return await self._store(kb, file_name, content,
                                 [(c.page_content, dict(c.metadata)) for c in result.chunks],
                                 loader=loaded.loader, splitter=result.splitter, replaces=replaces)

    async def ingest_custom(self, kb: str, file_name: str, content: bytes,
                            chunks: Sequence[tuple[str, dict[str, Any]]], *,
                            replaces: FileRecord | None = None) -> FileRecord:
        """Store one file with the client's own chunks (text, metadata) instead of the
        splitter's (Chatchat's custom docs); it is recorded as such. Raises
        ``UnsupportedFileType`` or ``EmptyDocument`` (no chunk has text), ``EmbeddingError`` or
        ``KnowledgeBaseNotFound``; in each case nothing was stored."""
        check_extension(file_name)
        if not chunks:
            raise EmptyDocument(file_name)
        return await self._store(kb, file_name, content, chunks, loader=CUSTOM_DOCS,
                                 splitter=CUSTOM_DOCS, custom_docs=True, replaces=replaces)

    async def edit_custom(self, kb: str, file_name: str,
                          edits: Mapping[str, tuple[str, dict[str, Any]] | None]) -> FileRecord:
        """Edit some of a stored file's chunks in place by id (new text and metadata, or None to
        delete them), embedding the new texts; the other chunks keep their ids. Raises
        ``StaleChunks``, ``EmbeddingError`` or ``KnowledgeBaseNotFound``; nothing changed then."""
        changed = {chunk_id: chunk for chunk_id, chunk in edits.items() if chunk is not None}
        texts = [text for text, _ in changed.values()]
        vectors = (await self.embedder.embed_documents(texts)
                   if self.embedder is not None and texts else None)
        drafts: dict[str, ChunkDraft | None] = {chunk_id: None for chunk_id in edits}
        for i, (chunk_id, (text, metadata)) in enumerate(changed.items()):
            drafts[chunk_id] = ChunkDraft(text=text, metadata=metadata,
                                          embedding=None if vectors is None else vectors[i])
        record = await self.store.edit_chunks(kb, file_name, drafts)
        if self._on_chunks is not None:
            self._on_chunks(len(changed))
        return record

    async def _store(self, kb: str, file_name: str, content: bytes,
                     chunks: Sequence[tuple[str, dict[str, Any]]], *, loader: str, splitter: str,
                     custom_docs: bool = False, replaces: FileRecord | None = None) -> FileRecord:
        """Embed the chunks (when embeddings are configured) and store the file with them."""
        texts = [text for text, _ in chunks]
        vectors = await self.embedder.embed_documents(texts) if self.embedder is not None else None
        drafts = [ChunkDraft(text=text, metadata=metadata,
                             embedding=None if vectors is None else vectors[i])
                  for i, (text, metadata) in enumerate(chunks)]
        record = await self.store.put_file(kb, file_name, content, drafts, loader=loader,
                                           splitter=splitter, custom_docs=custom_docs,
                                           replaces=replaces)
        if self._on_chunks is not None:
            self._on_chunks(len(drafts))
        return record
