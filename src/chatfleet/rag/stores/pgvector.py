"""The shared knowledge store: PostgreSQL with pgvector, one database for every gateway replica.

Every replica reads and writes the same tables, so an upload through one replica is searchable
through all of them as soon as its transaction commits; nothing is cached in the process except
which HNSW indexes exist.

Schema (created by ``start()`` when missing, under an advisory lock so that replicas starting
together do not race; every statement is ``IF NOT EXISTS``; ALTER TABLE, for a column added
since the first release, and CREATE INDEX, which lock their table even when they have nothing to
do, run only when the catalog lacks what they make, so that a start on a complete schema locks
no table and never holds off the other replicas):

- ``chatfleet_kb``: one row per KB, with its ``uid`` (a KB created anew under the same name has
  another).
- ``chatfleet_file``: one row per file, with its original bytes and a ``revision`` that every
  write changes (what ``put_file(replaces=...)`` compares); deleted with its KB.
- ``chatfleet_chunk``: one row per chunk, deleted with its file; ``lexemes`` holds the chunk's
  terms as ``rag/lexical.py``'s analyzer makes them (text and headings), ``tsv`` is generated from
  those
  (``to_tsvector('simple', lexemes)``, GIN-indexed) and ``embedding`` is an untyped, nullable
  ``vector``, so KBs with different embedding models (dimensions) share the table. One file's
  chunks, and one KB's, all have the same dimension (``put_file`` checks it).
- One HNSW index per embedding dimension D, made the first time a D-dimensional chunk is stored:
  a partial expression index over ``embedding::vector(D)`` for the rows with that dimension.
  Dense queries repeat that expression and predicate, which is what lets the planner use it.
  For a KB it believes small, the planner reads the KB's rows by ``(kb, file_name)`` and sorts
  them instead (exact, and cheap when the belief is right); the chunk table is re-analysed after
  every 1,000 changed rows, not the default 10% of the table, so that a new large KB is soon
  known as one.
- ``chatfleet_meta``: settings the stored data depends on; ``lexical_analyzer`` names the
  analyzer that made ``lexemes``. A store started with another analyzer (an upgrade that changed
  it, or a database older than the table) serves at once and re-analyzes every chunk's text and
  headings in the background: one replica at a time (a session-level advisory lock; the others
  try again every minute, so one takes over if it stops), in transactions of 2,000 chunks in id
  order, each recording the position reached (``lexical_reanalysis``), so that a replica stopped
  midway is resumed where it stopped. ``lexical_analyzer`` changes when every chunk is done.
  Meanwhile uploads and edits store the new terms, and searches find the chunks not done yet by
  their old terms (which differ in stemming, stopwords and headings only). A pod of the previous
  version still running in a rollout stores its uploads' terms the old way; they are searchable
  again once uploaded anew (or after ``recreate_vector_store``).

Searches:

- Lexical: PostgreSQL full-text search, OR over the query's tokens, ranked by ``ts_rank``
  (``ts_rank_cd``'s cover density took twice as long: p50 23 against 13 ms over 20k chunks).
  Chunks and queries are analyzed by ``rag/lexical.py``'s analyzer, as in the local store
  (English stopwords dropped, Snowball stems; a chunk's headings count too; a run of Chinese
  characters gives its characters and bigrams, which PostgreSQL's parser would keep as one
  unsearchable word), then given to the ``simple`` configuration, so both sides agree.
  ``ts_rank`` has no notion of a word's rarity (no IDF), unlike BM25, and ranks a little worse
  on the labelled questions of docs/benchmarks.md ("Retrieval quality").
- Dense: cosine distance (``<=>``) halved into [0, 1]. Connections run with
  ``hnsw.iterative_scan = strict_order``: the index is shared by all KBs of a dimension, and
  without iterative scans the filter on ``kb`` would be applied to the first ``hnsw.ef_search``
  (40) candidates only, so a small KB next to a large one would get few or no hits. The scan
  still stops after ``hnsw.max_scan_tuples`` (20,000) candidates.

Text with NUL characters, which PostgreSQL cannot store (PDF loaders produce them), is stored
without them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from chatfleet.rag.lexical import ANALYZER, Analyzer
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

__all__ = ["PgVectorStore", "dense_search_sql", "hnsw_index_name"]

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = 0x43464B42
"""First key of ChatFleet's advisory locks ("CFKB"); the second is 0 for the schema,
``_REANALYSIS_LOCK`` for the re-analysis, else the dimension whose HNSW index is being created."""
_DEFAULT_EF_SEARCH = 40
"""pgvector's default ``hnsw.ef_search``; a search for more hits raises it for its transaction."""
_MAX_EF_SEARCH = 1000
_INDEX_BUILD_MEMORY = "256MB"
"""``maintenance_work_mem`` while an HNSW index is built: the 64 MB default does not hold the
graph of 20k 1024-dimensional vectors, and a build that spills is several times slower."""

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS chatfleet_kb (
    name text PRIMARY KEY,
    info text NOT NULL,
    vector_store text NOT NULL,
    embed_model text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    uid text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS chatfleet_file (
    kb text NOT NULL REFERENCES chatfleet_kb (name) ON DELETE CASCADE,
    file_name text NOT NULL,
    content bytea NOT NULL,
    size bigint NOT NULL,
    loader text NOT NULL,
    splitter text NOT NULL,
    version integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    custom_docs boolean NOT NULL DEFAULT false,
    revision text NOT NULL DEFAULT '',
    PRIMARY KEY (kb, file_name));
CREATE TABLE IF NOT EXISTS chatfleet_chunk (
    id bigserial PRIMARY KEY,
    kb text NOT NULL,
    file_name text NOT NULL,
    seq integer NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL,
    lexemes text NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', lexemes)) STORED,
    embedding vector,
    FOREIGN KEY (kb, file_name) REFERENCES chatfleet_file (kb, file_name) ON DELETE CASCADE)
    WITH (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 1000);
CREATE TABLE IF NOT EXISTS chatfleet_meta (key text PRIMARY KEY, value text NOT NULL);
"""

_COLUMN_MISSING = """
SELECT NOT EXISTS (SELECT FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = $1
                         AND column_name = $2)"""
_COLUMNS_ADDED = (
    ("chatfleet_file", "custom_docs", "boolean NOT NULL DEFAULT false"),
    ("chatfleet_kb", "uid", "text NOT NULL DEFAULT ''"),
    ("chatfleet_file", "revision", "text NOT NULL DEFAULT ''"),
)
"""Columns added since the first release: (table, column, its type). Each is added only when it
is missing (a database made before it): even when it has nothing to do, ALTER TABLE takes an
ACCESS EXCLUSIVE lock, which would block every replica's reads of the table until the start's
transaction ends. A constant default rewrites no row."""
_INDEXES = {
    "chatfleet_chunk_tsv": "CREATE INDEX IF NOT EXISTS chatfleet_chunk_tsv ON chatfleet_chunk "
                           "USING gin (tsv)",
    "chatfleet_chunk_file": "CREATE INDEX IF NOT EXISTS chatfleet_chunk_file ON chatfleet_chunk "
                            "(kb, file_name, seq)",
}
"""Run only for an index that is missing: CREATE INDEX takes a SHARE lock on the table before
it looks whether the index exists, so it would wait for every upload in progress and hold the
next ones off until the start's transaction ends."""

_GET_META = "SELECT value FROM chatfleet_meta WHERE key = $1"
_SET_META = ("INSERT INTO chatfleet_meta (key, value) VALUES ($1, $2) "
             "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
_ANALYZER_KEY = "lexical_analyzer"
_REANALYSIS_KEY = "lexical_reanalysis"
"""The position of an unfinished re-analysis: JSON ``{"analyzer": name, "after": id}``, the
analyzer it re-analyzes for and the last chunk id it committed."""
_REANALYSIS_LOCK = -1
"""Second key of the session-level advisory lock held by the one replica re-analyzing."""
_REANALYZE_BATCH = 2000
"""Chunks re-analyzed per transaction (about 0.3 s of analysis) when the analyzer changed."""
_REANALYZE_RETRY_S = 60.0
"""How often a replica retries the re-analysis while another one holds it (and so takes over
when that one stops before it is done) or after a database error."""

_CHUNKS_TO_REANALYZE = """
SELECT id, text, metadata::text AS metadata, md5(ROW(text, metadata)::text) AS digest
FROM chatfleet_chunk WHERE id > $1 ORDER BY id LIMIT $2"""
# Only chunks unchanged since they were read: one edited meanwhile (edit_chunks) already has
# the terms of its new text, made by this analyzer.
_REANALYZE_CHUNKS = """
UPDATE chatfleet_chunk c SET lexemes = u.lexemes
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u (id, digest, lexemes)
WHERE c.id = u.id AND md5(ROW(c.text, c.metadata)::text) = u.digest"""

_KB_COLUMNS = """k.name, k.info, k.vector_store, k.embed_model, k.created_at, k.uid,
    (SELECT count(*) FROM chatfleet_file f WHERE f.kb = k.name) AS file_count"""

_FILE_COLUMNS = """f.file_name, f.size, f.loader, f.splitter, f.version, f.created_at,
    f.modified_at, f.custom_docs, f.revision,
    (SELECT count(*) FROM chatfleet_chunk c
     WHERE c.kb = f.kb AND c.file_name = f.file_name) AS chunk_count"""

_UPSERT_FILE = """
INSERT INTO chatfleet_file AS f (kb, file_name, content, size, loader, splitter, version,
                                 custom_docs, revision)
VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8)
ON CONFLICT (kb, file_name) DO UPDATE SET
    content = excluded.content, size = excluded.size, loader = excluded.loader,
    splitter = excluded.splitter, version = f.version + 1, modified_at = now(),
    custom_docs = excluded.custom_docs, revision = excluded.revision
RETURNING f.version, f.created_at, f.modified_at, f.revision"""

_CHUNK_COLUMNS = ("kb", "file_name", "seq", "text", "metadata", "lexemes", "embedding")

# The query's lexemes, each quoted for tsquery input (quotes and backslashes doubled: a URL's
# lexeme may hold either), joined with OR and cast, not parsed again, so they stay as they are.
_LEXICAL = r"""
WITH q AS (
    SELECT string_agg('''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''', ' | ')
           ::tsquery AS q
    FROM unnest(to_tsvector('simple', $2)))
SELECT c.id, c.file_name, c.seq, c.text, c.metadata, ts_rank(c.tsv, q.q) AS score
FROM chatfleet_chunk c CROSS JOIN q
WHERE c.kb = $1 AND c.tsv @@ q.q
ORDER BY score DESC, c.id
LIMIT $3"""


def dense_search_sql(dim: int) -> str:
    """Nearest chunks of one KB to a ``dim``-dimensional $1; the expression and the predicate
    are those of the partial index ``chatfleet_chunk_hnsw_<dim>``."""
    return f"""
SELECT id, file_name, seq, text, metadata, (embedding::vector({dim}) <=> $1) / 2 AS score
FROM chatfleet_chunk
WHERE kb = $2 AND vector_dims(embedding) = {dim}
ORDER BY embedding::vector({dim}) <=> $1
LIMIT $3"""


def _distances_sql(dim: int) -> str:
    return f"""
SELECT id, (embedding::vector({dim}) <=> $1) / 2 AS score
FROM chatfleet_chunk
WHERE kb = $2 AND id = ANY($3::bigint[]) AND vector_dims(embedding) = {dim}"""


def hnsw_index_name(dim: int) -> str:
    return f"chatfleet_chunk_hnsw_{dim}"


def _hnsw_index_sql(dim: int) -> str:
    return (f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(dim)} ON chatfleet_chunk "
            f"USING hnsw ((embedding::vector({dim})) vector_cosine_ops) "
            f"WHERE vector_dims(embedding) = {dim}")


def _kb_record(row: asyncpg.Record) -> KnowledgeBaseRecord:
    return KnowledgeBaseRecord(name=row["name"], info=row["info"], vector_store=row["vector_store"],
                               embed_model=row["embed_model"], file_count=row["file_count"],
                               created_at=row["created_at"].timestamp(), uid=row["uid"])


def _file_record(kb: str, row: asyncpg.Record, kb_uid: str) -> FileRecord:
    return FileRecord(kb=kb, file_name=row["file_name"], size_bytes=row["size"],
                      chunk_count=row["chunk_count"], loader=row["loader"],
                      splitter=row["splitter"], version=row["version"],
                      created_at=row["created_at"].timestamp(),
                      modified_at=row["modified_at"].timestamp(), custom_docs=row["custom_docs"],
                      kb_uid=kb_uid, revision=row["revision"])


def _stored_chunk(kb: str, row: asyncpg.Record) -> StoredChunk:
    return StoredChunk(id=str(row["id"]), kb=kb, file_name=row["file_name"], seq=row["seq"],
                       text=row["text"], metadata=row["metadata"])


def _hit(kb: str, row: asyncpg.Record) -> Hit:
    return Hit(chunk=_stored_chunk(kb, row), score=float(row["score"]))


def _jsonb_encode(value: Any) -> bytes:
    """jsonb's binary wire format: a version byte (1), then the JSON text. Binary, because the
    COPY that stores chunks is binary and needs a binary encoder for every column."""
    return b"\x01" + json.dumps(value).encode()


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


def _chunk_records(kb: str, file_name: str, chunks: Sequence[ChunkDraft],
                   analyzer: Analyzer) -> list[tuple[Any, ...]]:
    """COPY rows for a file's chunks (analyzing is CPU work: callers run this in a thread)."""
    return [(kb, file_name, seq, chunk.text.replace("\x00", ""), chunk.metadata,
             " ".join(analyzer.chunk_terms(chunk.text, chunk.metadata)), chunk.embedding)
            for seq, chunk in enumerate(chunks)]


def _reanalyzed(rows: Sequence[asyncpg.Record], analyzer: Analyzer) -> list[str]:
    """``lexemes`` of stored chunks (id, text, metadata as JSON text) under ``analyzer``."""
    return [" ".join(analyzer.chunk_terms(row["text"], json.loads(row["metadata"])))
            for row in rows]


def _dimension(chunks: Sequence[ChunkDraft]) -> int | None:
    """The one dimension of the chunks' embeddings; None when none has one."""
    dims = {len(chunk.embedding) for chunk in chunks if chunk.embedding is not None}
    if len(dims) > 1:
        raise ValueError(f"chunks of one file have embeddings of different dimensions {sorted(dims)}")
    return next(iter(dims), None)


ANALYZE_AFTER_ROWS = 200
"""An upload of this many chunks or more refreshes the planner's statistics right after."""


class PgVectorStore:
    """A ``KnowledgeStore`` in PostgreSQL (with the pgvector extension) at ``dsn``.

    ``pool_size`` connections at most are opened by one process. ``start()`` creates the
    extension when it is missing, which needs a superuser; where the database's owner is not
    one, have an administrator run ``CREATE EXTENSION vector`` once beforehand.
    ``reanalyze_batch`` and ``reanalyze_retry_s`` tune the re-analysis after an analyzer change
    (the module's docstring); tests shrink them.
    """

    kind = "pgvector"

    def __init__(self, dsn: str, *, pool_size: int = 10, analyzer: Analyzer = ANALYZER,
                 reanalyze_batch: int = _REANALYZE_BATCH,
                 reanalyze_retry_s: float = _REANALYZE_RETRY_S) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._analyzer = analyzer
        self._reanalyze_batch = reanalyze_batch
        self._reanalyze_retry_s = reanalyze_retry_s
        self._reanalysis: asyncio.Task[None] | None = None
        self._pool_or_none: asyncpg.Pool | None = None
        self._vector_schema = "public"
        self._indexed_dims: set[int] = set()
        self._analyze: asyncio.Task[None] | None = None
        self._analyze_again = False

    def __repr__(self) -> str:  # never shows the DSN: it holds the password
        return f"PgVectorStore(pool_size={self._pool_size})"

    @property
    def _pool(self) -> asyncpg.Pool:
        if self._pool_or_none is None:
            raise RuntimeError("PgVectorStore.start() was not called")
        return self._pool_or_none

    async def start(self) -> None:
        """Create what is missing of the schema, then serve at once; chunks stored under
        another analyzer are re-analyzed in the background (``_reanalyze_until_done``)."""
        conn = await asyncpg.connect(self._dsn)
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL client_min_messages = warning")  # no "skipping"s
                await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", _LOCK_NAMESPACE)
                await self._create_schema(conn)
            stored_analyzer = await conn.fetchval(_GET_META, _ANALYZER_KEY)
            self._vector_schema = await conn.fetchval(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = 'vector'")
        finally:
            await conn.close()
        self._pool_or_none = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=self._pool_size, init=self._init_connection,
            server_settings={"hnsw.iterative_scan": "strict_order"})
        if stored_analyzer != self._analyzer.name:
            self._reanalysis = asyncio.create_task(self._reanalyze_until_done())

    @staticmethod
    async def _create_schema(conn: asyncpg.Connection) -> None:
        """What is missing of the schema. On a complete one it locks no table, so that a replica
        starting (each scale-up) never holds off the others' reads and writes."""
        await conn.execute(_SCHEMA)
        for table, column, definition in _COLUMNS_ADDED:
            if await conn.fetchval(_COLUMN_MISSING, table, column):
                await conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                                   f"{definition}")
        for name, create in _INDEXES.items():
            if await conn.fetchval("SELECT to_regclass($1)", name) is None:
                await conn.execute(create)

    async def _reanalyze_until_done(self) -> None:
        """Re-analyze the chunks stored under another analyzer until that is done, by this
        replica or another: tried again every ``reanalyze_retry_s`` while another replica is at
        it (to take over should it stop) and after a database error."""
        while True:
            try:
                if await self._reanalyze():
                    return
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                log.warning("re-analysis for lexical search failed (retried in %g s): %s: %s",
                            self._reanalyze_retry_s, type(error).__name__, error)
            except Exception:  # not lost in a task nobody awaits until shutdown
                log.exception("re-analysis for lexical search stopped")
                raise
            await asyncio.sleep(self._reanalyze_retry_s)

    async def _reanalyze(self) -> bool:
        """Re-analyze the chunks not done yet unless another replica holds the work (False
        then). Batches of ``reanalyze_batch`` chunks in id order, each committed with the
        position reached, so that a replica stopped midway is resumed, not started over; the
        analyzer is recorded when every chunk is done (True: by this call or before it).

        A connection of its own, not the pool's: it holds a session-level advisory lock for as
        long as the work takes (the pool unlocks a connection it gets back), and closing it, as
        a cancelled task or a killed pod does, releases the lock."""
        conn = await asyncpg.connect(self._dsn)
        try:
            locked = await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _LOCK_NAMESPACE,
                                         _REANALYSIS_LOCK)
            stored = await conn.fetchval(_GET_META, _ANALYZER_KEY)
            if stored == self._analyzer.name:
                return True
            if not locked:
                log.debug("another replica is re-analyzing chunks for lexical search")
                return False
            after = await self._reanalysis_position(conn)
            log.info("re-analyzing chunks for lexical search in the background (%s, was %s), "
                     "after chunk %d", self._analyzer.name, stored, after)
            while rows := await conn.fetch(_CHUNKS_TO_REANALYZE, after, self._reanalyze_batch):
                after = await self._reanalyze_batch_of(conn, rows)
            async with conn.transaction():
                await conn.execute(_SET_META, _ANALYZER_KEY, self._analyzer.name)
                await conn.execute("DELETE FROM chatfleet_meta WHERE key = $1", _REANALYSIS_KEY)
            log.info("re-analysis for lexical search done (%s)", self._analyzer.name)
            return True
        finally:
            await conn.close()

    async def _reanalysis_position(self, conn: asyncpg.Connection) -> int:
        """The last chunk id an interrupted re-analysis for this analyzer committed; 0 when
        there was none (or it was for another analyzer)."""
        value = await conn.fetchval(_GET_META, _REANALYSIS_KEY)
        position = json.loads(value) if value is not None else {}
        return position["after"] if position.get("analyzer") == self._analyzer.name else 0

    async def _reanalyze_batch_of(self, conn: asyncpg.Connection,
                                  rows: Sequence[asyncpg.Record]) -> int:
        """Rewrite the rows' terms and record the last one's id as the position, in one
        transaction; return that id."""
        lexemes = await asyncio.to_thread(_reanalyzed, rows, self._analyzer)
        after: int = rows[-1]["id"]
        async with conn.transaction():
            await conn.execute(_REANALYZE_CHUNKS, [row["id"] for row in rows],
                               [row["digest"] for row in rows], lexemes)
            await conn.execute(_SET_META, _REANALYSIS_KEY,
                               json.dumps({"analyzer": self._analyzer.name, "after": after}))
        return after

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await register_vector(conn, schema=self._vector_schema)
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_jsonb_encode,
                                  decoder=_jsonb_decode, format="binary")

    def _analyze_soon(self) -> None:
        """Refresh the planner's statistics of the chunk table in the background, after a large
        upload: until then it believes a new KB holds one row and, for up to autovacuum's next
        round (a minute), sorts all its vectors instead of using HNSW and filters every row
        instead of the full-text index (3-10x slower searches, docs/benchmarks.md)."""
        if self._analyze is not None and not self._analyze.done():
            self._analyze_again = True
            return

        async def analyze() -> None:
            while True:
                self._analyze_again = False
                try:
                    async with self._pool.acquire() as conn:
                        await conn.execute("ANALYZE chatfleet_chunk")
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                    log.warning("ANALYZE after an upload failed (autovacuum will do it): %s: %s",
                                type(error).__name__, error)
                if not self._analyze_again:
                    return

        self._analyze = asyncio.create_task(analyze())

    async def aclose(self) -> None:
        """Stop the background work (a re-analysis resumes at the next start) and the pool."""
        for task in (self._analyze, self._reanalysis):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pool_or_none is not None:
            await self._pool_or_none.close()
            self._pool_or_none = None

    async def list_kbs(self) -> list[KnowledgeBaseRecord]:
        rows = await self._pool.fetch(f"SELECT {_KB_COLUMNS} FROM chatfleet_kb k ORDER BY k.name")
        return [_kb_record(row) for row in rows]

    async def get_kb(self, kb: str) -> KnowledgeBaseRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {_KB_COLUMNS} FROM chatfleet_kb k WHERE k.name = $1", kb)
        return None if row is None else _kb_record(row)

    async def create_kb(self, kb: str, *, info: str, embed_model: str) -> KnowledgeBaseRecord:
        row = await self._pool.fetchrow(
            "INSERT INTO chatfleet_kb AS k (name, info, vector_store, embed_model, uid) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING "
            f"RETURNING {_KB_COLUMNS}", kb, info, self.kind, embed_model, uuid.uuid4().hex)
        if row is None:
            raise KnowledgeBaseExists(kb)
        return _kb_record(row)

    async def delete_kb(self, kb: str) -> None:
        if await self._pool.fetchval(
                "DELETE FROM chatfleet_kb WHERE name = $1 RETURNING true", kb) is None:
            raise KnowledgeBaseNotFound(kb)

    async def update_kb_info(self, kb: str, info: str) -> None:
        if await self._pool.fetchval(
                "UPDATE chatfleet_kb SET info = $2 WHERE name = $1 RETURNING true", kb, info) is None:
            raise KnowledgeBaseNotFound(kb)

    async def list_files(self, kb: str) -> list[FileRecord]:
        rows = await self._pool.fetch(
            f"SELECT {_FILE_COLUMNS}, k.uid AS kb_uid FROM chatfleet_kb k "
            "LEFT JOIN chatfleet_file f ON f.kb = k.name WHERE k.name = $1 ORDER BY f.file_name", kb)
        if not rows:
            raise KnowledgeBaseNotFound(kb)
        return [_file_record(kb, row, row["kb_uid"]) for row in rows
                if row["file_name"] is not None]

    async def get_file(self, kb: str, file_name: str) -> bytes | None:
        row = await self._pool.fetchrow(
            "SELECT f.content FROM chatfleet_kb k LEFT JOIN chatfleet_file f "
            "ON f.kb = k.name AND f.file_name = $2 WHERE k.name = $1", kb, file_name)
        if row is None:
            raise KnowledgeBaseNotFound(kb)
        return row["content"]

    async def put_file(self, kb: str, file_name: str, content: bytes, chunks: Sequence[ChunkDraft],
                       *, loader: str, splitter: str, custom_docs: bool = False,
                       replaces: FileRecord | None = None) -> FileRecord:
        """Replace the file's row (version + 1, first ``created_at`` kept) and all its chunks in
        one transaction. Concurrent uploads to one KB take turns (they lock its row), so two
        files with embeddings of different dimensions cannot both get in. With ``replaces``,
        the file's row is locked and compared before anything is written: a delete that
        committed first has removed it; one that comes later waits for this commit."""
        dim = _dimension(chunks)
        records = await asyncio.to_thread(_chunk_records, kb, file_name, chunks, self._analyzer)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                kb_uid = await self._lock_kb(conn, kb)
                if replaces is not None:
                    await self._check_replaces(conn, kb, kb_uid, replaces)
                if dim is not None:
                    await self._check_kb_dimension(conn, kb, file_name, dim)
                row = await conn.fetchrow(_UPSERT_FILE, kb, file_name, content, len(content),
                                          loader, splitter, custom_docs, uuid.uuid4().hex)
                await conn.execute("DELETE FROM chatfleet_chunk WHERE kb = $1 AND file_name = $2",
                                   kb, file_name)
                if records:
                    await conn.copy_records_to_table("chatfleet_chunk", records=records,
                                                     columns=_CHUNK_COLUMNS)
            if dim is not None and dim not in self._indexed_dims:
                try:
                    await self._ensure_hnsw_index(conn, dim)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                    # The file is stored: put_file must not report a failure.
                    log.warning("no HNSW index for dimension %d yet (dense searches scan until an "
                                "upload creates it): %s: %s", dim, type(error).__name__, error)
            elif len(records) >= ANALYZE_AFTER_ROWS:
                self._analyze_soon()
        return FileRecord(kb=kb, file_name=file_name, size_bytes=len(content),
                          chunk_count=len(records), loader=loader, splitter=splitter,
                          version=row["version"], created_at=row["created_at"].timestamp(),
                          modified_at=row["modified_at"].timestamp(), custom_docs=custom_docs,
                          kb_uid=kb_uid, revision=row["revision"])

    @staticmethod
    async def _lock_kb(conn: asyncpg.Connection, kb: str) -> str:
        """Lock the KB's row against its deletion until the transaction ends; its uid. Raises
        ``KnowledgeBaseNotFound``."""
        uid: str | None = await conn.fetchval(
            "SELECT uid FROM chatfleet_kb WHERE name = $1 FOR NO KEY UPDATE", kb)
        if uid is None:
            raise KnowledgeBaseNotFound(kb)
        return uid

    @staticmethod
    async def _check_replaces(conn: asyncpg.Connection, kb: str, kb_uid: str,
                              record: FileRecord) -> None:
        """Raise unless the (locked) KB and the file are still those ``record`` was read from."""
        if kb_uid != record.kb_uid:
            raise KnowledgeBaseNotFound(kb)
        revision = await conn.fetchval(
            "SELECT revision FROM chatfleet_file WHERE kb = $1 AND file_name = $2 FOR UPDATE",
            kb, record.file_name)
        if revision != record.revision:
            raise FileChanged(record.file_name, deleted=revision is None)

    @staticmethod
    async def _check_kb_dimension(conn: asyncpg.Connection, kb: str, file_name: str,
                                  dim: int) -> None:
        """Raise ValueError when the KB's other files have embeddings of another dimension."""
        other = await conn.fetchval(
            "SELECT vector_dims(embedding) FROM chatfleet_chunk "
            "WHERE kb = $1 AND file_name <> $2 AND embedding IS NOT NULL LIMIT 1", kb, file_name)
        if other is not None and other != dim:
            raise ValueError(f"embeddings of dimension {dim} cannot join knowledge base '{kb}', "
                             f"whose vectors have dimension {other}: recreate its vector store")

    async def _ensure_hnsw_index(self, conn: asyncpg.Connection, dim: int) -> None:
        """Create the dimension's HNSW index unless it exists, after the chunks are in: one
        build over them is faster than inserting them into an empty graph one by one.

        Its own transaction, never the upload's: CREATE INDEX locks out writers to the table
        until commit, and two uploads each holding row locks while waiting for that lock would
        deadlock. The advisory lock makes two replicas creating it at once take turns (two
        concurrent ``IF NOT EXISTS`` of one name can still fail on the catalog's unique key).
        The ANALYZE after it gives the planner the table's statistics at once: until then it
        guesses every KB small and sorts its chunks instead of using the new index."""
        if await conn.fetchval("SELECT to_regclass($1)", hnsw_index_name(dim)) is None:
            async with conn.transaction():
                await conn.execute("SET LOCAL client_min_messages = warning")
                await conn.execute(f"SET LOCAL maintenance_work_mem = '{_INDEX_BUILD_MEMORY}'")
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NAMESPACE, dim)
                await conn.execute(_hnsw_index_sql(dim))
            await conn.execute("ANALYZE chatfleet_chunk")
        self._indexed_dims.add(dim)

    async def edit_chunks(self, kb: str, file_name: str,
                          edits: Mapping[str, ChunkDraft | None]) -> FileRecord:
        """One transaction: the file's chunks locked, every id checked, then the deletes and
        updates, and the file's row (version + 1). Unedited chunks keep their rows and ids."""
        updates = {chunk_id: draft for chunk_id, draft in edits.items() if draft is not None}
        dim = _dimension(list(updates.values()))
        lexemes = await asyncio.to_thread(lambda: {
            chunk_id: " ".join(self._analyzer.chunk_terms(draft.text, draft.metadata))
            for chunk_id, draft in updates.items()})
        async with self._pool.acquire() as conn, conn.transaction():
            kb_uid = await self._lock_kb(conn, kb)
            present = {row["id"] for row in await conn.fetch(
                "SELECT id FROM chatfleet_chunk WHERE kb = $1 AND file_name = $2 FOR UPDATE",
                kb, file_name)}
            stale = [i for i in edits if not i.isdigit() or int(i) not in present]
            if stale:
                raise StaleChunks(file_name, stale)
            if dim is not None:
                other = await conn.fetchval(
                    "SELECT vector_dims(embedding) FROM chatfleet_chunk WHERE kb = $1 AND "
                    "embedding IS NOT NULL AND NOT (id = ANY($2::bigint[])) LIMIT 1",
                    kb, [int(i) for i in updates])
                if other is not None and other != dim:
                    raise ValueError(f"embeddings of dimension {dim} cannot join knowledge base "
                                     f"'{kb}', whose vectors have dimension {other}: recreate its "
                                     "vector store")
            await conn.execute("DELETE FROM chatfleet_chunk WHERE id = ANY($1::bigint[])",
                               [int(i) for i, draft in edits.items() if draft is None])
            await conn.executemany(
                "UPDATE chatfleet_chunk SET text = $2, metadata = $3, lexemes = $4, "
                "embedding = $5 WHERE id = $1",
                [(int(i), draft.text.replace("\x00", ""), draft.metadata, lexemes[i],
                  draft.embedding) for i, draft in updates.items()])
            row = await conn.fetchrow(
                "UPDATE chatfleet_file AS f SET custom_docs = true, loader = $3, splitter = $3, "
                "version = f.version + 1, modified_at = now(), revision = $4 "
                f"WHERE kb = $1 AND file_name = $2 RETURNING {_FILE_COLUMNS}",
                kb, file_name, CUSTOM_DOCS, uuid.uuid4().hex)
        return _file_record(kb, row, kb_uid)

    async def delete_file(self, kb: str, file_name: str, *, keep_content: bool = False) -> bool:
        """With ``keep_content`` the file's row (with its bytes) stays and lists with 0 chunks;
        without it the row goes too. True if the file was there."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._require_kb(conn, kb)
            if keep_content:
                existed = await conn.fetchval(
                    "UPDATE chatfleet_file SET revision = $3 WHERE kb = $1 AND file_name = $2 "
                    "RETURNING true", kb, file_name, uuid.uuid4().hex)
                await conn.execute("DELETE FROM chatfleet_chunk WHERE kb = $1 AND file_name = $2",
                                   kb, file_name)
            else:
                existed = await conn.fetchval(
                    "DELETE FROM chatfleet_file WHERE kb = $1 AND file_name = $2 RETURNING true",
                    kb, file_name)
        return existed is not None

    async def list_chunks(self, kb: str, file_name: str) -> list[StoredChunk]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, file_name, seq, text, metadata FROM chatfleet_chunk "
                "WHERE kb = $1 AND file_name = $2 ORDER BY seq", kb, file_name)
            if not rows:
                await self._require_kb(conn, kb)
        return [_stored_chunk(kb, row) for row in rows]

    async def lexical_search(self, kb: str, query: str, k: int) -> list[Hit]:
        async with self._pool.acquire() as conn:
            lexemes = " ".join(self._analyzer.tokenize(query))
            rows = await conn.fetch(_LEXICAL, kb, lexemes, k) if lexemes else []
            if not rows:
                await self._require_kb(conn, kb)
        return [_hit(kb, row) for row in rows]

    async def dense_search(self, kb: str, query: Vector, k: int) -> list[Hit]:
        vector = np.asarray(query, dtype=np.float32)
        dim = len(vector)
        async with self._pool.acquire() as conn:
            if k <= _DEFAULT_EF_SEARCH:
                rows = await conn.fetch(dense_search_sql(dim), vector, kb, k)
            else:  # the scan's candidate list must hold k for good recall
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL hnsw.ef_search = {min(k, _MAX_EF_SEARCH)}")
                    rows = await conn.fetch(dense_search_sql(dim), vector, kb, k)
            if not rows:
                await self._require_kb(conn, kb, query_dim=dim)
        return [_hit(kb, row) for row in rows]

    async def distances(self, kb: str, query: Vector, chunk_ids: Sequence[str]) -> dict[str, float]:
        vector = np.asarray(query, dtype=np.float32)
        ids = [int(chunk_id) for chunk_id in chunk_ids]
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_distances_sql(len(vector)), vector, kb, ids)
            if not rows:
                await self._require_kb(conn, kb, query_dim=len(vector))
        return {str(row["id"]): float(row["score"]) for row in rows}

    @staticmethod
    async def _require_kb(conn: asyncpg.Connection, kb: str, *, query_dim: int | None = None) -> None:
        """Explain an empty answer: raise ``KnowledgeBaseNotFound`` when the KB does not exist,
        and ValueError when ``query_dim`` is given and the KB's vectors have another dimension.
        Run only then, so that a search that finds something costs one round trip."""
        if query_dim is None:
            if await conn.fetchval("SELECT true FROM chatfleet_kb WHERE name = $1", kb) is None:
                raise KnowledgeBaseNotFound(kb)
            return
        row = await conn.fetchrow(
            "SELECT (SELECT vector_dims(embedding) FROM chatfleet_chunk "
            "        WHERE kb = $1 AND embedding IS NOT NULL LIMIT 1) AS dim "
            "FROM chatfleet_kb WHERE name = $1", kb)
        if row is None:
            raise KnowledgeBaseNotFound(kb)
        if row["dim"] is not None and row["dim"] != query_dim:
            raise ValueError(f"query vector has dimension {query_dim}; knowledge base '{kb}' holds "
                             f"vectors of dimension {row['dim']}")
