"""Issue 12, data integrity: a delete wins over a rebuild or an update that read before it, a
KB deleted during a rebuild ends its stream with a 404 event, and the SQLite file shrinks when a
knowledge base is deleted.

The races are made deterministic, not timed: the gateway embeds through ``GatedEmbeddings``
(tests/support/gated_embeddings.py), which holds the request for one file's chunks until the
test has done its delete. Store-level tests check the contract behind it
(``put_file(replaces=...)``) on both stores.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatfleet.rag.stores.base import (
    ChunkDraft,
    FileChanged,
    FileRecord,
    KnowledgeBaseNotFound,
    KnowledgeStore,
)
from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.stores.pgvector import PgVectorStore
from tests.conftest import Server, start_gateway
from tests.support.gated_embeddings import MARKER, GatedEmbeddings
from tests.support.stores import STORES

@pytest.fixture(scope="module")
def embeddings() -> Iterator[GatedEmbeddings]:
    with GatedEmbeddings() as server:
        yield server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kb")


@pytest.fixture(scope="module")
def gw(embeddings: GatedEmbeddings, data_dir: Path) -> Iterator[Server]:
    server = start_gateway({"CHATFLEET_KB__EMBEDDINGS__URL": embeddings.v1,
                            "CHATFLEET_KB__EMBEDDINGS__MODEL": "gated-hash",
                            "CHATFLEET_KB__DATA_DIR": str(data_dir)})
    yield server
    server.proc.terminate()


@pytest.fixture
async def api(gw: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        yield client


HELD = ("a.txt", f"alpha {MARKER} first file".encode())
OTHERS = [("b.txt", b"bravo second file"), ("c.txt", b"charlie third file")]


async def _make_kb(api: httpx.AsyncClient, kb: str, *files: tuple[str, bytes]) -> None:
    body = (await api.post("/knowledge_base/create_knowledge_base",
                           json={"knowledge_base_name": kb})).json()
    assert body["code"] == 200, body
    if files:
        await _upload(api, kb, *files)


async def _upload(api: httpx.AsyncClient, kb: str, *files: tuple[str, bytes],
                  **form: str) -> None:
    body = (await api.post("/knowledge_base/upload_docs",
                           data={"knowledge_base_name": kb, **form},
                           files=[("files", file) for file in files])).json()
    assert body == {"code": 200, "msg": "文件上传与向量化完成", "data": {"failed_files": {}}}


async def _files(api: httpx.AsyncClient, kb: str) -> dict[str, dict[str, Any]]:
    body = (await api.get("/knowledge_base/list_files",
                          params={"knowledge_base_name": kb})).json()
    assert body["code"] == 200, body
    return {record["file_name"]: record for record in body["data"]}


async def _sources(api: httpx.AsyncClient, kb: str) -> set[str]:
    """The files a search finds chunks of (all: the threshold keeps every dense hit)."""
    response = await api.post("/knowledge_base/search_docs", json={
        "knowledge_base_name": kb, "query": "alpha bravo charlie november", "top_k": 100})
    return {doc["metadata"]["source"] for doc in response.json()}


async def _rebuild(api: httpx.AsyncClient, kb: str) -> list[dict[str, Any]]:
    """The rebuild's events, after checking Chatchat's framing and that the stream ended
    cleanly (a broken one raises httpx.RemoteProtocolError here)."""
    async with api.stream("POST", "/knowledge_base/recreate_vector_store",
                          json={"knowledge_base_name": kb}) as response:
        assert response.status_code == 200
        raw = (await response.aread()).decode()
    assert raw.endswith("\r\n\r\n"), raw
    frames = [frame for frame in raw.split("\r\n\r\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames), raw
    return [json.loads(frame.removeprefix("data: ")) for frame in frames]


async def _delete_docs(api: httpx.AsyncClient, kb: str, *names: str,
                       delete_content: bool = True) -> None:
    body = (await api.post("/knowledge_base/delete_docs", json={
        "knowledge_base_name": kb, "file_names": list(names),
        "delete_content": delete_content})).json()
    assert body["data"]["failed_files"] == {}, body


async def _delete_kb(api: httpx.AsyncClient, kb: str) -> None:
    body = (await api.post("/knowledge_base/delete_knowledge_base", json=kb)).json()
    assert body["code"] == 200, body


# Point 6: the delete wins --------------------------------------------------------------------

@pytest.mark.parametrize("delete_content", [True, False], ids=["delete", "delete-chunks-only"])
async def test_files_deleted_during_a_rebuild_stay_deleted_and_are_reported_as_skipped(
        api: httpx.AsyncClient, embeddings: GatedEmbeddings, delete_content: bool) -> None:
    """a.txt is deleted while the rebuild embeds it, b.txt before the rebuild reads it: neither
    comes back (with delete_content=false their bytes stay, but no chunks); c.txt is rebuilt."""
    kb = f"rebuild_files_{delete_content}".lower()
    await _make_kb(api, kb, HELD, *OTHERS)
    with embeddings.hold():
        rebuild = asyncio.create_task(_rebuild(api, kb))
        await embeddings.wait_held()
        await _delete_docs(api, kb, "a.txt", "b.txt", delete_content=delete_content)
    events = await rebuild
    files = await _files(api, kb)
    if delete_content:
        assert set(files) == {"c.txt"}
    else:
        assert {name: f["docs_count"] for name, f in files.items()} == {
            "a.txt": 0, "b.txt": 0, "c.txt": 1}
    assert await _sources(api, kb) == {"c.txt"}
    assert [(e["code"], e["finished"], e["doc"], "skipped" in e) for e in events] == [
        (200, 1, "a.txt", True), (200, 2, "b.txt", True), (200, 3, "c.txt", False)]
    assert all("meanwhile" in e["skipped"] for e in events[:2]), events


async def test_a_kb_deleted_and_created_anew_during_a_rebuild_gets_none_of_the_old_files(
        api: httpx.AsyncClient, embeddings: GatedEmbeddings) -> None:
    kb = "rebuild_kb_anew"
    await _make_kb(api, kb, HELD, *OTHERS)
    with embeddings.hold():
        rebuild = asyncio.create_task(_rebuild(api, kb))
        await embeddings.wait_held()
        await _delete_kb(api, kb)
        await _make_kb(api, kb, ("new.txt", b"november only file"))
    events = await rebuild
    assert set(await _files(api, kb)) == {"new.txt"}
    assert await _sources(api, kb) == {"new.txt"}
    assert events[-1]["code"] == 404 and f"'{kb}' was deleted" in events[-1]["msg"], events
    assert [e["code"] for e in events[:-1]] == []


async def test_a_kb_deleted_during_a_rebuild_ends_the_stream_with_a_404_event(
        api: httpx.AsyncClient, embeddings: GatedEmbeddings, gw: Server) -> None:
    """Point 7: was a server RuntimeError and an incomplete chunked read."""
    kb = "rebuild_kb_deleted"
    await _make_kb(api, kb, HELD, *OTHERS)
    with embeddings.hold():
        rebuild = asyncio.create_task(_rebuild(api, kb))
        await embeddings.wait_held()
        await _delete_kb(api, kb)
    events = await rebuild
    assert events == [{"code": 404, "msg": f"未找到知识库 ‘{kb}’ (knowledge base '{kb}' was "
                       "deleted during the rebuild; one created since under its name is left "
                       "as it is)"}]
    assert (await api.get("/knowledge_base/list_files",
                          params={"knowledge_base_name": kb})).json()["code"] == 404
    assert "Traceback" not in gw.proc.log_text()


async def test_update_docs_racing_a_delete_leaves_the_file_deleted(
        api: httpx.AsyncClient, embeddings: GatedEmbeddings) -> None:
    kb = "update_vs_delete"
    await _make_kb(api, kb, HELD, *OTHERS)
    with embeddings.hold():
        update = asyncio.create_task(api.post("/knowledge_base/update_docs", json={
            "knowledge_base_name": kb, "file_names": ["a.txt", "b.txt"]}))
        await embeddings.wait_held()
        await _delete_docs(api, kb, "a.txt")
    body = (await update).json()
    assert body["code"] == 200
    assert list(body["data"]["failed_files"]) == ["a.txt"]
    assert "was deleted meanwhile, and stays deleted" in body["data"]["failed_files"]["a.txt"]
    assert set(await _files(api, kb)) == {"b.txt", "c.txt"}
    assert await _sources(api, kb) == {"b.txt", "c.txt"}


async def test_custom_docs_for_a_file_deleted_meanwhile_do_not_bring_it_back(
        api: httpx.AsyncClient, embeddings: GatedEmbeddings) -> None:
    kb = "custom_vs_delete"
    await _make_kb(api, kb, ("a.txt", b"alpha plain"), *OTHERS)
    docs = {"a.txt": [{"page_content": f"alpha {MARKER} custom", "metadata": {}}]}
    with embeddings.hold():
        update = asyncio.create_task(api.post("/knowledge_base/update_docs", json={
            "knowledge_base_name": kb, "file_names": [], "docs": json.dumps(docs)}))
        await embeddings.wait_held()
        await _delete_docs(api, kb, "a.txt")
    body = (await update).json()
    assert "stays deleted" in body["data"]["failed_files"]["a.txt"], body
    assert set(await _files(api, kb)) == {"b.txt", "c.txt"}


# Point 15 (part): the SQLite file shrinks ----------------------------------------------------

def _db_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("kb.sqlite3*"))


async def test_deleting_a_kb_gives_its_space_back_to_the_file_system(
        api: httpx.AsyncClient, data_dir: Path) -> None:
    kb = "big_to_delete"
    await _make_kb(api, kb)
    before = _db_bytes(data_dir)
    text = " ".join(f"w{i}" for i in range(170_000)).encode()  # about 1.2 MB
    for n in range(4):
        await _upload(api, kb, (f"f{n}.txt", text), chunk_size="50000", chunk_overlap="0")
    full = _db_bytes(data_dir)
    assert full - before > 8 * len(text)  # bytes and chunk text, stored once each
    await _delete_kb(api, kb)
    after = _db_bytes(data_dir)
    assert after - before < (full - before) / 4, (before, full, after)


# The contract behind it, on both stores -------------------------------------------------------

KB = "kb1"

def _drafts(text: str) -> list[ChunkDraft]:
    return [ChunkDraft(text=text, metadata={})]


async def _put(store: KnowledgeStore, name: str, text: str, *, kb: str = KB,
               replaces: FileRecord | None = None) -> FileRecord:
    return await store.put_file(kb, name, text.encode(), _drafts(text), loader="TextLoader",
                                splitter="RecursiveCharacterTextSplitter", replaces=replaces)


async def _record(store: KnowledgeStore, name: str, kb: str = KB) -> FileRecord:
    (record,) = [f for f in await store.list_files(kb) if f.file_name == name]
    return record


async def _texts(store: KnowledgeStore, kb: str = KB) -> list[str]:
    found: list[str] = []
    for file in await store.list_files(kb):
        found += [chunk.text for chunk in await store.list_chunks(kb, file.file_name)]
    return sorted(found)


async def test_a_conditional_put_replaces_the_file_it_read_and_every_write_changes_revision(
        store: KnowledgeStore) -> None:
    created = await store.create_kb(KB, info="", embed_model="")
    put = await _put(store, "a.txt", "one")
    listed = await _record(store, "a.txt")
    assert (listed.kb_uid, listed.revision) == (created.uid, put.revision) and created.uid
    again = await _put(store, "a.txt", "two", replaces=listed)
    assert again.version == 2 and again.revision not in {"", listed.revision}
    assert await _texts(store) == ["two"]
    edited = await store.edit_chunks(KB, "a.txt", {
        (await store.list_chunks(KB, "a.txt"))[0].id: ChunkDraft(text="three")})
    assert edited.revision not in {again.revision, ""}
    with pytest.raises(FileChanged) as changed:
        await _put(store, "a.txt", "stale", replaces=again)
    assert not changed.value.deleted
    assert await _texts(store) == ["three"]


@pytest.mark.parametrize("keep_content", [False, True])
async def test_a_conditional_put_never_brings_back_a_deleted_file(
        store: KnowledgeStore, keep_content: bool) -> None:
    await store.create_kb(KB, info="", embed_model="")
    await _put(store, "a.txt", "one")
    read = await _record(store, "a.txt")
    await store.delete_file(KB, "a.txt", keep_content=keep_content)
    with pytest.raises(FileChanged) as changed:
        await _put(store, "a.txt", "rebuilt", replaces=read)
    assert changed.value.deleted is not keep_content
    assert [f.file_name for f in await store.list_files(KB)] == (["a.txt"] if keep_content else [])
    assert await _texts(store) == []


async def test_a_file_deleted_and_uploaded_again_is_not_replaced_by_what_was_read_before(
        store: KnowledgeStore) -> None:
    """Same name, same version (1) after the new upload: only the revision tells them apart."""
    await store.create_kb(KB, info="", embed_model="")
    await _put(store, "a.txt", "old")
    read = await _record(store, "a.txt")
    await store.delete_file(KB, "a.txt")
    await _put(store, "a.txt", "new")
    assert (await _record(store, "a.txt")).version == read.version
    with pytest.raises(FileChanged):
        await _put(store, "a.txt", "old rebuilt", replaces=read)
    assert await _texts(store) == ["new"]


async def test_a_conditional_put_into_a_kb_deleted_and_created_anew_stores_nothing(
        store: KnowledgeStore) -> None:
    old = await store.create_kb(KB, info="", embed_model="")
    await _put(store, "a.txt", "old kb")
    read = await _record(store, "a.txt")
    await store.delete_kb(KB)
    with pytest.raises(KnowledgeBaseNotFound):
        await _put(store, "a.txt", "old kb rebuilt", replaces=read)
    new = await store.create_kb(KB, info="", embed_model="")
    assert new.uid != old.uid
    await _put(store, "a.txt", "new kb")
    with pytest.raises(KnowledgeBaseNotFound):
        await _put(store, "a.txt", "old kb rebuilt", replaces=read)
    assert await _texts(store) == ["new kb"]


async def test_pgvector_a_conditional_put_waiting_on_a_delete_in_progress_sees_it(
        pg_dsn: str) -> None:
    """The delete holds the file's row when the put comes: the put waits for its commit, then
    finds the row gone (READ COMMITTED re-reads a row it waited for)."""
    store = PgVectorStore(pg_dsn)
    await store.start()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await store.create_kb(KB, info="", embed_model="")
        await _put(store, "a.txt", "one")
        read = await _record(store, "a.txt")
        deleting = conn.transaction()
        await deleting.start()
        await conn.execute("DELETE FROM chatfleet_file WHERE kb = $1", KB)
        put = asyncio.create_task(_put(store, "a.txt", "rebuilt", replaces=read))
        probe = await asyncpg.connect(pg_dsn)
        deadline = time.monotonic() + 10
        while not await probe.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                       "datname = current_database() AND wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline, "the put never waited for the delete"
            await asyncio.sleep(0.01)
        await probe.close()
        assert not put.done()
        await deleting.commit()
        with pytest.raises(FileChanged):
            await put
        assert await store.list_files(KB) == []
    finally:
        await conn.close()
        await store.aclose()


_DROP_REVISIONS = {
    "local": ["ALTER TABLE file DROP COLUMN revision", "ALTER TABLE kb DROP COLUMN uid"],
    "pgvector": ["ALTER TABLE chatfleet_file DROP COLUMN revision",
                 "ALTER TABLE chatfleet_kb DROP COLUMN uid"],
}


@pytest.mark.parametrize("kind", list(STORES))
async def test_a_store_made_before_revisions_is_migrated_and_its_files_are_protected_too(
        kind: str, request: pytest.FixtureRequest) -> None:
    store = STORES[kind](request)
    await store.start()
    await store.create_kb(KB, info="", embed_model="")
    await _put(store, "a.txt", "kept")
    await _put(store, "b.txt", "deleted")
    await store.aclose()
    if kind == "local":
        db = sqlite3.connect(request.getfixturevalue("tmp_path") / "kb" / "kb.sqlite3")
        for statement in _DROP_REVISIONS[kind]:
            db.execute(statement)
        db.commit()
        db.close()
    else:
        conn = await asyncpg.connect(request.getfixturevalue("pg_dsn"))
        for statement in _DROP_REVISIONS[kind]:
            await conn.execute(statement)
        await conn.close()
    store = STORES[kind](request)
    await store.start()
    try:
        a, b = await store.list_files(KB)
        assert (a.kb_uid, a.revision) == ("", "")
        await _put(store, "a.txt", "kept, rebuilt", replaces=a)
        await store.delete_file(KB, "b.txt")
        with pytest.raises(FileChanged):
            await _put(store, "b.txt", "rebuilt", replaces=b)
        assert await _texts(store) == ["kept, rebuilt"]
    finally:
        await store.aclose()


async def test_a_local_store_made_without_incremental_vacuum_is_converted_and_then_shrinks(
        tmp_path: Path) -> None:
    path = tmp_path / "kb" / "kb.sqlite3"
    store = LocalStore(tmp_path / "kb")
    await store.start()
    await store.create_kb(KB, info="", embed_model="")
    await store.aclose()
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA auto_vacuum = NONE; VACUUM;")
    assert db.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    db.close()
    store = LocalStore(tmp_path / "kb")
    await store.start()
    try:
        empty = _db_bytes(path.parent)
        for n in range(4):
            await _put(store, f"f{n}.txt", f"{n}" * 1_000_000)
        full = _db_bytes(path.parent)
        await store.delete_kb(KB)
        after = _db_bytes(path.parent)
        assert after - empty < (full - empty) / 4, (empty, full, after)
    finally:
        await store.aclose()
