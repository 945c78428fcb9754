"""Ingestion: bytes of an uploaded file in, a stored file with its chunks (and embeddings) out.

Load (langchain loader) and split (langchain splitter) run in a worker *process*, embeddings are
requested in concurrent batches, and the store writes the file and its chunks in one transaction.
Any failure before that write leaves the knowledge base unchanged. Called by the upload,
update and recreate routes.

Why a process and not a thread: parsing and splitting a large file is seconds of Python that
holds the GIL, and a thread doing it stalled the gateway's event loop for 70-125 ms at a time
(asyncio debug mode, tests/integration/test_event_loop.py), which every stream's tokens wait
behind. ``kb.ingest_workers`` processes (``rag/workers.py``) are started on first use (each
imports langchain: about a second, and 100-150 MB).

Every file is bounded before it costs the gateway memory or another user's wait: its text
(``kb.max_file_text_chars``, counted as pages or rows are read) and its chunks
(``kb.max_file_chunks``) inside the worker, its parse time (``kb.max_parse_s``: the worker is
killed and replaced), and its knowledge base's chunks (``kb.max_kb_chunks``) before it is
embedded. Past a bound the file is refused with ``FileTooLarge``, which names the setting.
The worker returns only the chunks' text and metadata, so the gateway holds at most
``max_file_chunks`` chunks per running ingestion.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from chatfleet.rag.embeddings import Embedder
from chatfleet.rag.loaders import (
    EmptyDocument,
    FileTooLarge,
    UnreadableDocument,
    check_extension,
    load_document,
)
from chatfleet.rag.splitting import split_documents
from chatfleet.rag.stores.base import CUSTOM_DOCS, ChunkDraft, FileRecord, KnowledgeStore
from chatfleet.rag.workers import WorkerDied, WorkerPool, WorkersStopped, WorkerTimeout

__all__ = ["IngestBusy", "IngestLimits", "IngestStopped", "Ingestor", "SplitOptions"]

TEMP_PREFIX = "chatfleet-load-"
"""Each file being read gets a private folder of this prefix in the temporary directory."""


class IngestBusy(Exception):
    """All ingestion slots are taken and as many requests wait as may: come back later."""

    retry_after_s = 5

    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"{running} ingestions are running and {waiting} are waiting, the most "
                         f"this gateway process takes (kb.max_queued_uploads, per worker "
                         f"process); retry in {self.retry_after_s} s")


class IngestStopped(Exception):
    """The gateway is shutting down: its ingest workers were stopped after the drain timeout."""

    retry_after_s = 5

    def __init__(self) -> None:
        super().__init__("this gateway replica is shutting down and stopped reading uploads; "
                         f"nothing was stored: upload again in {self.retry_after_s} s (another "
                         "replica takes it)")


@dataclass(frozen=True, kw_only=True, slots=True)
class IngestLimits:
    """Per-file and per-KB bounds: the ``kb.max_*`` settings of the same names, whose defaults
    live in settings.py only."""

    max_file_text_chars: int
    max_file_chunks: int
    max_kb_chunks: int
    max_parse_s: float


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What a worker sends back: only what is stored, so the gateway holds no Documents."""

    loader: str
    splitter: str
    chunks: list[tuple[str, dict[str, Any]]]


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


def _load_and_split(file_name: str, content: bytes, folder: str, split: SplitOptions,
                    limits: IngestLimits) -> _Parsed:
    """Runs in the worker process."""
    loaded = load_document(file_name, content, folder=folder,
                           max_text_chars=limits.max_file_text_chars)
    result = split_documents(loaded.documents, chunk_size=split.chunk_size,
                             chunk_overlap=split.chunk_overlap, file_name=file_name,
                             max_chunks=limits.max_file_chunks)
    return _Parsed(loaded.loader, result.splitter,
                   [(chunk.page_content, chunk.metadata) for chunk in result.chunks])


class Ingestor:
    """Ingests files. Requests that ingest take a slot first (``slot()``): two per worker process
    run at once (one splitting while the other's chunks are embedded and stored), up to
    ``max_waiting`` more wait, and beyond that ``IngestBusy``: uploads are bounded like chat
    requests, so a burst of them cannot pile up files in memory and on disk without limit."""

    def __init__(self, store: KnowledgeStore, embedder: Embedder | None, *, limits: IngestLimits,
                 workers: int = 1, max_waiting: int = 16,
                 on_chunks: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.embedder = embedder
        self.limits = limits
        self._pool = WorkerPool(workers, preload=__name__)
        self._on_chunks = on_chunks
        self._running = 2 * workers
        self._slots = asyncio.Semaphore(self._running)
        self._waiting = 0
        self._max_waiting = max_waiting
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = False

    def refusal(self) -> IngestBusy | IngestStopped | None:
        """What ``slot()`` would raise now, if anything: lets a request be refused before its
        body is read (``api/middleware.py``)."""
        if self._stopped:
            return IngestStopped()
        if self._slots.locked() and self._waiting >= self._max_waiting:
            return IngestBusy(self._running, self._waiting)
        return None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold an ingestion slot for one request's files. Raises ``IngestBusy`` at once when
        all are taken and ``max_waiting`` requests already wait, ``IngestStopped`` once
        stopped."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        self._active += 1
        self._idle.clear()
        try:
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no request holds or waits for a slot (the drain on SIGTERM waits)."""
        await self._idle.wait()

    def stop(self) -> None:
        """Kill the worker processes: files being read fail with ``IngestStopped``, and so do
        later ones. Called when the drain ends (on time or not) and at shutdown."""
        self._stopped = True
        self._pool.stop()

    def close(self) -> None:
        self.stop()

    async def _in_worker(self, file_name: str, content: bytes, split: SplitOptions) -> _Parsed:
        folder = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        try:
            return await self._pool.run(_load_and_split, file_name, content, folder, split,
                                        self.limits, timeout_s=self.limits.max_parse_s)
        except WorkerTimeout:
            raise FileTooLarge(file_name, f"reading it took longer than "
                               f"{self.limits.max_parse_s:g} s, the most one file may take",
                               "kb.max_parse_s") from None
        except WorkerDied as exc:
            raise UnreadableDocument(file_name, f"the worker process reading it died (exit code "
                                     f"{exc.exitcode}: out of memory?)") from None
        except WorkersStopped:
            raise IngestStopped from None
        finally:
            # Here, not in the worker: a killed worker cleans up nothing.
            shutil.rmtree(folder, ignore_errors=True)

    async def ingest(self, kb: str, file_name: str, content: bytes, split: SplitOptions, *,
                     replaces: FileRecord | None = None) -> FileRecord:
        """Store one file (replacing one of the same name; only the one ``replaces`` describes
        when given, see ``KnowledgeStore.put_file``). Raises the loaders' errors
        (``UnsupportedFileType``, ``EmptyDocument``, ``UnreadableDocument``, ``FileTooLarge``),
        ``EmbeddingError``, ``KnowledgeBaseNotFound``, ``FileChanged`` or ``IngestStopped``; in
        each case nothing was stored."""
        check_extension(file_name)
        if not content:
            raise EmptyDocument(file_name)
        parsed = await self._in_worker(file_name, content, split)
        if not parsed.chunks:
            raise EmptyDocument(file_name)
        return await self._store(kb, file_name, content, parsed.chunks, loader=parsed.loader,
                                 splitter=parsed.splitter, replaces=replaces)

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
        if len(edits) > self.limits.max_file_chunks:
            raise FileTooLarge(file_name, f"the edit names more than "
                               f"{self.limits.max_file_chunks} chunks, the most one file may have",
                               "kb.max_file_chunks")
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
        await self._check_kb_room(kb, file_name, len(chunks))
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

    async def _check_kb_room(self, kb: str, file_name: str, chunks: int) -> None:
        """Refuse a file with more than ``max_file_chunks`` chunks (custom docs come here
        unsplit), or one that would take its KB past ``max_kb_chunks`` (the chunks of the file
        it replaces do not count). Concurrent uploads to one KB may pass the bound by at most
        their own chunks."""
        limits = self.limits
        if chunks > limits.max_file_chunks:
            raise FileTooLarge(file_name, f"it has {chunks} chunks, more than "
                               f"{limits.max_file_chunks}, the most one file may have", "kb.max_file_chunks")
        held = sum(record.chunk_count for record in await self.store.list_files(kb)
                   if record.file_name != file_name)
        if held + chunks > limits.max_kb_chunks:
            raise FileTooLarge(file_name, f"its {chunks} chunks would take knowledge base "
                               f"'{kb}' from {held} to more than {limits.max_kb_chunks} chunks, the most "
                               "one knowledge base may hold",
                               "kb.max_kb_chunks")
