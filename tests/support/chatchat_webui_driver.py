"""Runs inside the Chatchat client venv (scripts/install-chatchat-client.sh), never in ChatFleet's.

Langchain-Chatchat 0.3.1.3's WebUI, driven by the test: each line on stdin is one JSON request,
each line on stdout its JSON answer. The calls go through Chatchat's own, unchanged client code:
``ApiRequest`` (chatchat/webui_pages/utils.py, with its pinned httpx 0.27), its
``check_success_msg`` / ``check_error_msg`` (what a page shows as a toast), and the openai SDK
(1.x, its pin) the way its dialogue and RAG pages call it. Where a page does more than one call,
the op named after it repeats those few steps of the page (the page modules import streamlit,
which is not installed): each says which page and button it stands for.

Requests: ``{"op": <name>, ...}``; answers: ``{"ok": true, "result": ...}``, or
``{"ok": false, "error": <exception class>, "message": ...}`` when the op itself raised.
Imported from a scratch ``CHATCHAT_ROOT`` (its settings module writes files there).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import openai
from chatchat.settings import Settings
from chatchat.webui_pages.utils import ApiRequest, check_error_msg, check_success_msg


def _plain(value: Any) -> Any:
    """JSON-ready: generators drained, pydantic models dumped."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "__next__"):
        return [_plain(item) for item in value]
    return value


def _toast(ret: Any) -> dict[str, str]:
    """What the knowledge-base page shows after a call (its check_success_msg / error pair)."""
    if msg := check_success_msg(ret):
        return {"success": msg}
    if msg := check_error_msg(ret):
        return {"error": msg}
    return {}


class Driver:
    def __init__(self, base_url: str) -> None:
        self.api = ApiRequest(base_url=base_url)
        self.base_url = base_url

    def settings(self) -> dict[str, Any]:
        """The WebUI's own defaults, which its pages send."""
        return {"model": Settings.model_settings.DEFAULT_LLM_MODEL,
                "chunk_size": Settings.kb_settings.CHUNK_SIZE,
                "chunk_overlap": Settings.kb_settings.OVERLAP_SIZE,
                "top_k": Settings.kb_settings.VECTOR_SEARCH_TOP_K,
                "score_threshold": Settings.kb_settings.SCORE_THRESHOLD}

    def call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """One ApiRequest method, as a page calls it."""
        return _plain(getattr(self.api, method)(*args, **kwargs))

    def kb_page_upload(self, kb: str, files: list[str]) -> dict[str, Any]:
        """Knowledge-base page, "添加文件到知识库" (add files): upload_kb_docs with override=True
        and the page's split settings, then the toast."""
        ret = self.api.upload_kb_docs(files, knowledge_base_name=kb, override=True,
                                      chunk_size=Settings.kb_settings.CHUNK_SIZE,
                                      chunk_overlap=Settings.kb_settings.OVERLAP_SIZE,
                                      zh_title_enhance=Settings.kb_settings.ZH_TITLE_ENHANCE)
        return {"ret": ret, "toast": _toast(ret)}

    def kb_page_grid(self, kb: str, file_name: str) -> list[dict[str, Any]]:
        """Knowledge-base page, the chunk grid of a selected file (seq, id, content, source)."""
        docs = self.api.search_kb_docs(knowledge_base_name=kb, file_name=file_name)
        return [{"seq": i + 1, "id": x["id"], "page_content": x["page_content"],
                 "source": x["metadata"].get("source"), "type": x["type"],
                 "metadata": json.dumps(x["metadata"], ensure_ascii=False)}
                for i, x in enumerate(docs)]

    def kb_page_save_changes(self, kb: str, file_name: str, grid: list[dict[str, Any]],
                             edits: dict[str, str]) -> dict[str, Any]:
        """Knowledge-base page, "保存更改" (save changes) after editing cells of ``grid``, the
        chunk grid as the page rendered it (``kb_page_grid``), maybe several saves ago:
        ``edits`` maps a row's id to its new content. On the click the page lists the file's
        chunks again, looks each grid row up in that listing by id, sends only the rows whose
        content changed, each with its listed metadata, and toasts success when the answer is
        truthy."""
        origin = {x["id"]: x for x in self.api.search_kb_docs(knowledge_base_name=kb,
                                                              file_name=file_name)}
        changed = []
        for row in grid:
            content = edits.get(row["id"], row["page_content"])
            if content != origin[row["id"]]["page_content"]:
                changed.append({"page_content": content, "type": row["type"],
                                "metadata": json.loads(row["metadata"])})
        ret = self.api.update_kb_docs(knowledge_base_name=kb, file_names=[file_name],
                                      docs={file_name: changed})
        return {"ret": ret, "toast": "更新文档成功" if ret else "更新文档失败"}

    def kb_page_rebuild(self, kb: str) -> dict[str, Any]:
        """Knowledge-base page, "依据源文件重建向量库" (rebuild): the progress bar's values and
        the toasts."""
        progress, toasts = [], []
        for d in self.api.recreate_vector_store(kb, chunk_size=Settings.kb_settings.CHUNK_SIZE,
                                                chunk_overlap=Settings.kb_settings.OVERLAP_SIZE):
            if msg := check_error_msg(d):
                toasts.append(msg)
            else:
                progress.append([d["finished"] / d["total"], d["msg"]])
        return {"progress": progress, "toasts": toasts}

    def file_chat_id(self, files: list[str]) -> Any:
        """RAG page, file chat mode, "开始上传" (upload): the id the page keeps."""
        return self.api.upload_temp_docs(files).get("data", {}).get("id")

    def openai_chat(self, base_path: str, params: dict[str, Any]) -> dict[str, Any]:
        """The dialogue page (``base_path`` "/chat") or the RAG page ("/knowledge_base/<mode>/
        <kb or id>"): openai.Client(base_url=api + base_path).chat.completions.create(**params);
        what the page gets, or what it shows when the SDK raises (``st.error(e.body)``)."""
        client = openai.Client(base_url=self.base_url + base_path, api_key="NONE")
        try:
            answer = client.chat.completions.create(**params)
            if params.get("stream"):
                return {"chunks": [chunk.model_dump() for chunk in answer]}
            return {"answer": answer.model_dump()}
        except openai.APIError as exc:
            return {"raised": type(exc).__name__, "body": getattr(exc, "body", None),
                    "status_code": getattr(exc, "status_code", None), "message": str(exc)}


def main() -> None:
    # Answers own stdout; anything else printing there (Chatchat logs, its settings warnings)
    # goes to stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    driver = Driver(sys.argv[1])
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            answer = {"ok": True, "result": getattr(driver, op)(**request)}
        except Exception as exc:  # reported to the test, which fails with it
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                      "traceback": traceback.format_exc()}
        answers.write(json.dumps(answer, ensure_ascii=False, default=repr) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
