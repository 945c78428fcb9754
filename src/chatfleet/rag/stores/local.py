"""The embedded knowledge store: one process, everything under a data directory.

Layout of ``data_dir``: ``kb.sqlite3`` (knowledge bases, files with their original bytes, chunks
with their embeddings) and nothing else; it is the one source of truth and every change is one
SQLite transaction, so a crash leaves a KB either before or after an upload. The indexes are kept
in memory and rebuilt from it at start (``tests`` and docs/benchmarks.md give the time for 20k
chunks): a ``Bm25Index`` of each chunk's terms (``rag/lexical.py``'s analyzer over its text and
headings; made anew at every start, so a changed analyzer needs no migration) and, once a KB has
embeddings, a FAISS inner-product index over unit vectors (``IndexIDMap2(IndexFlatIP)``: exact
search, and vectors can be read back for ``distances``). Both are updated in place on every
upload or delete, never rebuilt per query.

Deletes give their space back to the file system: the file uses ``auto_vacuum = INCREMENTAL``
(a file made before that is converted by one VACUUM at start), and after a delete the freed
pages are vacuumed in turns of 8 MiB on the write connection, then the WAL is checkpointed
and truncated (``_reclaim_space``).

All SQLite, FAISS and BM25 work runs in worker threads, and three locks keep it apart:

- writers (uploads, deletes, KB changes) take turns on the write connection (``_write_lock``);
  a file's chunks are tokenized and written to SQLite without stopping anything else;
- searches share the in-memory indexes (a read-write lock), and a writer holds them alone only
  for the moment it swaps a file's chunks in (a plain lock made concurrent searches queue behind
  each other while each waited for the GIL: held 90% of the time at 32 concurrent searches,
  docs/benchmarks.md; and an upload held it for the whole SQLite write);
- listings and downloads read through a second connection (``_read_lock``), which WAL mode lets
  read the last commit while a writer is in its transaction.
FAISS runs one OpenMP thread: its searches are 20k-row scans, concurrency comes from requests,
and with two threads on two busy cores a scan took twice as long (p95 28 ms against 1 ms).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from chatfleet.rag.lexical import ANALYZER, Analyzer, Bm25Index
from chatfleet.rag.stores.base import (
    CUSTOM_DOCS,
    ChunkDraft,
    FileChanged,
    FileRecord,
    Hit,
    KnowledgeBaseExists,
    KnowledgeBaseNotFound,
    KnowledgeBaseRecord,
    StaleChunks,
    StoredChunk,
    Vector,
)

__all__ = ["LocalStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_INCREMENTAL = 2
"""``PRAGMA auto_vacuum``'s value for INCREMENTAL."""

_SCHEMA = f"""
PRAGMA auto_vacuum = INCREMENTAL;
PRAGMA journal_mode = WAL;
PRAGMA journal_size_limit = {64 << 20};
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS kb (
    name TEXT PRIMARY KEY, info TEXT NOT NULL, embed_model TEXT NOT NULL, created_at REAL NOT NULL,
    uid TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS file (
    kb TEXT NOT NULL REFERENCES kb(name) ON DELETE CASCADE, file_name TEXT NOT NULL,
    content BLOB, size INTEGER NOT NULL, loader TEXT NOT NULL, splitter TEXT NOT NULL,
    version INTEGER NOT NULL, created_at REAL NOT NULL, modified_at REAL NOT NULL,
    custom_docs INTEGER NOT NULL DEFAULT 0, revision TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (kb, file_name));
CREATE TABLE IF NOT EXISTS chunk (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kb TEXT NOT NULL, file_name TEXT NOT NULL,
    seq INTEGER NOT NULL, text TEXT NOT NULL, metadata TEXT NOT NULL, embedding BLOB,
    FOREIGN KEY (kb, file_name) REFERENCES file(kb, file_name) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS chunk_by_file ON chunk (kb, file_name, seq);
"""

_MIGRATIONS = (
    ("file", "custom_docs", "ALTER TABLE file ADD COLUMN custom_docs INTEGER NOT NULL DEFAULT 0"),
    ("kb", "uid", "ALTER TABLE kb ADD COLUMN uid TEXT NOT NULL DEFAULT ''"),
    ("file", "revision", "ALTER TABLE file ADD COLUMN revision TEXT NOT NULL DEFAULT ''"),
)
"""Columns added since the first release: (table, column, the statement that adds it), applied
at start to a database made before them."""

_RECLAIM_MIN_PAGES = 256
"""Free pages (4 KiB each) below which a delete leaves them for the next uploads to reuse."""
_RECLAIM_STEP_PAGES = 2048
"""Pages given back per turn on the write connection (8 MiB, about 10-40 ms), so that uploads
and deletes wait for one turn, not for a whole large KB's space."""


def _migrate(db: sqlite3.Connection) -> None:
    for table, column, statement in _MIGRATIONS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(statement)


def _enable_reclaim(db: sqlite3.Connection, path: Path) -> None:
    """Make a database made before ``auto_vacuum = INCREMENTAL`` (which a new one gets from
    ``_SCHEMA``) able to give freed space back: SQLite switches an existing file only by a
    VACUUM, a copy of the whole file (about 3 s per GB, and as much free disk again). Once;
    a failure (a full disk) is logged and leaves the store working, only not shrinking."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL:
        return
    started = time.perf_counter()
    try:
        db.executescript("VACUUM;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the copy went through the WAL
    except sqlite3.Error as error:
        log.warning("could not convert %s to incremental vacuum (deleted knowledge bases keep "
                    "their space until it is): %s", path, error)
        return
    log.info("converted %s to incremental vacuum in %.1f s (once)", path,
             time.perf_counter() - started)


class _ReadWriteLock:
    """Many readers or one writer. A waiting writer holds off new readers, so a stream of
    searches cannot starve an upload."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            while self._writing or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                if not self._readers:
                    self._changed.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._changed.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


@dataclass(frozen=True, slots=True)
class _Row:
    """A stored chunk with what the indexes need, prepared before they are locked."""

    row_id: int
    chunk: StoredChunk
    tokens: list[str]
    vector: Vector | None


@dataclass
class _KbIndex:
    """One KB's in-memory search state."""

    bm25: Bm25Index = field(default_factory=Bm25Index)
    vectors: Any = None
    """faiss.IndexIDMap2 over IndexFlatIP, created with the first embedding's dimension."""
    chunks: dict[int, StoredChunk] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)

    def add(self, rows: Sequence[_Row]) -> None:
        with_vectors = [row for row in rows if row.vector is not None]
        for row in rows:
            self.bm25.add(row.row_id, row.tokens)
            self.tokens[row.row_id] = row.tokens
            self.chunks[row.row_id] = row.chunk
        if with_vectors:
            if self.vectors is None:
                self.vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(len(with_vectors[0].vector)))
            self.vectors.add_with_ids(
                np.stack([row.vector for row in with_vectors]),
                np.array([row.row_id for row in with_vectors], dtype=np.int64))

    def remove(self, row_ids: Sequence[int]) -> None:
        for row_id in row_ids:
            self.bm25.remove(row_id, self.tokens.pop(row_id))
            del self.chunks[row_id]
        if self.vectors is not None and row_ids:
            self.vectors.remove_ids(np.asarray(row_ids, dtype=np.int64))


def _vector_bytes(embedding: Vector | None) -> bytes | None:
    return None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()


class LocalStore:
    kind = "local"

    def __init__(self, data_dir: Path, *, analyzer: Analyzer = ANALYZER) -> None:
        self._path = data_dir / "kb.sqlite3"
        self._analyzer = analyzer
        self._data_dir = data_dir
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._indexes_lock = _ReadWriteLock()
        self._indexes: dict[str, _KbIndex] = {}

    async def _write(self, work: Callable[[], T]) -> T:
        """``work`` in a worker thread, after the writers before it; it may use ``db`` and change
        indexes, but only inside ``self._indexes_lock.writing()``."""
        def locked() -> T:
            with self._write_lock:
                return work()
        return await asyncio.to_thread(locked)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in a worker thread on the read connection (the last committed state)."""
        def locked() -> T:
            with self._read_lock:
                if self._reader is None:
                    raise RuntimeError("LocalStore.start() was not called")
                return work(self._reader)
        return await asyncio.to_thread(locked)

    async def _search(self, work: Callable[[], T]) -> T:
        """``work`` in a worker thread, beside other searches (it only reads the indexes)."""
        def locked() -> T:
            with self._indexes_lock.reading():
                return work()
        return await asyncio.to_thread(locked)

    @property
    def db(self) -> sqlite3.Connection:
        """The write connection (only inside ``_write``)."""
        if self._db is None:
            raise RuntimeError("LocalStore.start() was not called")
        return self._db

    async def start(self) -> None:
        faiss.omp_set_num_threads(1)

        def open_and_load() -> None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            _migrate(db)
            _enable_reclaim(db, self._path)
            self._db = db
            self._reader = sqlite3.connect(self._path, check_same_thread=False,
                                           isolation_level=None)
            for (name,) in db.execute("SELECT name FROM kb").fetchall():
                self._indexes[name] = self._load_kb(name)
        await self._write(open_and_load)

    def _load_kb(self, kb: str) -> _KbIndex:
        index = _KbIndex()
        rows = self.db.execute(
            "SELECT id, file_name, seq, text, metadata, embedding FROM chunk WHERE kb = ? "
            "ORDER BY id", (kb,))
        chunks = [(row_id, StoredChunk(id=str(row_id), kb=kb, file_name=file_name, seq=seq,
                                       text=text, metadata=json.loads(metadata)), embedding)
                  for row_id, file_name, seq, text, metadata, embedding in rows]
        index.add([_Row(row_id=row_id, chunk=chunk,
                        tokens=self._analyzer.chunk_terms(chunk.text, chunk.metadata),
                        vector=None if embedding is None else np.frombuffer(embedding, np.float32))
                   for row_id, chunk, embedding in chunks])
        return index

    async def aclose(self) -> None:
        def close() -> None:
            for connection in (self._db, self._reader):
                if connection is not None:
                    connection.close()
            self._db = self._reader = None
        await self._write(close)

    def _index(self, kb: str) -> _KbIndex:
        index = self._indexes.get(kb)
        if index is None:
            raise KnowledgeBaseNotFound(kb)
        return index

    def _kb_record(self, db: sqlite3.Connection, kb: str) -> KnowledgeBaseRecord | None:
        row = db.execute(
            "SELECT name, info, embed_model, created_at, "
            "(SELECT count(*) FROM file WHERE file.kb = kb.name), uid FROM kb WHERE name = ?",
            (kb,)).fetchone()
        if row is None:
            return None
        name, info, embed_model, created_at, file_count, uid = row
        return KnowledgeBaseRecord(name=name, info=info, vector_store=self.kind,
                                   embed_model=embed_model, file_count=file_count,
                                   created_at=created_at, uid=uid)

    async def list_kbs(self) -> list[KnowledgeBaseRecord]:
        def work(db: sqlite3.Connection) -> list[KnowledgeBaseRecord]:
            names = [name for (name,) in db.execute("SELECT name FROM kb ORDER BY name")]
            return [record for name in names if (record := self._kb_record(db, name)) is not None]
        return await self._read(work)

    async def get_kb(self, kb: str) -> KnowledgeBaseRecord | None:
        return await self._read(lambda db: self._kb_record(db, kb))

    async def create_kb(self, kb: str, *, info: str, embed_model: str) -> KnowledgeBaseRecord:
        def work() -> KnowledgeBaseRecord:
            try:
                self.db.execute("INSERT INTO kb (name, info, embed_model, created_at, uid) "
                                "VALUES (?, ?, ?, ?, ?)",
                                (kb, info, embed_model, time.time(), uuid.uuid4().hex))
            except sqlite3.IntegrityError:
                raise KnowledgeBaseExists(kb) from None
            with self._indexes_lock.writing():
                self._indexes[kb] = _KbIndex()
            record = self._kb_record(self.db, kb)
            assert record is not None
            return record
        return await self._write(work)

    async def delete_kb(self, kb: str) -> None:
        def work() -> None:
            self._index(kb)
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM kb WHERE name = ?", (kb,))
            with self._indexes_lock.writing():
                del self._indexes[kb]
        await self._write(work)
        await self._reclaim_space()

    async def _reclaim_space(self) -> None:
        """Give the pages deletes freed back to the file system, in turns of
        ``_RECLAIM_STEP_PAGES`` on the write connection, then checkpoint, which is when the
        file shrinks (WAL mode). Until then, and below ``_RECLAIM_MIN_PAGES``, free pages are
        reused by the next uploads."""
        def step() -> bool:
            if self.db.execute("PRAGMA freelist_count").fetchone()[0] < _RECLAIM_MIN_PAGES:
                return False
            # executescript: execute() runs the pragma one page at a time.
            self.db.executescript(f"PRAGMA incremental_vacuum({_RECLAIM_STEP_PAGES});")
            return True
        if not await self._write(step):
            return
        while await self._write(step):
            pass
        # TRUNCATE empties the WAL too, which holds as many pages as were freed (this SQLite
        # zeroes deleted content: secure_delete); it waits for a read in progress (busy timeout).
        await self._write(lambda: self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    async def update_kb_info(self, kb: str, info: str) -> None:
        def work() -> None:
            self._index(kb)
            self.db.execute("UPDATE kb SET info = ? WHERE name = ?", (info, kb))
        await self._write(work)

    @staticmethod
    def _file_records(db: sqlite3.Connection, kb: str,
                      file_name: str | None = None) -> list[FileRecord]:
        query = ("SELECT f.file_name, f.size, f.loader, f.splitter, f.version, f.created_at, "
                 "f.modified_at, f.custom_docs, (SELECT count(*) FROM chunk c WHERE c.kb = f.kb AND "
                 "c.file_name = f.file_name), k.uid, f.revision "
                 "FROM file f JOIN kb k ON k.name = f.kb WHERE f.kb = ?")
        params: tuple[str, ...] = (kb,)
        if file_name is not None:
            query += " AND f.file_name = ?"
            params = (kb, file_name)
        rows = db.execute(query + " ORDER BY f.file_name", params).fetchall()
        return [FileRecord(kb=kb, file_name=name, size_bytes=size, chunk_count=chunks,
                           loader=loader, splitter=splitter, version=version,
                           created_at=created, modified_at=modified, custom_docs=bool(custom),
                           kb_uid=kb_uid, revision=revision)
                for name, size, loader, splitter, version, created, modified, custom, chunks,
                kb_uid, revision in rows]

    async def list_files(self, kb: str) -> list[FileRecord]:
        def work(db: sqlite3.Connection) -> list[FileRecord]:
            self._index(kb)
            return self._file_records(db, kb)
        return await self._read(work)

    async def get_file(self, kb: str, file_name: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            self._index(kb)
            row = db.execute("SELECT content FROM file WHERE kb = ? AND file_name = ?",
                             (kb, file_name)).fetchone()
            return None if row is None else row[0]
        return await self._read(work)

    def _chunk_ids(self, kb: str, file_name: str) -> list[int]:
        return [row_id for (row_id,) in self.db.execute(
            "SELECT id FROM chunk WHERE kb = ? AND file_name = ?", (kb, file_name))]

    def _check_replaces(self, kb: str, record: FileRecord) -> None:
        """Raise unless the KB and the file are still those ``record`` was read from (inside
        the write's transaction)."""
        row = self.db.execute(
            "SELECT k.uid, f.revision FROM kb k LEFT JOIN file f ON f.kb = k.name "
            "AND f.file_name = ? WHERE k.name = ?", (record.file_name, kb)).fetchone()
        if row is None or row[0] != record.kb_uid:
            raise KnowledgeBaseNotFound(kb)
        if row[1] != record.revision:
            raise FileChanged(record.file_name, deleted=row[1] is None)

    async def put_file(self, kb: str, file_name: str, content: bytes, chunks: Sequence[ChunkDraft],
                       *, loader: str, splitter: str, custom_docs: bool = False,
                       replaces: FileRecord | None = None) -> FileRecord:
        dims = {len(c.embedding) for c in chunks if c.embedding is not None}
        if len(dims) > 1:
            raise ValueError(f"chunks of one file have embeddings of different dimensions {dims}")

        def work() -> FileRecord:
            index = self._index(kb)
            if dims and index.vectors is not None and index.vectors.d not in dims:
                raise ValueError(
                    f"embeddings of dimension {dims.pop()} cannot join knowledge base '{kb}', "
                    f"whose vectors have dimension {index.vectors.d}: recreate its vector store")
            tokens = [self._analyzer.chunk_terms(draft.text, draft.metadata) for draft in chunks]
            now = time.time()
            rows: list[_Row] = []
            with self.db:
                self.db.execute("BEGIN")
                if replaces is not None:
                    self._check_replaces(kb, replaces)
                old_ids = self._chunk_ids(kb, file_name)
                self.db.execute("DELETE FROM chunk WHERE kb = ? AND file_name = ?", (kb, file_name))
                self.db.execute(
                    "INSERT INTO file (kb, file_name, content, size, loader, splitter, version, "
                    "created_at, modified_at, custom_docs, revision) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?) "
                    "ON CONFLICT (kb, file_name) DO UPDATE SET content = excluded.content, "
                    "size = excluded.size, loader = excluded.loader, splitter = excluded.splitter, "
                    "version = file.version + 1, modified_at = excluded.modified_at, "
                    "custom_docs = excluded.custom_docs, revision = excluded.revision",
                    (kb, file_name, content, len(content), loader, splitter, now, now,
                     int(custom_docs), uuid.uuid4().hex))
                for seq, draft in enumerate(chunks):
                    cursor = self.db.execute(
                        "INSERT INTO chunk (kb, file_name, seq, text, metadata, embedding) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (kb, file_name, seq, draft.text, json.dumps(draft.metadata),
                         _vector_bytes(draft.embedding)))
                    row_id = cursor.lastrowid
                    assert row_id is not None
                    rows.append(_Row(
                        row_id=row_id, tokens=tokens[seq],
                        chunk=StoredChunk(id=str(row_id), kb=kb, file_name=file_name, seq=seq,
                                          text=draft.text, metadata=dict(draft.metadata)),
                        vector=(None if draft.embedding is None
                                else np.asarray(draft.embedding, dtype=np.float32))))
            # Committed: the indexes follow, in one step no search sees half of.
            with self._indexes_lock.writing():
                index.remove(old_ids)
                index.add(rows)
            return self._file_records(self.db, kb, file_name)[0]
        return await self._write(work)

    async def edit_chunks(self, kb: str, file_name: str,
                          edits: Mapping[str, ChunkDraft | None]) -> FileRecord:
        def work() -> FileRecord:
            index = self._index(kb)
            dims = {len(d.embedding) for d in edits.values()
                    if d is not None and d.embedding is not None}
            if dims and index.vectors is not None and index.vectors.d not in dims:
                raise ValueError(
                    f"embeddings of dimension {dims.pop()} cannot join knowledge base '{kb}', "
                    f"whose vectors have dimension {index.vectors.d}: recreate its vector store")
            rows: list[_Row] = []
            with self.db:
                self.db.execute("BEGIN")
                seqs = dict(self.db.execute(
                    "SELECT id, seq FROM chunk WHERE kb = ? AND file_name = ?", (kb, file_name)))
                stale = [i for i in edits if not i.isdigit() or int(i) not in seqs]
                if stale:
                    raise StaleChunks(file_name, stale)
                for chunk_id, draft in edits.items():
                    if draft is None:
                        self.db.execute("DELETE FROM chunk WHERE id = ?", (int(chunk_id),))
                        continue
                    self.db.execute(
                        "UPDATE chunk SET text = ?, metadata = ?, embedding = ? WHERE id = ?",
                        (draft.text, json.dumps(draft.metadata), _vector_bytes(draft.embedding),
                         int(chunk_id)))
                    rows.append(_Row(
                        row_id=int(chunk_id),
                        tokens=self._analyzer.chunk_terms(draft.text, draft.metadata),
                        chunk=StoredChunk(id=chunk_id, kb=kb, file_name=file_name,
                                          seq=seqs[int(chunk_id)], text=draft.text,
                                          metadata=dict(draft.metadata)),
                        vector=(None if draft.embedding is None
                                else np.asarray(draft.embedding, dtype=np.float32))))
                self.db.execute(
                    "UPDATE file SET custom_docs = 1, loader = ?, splitter = ?, "
                    "version = version + 1, modified_at = ?, revision = ? "
                    "WHERE kb = ? AND file_name = ?",
                    (CUSTOM_DOCS, CUSTOM_DOCS, time.time(), uuid.uuid4().hex, kb, file_name))
            with self._indexes_lock.writing():
                index.remove([int(chunk_id) for chunk_id in edits])
                index.add(rows)
            return self._file_records(self.db, kb, file_name)[0]
        return await self._write(work)

    async def delete_file(self, kb: str, file_name: str, *, keep_content: bool = False) -> bool:
        def work() -> bool:
            index = self._index(kb)
            with self.db:
                self.db.execute("BEGIN")
                old_ids = self._chunk_ids(kb, file_name)
                if keep_content:
                    self.db.execute("DELETE FROM chunk WHERE kb = ? AND file_name = ?",
                                    (kb, file_name))
                    existed = self.db.execute(
                        "UPDATE file SET revision = ? WHERE kb = ? AND file_name = ?",
                        (uuid.uuid4().hex, kb, file_name)).rowcount > 0
                else:
                    existed = self.db.execute(
                        "DELETE FROM file WHERE kb = ? AND file_name = ?",
                        (kb, file_name)).rowcount > 0
            with self._indexes_lock.writing():
                index.remove(old_ids)
            return existed
        existed = await self._write(work)
        await self._reclaim_space()
        return existed

    async def list_chunks(self, kb: str, file_name: str) -> list[StoredChunk]:
        def work() -> list[StoredChunk]:
            index = self._index(kb)
            return sorted((c for c in index.chunks.values() if c.file_name == file_name),
                          key=lambda c: c.seq)
        return await self._search(work)

    async def lexical_search(self, kb: str, query: str, k: int) -> list[Hit]:
        tokens = self._analyzer.tokenize(query)

        def work() -> list[Hit]:
            index = self._index(kb)
            return [Hit(chunk=index.chunks[row_id], score=score)
                    for row_id, score in index.bm25.search(tokens, k)]
        return await self._search(work)

    async def dense_search(self, kb: str, query: Vector, k: int) -> list[Hit]:
        vector = np.asarray(query, dtype=np.float32).reshape(1, -1)

        def work() -> list[Hit]:
            index = self._index(kb)
            if index.vectors is None or index.vectors.ntotal == 0 or k <= 0:
                return []
            self._check_dim(kb, index, vector.shape[1])
            similarities, ids = index.vectors.search(vector, min(k, index.vectors.ntotal))
            return [Hit(chunk=index.chunks[int(row_id)], score=(1.0 - float(sim)) / 2.0)
                    for sim, row_id in zip(similarities[0], ids[0], strict=True) if row_id >= 0]
        return await self._search(work)

    @staticmethod
    def _check_dim(kb: str, index: _KbIndex, dim: int) -> None:
        if dim != index.vectors.d:
            raise ValueError(f"query vector has dimension {dim}; knowledge base '{kb}' holds "
                             f"vectors of dimension {index.vectors.d}")

    async def distances(self, kb: str, query: Vector, chunk_ids: Sequence[str]) -> dict[str, float]:
        vector = np.asarray(query, dtype=np.float32)

        def work() -> dict[str, float]:
            index = self._index(kb)
            if index.vectors is None:
                return {}
            self._check_dim(kb, index, len(vector))
            out: dict[str, float] = {}
            for chunk_id in chunk_ids:
                try:
                    stored = index.vectors.reconstruct(int(chunk_id))
                except RuntimeError:  # no embedding for that chunk
                    continue
                out[chunk_id] = (1.0 - float(np.dot(stored, vector))) / 2.0
            return out
        return await self._search(work)
