"""The interface every knowledge store implements, and the values that cross it.

A store keeps, per knowledge base (KB): its info line, the original files, their chunks, each
chunk's embedding (when embeddings are configured) and a lexical index over the chunks' text. It
answers two searches, lexical (BM25 or full-text rank) and dense (cosine distance), and the fusion
of the two lives above it in ``rag/retrieval.py``, so both stores rank the same way.

Rules every implementation keeps (``tests/integration/test_kb_stores.py`` checks them on both):

- Every method is a coroutine and never blocks the event loop (CPU or disk work goes to a thread).
- ``put_file`` is atomic: after it returns, searches see all of the file's new chunks and none of
  its old ones; if it raises, the KB is as it was.
- KB and file names arrive already validated (``rag/names.py``); stores do not re-check them.
- Searches in a KB that does not exist raise ``KnowledgeBaseNotFound``.
- A delete wins over a write that read before it: ``put_file(..., replaces=record)`` (a rebuild
  or an update re-ingesting a stored file) stores nothing when the KB or the file is no longer
  the one ``record`` was read from. A KB has a ``uid`` of its own (a KB created anew under a
  deleted one's name has another), and a file a ``revision`` that changes with every write, so
  neither a deleted file nor a deleted KB's files come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "CUSTOM_DOCS",
    "ChunkDraft",
    "FileChanged",
    "FileRecord",
    "Hit",
    "KnowledgeBaseExists",
    "KnowledgeBaseNotFound",
    "KnowledgeBaseRecord",
    "KnowledgeStore",
    "StaleChunks",
    "StoreError",
    "StoredChunk",
    "Vector",
]

CUSTOM_DOCS = "custom docs"
"""The loader and splitter recorded for a file whose chunks the client wrote (list_files shows it)."""

Vector = npt.NDArray[np.float32]
"""One embedding, unit length (stores compare by inner product = cosine similarity)."""


class StoreError(Exception):
    """Base of the errors a store raises on purpose."""


class KnowledgeBaseNotFound(StoreError):
    def __init__(self, kb: str) -> None:
        super().__init__(f"knowledge base '{kb}' does not exist")
        self.kb = kb


class StaleChunks(StoreError):
    """An edit names chunks the file does not have (any more): it changed since it was listed."""

    def __init__(self, file_name: str, chunk_ids: Sequence[str]) -> None:
        shown = ", ".join(sorted(chunk_ids)[:5]) + (" ..." if len(chunk_ids) > 5 else "")
        super().__init__(f"chunk id(s) {shown} are not chunks of '{file_name}' (it changed since "
                         "it was listed): list its chunks again and redo the edit; nothing "
                         "was changed")
        self.file_name = file_name
        self.chunk_ids = tuple(chunk_ids)


class FileChanged(StoreError):
    """A conditional write (``put_file(replaces=...)``) found the file deleted, or written
    again, since it was read: nothing was stored, the delete or the newer write stands."""

    def __init__(self, file_name: str, *, deleted: bool) -> None:
        super().__init__(f"'{file_name}' was deleted meanwhile, and stays deleted" if deleted else
                         f"'{file_name}' was uploaded, edited or had its chunks deleted meanwhile: "
                         "that newer version is kept")
        self.file_name = file_name
        self.deleted = deleted


class KnowledgeBaseExists(StoreError):
    def __init__(self, kb: str) -> None:
        super().__init__(f"knowledge base '{kb}' already exists")
        self.kb = kb


@dataclass(frozen=True, kw_only=True)
class KnowledgeBaseRecord:
    name: str
    info: str
    """The KB's description (Chatchat's kb_info), shown to users and agents."""
    vector_store: str
    """The store kind that holds it: "local" or "pgvector" (Chatchat's vs_type)."""
    embed_model: str
    """The embedding model its vectors came from, or "" when it has none (lexical only)."""
    file_count: int
    created_at: float
    """Unix seconds."""
    uid: str = ""
    """This KB's identity, made when it is created: another KB created later under the same name
    has another. "" for a KB created before uids existed."""


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    kb: str
    file_name: str
    size_bytes: int
    chunk_count: int
    loader: str
    """The langchain loader that read it, e.g. "TextLoader"."""
    splitter: str
    """The langchain splitter that cut it, e.g. "RecursiveCharacterTextSplitter"."""
    version: int
    """1 on first upload, +1 each time the file is replaced."""
    created_at: float
    """Unix seconds of the first upload."""
    modified_at: float
    """Unix seconds of the latest upload."""
    custom_docs: bool = False
    """Its chunks are the client's own (Chatchat's custom docs), not the splitter's."""
    kb_uid: str = ""
    """The ``uid`` of the KB it was read from."""
    revision: str = ""
    """Changes with every write of the file (upload, edit, chunks deleted), never repeats: what
    ``put_file(replaces=...)`` compares. "" for a file last written before revisions existed."""


@dataclass(frozen=True, kw_only=True)
class ChunkDraft:
    """A chunk about to be stored: its text, metadata and (optionally) its embedding."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    """Loader metadata (source, page, row, ...), returned with every hit."""
    embedding: Vector | None = None


@dataclass(frozen=True, kw_only=True)
class StoredChunk:
    id: str
    """Stable within the store; unique across KBs."""
    kb: str
    file_name: str
    seq: int
    """Position of the chunk in its file, from 0."""
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Hit:
    """One search result. ``score`` is the search's own measure:

    - lexical: the BM25 (local) or full-text (pgvector) rank, higher is better;
    - dense: cosine distance halved into [0, 1], lower is better (Chatchat's score direction).
    """

    chunk: StoredChunk
    score: float


class KnowledgeStore(Protocol):
    kind: str
    """ "local" or "pgvector"."""

    async def start(self) -> None:
        """Open files or connections, create what is missing, load indexes."""

    async def aclose(self) -> None: ...

    async def list_kbs(self) -> list[KnowledgeBaseRecord]: ...

    async def get_kb(self, kb: str) -> KnowledgeBaseRecord | None: ...

    async def create_kb(self, kb: str, *, info: str, embed_model: str) -> KnowledgeBaseRecord:
        """Raises ``KnowledgeBaseExists``."""

    async def delete_kb(self, kb: str) -> None:
        """Removes the KB with its files, chunks and indexes. Raises ``KnowledgeBaseNotFound``."""

    async def update_kb_info(self, kb: str, info: str) -> None:
        """Raises ``KnowledgeBaseNotFound``."""

    async def list_files(self, kb: str) -> list[FileRecord]:
        """Raises ``KnowledgeBaseNotFound``."""

    async def get_file(self, kb: str, file_name: str) -> bytes | None:
        """The original bytes as uploaded, or None. Raises ``KnowledgeBaseNotFound``."""

    async def put_file(self, kb: str, file_name: str, content: bytes, chunks: Sequence[ChunkDraft],
                       *, loader: str, splitter: str, custom_docs: bool = False,
                       replaces: FileRecord | None = None) -> FileRecord:
        """Store (or replace, atomically) one file and its chunks; ``custom_docs`` records that
        the chunks are the client's own. Raises ``KnowledgeBaseNotFound``.

        With ``replaces`` (a record of this file, read earlier), only replace that very file,
        checked in the write's transaction: ``KnowledgeBaseNotFound`` when its KB was deleted
        (even if one of the same name was created since), ``FileChanged`` when the file was
        deleted or written since; nothing is stored then."""

    async def edit_chunks(self, kb: str, file_name: str,
                          edits: Mapping[str, ChunkDraft | None]) -> FileRecord:
        """Change some of a stored file's chunks in place, atomically: each id in ``edits`` gets
        the draft's text, metadata and embedding, or is deleted (None); the other chunks and
        every id stay as they were. The file is recorded as custom docs, its version + 1 (and a
        new revision).
        Raises ``StaleChunks`` (nothing changed) when an id is not a chunk of that file, and
        ``KnowledgeBaseNotFound``."""

    async def delete_file(self, kb: str, file_name: str, *, keep_content: bool = False) -> bool:
        """Remove a file's chunks (and its bytes unless ``keep_content``, when it gets a new
        revision). False if it was not there. Raises ``KnowledgeBaseNotFound``."""

    async def list_chunks(self, kb: str, file_name: str) -> list[StoredChunk]:
        """A file's chunks in order. Raises ``KnowledgeBaseNotFound``."""

    async def lexical_search(self, kb: str, query: str, k: int) -> list[Hit]:
        """Best ``k`` chunks by lexical rank, best first; chunks sharing no term are left out."""

    async def dense_search(self, kb: str, query: Vector, k: int) -> list[Hit]:
        """Nearest ``k`` chunks by cosine distance, nearest first; chunks without an embedding are
        left out."""

    async def distances(self, kb: str, query: Vector, chunk_ids: Sequence[str]) -> dict[str, float]:
        """Halved cosine distance from ``query`` to each listed chunk that has an embedding."""
