"""Langchain-Chatchat 0.3.1.3's own WebUI client against a running gateway, page by page.

The client is Chatchat's ``ApiRequest``, imported unchanged in its own venv with its pinned httpx
0.27 and openai 1.x (tests/support/chatchat_webui.py); where a page does several calls, the
driver repeats that page's steps. Each test asserts what the WebUI user would see: the toast,
the file list, the chunk grid, the progress bar, the answer, or the error shown.

The gateway runs its embedded engine model, BM25-only retrieval (no embeddings endpoint, the
default), and accepts the WebUI's default model name through ``engine.model_aliases``, as the
README's "Using Chatchat's WebUI with ChatFleet" section sets it up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_gateway
from tests.support.chatchat_webui import ChatchatWebUI, ensure_chatchat_client

WEBUI_MODEL = "glm4-chat"
"""Chatchat 0.3.1.3's DEFAULT_LLM_MODEL: what its pages send unless the user picks another."""
SERVED = "chatfleet-sim/tiny-cpu"

ADMISSION = ("# Admission\n\nThe gateway lets engine_slots requests reach the engine at once and "
             "holds the rest in a bounded queue. A request that waits longer than "
             "max_queue_wait_s gets a 429 with Retry-After.\n")
DRAIN = ("On SIGTERM the pod drains: readiness fails at once, accepted streams finish, and the "
         "process exits after drain_timeout_s at most.\n")


@pytest.fixture(scope="module")
def python() -> Path:
    return ensure_chatchat_client()


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    server = start_gateway({"CHATFLEET_ENGINE__MODEL_ALIASES": WEBUI_MODEL})
    yield server
    server.proc.terminate()


@pytest.fixture(scope="module")
def webui(python: Path, gw: Server) -> Iterator[ChatchatWebUI]:
    with ChatchatWebUI(python, gw.url) as client:
        yield client


@pytest.fixture
def docs(tmp_path: Path) -> dict[str, str]:
    """Two files as a user would pick them in the uploader: name -> path."""
    (tmp_path / "admission.md").write_text(ADMISSION)
    (tmp_path / "drain.txt").write_text(DRAIN)
    return {"admission.md": str(tmp_path / "admission.md"), "drain.txt": str(tmp_path / "drain.txt")}


@pytest.fixture
def kb(webui: ChatchatWebUI, docs: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A knowledge base created and filled from the knowledge-base page; deleted afterwards."""
    name = "webui_" + request.node.name.removeprefix("test_")[:40]
    created = webui.call("create_knowledge_base", name)
    assert created["code"] == 200, created
    uploaded = webui.op("kb_page_upload", kb=name, files=list(docs.values()))
    assert uploaded["toast"] == {"success": "文件上传与向量化完成"}, uploaded
    assert uploaded["ret"]["data"]["failed_files"] == {}
    yield name
    webui.call("delete_knowledge_base", name)


def _files(webui: ChatchatWebUI, kb: str) -> dict[str, dict[str, Any]]:
    """The knowledge-base page's file table, by file name."""
    return {row["file_name"]: row for row in webui.call("list_kb_docs", kb)}


def _upload_with_custom_chunk(webui: ChatchatWebUI, kb: str, path: Path, text: str,
                              chunk: str) -> None:
    """Upload a file holding ``text`` whose one chunk is ``chunk`` (custom docs)."""
    path.write_text(text)
    ret = webui.call("upload_kb_docs", [str(path)], kb, override=True,
                     docs={path.name: [{"page_content": chunk}]})
    assert ret["code"] == 200 and ret["data"]["failed_files"] == {}, ret


def _grid(webui: ChatchatWebUI, kb: str, file_name: str) -> list[str]:
    """The chunk grid's content column for one file."""
    return [row["page_content"] for row in webui.op("kb_page_grid", kb=kb, file_name=file_name)]


# -- knowledge-base page ------------------------------------------------------------------------


def test_a_new_knowledge_base_is_listed_and_its_upload_with_the_webuis_empty_docs_is_stored(
        webui: ChatchatWebUI, kb: str) -> None:
    assert kb in [row["kb_name"] for row in webui.call("list_knowledge_bases")]
    files = _files(webui, kb)
    assert set(files) == {"admission.md", "drain.txt"}
    for row in files.values():
        assert row["in_db"] and row["in_folder"] and row["docs_count"] >= 1
        assert row["custom_docs"] is False
    assert "bounded queue" in "".join(_grid(webui, kb, "admission.md"))


def test_creating_a_knowledge_base_that_exists_shows_why(webui: ChatchatWebUI, kb: str) -> None:
    again = webui.call("create_knowledge_base", kb)
    assert again["code"] != 200 and "已存在同名知识库" in again["msg"]


def test_uploading_with_custom_docs_stores_them_as_the_files_chunks(
        webui: ChatchatWebUI, kb: str, tmp_path: Path) -> None:
    path = tmp_path / "faq.md"
    path.write_text("# FAQ\n\nThe original text, which the custom docs replace.\n")
    custom = [{"page_content": "Q: how many requests reach the engine? A: engine_slots.",
               "metadata": {"topic": "admission"}},
              {"page_content": "Q: what does a full queue answer? A: 429 with Retry-After.",
               "metadata": {"topic": "overload"}}]
    ret = webui.call("upload_kb_docs", [str(path)], kb, override=True,
                     docs={"faq.md": custom})
    assert ret["code"] == 200 and ret["data"]["failed_files"] == {}
    row = _files(webui, kb)["faq.md"]
    assert row["custom_docs"] is True and row["docs_count"] == 2
    assert row["text_splitter"] == "custom docs"
    grid = webui.op("kb_page_grid", kb=kb, file_name="faq.md")
    assert [r["page_content"] for r in grid] == [d["page_content"] for d in custom]
    assert [json.loads(r["metadata"])["topic"] for r in grid] == ["admission", "overload"]
    found = webui.call("search_kb_docs", kb, query="full queue 429 Retry-After", top_k=3)
    assert found[0]["page_content"] == custom[1]["page_content"]
    assert found[0]["metadata"]["source"] == "faq.md"


def test_search_finds_the_chunk_that_answers(webui: ChatchatWebUI, kb: str) -> None:
    found = webui.call("search_kb_docs", kb, query="what happens on SIGTERM", top_k=3)
    assert found and found[0]["metadata"]["source"] == "drain.txt"
    assert "drains" in found[0]["page_content"]


def test_editing_chunks_and_saving_changes_only_those_chunks_save_after_save(
        webui: ChatchatWebUI, kb: str, tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: " + "filler words " * 20 for i in range(6)))
    webui.call("upload_kb_docs", [str(path)], kb, override=True, chunk_size=300,
               chunk_overlap=0)
    grid = webui.op("kb_page_grid", kb=kb, file_name="long.txt")
    assert len(grid) >= 4
    first = "Paragraph 1, edited in the WebUI: the gateway owns the queue."
    saved = webui.op("kb_page_save_changes", kb=kb, file_name="long.txt", grid=grid,
                     edits={grid[1]["id"]: first})
    assert saved["toast"] == "更新文档成功"
    assert saved["ret"]["code"] == 200 and saved["ret"]["data"]["failed_files"] == {}
    # A second save from the grid as it was first rendered: the ids it holds are still the
    # file's (an edit keeps every chunk's id), and only the newly edited row is sent.
    second = "Paragraph 3, edited next, from the same page."
    saved = webui.op("kb_page_save_changes", kb=kb, file_name="long.txt",
                     grid=[{**row, "page_content": first} if row["id"] == grid[1]["id"] else row
                           for row in grid],
                     edits={grid[3]["id"]: second})
    assert saved["ret"]["code"] == 200 and saved["ret"]["data"]["failed_files"] == {}
    after = webui.op("kb_page_grid", kb=kb, file_name="long.txt")
    assert [row["id"] for row in after] == [row["id"] for row in grid]
    assert [row["page_content"] for row in after] == [
        first if i == 1 else second if i == 3 else row["page_content"]
        for i, row in enumerate(grid)]
    assert _files(webui, kb)["long.txt"]["custom_docs"] is True
    found = webui.call("search_kb_docs", kb, query="edited in the WebUI", top_k=1)
    assert found[0]["page_content"] == first


def test_an_edit_of_a_chunk_that_is_gone_changes_nothing_and_says_why(
        webui: ChatchatWebUI, kb: str) -> None:
    grid = webui.op("kb_page_grid", kb=kb, file_name="drain.txt")
    webui.call("update_kb_docs", kb, ["drain.txt"], override_custom_docs=True)  # new chunk ids
    listed = [{"page_content": "edited", "type": "Document", "metadata": json.loads(row["metadata"])}
              for row in grid]
    ret = webui.call("update_kb_docs", kb, ["drain.txt"], docs={"drain.txt": listed})
    assert ret["code"] == 200
    assert "changed since it was listed" in ret["data"]["failed_files"]["drain.txt"]
    assert "drains" in "".join(_grid(webui, kb, "drain.txt"))


def test_readding_to_the_vector_store_keeps_custom_docs_unless_told_to_override(
        webui: ChatchatWebUI, kb: str, tmp_path: Path) -> None:
    _upload_with_custom_chunk(webui, kb, tmp_path / "notes.txt",
                              "The file's own text, as the splitter cuts it.",
                              "A hand-written chunk.")
    kept = webui.call("update_kb_docs", kb, ["notes.txt", "drain.txt"])  # the "re-add" button
    assert kept["code"] == 200 and kept["data"]["failed_files"] == {}
    assert "kept the custom docs of notes.txt" in kept["msg"]
    assert _grid(webui, kb, "notes.txt") == ["A hand-written chunk."]
    assert "drains" in "".join(_grid(webui, kb, "drain.txt"))
    resplit = webui.call("update_kb_docs", kb, ["notes.txt"], override_custom_docs=True)
    assert resplit["code"] == 200
    assert _grid(webui, kb, "notes.txt") == ["The file's own text, as the splitter cuts it."]
    assert _files(webui, kb)["notes.txt"]["custom_docs"] is False


def test_custom_docs_that_are_not_documents_are_refused_with_the_shape_to_send(
        webui: ChatchatWebUI, kb: str) -> None:
    ret = webui.call("update_kb_docs", kb, ["drain.txt"], docs={"drain.txt": [{"text": "x"}]})
    assert ret["code"] == 422 and "page_content" in ret["msg"] and "metadata" in ret["msg"]
    assert "drains" in "".join(_grid(webui, kb, "drain.txt"))


def test_rebuilding_shows_progress_to_the_end_and_resplits_custom_docs_as_chatchat_does(
        webui: ChatchatWebUI, kb: str, tmp_path: Path) -> None:
    _upload_with_custom_chunk(webui, kb, tmp_path / "custom.txt",
                              "Text the splitter will cut again on a rebuild.", "Custom chunk.")
    rebuilt = webui.op("kb_page_rebuild", kb=kb)
    assert rebuilt["toasts"] == []
    fractions = [fraction for fraction, _ in rebuilt["progress"]]
    assert len(fractions) == 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(msg.startswith("(") for _, msg in rebuilt["progress"])
    files = _files(webui, kb)
    assert files["custom.txt"]["custom_docs"] is False
    assert _grid(webui, kb, "custom.txt") == ["Text the splitter will cut again on a rebuild."]


def test_deleting_files_from_the_vector_store_and_from_the_knowledge_base(
        webui: ChatchatWebUI, kb: str) -> None:
    ret = webui.call("delete_kb_docs", kb, file_names=["drain.txt"])  # "从向量库删除"
    assert ret["code"] == 200 and ret["data"]["failed_files"] == {}
    row = _files(webui, kb)["drain.txt"]
    assert row["in_db"] is False and row["docs_count"] == 0
    assert webui.call("search_kb_docs", kb, query="SIGTERM drains", top_k=3) == [] or all(
        hit["metadata"]["source"] != "drain.txt"
        for hit in webui.call("search_kb_docs", kb, query="SIGTERM drains", top_k=3))
    ret = webui.call("delete_kb_docs", kb, file_names=["drain.txt"], delete_content=True)
    assert ret["code"] == 200
    assert "drain.txt" not in _files(webui, kb)


def test_deleting_the_knowledge_base_removes_it_from_the_list(
        webui: ChatchatWebUI, docs: dict[str, str]) -> None:
    assert webui.call("create_knowledge_base", "webui_doomed")["code"] == 200
    ret = webui.call("delete_knowledge_base", "webui_doomed")
    assert ret["code"] == 200 and "成功删除知识库" in ret["msg"]
    assert "webui_doomed" not in [row["kb_name"] for row in webui.call("list_knowledge_bases")]


# -- dialogue page --------------------------------------------------------------------------------


def _dialogue_params(model: str, **extra: Any) -> dict[str, Any]:
    """What the dialogue page sends for a typed message (no tools selected)."""
    return {"messages": [{"role": "user", "content": "hello"}], "model": model, "stream": True,
            "extra_body": {"metadata": {}, "chat_model_config": {}, "conversation_id": "c1",
                           "tool_input": {}, "upload_image": None}, **extra}


def test_the_dialogue_page_streams_an_answer_named_by_the_served_model(
        webui: ChatchatWebUI) -> None:
    answer = webui.op("openai_chat", base_path="/chat", params=_dialogue_params(WEBUI_MODEL))
    chunks = answer["chunks"]
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text.strip()
    assert all("message_id" in c and c["status"] is None for c in chunks)
    assert {c["model"] for c in chunks} == {SERVED}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_an_unknown_model_is_an_error_the_page_shows_not_a_blank_answer(
        webui: ChatchatWebUI, stream: bool) -> None:
    answer = webui.op("openai_chat", base_path="/chat",
                      params=_dialogue_params("qwen:7b", stream=stream))
    assert answer.get("raised") == "NotFoundError", answer
    assert answer["status_code"] == 404
    # The SDK's APIError.body, which the page shows (st.error(e.body)): OpenAI's error object.
    assert answer["body"]["type"] == "model_not_found"
    assert SERVED in answer["body"]["message"]
    assert "CHATFLEET_ENGINE__MODEL_ALIASES" in answer["body"]["message"]


def test_selecting_a_tool_is_an_error_the_page_shows(webui: ChatchatWebUI) -> None:
    answer = webui.op("openai_chat", base_path="/chat", params=_dialogue_params(
        WEBUI_MODEL, tools=[{"type": "function", "function": {"name": "weather_check",
                                                             "parameters": {}}}]))
    assert answer.get("raised") == "BadRequestError" and answer["status_code"] == 400, answer
    assert "tools" in answer["body"]["message"]


# -- RAG page -------------------------------------------------------------------------------------


def _rag_params(question: str, *, model: str = WEBUI_MODEL, **extra_body: Any) -> dict[str, Any]:
    """What the RAG page sends: the question, and its sidebar settings in extra_body."""
    return {"messages": [{"role": "user", "content": question}], "model": model, "stream": True,
            "extra_body": {"top_k": 3, "score_threshold": 2.0, "temperature": 0.7,
                           "prompt_name": "default", "return_direct": False, **extra_body}}


def _rag_answer(chunks: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The page's two messages: the references (first chunk's docs) and the answer text."""
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks[1:] if c["choices"])
    return chunks[0]["docs"], text


def test_the_rag_page_answers_with_references_from_the_knowledge_base(
        webui: ChatchatWebUI, kb: str) -> None:
    answer = webui.op("openai_chat", base_path=f"/knowledge_base/local_kb/{kb}",
                      params=_rag_params("What does a request that waits too long get?"))
    references, text = _rag_answer(answer["chunks"])
    assert references[0].startswith("出处 [1] [admission.md](")
    assert "max_queue_wait_s" in references[0]
    assert text.strip()


def test_the_rag_page_on_a_missing_knowledge_base_shows_the_error(webui: ChatchatWebUI) -> None:
    answer = webui.op("openai_chat", base_path="/knowledge_base/local_kb/nope",
                      params=_rag_params("anything"))
    assert answer.get("raised") == "NotFoundError" and "未找到知识库 nope" in answer["body"]["message"]


def test_kb_chat_streamed_to_an_unknown_model_is_an_event_the_sdk_raises(
        gw: Server, kb: str) -> None:
    """/chat/kb_chat keeps Chatchat's HTTP 200; its refusal is one event carrying the code."""
    with httpx.stream("POST", f"{gw.url}/chat/kb_chat", json={
            "query": "x", "kb_name": kb, "model": "qwen:7b", "stream": True}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line]
    assert len(events) == 1 and events[0]["code"] == 404
    assert events[0]["error"]["type"] == "model_not_found" and SERVED in events[0]["msg"]


# -- file chat --------------------------------------------------------------------------------------


def test_file_chat_uploads_a_temporary_file_and_answers_from_it(
        webui: ChatchatWebUI, gw: Server, docs: dict[str, str]) -> None:
    temp_id = webui.op("file_chat_id", files=[docs["admission.md"]])
    assert isinstance(temp_id, str) and len(temp_id) == 32
    answer = webui.op("openai_chat", base_path=f"/knowledge_base/temp_kb/{temp_id}",
                      params=_rag_params("What does a request that waits too long get?"))
    references, text = _rag_answer(answer["chunks"])
    assert references[0].startswith("出处 [1] [admission.md]") and "Retry-After" in references[0]
    assert text.strip()
    events = webui.call("file_chat", "What does a request that waits too long get?", temp_id,
                        model=WEBUI_MODEL)
    assert all(e.get("code") in (None, 200) for e in events), events
    assert "".join(e.get("answer", "") for e in events).strip()
    assert "Retry-After" in events[-1]["docs"][0]
    found = httpx.post(f"{gw.url}/knowledge_base/search_temp_docs", json={
        "knowledge_id": temp_id, "query": "Retry-After", "top_k": 1, "score_threshold": 2.0}).json()
    assert found[0]["metadata"]["source"] == "admission.md"
    assert not any(row["kb_name"].startswith(".") for row in webui.call("list_knowledge_bases"))


def test_file_chat_with_no_readable_file_gives_no_id_and_no_crash(
        webui: ChatchatWebUI, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert webui.op("file_chat_id", files=[str(empty)]) is None
    ret = webui.call("upload_temp_docs", [str(empty)])
    assert ret["code"] == 422 and "empty.txt" in ret["data"]["failed_files"][0]


def test_a_temporary_file_expires_and_chatting_with_it_says_to_upload_again(
        python: Path, tmp_path: Path) -> None:
    server = start_gateway({"CHATFLEET_ENGINE__MODEL_ALIASES": WEBUI_MODEL,
                            "CHATFLEET_KB__TEMP_TTL_S": "2"})
    try:
        path = tmp_path / "brief.md"
        path.write_text(ADMISSION)
        with ChatchatWebUI(python, server.url) as client:
            temp_id = client.op("file_chat_id", files=[str(path)])
            assert temp_id
            deadline = time.monotonic() + 30
            while True:
                answer = client.op("openai_chat", base_path=f"/knowledge_base/temp_kb/{temp_id}",
                                   params=_rag_params("what is admission?"))
                if "raised" in answer or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert answer.get("raised") == "NotFoundError", answer
            assert "expired" in answer["body"]["message"]
            assert "upload_temp_docs" in answer["body"]["message"]
            events = client.call("file_chat", "what is admission?", temp_id, model=WEBUI_MODEL)
            assert events[0]["code"] == 404 and "expired" in events[0]["msg"]
    finally:
        server.proc.terminate()
