"""The embedded knowledge store: everything under a data directory, shared by the gateway's
worker processes.

Layout of ``data_dir``: ``kb.sqlite3`` (knowledge bases, files with their original bytes, chunks
with their embeddings, and a log of which files changed) and ``kb.lock`` (held while a process
creates or migrates the schema at start); the database is the one source of truth and every
change is one SQLite transaction, so a crash leaves a KB either before or after an upload. The
indexes are kept in each process's memory: a ``Bm25Index`` of each chunk's terms
(``rag/lexical.py``'s analyzer over its text and headings; made anew at every start, so a changed
analyzer needs no migration) and, once a KB has embeddings, a FAISS inner-product index over unit
vectors (``IndexIDMap2(IndexFlatIP)``: exact search, and vectors can be read back for
``distances``). Both are updated in place, file by file, never rebuilt per query.

Several processes (``chatfleet serve --workers N``) share one ``data_dir``. Every write records
the KB or file it changed in ``change_log`` in its own transaction (``BEGIN IMMEDIATE``: writers
of all processes take turns on SQLite's write lock, waiting up to ``_BUSY_TIMEOUT_S``, and check
the KB, the file's revision and the embedding dimension inside it, so ``FileChanged`` and the
other refusals hold across processes). Before every search, and as each of its own writes
commits, a process catches up (``_catch_up``): ``PRAGMA data_version`` (2 us alone, 10-50 us
added to a search: docs/architecture.md) says whether any other connection committed since it
last looked; if so it reads the log past the position it applied and reloads just the files (or
KBs) named there, moving only the chunks that changed. So a write acknowledged by one process
is seen by the next search of every other, with no delay. Listings and downloads read SQLite
directly. The log keeps its last ``_CHANGE_LOG_KEEP`` entries; a process that fell further
behind reloads everything (reusing the terms of unchanged chunks).

Deletes give their space back to the file system: the file uses ``auto_vacuum = INCREMENTAL``
(a file made before that is converted by one VACUUM at start), and after a delete the freed
pages are vacuumed in turns of 8 MiB on the write connection, then the WAL is checkpointed
and truncated (``_reclaim_space``).

All SQLite, FAISS and BM25 work runs in worker threads, and four locks keep it apart:

- writers (uploads, deletes, KB changes) take turns on the write connection (``_write_lock``);
  a file's chunks are tokenized and written to SQLite without stopping anything else;
- catching up (``_catch_up_lock``) is one thread at a time, on its own connection; it is the only
  thing that changes the indexes, and a write commits under it, so its own chunks go in as it
  commits, with the terms it already made;
- searches share the in-memory indexes (a read-write lock), and catching up holds them alone only
  for the moment it swaps files' chunks in (a plain lock made concurrent searches queue behind
  each other while each waited for the GIL: held 90% of the time at 32 concurrent searches,
  docs/benchmarks.md; and an upload held it for the whole SQLite write);
- listings and downloads read through a further connection (``_read_lock``), which WAL mode lets
  read the last commit while a writer is in its transaction.
FAISS runs one OpenMP thread: its searches are 20k-row scans, concurrency comes from requests,
and with two threads on two busy cores a scan took twice as long (p95 28 ms against 1 ms).
"""

from __future__ import annotations

import asyncio
import fcntl
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
CREATE TABLE IF NOT EXISTS change_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kb TEXT NOT NULL, file_name TEXT);
"""
"""``change_log``: one row per write that changed what searches see, ``file_name`` NULL when the
KB itself was created or deleted. AUTOINCREMENT: ``seq`` (and a chunk's ``id``) is never reused,
so a process's position in the log, and the chunk ids in its indexes, keep their meaning."""

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
_BUSY_TIMEOUT_S = 60.0
"""How long a connection waits for another process's write transaction (SQLite's busy timeout)
before a write fails: a 20k-chunk upload's transaction takes about a second, and N worker
processes' uploads queue for the one write lock."""
_CHANGE_LOG_KEEP = 10_000
"""Entries ``change_log`` keeps (a few hundred KB). A process further behind than that (one that
served no knowledge-base request meanwhile) reloads every KB when it next catches up."""
_PRUNE_EVERY = 100
"""Writes between two prunings of ``change_log``."""


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


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                           timeout=_BUSY_TIMEOUT_S)


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
    """faiss.IndexIDMap2 over IndexFlatIP, created with the first embedding's dimension (and
    anew when a KB whose vectors were all removed gets vectors of another one)."""
    chunks: dict[int, StoredChunk] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    files: dict[str, set[int]] = field(default_factory=dict)
    """Each file's chunk ids."""

    def add(self, rows: Sequence[_Row]) -> None:
        with_vectors = [row for row in rows if row.vector is not None]
        for row in rows:
            self.bm25.add(row.row_id, row.tokens)
            self.tokens[row.row_id] = row.tokens
            self.chunks[row.row_id] = row.chunk
            self.files.setdefault(row.chunk.file_name, set()).add(row.row_id)
        if with_vectors:
            dim = len(with_vectors[0].vector)
            if self.vectors is None or (self.vectors.ntotal == 0 and self.vectors.d != dim):
                self.vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            self.vectors.add_with_ids(
                np.stack([row.vector for row in with_vectors]),
                np.array([row.row_id for row in with_vectors], dtype=np.int64))

    def remove(self, row_ids: Sequence[int]) -> None:
        for row_id in row_ids:
            self.bm25.remove(row_id, self.tokens.pop(row_id))
            chunk = self.chunks.pop(row_id)
            held = self.files[chunk.file_name]
            held.discard(row_id)
            if not held:
                del self.files[chunk.file_name]
        if self.vectors is not None and row_ids:
            self.vectors.remove_ids(np.asarray(row_ids, dtype=np.int64))

    def changes(self, file_name: str, rows: Sequence[_Row]) -> tuple[list[int], list[_Row]]:
        """What turns this file's chunks here into ``rows`` (the file as stored now): the ids to
        remove and the rows to add. A chunk whose text, metadata and vector are unchanged stays
        (an edit keeps ids: only the edited chunks move)."""
        stored = {row.row_id: row for row in rows}
        stale = []
        for row_id in self.files.get(file_name, ()):
            row = stored.get(row_id)
            if row is None or row.chunk != self.chunks[row_id] or not self._same_vector(row):
                stale.append(row_id)
        kept = set(self.files.get(file_name, ())).difference(stale)
        return stale, [row for row in rows if row.row_id not in kept]

    def _same_vector(self, row: _Row) -> bool:
        try:
            held = None if self.vectors is None else self.vectors.reconstruct(row.row_id)
        except RuntimeError:  # no embedding for that chunk
            held = None
        if held is None or row.vector is None:
            return held is None and row.vector is None
        return bool(np.array_equal(held, row.vector))


def _vector_bytes(embedding: Vector | None) -> bytes | None:
    return None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()


_CHUNK_COLUMNS = "id, file_name, seq, text, metadata, embedding"


class _Write:
    """One write transaction on the write connection: what it changed goes to ``change_log``,
    and the rows it prepared (with their terms) to the indexes as it commits."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.prepared: dict[int, _Row] = {}

    def changed(self, kb: str, file_name: str | None = None) -> None:
        seq = self.db.execute("INSERT INTO change_log (kb, file_name) VALUES (?, ?)",
                              (kb, file_name)).lastrowid
        assert seq is not None
        if seq > _CHANGE_LOG_KEEP and seq % _PRUNE_EVERY == 0:
            self.db.execute("DELETE FROM change_log WHERE seq <= ?", (seq - _CHANGE_LOG_KEEP,))

    def kb_uid(self, kb: str) -> str:
        """The KB's uid, read in this transaction. Raises ``KnowledgeBaseNotFound``."""
        row = self.db.execute("SELECT uid FROM kb WHERE name = ?", (kb,)).fetchone()
        if row is None:
            raise KnowledgeBaseNotFound(kb)
        return row[0]

    def check_dimension(self, kb: str, file_name: str, dims: set[int]) -> None:
        """Raise ValueError when the KB's other files hold embeddings of another dimension (as
        the pgvector store does)."""
        if not dims:
            return
        row = self.db.execute(
            "SELECT length(embedding) FROM chunk WHERE kb = ? AND file_name <> ? "
            "AND embedding IS NOT NULL LIMIT 1", (kb, file_name)).fetchone()
        if row is not None and row[0] // 4 not in dims:
            raise ValueError(
                f"embeddings of dimension {dims.pop()} cannot join knowledge base '{kb}', whose "
                f"vectors have dimension {row[0] // 4}: recreate its vector store")


class LocalStore:
    kind = "local"

    def __init__(self, data_dir: Path, *, analyzer: Analyzer = ANALYZER) -> None:
        self._path = data_dir / "kb.sqlite3"
        self._analyzer = analyzer
        self._data_dir = data_dir
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._catch_up_lock = threading.Lock()
        self._indexes_lock = _ReadWriteLock()
        self._indexes: dict[str, _KbIndex] = {}
        self._data_version: int | None = None
        """``PRAGMA data_version`` of ``_watch`` when this process last caught up."""
        self._applied = -1
        """The last ``change_log`` seq the indexes reflect; -1 before the first load."""

    async def _write(self, work: Callable[[], T]) -> T:
        """``work`` in a worker thread, after this process's writers before it; it may use
        ``db`` and ``_transaction``."""
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
        """``work`` in a worker thread, once the indexes have every commit made before it (by
        any process), beside other searches (it only reads the indexes)."""
        def locked() -> T:
            self._catch_up()
            with self._indexes_lock.reading():
                return work()
        return await asyncio.to_thread(locked)

    @property
    def db(self) -> sqlite3.Connection:
        """The write connection (only inside ``_write``)."""
        if self._db is None:
            raise RuntimeError("LocalStore.start() was not called")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[_Write]:
        """A write transaction (inside ``_write``). ``BEGIN IMMEDIATE`` takes SQLite's write
        lock at once, so what it reads (the KB's uid, the file's revision) no other process
        changes before it commits; the commit and its catching up are one step, so no search
        of this process sees the commit before its own chunks are in."""
        write = _Write(self.db)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield write
            with self._catch_up_lock:
                self.db.execute("COMMIT")
                self._catch_up_locked(write.prepared)
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    async def start(self) -> None:
        faiss.omp_set_num_threads(1)

        def open_and_load() -> None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            # Processes starting together take turns: a migration or the VACUUM of
            # ``_enable_reclaim`` checks, then changes, what another might be changing.
            with open(self._data_dir / "kb.lock", "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                db = _connect(self._path)
                db.executescript(_SCHEMA)
                _migrate(db)
                _enable_reclaim(db, self._path)
            self._db = db
            self._reader = _connect(self._path)
            self._watch = _connect(self._path)
            self._catch_up()
        await self._write(open_and_load)

    async def aclose(self) -> None:
        def close() -> None:
            with self._catch_up_lock:
                for connection in (self._db, self._reader, self._watch):
                    if connection is not None:
                        connection.close()
                self._db = self._reader = self._watch = None
        await self._write(close)

    def _catch_up(self) -> None:
        """Bring the indexes up to the last commit of any process (see the module's doc)."""
        with self._catch_up_lock:
            self._catch_up_locked({})

    def _catch_up_locked(self, prepared: Mapping[int, _Row]) -> None:
        watch = self._watch
        if watch is None:
            raise RuntimeError("LocalStore.start() was not called")
        version = watch.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        watch.execute("BEGIN")
        try:
            # Two statements: SQLite answers a lone min() or max() from the index's end, both
            # together by a scan of the log.
            head = watch.execute("SELECT coalesce(max(seq), 0) FROM change_log").fetchone()[0]
            oldest = watch.execute("SELECT min(seq) FROM change_log").fetchone()[0]
            if head == self._applied:
                pass
            elif self._applied < 0 or (oldest is not None and oldest > self._applied + 1):
                kbs = {name: self._load_kb(watch, name, prepared)
                       for (name,) in watch.execute("SELECT name FROM kb").fetchall()}
                with self._indexes_lock.writing():
                    self._indexes = kbs
            else:
                self._apply_log(watch, head, prepared)
            self._applied = head
        finally:
            watch.execute("COMMIT")
        # The version read before the snapshot: a commit made in between is in the snapshot
        # and read again (as nothing new) next time, never missed.
        self._data_version = version

    def _apply_log(self, watch: sqlite3.Connection, head: int,
                   prepared: Mapping[int, _Row]) -> None:
        """Reload what the log names past ``_applied``: a KB created or deleted there wholly,
        each other named file by itself. Read and analyzed first, then swapped in at once."""
        entries = watch.execute(
            "SELECT DISTINCT kb, file_name FROM change_log WHERE seq > ? AND seq <= ?",
            (self._applied, head)).fetchall()
        whole = {kb for kb, file_name in entries if file_name is None or kb not in self._indexes}
        kbs = {kb: (self._load_kb(watch, kb, prepared) if watch.execute(
                    "SELECT 1 FROM kb WHERE name = ?", (kb,)).fetchone() else None)
               for kb in whole}
        files = {(kb, file_name): self._file_rows(watch, kb, file_name, prepared)
                 for kb, file_name in entries if kb not in whole}
        changes = [(self._indexes[kb], *self._indexes[kb].changes(file_name, rows))
                   for (kb, file_name), rows in files.items()]
        with self._indexes_lock.writing():
            for kb, index in kbs.items():
                if index is None:
                    self._indexes.pop(kb, None)
                else:
                    self._indexes[kb] = index
            # All removals first: a file replaced by vectors of another dimension empties the
            # FAISS index before the new ones go in.
            for index, stale, _ in changes:
                index.remove(stale)
            for index, _, fresh in changes:
                index.add(fresh)

    def _file_rows(self, db: sqlite3.Connection, kb: str, file_name: str,
                   prepared: Mapping[int, _Row]) -> list[_Row]:
        """A file's chunks as stored now (none once it is deleted): this process's own write
        hands them over ready (``prepared``), anything else is read back."""
        ids = [row_id for (row_id,) in db.execute(
            "SELECT id FROM chunk WHERE kb = ? AND file_name = ? ORDER BY id", (kb, file_name))]
        if all(row_id in prepared for row_id in ids):
            return [prepared[row_id] for row_id in ids]
        return self._rows(kb, db.execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunk WHERE kb = ? AND file_name = ? ORDER BY id",
            (kb, file_name)), prepared)

    def _load_kb(self, db: sqlite3.Connection, kb: str, prepared: Mapping[int, _Row]) -> _KbIndex:
        index = _KbIndex()
        index.add(self._rows(kb, db.execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunk WHERE kb = ? ORDER BY id", (kb,)), prepared))
        return index

    def _rows(self, kb: str, rows: Iterator[tuple[Any, ...]],
              prepared: Mapping[int, _Row]) -> list[_Row]:
        """Stored chunks ready for the indexes. Terms are made anew only for chunks the
        indexes lack, or hold with another text or metadata (an edit keeps ids)."""
        known = self._indexes.get(kb)
        out: list[_Row] = []
        for row_id, file_name, seq, text, metadata, embedding in rows:
            chunk = StoredChunk(id=str(row_id), kb=kb, file_name=file_name, seq=seq, text=text,
                                metadata=json.loads(metadata))
            ready = prepared.get(row_id)
            if ready is not None and ready.chunk == chunk:
                out.append(ready)
                continue
            held = None if known is None else known.chunks.get(row_id)
            tokens = (known.tokens[row_id] if known is not None and held == chunk
                      else self._analyzer.chunk_terms(text, chunk.metadata))
            out.append(_Row(row_id=row_id, chunk=chunk, tokens=tokens,
                            vector=None if embedding is None
                            else np.frombuffer(embedding, np.float32)))
        return out

    def _index(self, kb: str) -> _KbIndex:
        index = self._indexes.get(kb)
        if index is None:
            raise KnowledgeBaseNotFound(kb)
        return index

    @staticmethod
    def _check_kb(db: sqlite3.Connection, kb: str) -> None:
        if db.execute("SELECT 1 FROM kb WHERE name = ?", (kb,)).fetchone() is None:
            raise KnowledgeBaseNotFound(kb)

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
            with self._transaction() as write:
                try:
                    write.db.execute("INSERT INTO kb (name, info, embed_model, created_at, uid) "
                                     "VALUES (?, ?, ?, ?, ?)",
                                     (kb, info, embed_model, time.time(), uuid.uuid4().hex))
                except sqlite3.IntegrityError:
                    raise KnowledgeBaseExists(kb) from None
                write.changed(kb)
                record = self._kb_record(write.db, kb)
            assert record is not None
            return record
        return await self._write(work)

    async def delete_kb(self, kb: str) -> None:
        def work() -> None:
            with self._transaction() as write:
                if not write.db.execute("DELETE FROM kb WHERE name = ?", (kb,)).rowcount:
                    raise KnowledgeBaseNotFound(kb)
                write.changed(kb)
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
            with self._transaction() as write:
                if not write.db.execute("UPDATE kb SET info = ? WHERE name = ?",
                                        (info, kb)).rowcount:
                    raise KnowledgeBaseNotFound(kb)
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
            self._check_kb(db, kb)
            return self._file_records(db, kb)
        return await self._read(work)

    async def get_file(self, kb: str, file_name: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            self._check_kb(db, kb)
            row = db.execute("SELECT content FROM file WHERE kb = ? AND file_name = ?",
                             (kb, file_name)).fetchone()
            return None if row is None else row[0]
        return await self._read(work)

    @staticmethod
    def _check_replaces(write: _Write, kb: str, record: FileRecord) -> None:
        """Raise unless the KB and the file are still those ``record`` was read from (inside
        the write's transaction)."""
        if write.kb_uid(kb) != record.kb_uid:
            raise KnowledgeBaseNotFound(kb)
        row = write.db.execute("SELECT revision FROM file WHERE kb = ? AND file_name = ?",
                               (kb, record.file_name)).fetchone()
        revision = None if row is None else row[0]
        if revision != record.revision:
            raise FileChanged(record.file_name, deleted=revision is None)

    async def put_file(self, kb: str, file_name: str, content: bytes, chunks: Sequence[ChunkDraft],
                       *, loader: str, splitter: str, custom_docs: bool = False,
                       replaces: FileRecord | None = None) -> FileRecord:
        dims = {len(c.embedding) for c in chunks if c.embedding is not None}
        if len(dims) > 1:
            raise ValueError(f"chunks of one file have embeddings of different dimensions {dims}")

        def work() -> FileRecord:
            tokens = [self._analyzer.chunk_terms(draft.text, draft.metadata) for draft in chunks]
            now = time.time()
            with self._transaction() as write:
                db = write.db
                write.kb_uid(kb)
                if replaces is not None:
                    self._check_replaces(write, kb, replaces)
                write.check_dimension(kb, file_name, set(dims))
                db.execute("DELETE FROM chunk WHERE kb = ? AND file_name = ?", (kb, file_name))
                db.execute(
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
                    metadata = json.dumps(draft.metadata)
                    row_id = db.execute(
                        "INSERT INTO chunk (kb, file_name, seq, text, metadata, embedding) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (kb, file_name, seq, draft.text, metadata,
                         _vector_bytes(draft.embedding))).lastrowid
                    assert row_id is not None
                    write.prepared[row_id] = _Row(
                        row_id=row_id, tokens=tokens[seq],
                        chunk=StoredChunk(id=str(row_id), kb=kb, file_name=file_name, seq=seq,
                                          text=draft.text, metadata=json.loads(metadata)),
                        vector=(None if draft.embedding is None
                                else np.asarray(draft.embedding, dtype=np.float32)))
                write.changed(kb, file_name)
                record = self._file_records(db, kb, file_name)[0]
            return record
        return await self._write(work)

    async def edit_chunks(self, kb: str, file_name: str,
                          edits: Mapping[str, ChunkDraft | None]) -> FileRecord:
        def work() -> FileRecord:
            dims = {len(d.embedding) for d in edits.values()
                    if d is not None and d.embedding is not None}
            with self._transaction() as write:
                db = write.db
                write.kb_uid(kb)
                write.check_dimension(kb, "", set(dims))
                seqs = dict(db.execute(
                    "SELECT id, seq FROM chunk WHERE kb = ? AND file_name = ?", (kb, file_name)))
                stale = [i for i in edits if not i.isdigit() or int(i) not in seqs]
                if stale:
                    raise StaleChunks(file_name, stale)
                for chunk_id, draft in edits.items():
                    if draft is None:
                        db.execute("DELETE FROM chunk WHERE id = ?", (int(chunk_id),))
                        continue
                    metadata = json.dumps(draft.metadata)
                    db.execute(
                        "UPDATE chunk SET text = ?, metadata = ?, embedding = ? WHERE id = ?",
                        (draft.text, metadata, _vector_bytes(draft.embedding), int(chunk_id)))
                    write.prepared[int(chunk_id)] = _Row(
                        row_id=int(chunk_id),
                        tokens=self._analyzer.chunk_terms(draft.text, draft.metadata),
                        chunk=StoredChunk(id=chunk_id, kb=kb, file_name=file_name,
                                          seq=seqs[int(chunk_id)], text=draft.text,
                                          metadata=json.loads(metadata)),
                        vector=(None if draft.embedding is None
                                else np.asarray(draft.embedding, dtype=np.float32)))
                db.execute(
                    "UPDATE file SET custom_docs = 1, loader = ?, splitter = ?, "
                    "version = version + 1, modified_at = ?, revision = ? "
                    "WHERE kb = ? AND file_name = ?",
                    (CUSTOM_DOCS, CUSTOM_DOCS, time.time(), uuid.uuid4().hex, kb, file_name))
                write.changed(kb, file_name)
                record = self._file_records(db, kb, file_name)[0]
            return record
        return await self._write(work)

    async def delete_file(self, kb: str, file_name: str, *, keep_content: bool = False) -> bool:
        def work() -> bool:
            with self._transaction() as write:
                db = write.db
                write.kb_uid(kb)
                if keep_content:
                    db.execute("DELETE FROM chunk WHERE kb = ? AND file_name = ?",
                               (kb, file_name))
                    existed = db.execute(
                        "UPDATE file SET revision = ? WHERE kb = ? AND file_name = ?",
                        (uuid.uuid4().hex, kb, file_name)).rowcount > 0
                else:
                    existed = db.execute(
                        "DELETE FROM file WHERE kb = ? AND file_name = ?",
                        (kb, file_name)).rowcount > 0
                write.changed(kb, file_name)
            return existed
        existed = await self._write(work)
        await self._reclaim_space()
        return existed

    async def list_chunks(self, kb: str, file_name: str) -> list[StoredChunk]:
        def work() -> list[StoredChunk]:
            index = self._index(kb)
            return sorted((index.chunks[row_id] for row_id in index.files.get(file_name, ())),
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
