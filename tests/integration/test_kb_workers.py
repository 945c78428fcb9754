"""Issue 13 point 5: the knowledge-base path with several worker processes.

A pod's workers are separate gateway processes with the same settings: the kernel hands each
connection to any of them, so one client's upload, listing, chat and delete land on different
processes. Here two real ``chatfleet serve`` processes (each its own port: two workers minus
the shared socket) share one knowledge store, the local one on one ``kb.data_dir`` or pgvector
on one database, with one engine-sim for chat and ``GatedEmbeddings`` for embeddings (which
makes the write race deterministic). Each request goes to the worker a test names, and the very
next request to the other must see its effect: no wait, no retry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_engine_sim, start_gateway, upstream_env
from tests.support.gated_embeddings import MARKER, GatedEmbeddings
from tests.support.postgres import PostgresServer
from tests.support.stores import STORES

Workers = tuple[httpx.AsyncClient, httpx.AsyncClient]


@pytest.fixture(scope="module")
def embeddings() -> Iterator[GatedEmbeddings]:
    with GatedEmbeddings() as server:
        yield server


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    server = start_engine_sim()
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module", params=list(STORES))
def gateways(request: pytest.FixtureRequest, sim: Server, embeddings: GatedEmbeddings,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two gateway processes on one store, started before any KB exists (so neither learns of
    one at its start)."""
    env = {**upstream_env(sim), "CHATFLEET_KB__EMBEDDINGS__URL": embeddings.v1,
           "CHATFLEET_KB__EMBEDDINGS__MODEL": "gated-hash"}
    database = None
    if request.param == "pgvector":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"test_{uuid.uuid4().hex[:16]}"
        env |= {"CHATFLEET_KB__STORE": "pgvector",
                "CHATFLEET_KB__PG_DSN": postgres.create_database(database)}
    else:
        data_dir: Path = tmp_path_factory.mktemp("kb")
        env |= {"CHATFLEET_KB__STORE": "local", "CHATFLEET_KB__DATA_DIR": str(data_dir)}
    first = start_gateway(env)
    second = start_gateway(env)
    yield first, second
    for server in (first, second):
        server.proc.terminate()
        assert "Traceback" not in server.proc.log_text()
    if database is not None:
        postgres.drop_database(database)


@pytest.fixture
async def workers(gateways: tuple[Server, Server]) -> AsyncIterator[Workers]:
    first, second = gateways
    async with httpx.AsyncClient(base_url=first.url, timeout=60) as a, \
            httpx.AsyncClient(base_url=second.url, timeout=60) as b:
        yield a, b


async def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200, body
    return body["data"]


async def _create(api: httpx.AsyncClient, kb: str) -> None:
    await _ok(await api.post("/knowledge_base/create_knowledge_base",
                             json={"knowledge_base_name": kb}))


async def _upload(api: httpx.AsyncClient, kb: str, name: str, text: str, *,
                  override: bool = False) -> dict[str, str]:
    data = await _ok(await api.post("/knowledge_base/upload_docs", data={
        "knowledge_base_name": kb, "override": str(override).lower()},
        files=[("files", (name, text.encode()))]))
    return data["failed_files"]


async def _sources(api: httpx.AsyncClient, kb: str, query: str, top_k: int = 3) -> list[str]:
    response = await api.post("/knowledge_base/search_docs", json={
        "knowledge_base_name": kb, "query": query, "top_k": top_k, "score_threshold": 2.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list), body
    return [doc["metadata"]["source"] for doc in body]


async def _texts(api: httpx.AsyncClient, kb: str, query: str) -> list[str]:
    response = await api.post("/knowledge_base/search_docs", json={
        "knowledge_base_name": kb, "query": query, "top_k": 10, "score_threshold": 2.0})
    return [doc["page_content"] for doc in response.json()]


async def _files(api: httpx.AsyncClient, kb: str) -> dict[str, dict[str, Any]]:
    data = await _ok(await api.get("/knowledge_base/list_files",
                                   params={"knowledge_base_name": kb}))
    return {record["file_name"]: record for record in data}


async def _kbs(api: httpx.AsyncClient) -> list[str]:
    listed = await _ok(await api.get("/knowledge_base/list_knowledge_bases"))
    return [kb["kb_name"] for kb in listed]


async def test_a_write_through_one_worker_is_seen_by_the_next_request_to_the_other(
        workers: Workers) -> None:
    a, b = workers
    kb = "handbook"
    await _create(a, kb)
    assert kb in await _kbs(b)
    text = "Runbook: the walrus alert fires when a drain takes longer than its timeout."
    assert await _upload(a, kb, "walrus.md", text) == {}

    assert await _sources(b, kb, "walrus alert") == ["walrus.md"]
    assert set(await _files(b, kb)) == {"walrus.md"}
    download = await b.get("/knowledge_base/download_doc",
                           params={"knowledge_base_name": kb, "file_name": "walrus.md"})
    assert download.content == text.encode()
    chat = (await b.post("/chat/kb_chat", json={
        "query": "when does the walrus alert fire", "kb_name": kb, "stream": False, "top_k": 1,
        "score_threshold": 2.0, "max_tokens": 2})).json()
    assert chat["docs"][0].startswith("出处 [1] [walrus.md]"), chat

    # A custom-docs edit through B (chunks replaced by the client's own) is what A searches.
    docs = '{"walrus.md": [{"page_content": "The narwhal alert replaced it.", "metadata": {}}]}'
    await _ok(await b.post("/knowledge_base/update_docs", json={
        "knowledge_base_name": kb, "file_names": [], "docs": docs}))
    assert await _texts(a, kb, "narwhal walrus alert") == ["The narwhal alert replaced it."]

    await _ok(await b.post("/knowledge_base/delete_docs", json={
        "knowledge_base_name": kb, "file_names": ["walrus.md"], "delete_content": True}))
    assert await _sources(a, kb, "narwhal walrus alert") == []
    assert await _files(a, kb) == {}

    # A KB deleted through A and created anew through B: A finds none of the old chunks.
    assert await _upload(b, kb, "old.md", "the quokka note") == {}
    assert await _sources(a, kb, "quokka") == ["old.md"]
    await _ok(await a.post("/knowledge_base/delete_knowledge_base", json=kb))
    assert kb not in await _kbs(b)
    assert await _sources(b, kb, "quokka") == []  # Chatchat's answer for a missing KB
    await _create(b, kb)
    assert await _upload(b, kb, "new.md", "the wombat note") == {}
    assert await _sources(a, kb, "quokka wombat note") == ["new.md"]


async def test_a_temporary_upload_through_one_worker_serves_file_chat_through_the_other(
        workers: Workers) -> None:
    a, b = workers
    uploaded = await _ok(await a.post("/knowledge_base/upload_temp_docs", files=[
        ("files", ("brief.txt", b"The drain lets accepted streams of the pelican finish."))]))
    temp_id = uploaded["id"]
    assert uploaded["failed_files"] == [] and temp_id
    docs = (await b.post("/knowledge_base/search_temp_docs", json={
        "knowledge_id": temp_id, "query": "pelican drain", "top_k": 3,
        "score_threshold": 2.0})).json()
    assert [doc["metadata"]["source"] for doc in docs] == ["brief.txt"], docs
    chat = (await b.post("/chat/file_chat", json={
        "query": "what does the pelican drain do?", "knowledge_id": temp_id, "stream": False,
        "score_threshold": 2.0, "max_tokens": 2})).json()
    assert any("brief.txt" in doc for doc in chat["docs"]), chat
    # Replaced through B (prev_id): A's next file chat sees only the new file.
    again = await _ok(await b.post("/knowledge_base/upload_temp_docs", data={"prev_id": temp_id},
                                   files=[("files", ("other.txt", b"The heron takes over."))]))
    assert again["id"] == temp_id
    docs = (await a.post("/knowledge_base/search_temp_docs", json={
        "knowledge_id": temp_id, "query": "pelican heron", "top_k": 3,
        "score_threshold": 2.0})).json()
    assert [doc["metadata"]["source"] for doc in docs] == ["other.txt"], docs


async def test_concurrent_uploads_into_one_kb_through_both_workers_are_all_stored(
        workers: Workers) -> None:
    a, b = workers
    kb = "busy"
    await _create(a, kb)
    count = 16

    async def upload(i: int) -> dict[str, str]:
        return await _upload((a, b)[i % 2], kb, f"doc{i}.txt", f"Document {i} is about topic{i}.")

    assert await asyncio.gather(*(upload(i) for i in range(count))) == [{}] * count
    expected = {f"doc{i}.txt" for i in range(count)}
    for api in (a, b):
        files = await _files(api, kb)
        assert set(files) == expected
        assert all(record["docs_count"] == 1 for record in files.values())
    for i in range(count):
        other = (b, a)[i % 2]
        assert (await _sources(other, kb, f"topic{i}", top_k=1)) == [f"doc{i}.txt"]


async def test_one_file_rebuilt_through_both_workers_at_once_one_wins_the_other_is_told(
        workers: Workers, embeddings: GatedEmbeddings) -> None:
    """Both update_docs read version 1 and embed while held; released, one stores version 2
    and the other's conditional write finds the file changed: refused, with the reason."""
    a, b = workers
    kb = "contested"
    await _create(a, kb)
    assert await _upload(a, kb, "shared.txt", f"the {MARKER} shared file, first text") == {}

    def update(api: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(api.post("/knowledge_base/update_docs", json={
            "knowledge_base_name": kb, "file_names": ["shared.txt"]}))

    with embeddings.hold():
        updates = [update(a), update(b)]
        await embeddings.wait_held(2)
    failed = [(await _ok(await task))["failed_files"] for task in updates]
    assert sorted(len(f) for f in failed) == [0, 1], failed
    reason = next(f for f in failed if f)["shared.txt"]
    assert "meanwhile: that newer version is kept" in reason, reason
    for api in (a, b):
        assert (await _files(api, kb))["shared.txt"]["file_version"] == 2
        assert await _sources(api, kb, "shared file first text") == ["shared.txt"]
