"""The knowledge service: one object holding a process's store, embedder, retriever and ingestor.

Built once from ``KnowledgeSettings`` by the app's lifespan and kept on ``app.state.knowledge``;
the knowledge-base and chat routes only call it. It also rebuilds a KB's chunks from its stored
files (``recreate``), which is how a KB moves to new split settings or a new embedding model,
applies a client's own chunks (``apply_custom_docs``), and keeps the temporary knowledge bases
of file chat (``temp``), sweeping the expired ones while it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from chatfleet.rag.custom_docs import (
    ChunkEdits,
    CustomDoc,
    InvalidCustomDocs,
    plan_custom_docs,
)
from chatfleet.rag.embeddings import Embedder, EmbeddingError
from chatfleet.rag.ingest import IngestLimits, Ingestor, SplitOptions
from chatfleet.rag.retrieval import RetrievalMode, Retriever
from chatfleet.rag.stores.base import (
    FileChanged,
    FileRecord,
    KnowledgeBaseNotFound,
    KnowledgeStore,
)
from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.stores.pgvector import PgVectorStore
from chatfleet.rag.temp_kbs import TempKnowledgeBases
from chatfleet.settings import MIN_CHUNK_SIZE, KnowledgeSettings, StoreKind

__all__ = ["FileNotStored", "KnowledgeService", "RebuildProgress", "build_store"]


class FileNotStored(LookupError):
    """Custom docs name a file that is neither stored nor in the request."""

    def __init__(self, file_name: str) -> None:
        super().__init__(f"no stored file named '{file_name}' to take these docs: upload the "
                         "file in the same request (upload_docs with files and docs)")


def build_store(settings: KnowledgeSettings) -> KnowledgeStore:
    if settings.store is StoreKind.PGVECTOR:
        assert settings.pg_dsn is not None  # checked by KnowledgeSettings
        return PgVectorStore(settings.pg_dsn.get_secret_value(), pool_size=settings.pg_pool_size)
    return LocalStore(settings.data_dir)


def build_embedder(settings: KnowledgeSettings) -> Embedder | None:
    embeddings = settings.embeddings
    if not embeddings.url:
        return None
    assert embeddings.model is not None  # checked by KnowledgeSettings
    return Embedder(base_url=embeddings.url, model=embeddings.model,
                    api_key=embeddings.api_key.get_secret_value() if embeddings.api_key else None,
                    batch_size=embeddings.batch_size, max_concurrency=embeddings.max_concurrency,
                    timeout_s=embeddings.timeout_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class RebuildProgress:
    """One file of a ``recreate``: done (``record``), failed (``error``), or left as it is
    because it was deleted or written again during the rebuild (``skipped``, why)."""

    total: int
    finished: int
    file_name: str
    record: FileRecord | None = None
    error: str | None = None
    skipped: str | None = None


class KnowledgeService:
    def __init__(self, settings: KnowledgeSettings, *, store: KnowledgeStore | None = None,
                 on_retrieval: Callable[[RetrievalMode, float], None] | None = None,
                 on_chunks: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else build_store(settings)
        self.embedder = build_embedder(settings)
        self.retriever = Retriever(self.store, self.embedder, on_retrieval=on_retrieval)
        self.ingestor = Ingestor(self.store, self.embedder, workers=settings.ingest_workers,
                                 max_waiting=settings.max_queued_uploads, on_chunks=on_chunks,
                                 limits=IngestLimits(
                                     max_file_text_chars=settings.max_file_text_chars,
                                     max_file_chunks=settings.max_file_chunks,
                                     max_kb_chunks=settings.max_kb_chunks,
                                     max_parse_s=settings.max_parse_s))
        self.temp = TempKnowledgeBases(self.store, ttl_s=settings.temp_ttl_s,
                                       max_count=settings.max_temp_kbs)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def mode(self) -> RetrievalMode:
        return self.retriever.mode

    @property
    def embed_model(self) -> str:
        """The embedding model new KBs are recorded with; "" without embeddings."""
        return (self.settings.embeddings.model or "") if self.embedder is not None else ""

    def split_options(self, chunk_size: int | None = None,
                      chunk_overlap: int | None = None) -> SplitOptions:
        """The request's split settings, the configured ones where it gives none. Raises
        ValueError, also for a chunk_size under the minimum that kb.chunk_size has: refused, not
        raised to it, so a client learns that its setting was not used (Chatchat's WebUI shows
        the message), and a rebuild never silently differs from what was asked."""
        if chunk_size is not None and chunk_size < MIN_CHUNK_SIZE:
            raise ValueError(f"chunk_size is {chunk_size}; it must be at least {MIN_CHUNK_SIZE} "
                             "characters (the minimum of kb.chunk_size): smaller chunks carry "
                             "too little text to retrieve and multiply a file's chunks")
        return SplitOptions(
            chunk_size=self.settings.chunk_size if chunk_size is None else chunk_size,
            chunk_overlap=self.settings.chunk_overlap if chunk_overlap is None else chunk_overlap)

    async def start(self) -> None:
        if self.embedder is not None:
            await self.embedder.start()
        await self.store.start()
        self._sweeper = asyncio.create_task(self.temp.run_sweeper(), name="chatfleet-temp-kbs")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self.ingestor.close()
        await self.store.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()

    async def apply_custom_docs(self, kb: str, file_name: str, docs: list[CustomDoc], *,
                                content: bytes | None = None) -> FileRecord:
        """Make ``docs`` the chunks of ``file_name``, or edit its chunks with them
        (``rag/custom_docs.py`` says which), storing ``content`` as its bytes, or keeping the
        stored ones. Raises ``FileNotStored`` (no bytes either way), ``InvalidCustomDocs`` (an
        edit sent with new bytes), ``StaleChunks`` and what the ingestor raises; nothing changes
        then."""
        plan = plan_custom_docs(docs)
        if isinstance(plan, ChunkEdits):
            if content is not None:
                raise InvalidCustomDocs(
                    f"docs[{file_name!r}] edits chunks by metadata.id, but the file is uploaded "
                    "anew, which would replace them: upload it without docs, then send the "
                    "edits with update_docs")
            return await self.ingestor.edit_custom(kb, file_name, plan.edits)
        stored: FileRecord | None = None
        if content is None:
            # The stored file, replaced only if nothing deletes or rewrites it meanwhile.
            stored = next((f for f in await self.store.list_files(kb) if f.file_name == file_name),
                          None)
            content = None if stored is None else await self.store.get_file(kb, file_name)
            if content is None:
                raise FileNotStored(file_name)
        return await self.ingestor.ingest_custom(kb, file_name, content, plan.chunks,
                                                 replaces=stored)

    async def recreate(self, kb: str, split: SplitOptions) -> AsyncIterator[RebuildProgress]:
        """Re-load, re-split and re-embed every stored file of ``kb``, one at a time. A file that
        fails keeps its old chunks and is reported; the others go on. Custom docs are replaced
        by the splitter's chunks, as Chatchat's rebuild does.

        A delete wins: each file is stored only if it is still the one listed at the start
        (``put_file(replaces=...)``), so a file deleted or uploaded anew meanwhile is skipped
        and left as it is, and ``KnowledgeBaseNotFound`` ends the rebuild when the KB was
        deleted, even if another was created under its name since."""
        files = await self.store.list_files(kb)
        for finished, file in enumerate(files, start=1):
            step = partial(RebuildProgress, total=len(files), finished=finished,
                           file_name=file.file_name)
            content = await self.store.get_file(kb, file.file_name)
            if content is None:
                current = await self.store.get_kb(kb)
                if current is None or current.uid != file.kb_uid:
                    raise KnowledgeBaseNotFound(kb)
                yield step(skipped=str(FileChanged(file.file_name, deleted=True)))
                continue
            try:
                record = await self.ingestor.ingest(kb, file.file_name, content, split,
                                                    replaces=file)
            except FileChanged as exc:
                yield step(skipped=str(exc))
                continue
            except (ValueError, EmbeddingError) as exc:
                yield step(error=str(exc))
                continue
            yield step(record=record)
