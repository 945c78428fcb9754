"""Two gateway replicas on one pgvector store: every replica sees every upload at once.

Two real ``chatfleet serve`` processes with ``kb.store=pgvector`` on one real PostgreSQL (with
pgvector), embeddings from one engine-sim: what a Deployment with several pods and the chart's
pgvector values runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, start_engine_sim, start_gateway, upstream_env

EMBED_MODEL = "chatfleet-sim/hashed-embedding"


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    server = start_engine_sim()
    yield server
    server.proc.terminate()


@pytest.fixture
def replicas(sim: Server, pg_dsn: str) -> Iterator[tuple[Server, Server]]:
    env = {**upstream_env(sim), "CHATFLEET_KB__STORE": "pgvector", "CHATFLEET_KB__PG_DSN": pg_dsn,
           "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1, "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED_MODEL}
    first = start_gateway(env)
    second = start_gateway(env)
    yield first, second
    first.proc.terminate()
    second.proc.terminate()


async def test_an_upload_through_one_replica_is_searchable_through_the_other_at_once(replicas) -> None:
    first, second = replicas
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as one, \
            httpx.AsyncClient(base_url=second.url, timeout=30) as two:
        created = await one.post("/knowledge_base/create_knowledge_base",
                                  json={"knowledge_base_name": "shared"})
        assert created.json()["code"] == 200
        listed = (await two.get("/knowledge_base/list_knowledge_bases")).json()["data"]
        assert [kb["kb_name"] for kb in listed] == ["shared"]
        assert listed[0]["vs_type"] == "pgvector"

        for i in range(5):
            text = f"Runbook {i}: the zebra{i} alert fires when replica {i} drains too slowly."
            answer = (await one.post("/knowledge_base/upload_docs",
                                     data={"knowledge_base_name": "shared"},
                                     files=[("files", (f"runbook{i}.md", text.encode()))])).json()
            assert answer["data"]["failed_files"] == {}
            # No wait, no retry: the very next request, to the other replica, sees it.
            docs = (await two.post("/knowledge_base/search_docs", json={
                "knowledge_base_name": "shared", "query": f"zebra{i} alert", "top_k": 1})).json()
            assert [d["metadata"]["source"] for d in docs] == [f"runbook{i}.md"]
            download = await two.get("/knowledge_base/download_doc", params={
                "knowledge_base_name": "shared", "file_name": f"runbook{i}.md"})
            assert download.content == text.encode()

        chat = (await two.post("/chat/kb_chat", json={
            "query": "what is the zebra3 alert", "kb_name": "shared", "stream": False,
            "top_k": 1, "max_tokens": 2})).json()
        assert chat["docs"][0].startswith("出处 [1] [runbook3.md]")
        assert chat["retrieval"]["mode"] == "hybrid"

        deleted = (await two.post("/knowledge_base/delete_docs", json={
            "knowledge_base_name": "shared", "file_names": ["runbook0.md"],
            "delete_content": True})).json()
        assert deleted["data"]["failed_files"] == {}
        files = (await one.get("/knowledge_base/list_files",
                               params={"knowledge_base_name": "shared"})).json()["data"]
        assert "runbook0.md" not in {f["file_name"] for f in files}


async def test_concurrent_uploads_and_searches_on_both_replicas_all_succeed(replicas) -> None:
    first, second = replicas
    async with httpx.AsyncClient(base_url=first.url, timeout=60) as one, \
            httpx.AsyncClient(base_url=second.url, timeout=60) as two:
        await one.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "busy"})

        async def upload(client: httpx.AsyncClient, i: int) -> dict:
            text = f"Document {i} about topic{i}. " * 40
            return (await client.post("/knowledge_base/upload_docs",
                                      data={"knowledge_base_name": "busy"},
                                      files=[("files", (f"doc{i}.txt", text.encode()))])).json()

        async def search(client: httpx.AsyncClient, i: int) -> int:
            response = await client.post("/knowledge_base/search_docs", json={
                "knowledge_base_name": "busy", "query": f"topic{i}"})
            assert response.status_code == 200
            return len(response.json())

        clients = (one, two)
        results = await asyncio.gather(*(upload(clients[i % 2], i) for i in range(10)),
                                       *(search(clients[i % 2], i) for i in range(40)))
        assert all(r["data"]["failed_files"] == {} for r in results[:10])
        files = (await two.get("/knowledge_base/list_files",
                               params={"knowledge_base_name": "busy"})).json()["data"]
        assert len(files) == 10
        for i in range(10):
            docs = (await one.post("/knowledge_base/search_docs", json={
                "knowledge_base_name": "busy", "query": f"topic{i}", "top_k": 1})).json()
            assert docs[0]["metadata"]["source"] == f"doc{i}.txt"
