"""Chatchat 0.3.1.3's API on a real gateway (local store), against the shapes in docs/api.md.

One engine-sim serves both the chat model and /v1/embeddings (hashed vectors: texts sharing words
are close), so retrieval here is hybrid, like production with an embedding model. Clients are
plain httpx (what Chatchat's WebUI uses) and the openai SDK with the WebUI's base_url trick.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from typer.testing import CliRunner

from chatfleet.cli import app
from chatfleet.engines.hashed_embeddings import hashed_embedding
from tests.conftest import (
    SIM_MODEL,
    Server,
    start_engine_sim,
    start_gateway,
    upstream_env,
)
from tests.support.metrics import value

EMBED_MODEL = "chatfleet-sim/hashed-embedding"
KB = "ops"
QUEUE_DOC = ("The admission queue holds requests beyond the engine slots. A request that waits "
             "longer than max_queue_wait_s gets a 429 with Retry-After.")
GPU_DOC = "vLLM batches requests continuously on the GPU; its KV cache holds the context."
DRAIN_DOC = "On SIGTERM the pod drains: accepted streams finish before the process exits."


def _hybrid_env(sim: Server, **extra: str) -> dict[str, str]:
    return {**upstream_env(sim), "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1,
            "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED_MODEL, **extra}


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    server = start_engine_sim()
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module")
def gw(sim: Server) -> Iterator[Server]:
    server = start_gateway(_hybrid_env(sim, CHATFLEET_KB__MAX_UPLOAD_BYTES=str(2 << 20)))
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module")
def api(gw: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        yield client


def _upload(api: httpx.Client, kb: str, *files: tuple[str, bytes], **form: str) -> dict:
    response = api.post("/knowledge_base/upload_docs", data={"knowledge_base_name": kb, **form},
                        files=[("files", (name, content)) for name, content in files])
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def kb(api: httpx.Client) -> str:
    assert api.post("/knowledge_base/create_knowledge_base",
                     json={"knowledge_base_name": KB, "kb_info": "operations notes"}).json() == {
        "code": 200, "msg": f"已新增知识库 {KB}", "data": None}
    answer = _upload(api, KB, ("queue.md", QUEUE_DOC.encode()), ("gpu.txt", GPU_DOC.encode()),
                     ("drain.txt", DRAIN_DOC.encode()))
    assert answer == {"code": 200, "msg": "文件上传与向量化完成", "data": {"failed_files": {}}}
    return KB


def _files(api: httpx.Client, kb: str) -> dict[str, dict]:
    body = api.get("/knowledge_base/list_files", params={"knowledge_base_name": kb}).json()
    assert body["code"] == 200
    return {record["file_name"]: record for record in body["data"]}


def _search(api: httpx.Client, kb: str, query: str, **fields: object) -> list[dict]:
    response = api.post("/knowledge_base/search_docs",
                        json={"knowledge_base_name": kb, "query": query, **fields})
    assert response.status_code == 200
    return response.json()


def _events(response: httpx.Response) -> list[dict]:
    """The JSON of each SSE event, checking Chatchat's framing on the way."""
    raw = response.read().decode()
    assert raw.endswith("\r\n\r\n"), "events end with a blank CRLF line"
    frames = [frame for frame in raw.split("\r\n\r\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    assert "[DONE]" not in raw
    return [json.loads(frame.removeprefix("data: ")) for frame in frames]


def test_knowledge_bases_are_listed_with_chatchats_fields(api, kb) -> None:
    body = api.get("/knowledge_base/list_knowledge_bases").json()
    assert body["code"] == 200
    (record,) = [r for r in body["data"] if r["kb_name"] == kb]
    assert record["kb_info"] == "operations notes"
    assert record["vs_type"] == "local"
    assert record["embed_model"] == EMBED_MODEL
    assert record["file_count"] == 3
    assert set(record) == {"id", "kb_name", "kb_info", "vs_type", "embed_model", "file_count",
                           "create_time"}


def test_list_files_shows_each_upload_with_its_loader_splitter_and_chunk_count(api, kb) -> None:
    queue = _files(api, kb)["queue.md"]
    assert queue["file_ext"] == ".md"
    assert queue["docs_count"] == 1
    assert queue["file_version"] == 1
    assert queue["document_loader"] == "TextLoader"
    assert queue["in_db"] is True and queue["in_folder"] is True
    assert queue["file_size"] == len(QUEUE_DOC.encode())


def test_search_docs_ranks_the_matching_chunk_first_and_honours_top_k(api, kb) -> None:
    docs = _search(api, kb, "how long may a request wait in the admission queue", top_k=1)
    assert len(docs) == 1
    assert docs[0]["metadata"]["source"] == "queue.md"
    assert docs[0]["page_content"] == QUEUE_DOC
    assert docs[0]["type"] == "Document"
    assert 0.0 <= docs[0]["score"] <= 1.0
    assert len(_search(api, kb, "requests", top_k=3)) == 3


def test_score_threshold_really_filters_by_distance(api, kb) -> None:
    """Chatchat's default 2.0 drops every vector hit; here 2.0 keeps all and a tight threshold
    keeps only the chunk that is the question itself."""
    assert len(_search(api, kb, GPU_DOC, top_k=3, score_threshold=2.0)) == 3
    close = _search(api, kb, GPU_DOC, top_k=3, score_threshold=0.01)
    assert [d["metadata"]["source"] for d in close] == ["gpu.txt"]
    assert close[0]["score"] == pytest.approx(0.0, abs=1e-5)


def test_search_docs_with_a_file_name_and_no_query_lists_that_files_chunks(api, kb) -> None:
    docs = _search(api, kb, "", file_name="drain.txt")
    assert [d["page_content"] for d in docs] == [DRAIN_DOC]


def test_a_missing_knowledge_base_is_code_404_with_http_200(api) -> None:
    for response in (
        api.get("/knowledge_base/list_files", params={"knowledge_base_name": "nope"}),
        api.post("/knowledge_base/delete_knowledge_base", json="nope"),
        api.post("/knowledge_base/update_info", json={"knowledge_base_name": "nope", "kb_info": "x"}),
        api.post("/chat/kb_chat", json={"query": "hi", "kb_name": "nope", "stream": False}),
    ):
        assert response.status_code == 200
        body = response.json()
        assert body["code"] == 404
        assert "未找到知识库 nope" in body["msg"]
    assert _search(api, "nope", "anything") == []


def test_creating_a_knowledge_base_twice_says_it_exists(api, kb) -> None:
    body = api.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": kb}).json()
    assert body["code"] == 404
    assert "已存在同名知识库" in body["msg"]


def test_a_malformed_body_is_a_422_envelope_that_names_the_field(api) -> None:
    response = api.post("/knowledge_base/search_docs", json={"query": "x"})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == 422
    assert "knowledge_base_name" in body["msg"]
    response = api.post("/chat/kb_chat", json={"query": "x", "kb_name": KB, "top_k": 0})
    assert response.status_code == 422
    assert "top_k" in response.json()["msg"]


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/chat/kb_chat", {"query": "x", "kb_name": KB}),
    (f"/knowledge_base/local_kb/{KB}/chat/completions",
     {"messages": [{"role": "user", "content": "x"}]}),
], ids=["chat", "kb_chat", "kb_openai"])
def test_chat_routes_refuse_max_tokens_over_the_deployment_limit_with_a_422_envelope(
        api, kb, path, body) -> None:
    response = api.post(path, json={**body, "max_tokens": 8193, "stream": False})
    assert response.status_code == 422
    assert response.json() == {"code": 422, "data": None, "msg": (
        "max_tokens is 8193; this deployment allows at most 8192 (limits.max_tokens): ask for "
        "fewer output tokens")}


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 513}),
    ("/chat/kb_chat", {"query": "x", "kb_name": KB, "history": [{"role": "user", "content": "x"}] * 512}),
], ids=["chat", "kb_chat"])
def test_chat_routes_refuse_conversations_over_the_message_limit_with_a_422_envelope(
        api, kb, path, body) -> None:
    response = api.post(path, json={**body, "stream": False})
    assert response.status_code == 422
    assert response.json()["msg"].startswith(
        "the conversation has 513 messages; this deployment allows at most 512 (limits.max_messages)")


def test_a_body_that_is_not_utf8_is_a_400_envelope_that_says_so(api) -> None:
    response = api.post("/chat/kb_chat", content=b'{"query": "\xc3\x28"}',
                        headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"code": 400, "data": None, "msg": (
        "the request body is not valid JSON: it is not UTF-8 (invalid continuation byte at "
        "byte 11); send UTF-8")}


def test_kb_chat_streams_docs_first_then_tokens_with_a_new_id_per_chunk(api, kb) -> None:
    with api.stream("POST", "/chat/kb_chat", json={
            "query": "what happens on SIGTERM", "kb_name": kb, "top_k": 2, "max_tokens": 8}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    first, *tokens = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["content"] == ""
    assert len(first["docs"]) == 2
    assert first["docs"][0].startswith("出处 [1] [drain.txt](")
    assert "/knowledge_base/download_doc?knowledge_base_name=ops&file_name=drain.txt" in first["docs"][0]
    assert first["retrieval"]["mode"] == "hybrid"
    # 8 tokens (a word each); the tokens that reach the gateway together are one event
    assert sum(len(t["choices"][0]["delta"]["content"].split()) for t in tokens) == 8
    assert all("docs" not in t and t["status"] is None for t in tokens)
    assert len({e["id"] for e in events}) == len(events)
    assert all(e["id"].startswith("chat") and e["model"] == SIM_MODEL for e in events)


def test_kb_chat_without_stream_returns_an_object_not_a_json_string(api, kb) -> None:
    body = api.post("/chat/kb_chat", json={"query": "GPU batches", "kb_name": kb, "stream": False,
                                           "max_tokens": 5}).json()
    assert isinstance(body, dict)
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"]) > 0
    assert body["docs"][0].startswith("出处 [1] [gpu.txt]")


def test_return_direct_answers_with_the_references_only(api, kb) -> None:
    body = api.post("/chat/kb_chat", json={"query": "KV cache", "kb_name": kb, "stream": False,
                                           "return_direct": True}).json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["docs"][0].startswith("出处 [1] [gpu.txt]")


def test_an_unknown_prompt_name_or_mode_is_refused_in_the_envelope(api, kb) -> None:
    body = api.post("/chat/kb_chat", json={"query": "x", "kb_name": kb, "prompt_name": "nope",
                                           "stream": False}).json()
    assert body["code"] == 404 and "default" in body["msg"]
    body = api.post("/chat/kb_chat", json={"query": "x", "kb_name": kb, "mode": "search_engine",
                                           "stream": False}).json()
    assert body["code"] == 404 and "local_kb" in body["msg"] and "temp_kb" in body["msg"]


def test_the_openai_sdk_with_the_webuis_base_url_trick_streams_and_completes(gw, kb) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/knowledge_base/local_kb/{kb}", api_key="EMPTY",
                           max_retries=0)
    with client:
        stream = client.chat.completions.create(
            model=SIM_MODEL, messages=[{"role": "user", "content": "what does the queue hold"}],
            stream=True, max_tokens=6, extra_body={"top_k": 1})
        chunks = list(stream)
        assert chunks[0].model_extra["docs"][0].startswith("出处 [1] [queue.md]")
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert len(text) > 0
        whole = client.chat.completions.create(
            model=SIM_MODEL, messages=[{"role": "user", "content": "KV cache"}], max_tokens=4)
        assert whole.choices[0].message.content


def test_plain_chat_streams_chatchat_chunks_and_answers_whole(api) -> None:
    with api.stream("POST", "/chat/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": 5}) as response:
        events = _events(response)
    # Chatchat relays the upstream's OpenAI chunks with message_id and status added.
    assert all(e["object"] == "chat.completion.chunk" and e["status"] is None
               and e["message_id"] is None and e["choices"][0]["index"] == 0 for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    body = api.post("/chat/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["status"] is None and body["message_id"] is None
    assert body["usage"]["completion_tokens"] == 3
    body = api.post("/chat/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "model": "gpt-4"}).json()
    assert body["code"] == 404 and SIM_MODEL in body["msg"]


def test_download_doc_returns_the_uploaded_bytes(api, kb) -> None:
    response = api.get("/knowledge_base/download_doc",
                       params={"knowledge_base_name": kb, "file_name": "gpu.txt"})
    assert response.status_code == 200
    assert response.content == GPU_DOC.encode()
    assert response.headers["content-disposition"].startswith("attachment")
    missing = api.get("/knowledge_base/download_doc",
                      params={"knowledge_base_name": kb, "file_name": "none.txt"}).json()
    assert missing["code"] == 500


def test_server_configs_say_how_retrieval_works(api) -> None:
    body = api.post("/server/configs").json()
    assert body["api_address"].startswith("http://127.0.0.1:")
    assert body["knowledge_base"]["retrieval_mode"] == "hybrid"
    assert body["knowledge_base"]["store"] == "local"


def test_files_can_be_replaced_updated_and_deleted(api) -> None:
    kb = "lifecycle"
    api.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": kb})
    _upload(api, kb, ("a.txt", b"first version about tokens"))
    again = _upload(api, kb, ("a.txt", b"second version about queues"))
    assert "a.txt" in again["data"]["failed_files"], "no override: an existing file is kept"
    _upload(api, kb, ("a.txt", b"second version about queues"), override="true")
    assert _files(api, kb)["a.txt"]["file_version"] == 2
    assert [d["page_content"] for d in _search(api, kb, "queues")] == ["second version about queues"]
    body = api.post("/knowledge_base/update_docs", json={
        "knowledge_base_name": kb, "file_names": ["a.txt"], "chunk_size": 10,
        "chunk_overlap": 2}).json()
    assert body["code"] == 422 and "at least 50" in body["msg"], "under kb.chunk_size's minimum"
    body = api.post("/knowledge_base/update_docs", json={
        "knowledge_base_name": kb, "file_names": ["a.txt"], "chunk_size": 50,
        "chunk_overlap": 2}).json()
    assert body == {"code": 200, "msg": "更新文档完成", "data": {"failed_files": {}}}
    assert _files(api, kb)["a.txt"]["file_version"] == 3
    body = api.post("/knowledge_base/update_info", json={"knowledge_base_name": kb,
                                                         "kb_info": "new info"}).json()
    assert body["data"] == {"kb_info": "new info"}
    body = api.post("/knowledge_base/delete_docs", json={
        "knowledge_base_name": kb, "file_names": ["a.txt", "b.txt"], "delete_content": True}).json()
    assert list(body["data"]["failed_files"]) == ["b.txt"]
    assert _files(api, kb) == {}
    assert _search(api, kb, "queues") == []
    assert api.post("/knowledge_base/delete_knowledge_base", json=kb).json()["code"] == 200


def test_recreate_vector_store_streams_progress_per_file(api) -> None:
    kb = "rebuild"
    api.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": kb})
    _upload(api, kb, ("one.txt", b"alpha beta gamma " * 200), ("two.md", b"# Title\n\ndelta epsilon"))
    with api.stream("POST", "/knowledge_base/recreate_vector_store",
                    json={"knowledge_base_name": kb, "chunk_size": 200, "chunk_overlap": 20}) as response:
        events = _events(response)
    assert [(e["code"], e["finished"], e["total"], e["doc"]) for e in events] == [
        (200, 1, 2, "one.txt"), (200, 2, 2, "two.md")]
    assert _files(api, kb)["one.txt"]["docs_count"] > 10


BAD_UPLOADS = [
    ("virus.exe", b"MZ...", "not supported"),
    ("empty.txt", b"", "no text"),
    ("blank.md", b"   \n\n  ", "no text"),
    ("../../etc/passwd.txt", b"root:x:0:0", "path"),
    ("sub/dir.txt", b"text", "path"),
    ("broken.pdf", b"%PDF-1.4 this is not a pdf", "cannot read"),
]


@pytest.mark.parametrize(("name", "content", "reason"), BAD_UPLOADS,
                         ids=[name for name, _, _ in BAD_UPLOADS])
def test_a_bad_upload_is_refused_with_its_reason_and_leaves_the_kb_unchanged(
        api, kb, name, content, reason) -> None:
    before = _files(api, kb)
    answer = _upload(api, kb, (name, content))
    assert answer["code"] == 200
    (failed_name, message), = answer["data"]["failed_files"].items()
    assert failed_name == name
    assert reason in message
    assert _files(api, kb) == before


def test_a_path_in_the_knowledge_base_name_is_refused(api) -> None:
    for name in ("../ops", "a/b", ".."):
        body = api.post("/knowledge_base/create_knowledge_base",
                        json={"knowledge_base_name": name}).json()
        assert body["code"] == 403, name
        answer = api.post("/knowledge_base/upload_docs", data={"knowledge_base_name": name},
                          files=[("files", ("x.txt", b"text"))]).json()
        assert answer["code"] == 403
    listed = api.get("/knowledge_base/list_knowledge_bases").json()["data"]
    assert not any("/" in kb["kb_name"] or kb["kb_name"].startswith(".") for kb in listed)


def test_an_upload_over_the_limit_is_a_413_that_names_the_setting(api, kb) -> None:
    """A 100 MB file against this gateway's 2 MiB kb.max_upload_bytes: refused on its declared
    length, before the body is read, and nothing is stored."""
    before = _files(api, kb)
    response = api.post("/knowledge_base/upload_docs", data={"knowledge_base_name": kb},
                        files=[("files", ("big.txt", b"x" * (100 << 20)))])
    assert response.status_code == 413
    body = response.json()
    assert body["code"] == 413
    assert "kb.max_upload_bytes" in body["msg"]
    assert _files(api, kb) == before


def test_metrics_count_retrievals_chunks_and_split_kb_chat_ttft(gw, api, kb) -> None:
    api.post("/chat/kb_chat", json={"query": "queue", "kb_name": kb, "stream": False,
                                    "max_tokens": 2})
    text = gw.metrics()
    assert value(text, "chatfleet_retrieval_seconds_count", store="local", mode="hybrid") >= 1
    assert value(text, "chatfleet_ingest_chunks_total", store="local") >= 3
    assert value(text, "chatfleet_ingest_files_total", store="local", outcome="rejected") >= 1
    for phase in ("retrieval", "queue", "engine"):
        assert value(text, "chatfleet_knowledge_chat_ttft_seconds_count", model=SIM_MODEL,
                     phase=phase) >= 1
    assert value(text, "chatfleet_requests_total", model=SIM_MODEL, route="/chat/kb_chat",
                 outcome="ok") >= 1


def test_without_an_embeddings_endpoint_retrieval_is_bm25_only_and_says_so(sim) -> None:
    server = start_gateway(upstream_env(sim))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/server/configs").json()["knowledge_base"]["retrieval_mode"] == "lexical"
            client.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "lex"})
            _upload(client, "lex", ("a.txt", QUEUE_DOC.encode()), ("b.txt", GPU_DOC.encode()))
            body = client.post("/chat/kb_chat", json={"query": "admission queue", "kb_name": "lex",
                                                      "stream": False, "max_tokens": 2}).json()
            assert body["retrieval"]["mode"] == "lexical"
            assert body["docs"][0].startswith("出处 [1] [a.txt]")
            assert body["retrieval"]["chunks"][0]["score"] is None
            refused = client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"})
            assert refused.status_code == 404
            assert "CHATFLEET_KB__EMBEDDINGS__URL" in refused.json()["error"]["message"]
    finally:
        server.proc.terminate()


def test_the_gateways_v1_embeddings_relays_to_the_configured_endpoint(gw) -> None:
    with openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0) as client:
        response = client.embeddings.create(model=EMBED_MODEL, input=["queue", "GPU"])
        assert response.data[1].embedding == pytest.approx(hashed_embedding("GPU").tolist(), abs=1e-6)
        with pytest.raises(openai.NotFoundError, match=EMBED_MODEL):
            client.embeddings.create(model="text-embedding-3-small", input="x")


def test_the_kb_command_creates_uploads_lists_searches_and_deletes(gw, tmp_path) -> None:
    runner = CliRunner()
    good = tmp_path / "notes.md"
    good.write_text("# Scaling\n\nThe HPA scales on chatfleet_queue_depth.")
    bad = tmp_path / "tool.exe"
    bad.write_bytes(b"MZ")

    def kb(*args: str) -> object:
        return runner.invoke(app, ["kb", *args, "--url", gw.url])

    assert kb("create", "cli").exit_code == 0
    result = kb("upload", "cli", str(good), str(bad))
    assert result.exit_code == 1, "a refused file fails the command"
    assert "notes.md: stored" in result.output
    assert "not supported" in result.output
    assert "notes.md" in kb("files", "cli").output
    result = kb("search", "cli", "what does the HPA scale on")
    assert result.exit_code == 0 and "chatfleet_queue_depth" in result.output
    assert "cli" in kb("list").output
    assert kb("delete", "cli").exit_code == 0
    result = kb("files", "cli")
    assert result.exit_code == 1 and "knowledge base 'cli' does not exist" in result.output


async def test_a_burst_of_uploads_past_the_bound_gets_429_and_the_rest_are_all_stored(sim) -> None:
    """One ingest worker (two running) and one waiting: of eight uploads sent at once, those
    beyond are refused with 429 and Retry-After before anything is stored, and every accepted
    file is in the KB afterwards."""
    server = start_gateway({**_hybrid_env(sim), "CHATFLEET_KB__INGEST_WORKERS": "1",
                            "CHATFLEET_KB__MAX_QUEUED_UPLOADS": "1"})
    words = ["gateway", "queue", "replica", "engine", "token", "latency", "vector", "index", "chunk", "drain"]
    text = "\n\n".join(" ".join(words[(i + j) % 10] for j in range(100)) for i in range(2500))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await client.post("/knowledge_base/create_knowledge_base",
                              json={"knowledge_base_name": "burst"})

            async def upload(i: int) -> httpx.Response:
                return await client.post("/knowledge_base/upload_docs",
                                         data={"knowledge_base_name": "burst"},
                                         files=[("files", (f"f{i}.txt", text.encode()))])

            responses = await asyncio.gather(*(upload(i) for i in range(8)))
            refused = [r for r in responses if r.status_code == 429]
            accepted = [i for i, r in enumerate(responses) if r.status_code == 200]
            assert refused and len(accepted) >= 3
            assert all(r.headers["retry-after"] == "5" and r.json()["code"] == 429
                       and "kb.max_queued_uploads" in r.json()["msg"] for r in refused)
            assert all(responses[i].json()["data"]["failed_files"] == {} for i in accepted)
            files = (await client.get("/knowledge_base/list_files",
                                      params={"knowledge_base_name": "burst"})).json()["data"]
            assert sorted(f["file_name"] for f in files) == sorted(f"f{i}.txt" for i in accepted)
    finally:
        server.proc.terminate()


def _temp_upload(api: httpx.Client, **form: str) -> httpx.Response:
    return api.post("/knowledge_base/upload_temp_docs", data=form,
                    files=[("files", ("brief.txt", b"The drain lets accepted streams finish."))])


def test_a_temporary_upload_with_an_unknown_prev_id_gets_a_new_id(api: httpx.Client) -> None:
    chosen = "0" * 32
    answer = _temp_upload(api, prev_id=chosen).json()
    assert answer["code"] == 200 and answer["data"]["id"] not in (chosen, None)


def test_temporary_uploads_reusing_one_prev_id_at_once_all_answer(gw: Server) -> None:
    with httpx.Client(base_url=gw.url, timeout=30) as api:
        temp_id = _temp_upload(api).json()["data"]["id"]

    async def reuse() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            return await asyncio.gather(*(client.post(
                "/knowledge_base/upload_temp_docs", data={"prev_id": temp_id},
                files=[("files", (f"f{i}.txt", b"The drain lets streams finish."))])
                for i in range(4)))

    answers = asyncio.run(reuse())
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    bodies = [r.json() for r in answers]
    assert all(b["code"] in (200, 409) and isinstance(b["data"], dict) for b in bodies), bodies
    assert any(b["code"] == 200 and b["data"]["id"] == temp_id for b in bodies)


def test_a_temporary_upload_with_bad_split_options_keeps_data_an_object(api: httpx.Client) -> None:
    answer = _temp_upload(api, chunk_size="100", chunk_overlap="100").json()
    assert answer["code"] == 422 and "chunk_overlap" in answer["msg"]
    assert answer["data"] == {"id": None, "failed_files": []}
