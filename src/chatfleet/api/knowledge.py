"""Chatchat 0.3.1.3's knowledge-base routes: /knowledge_base/* (docs/api.md lists each).

Same paths, fields, defaults and ``{code, msg, data}`` envelopes as Chatchat, so its WebUI and
scripts work; the work goes to the ``KnowledgeService`` on ``app.state.knowledge``. Names are
validated before anything is read or stored (``rag/names.py``); a refused file name is reported
per file in ``failed_files`` with the reason, and leaves the knowledge base unchanged. A refused
KB name (``InvalidName``) and a missing KB (``KnowledgeBaseNotFound``) propagate to the app's
handlers (``api/errors.py``), which answer Chatchat's 403 and 404 envelopes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field, WithJsonSchema

from chatfleet.api.chatchat_envelope import envelope, error_data
from chatfleet.api.chatchat_schemas import ChatchatEnvelope, KbDocument, KbProgressEvent
from chatfleet.api.file_responses import stored_file_response
from chatfleet.api.multipart_names import sent_file_name
from chatfleet.api.responses import (
    chatchat_errors,
    json_content,
    json_schema,
    sse_content,
)
from chatfleet.api.sse import crlf_data_frame
from chatfleet.rag.custom_docs import CustomDoc, InvalidCustomDocs, parse_custom_docs
from chatfleet.rag.embeddings import EmbeddingError
from chatfleet.rag.ingest import IngestBusy, IngestStopped, SplitOptions
from chatfleet.rag.knowledge import FileNotStored, KnowledgeService
from chatfleet.rag.loaders import (
    EmptyDocument,
    FileTooLarge,
    UnreadableDocument,
    UnsupportedFileType,
)
from chatfleet.rag.names import InvalidName, validate_file_name, validate_kb_name
from chatfleet.rag.stores.base import (
    FileChanged,
    FileRecord,
    KnowledgeBaseExists,
    KnowledgeBaseNotFound,
    StaleChunks,
)
from chatfleet.rag.temp_kbs import TempKbNotFound, is_temp_kb

__all__ = ["UPLOAD_PATHS", "file_record", "router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/knowledge_base", tags=["chatchat knowledge base"])

UPLOAD_PATHS = ("/knowledge_base/upload_docs", "/knowledge_base/upload_temp_docs")
"""Routes whose bodies carry files: their limit is kb.max_upload_bytes, not limits.max_body_bytes.
update_docs' custom docs are JSON parsed on the event loop: they keep limits.max_body_bytes."""
_DOCS_HELP = ("Custom docs: a JSON object (as a string) from file names to lists of documents "
              '{"page_content", "metadata"}, which become those files\' chunks instead of the '
              "splitter's; a list whose every document names one of the file's chunks by "
              "metadata.id edits those chunks in place (empty page_content deletes one). "
              '"" or "{}": none')

_FILE_REFUSED = (InvalidName, UnsupportedFileType, EmptyDocument, UnreadableDocument,
                 FileTooLarge, FileNotStored, InvalidCustomDocs, StaleChunks, FileChanged)
_ENVELOPE = {200: {"model": ChatchatEnvelope,
                   "description": "Chatchat's envelope: the outcome is its code (200, 403, 404 ...)"}}
_JSON_BODY_ERRORS = chatchat_errors(400, 413, 422)
_QUERY_ERRORS = chatchat_errors(422)
_INGEST_ERRORS = chatchat_errors(400, 413, 422, 429)
_CHUNKS_OR_ENVELOPE = json_content({"type": "array", "items": json_schema(KbDocument)},
                                   ChatchatEnvelope)
"""search_docs' and search_temp_docs' answer: a bare list of chunks, or Chatchat's envelope."""
_OPTIONAL_INT = WithJsonSchema({"type": "integer"})
"""A form field that may be left out: a form has no null, so the schema says integer only."""


def _knowledge(request: Request) -> KnowledgeService:
    return request.app.state.knowledge


def file_record(record: FileRecord, index: int = 0) -> dict[str, Any]:
    """A file as Chatchat's list_files shows it (its knowledge_file table row)."""
    return {
        "No": index + 1, "kb_name": record.kb, "file_name": record.file_name,
        "file_ext": PurePosixPath(record.file_name).suffix.lower(),
        "file_version": record.version, "document_loader": record.loader,
        "docs_count": record.chunk_count, "text_splitter": record.splitter,
        "create_time": record.created_at, "in_folder": True, "in_db": record.chunk_count > 0,
        "file_mtime": record.modified_at, "file_size": record.size_bytes,
        "custom_docs": record.custom_docs,
    }


@router.get("/list_knowledge_bases", summary="List knowledge bases (Chatchat)",
            responses=_ENVELOPE)
async def list_knowledge_bases(request: Request) -> Response:
    kbs = [kb for kb in await _knowledge(request).store.list_kbs() if not is_temp_kb(kb.name)]
    return envelope(200, "success", [
        {"id": i + 1, "kb_name": kb.name, "kb_info": kb.info, "vs_type": kb.vector_store,
         "embed_model": kb.embed_model, "file_count": kb.file_count,
         "create_time": datetime.fromtimestamp(kb.created_at).isoformat(timespec="seconds")}
        for i, kb in enumerate(kbs)])


def _utf8(value: str) -> str:
    """Refuse text the stores cannot keep: JSON's ``\\ud800`` escapes decode to unpaired
    surrogates, which are no UTF-8 (SQLite and PostgreSQL failed on them with a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not UTF-8 text (an unpaired surrogate at character {exc.start}): "
                         "send UTF-8") from None
    return value


Utf8Text = Annotated[str, AfterValidator(_utf8)]


class CreateKnowledgeBase(BaseModel):
    knowledge_base_name: str = Field(examples=["samples"])
    vector_store_type: str = Field("", description="Chatchat's vs_type; ChatFleet uses its "
                                   "configured store (kb.store) whatever this says")
    kb_info: Utf8Text = ""
    embed_model: str = Field("", description="Ignored: the configured kb.embeddings.model is used")


@router.post("/create_knowledge_base", summary="Create a knowledge base (Chatchat)",
             responses={**_ENVELOPE, **_JSON_BODY_ERRORS})
async def create_knowledge_base(body: CreateKnowledgeBase, request: Request) -> Response:
    if not body.knowledge_base_name.strip():
        return envelope(404, "知识库名称不能为空，请重新填写知识库名称 (knowledge_base_name is empty)")
    name = validate_kb_name(body.knowledge_base_name)
    knowledge = _knowledge(request)
    try:
        await knowledge.store.create_kb(name, info=body.kb_info, embed_model=knowledge.embed_model)
    except KnowledgeBaseExists:
        return envelope(404, f"已存在同名知识库 {name} (a knowledge base named '{name}' exists)")
    return envelope(200, f"已新增知识库 {name}")


@router.post("/delete_knowledge_base", summary="Delete a knowledge base (Chatchat; the body "
             "is a bare JSON string)", responses={**_ENVELOPE, **_JSON_BODY_ERRORS})
async def delete_knowledge_base(request: Request,
                                knowledge_base_name: Annotated[str, Body(examples=["samples"])]
                                ) -> Response:
    name = validate_kb_name(knowledge_base_name)
    await _knowledge(request).store.delete_kb(name)
    return envelope(200, f"成功删除知识库 {name}")


@router.get("/list_files", summary="List a knowledge base's files (Chatchat)",
            responses={**_ENVELOPE, **_QUERY_ERRORS})
async def list_files(request: Request, knowledge_base_name: str) -> Response:
    name = validate_kb_name(knowledge_base_name)
    files = await _knowledge(request).store.list_files(name)
    return envelope(200, "success", [file_record(f, i) for i, f in enumerate(files)])


class SearchDocs(BaseModel):
    query: str = ""
    knowledge_base_name: str = Field(examples=["samples"])
    top_k: int | None = Field(None, ge=1, le=100, description="Default: kb.top_k (3)")
    score_threshold: float | None = Field(None, ge=0.0, le=2.0,
                                          description="Default: kb.score_threshold (2.0, keeps all)")
    file_name: str = Field("", description="With an empty query: list this file's chunks")
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="With an empty query: keep chunks whose metadata "
                                     "has these top-level values")


def _document(chunk: Any, score: float | None) -> dict[str, Any]:
    """A chunk as Chatchat's DocumentWithVSId."""
    metadata = {**chunk.metadata, "id": chunk.id, "source": chunk.file_name}
    return {"page_content": chunk.text, "metadata": metadata, "type": "Document", "id": chunk.id,
            "score": score}


@router.post("/search_docs", summary="Search a knowledge base (Chatchat; a bare list of documents)",
             responses={200: {"description": "The chunks found (none for a missing knowledge "
                                             "base), or an envelope when the embeddings endpoint "
                                             "failed",
                              "content": _CHUNKS_OR_ENVELOPE},
                        **_JSON_BODY_ERRORS})
async def search_docs(body: SearchDocs, request: Request) -> Response:
    knowledge = _knowledge(request)
    name = validate_kb_name(body.knowledge_base_name)
    try:
        if body.query:
            result = await knowledge.retriever.retrieve(
                name, body.query, top_k=body.top_k or knowledge.settings.top_k,
                score_threshold=(knowledge.settings.score_threshold if body.score_threshold is None
                                 else body.score_threshold))
            docs = [_document(hit.chunk, hit.score) for hit in result.chunks]
        elif body.file_name or body.metadata:
            files = ([body.file_name] if body.file_name
                     else [f.file_name for f in await knowledge.store.list_files(name)])
            parts = []
            for file_name in files:
                chunks = await knowledge.store.list_chunks(name, file_name)
                # A file holds up to kb.max_file_chunks chunks (tens of MB of JSON): built in a
                # thread, not on the event loop (688 ms stall for 153k chunks).
                parts.append(await asyncio.to_thread(_listing_json, chunks, body.metadata))
            return Response(f"[{','.join(part for part in parts if part)}]",
                            media_type="application/json")
        else:
            docs = []
    except KnowledgeBaseNotFound:
        docs = []  # Chatchat answers a missing KB with an empty list here
    except EmbeddingError as exc:
        return envelope(500, f"the embeddings endpoint failed: {exc}")
    return Response(json.dumps(docs, ensure_ascii=False), media_type="application/json")


_JSON_BATCH = 256
"""Chunks per json.dumps call when listing a file: its C encoder holds the GIL for a whole call,
so a thread encoding 153k chunks at once would still stall the event loop."""


def _listing_json(chunks: list[Any], metadata: dict[str, Any]) -> str:
    """The chunks whose metadata has ``metadata``'s values, as JSON array items (no brackets)."""
    docs = [_document(chunk, None) for chunk in chunks
            if all(chunk.metadata.get(k) == v for k, v in metadata.items())]
    return ",".join(json.dumps(docs[i:i + _JSON_BATCH], ensure_ascii=False)[1:-1]
                    for i in range(0, len(docs), _JSON_BATCH))


async def _store_one(request: Request, kb: str, file_name: str,
                     work: Callable[[], Awaitable[object]]) -> str | None:
    """Run one file's ingestion; its failure reason (Chatchat's ``failed_files`` entry), if any.
    Counted in chatfleet_kb_ingest_files_total."""
    outcome, reason = "ok", None
    try:
        await work()
    except _FILE_REFUSED as exc:
        outcome, reason = "rejected", str(exc)
    except EmbeddingError as exc:
        outcome, reason = "failed", f"the embeddings endpoint failed, nothing was stored: {exc}"
    knowledge = _knowledge(request)
    request.app.state.metrics.ingest_files_total.labels(knowledge.store.kind, outcome).inc()
    return reason


async def _ingest_files(request: Request, kb: str, files: list[tuple[str, bytes]],
                        split: SplitOptions, *, override: bool,
                        custom: dict[str, list[CustomDoc]] | None = None) -> dict[str, str]:
    """Ingest each file, with the client's own chunks where ``custom`` has some for it; the
    failed ones with their reasons (Chatchat's ``failed_files``)."""
    knowledge = _knowledge(request)
    custom = custom or {}
    existing = set() if override else {f.file_name for f in await knowledge.store.list_files(kb)}
    failed: dict[str, str] = {}
    for file_name, content in files:
        if file_name in existing:
            failed[file_name] = (f"文件 {file_name} 已存在。(a file of that name exists; upload it "
                                 "with override=true to replace it)")
            request.app.state.metrics.ingest_files_total.labels(knowledge.store.kind,
                                                                "rejected").inc()
            continue
        docs = custom.get(file_name)
        reason = await _store_one(request, kb, file_name, (
            partial(knowledge.ingestor.ingest, kb, file_name, content, split) if docs is None
            else partial(knowledge.apply_custom_docs, kb, file_name, docs, content=content)))
        if reason is not None:
            failed[file_name] = reason
    return failed


async def _apply_custom_docs(request: Request, kb: str,
                             custom: dict[str, list[CustomDoc]]) -> dict[str, str]:
    """Make each entry the chunks of its stored file; the failed ones with their reasons."""
    knowledge = _knowledge(request)
    failed: dict[str, str] = {}
    for raw_name, docs in custom.items():
        try:
            name = validate_file_name(raw_name)
        except InvalidName as exc:
            failed[raw_name] = str(exc)
            continue
        reason = await _store_one(request, kb, name,
                                  partial(knowledge.apply_custom_docs, kb, name, docs))
        if reason is not None:
            failed[raw_name] = f"为 {raw_name} 添加自定义docs时出错：{reason}"
    return failed


def _custom_docs(docs: str | dict[str, Any]) -> dict[str, list[CustomDoc]] | Response:
    """The parsed ``docs`` field, or the 422 envelope that says what is wrong with it."""
    try:
        return parse_custom_docs(docs)
    except InvalidCustomDocs as exc:
        return envelope(422, str(exc))


def _split(request: Request, chunk_size: int | None, chunk_overlap: int | None
           ) -> SplitOptions | Response:
    try:
        return _knowledge(request).split_options(chunk_size, chunk_overlap)
    except ValueError as exc:
        return envelope(422, str(exc), error_data(request.url.path))


@router.post("/upload_docs", summary="Upload files into a knowledge base (Chatchat; multipart)",
             responses={**_ENVELOPE, **_INGEST_ERRORS})
async def upload_docs(
    request: Request,
    files: Annotated[list[UploadFile], File(
        min_length=1, description="Files to add (txt, md, html, pdf, docx, csv)")],
    knowledge_base_name: Annotated[str, Form(min_length=1, examples=["samples"])],
    override: Annotated[bool, Form()] = False,
    to_vector_store: Annotated[bool, Form()] = True,
    chunk_size: Annotated[int | None, Form(description="Default: kb.chunk_size"),
                          _OPTIONAL_INT] = None,
    chunk_overlap: Annotated[int | None, Form(description="Default: kb.chunk_overlap"),
                             _OPTIONAL_INT] = None,
    zh_title_enhance: Annotated[bool, Form()] = False,
    docs: Annotated[str, Form(description=_DOCS_HELP)] = "",
    not_refresh_vs_cache: Annotated[bool, Form()] = False,
) -> Response:
    kb = validate_kb_name(knowledge_base_name)
    knowledge = _knowledge(request)
    if await knowledge.store.get_kb(kb) is None:
        raise KnowledgeBaseNotFound(kb)
    limit = knowledge.settings.max_files_per_upload
    if len(files) > limit:
        return envelope(422, f"{len(files)} files in one upload; at most {limit} "
                             "(kb.max_files_per_upload): upload them in smaller groups")
    custom = _custom_docs(docs)
    if isinstance(custom, Response):
        return custom
    split = _split(request, chunk_size, chunk_overlap)
    if isinstance(split, Response):
        return split
    named, failed = await _read_uploads(request, files)
    if to_vector_store:
        uploaded = {name for name, _ in named}
        async with knowledge.ingestor.slot():
            failed |= await _ingest_files(request, kb, named, split, override=override,
                                          custom=custom)
            failed |= await _apply_custom_docs(
                request, kb, {name: d for name, d in custom.items() if name not in uploaded})
    else:
        failed |= {name: "to_vector_store=false is not supported: ChatFleet stores a file "
                         "with its chunks, so it is searchable as soon as it is stored"
                   for name, _ in named}
    return envelope(200, "文件上传与向量化完成", {"failed_files": failed})


async def _read_uploads(request: Request, files: list[UploadFile]
                        ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The uploaded files as (validated name, bytes), and the refused names with their reasons."""
    named: list[tuple[str, bytes]] = []
    failed: dict[str, str] = {}
    for upload in files:
        raw_name = sent_file_name(upload)  # a Windows path as sent, not cut to its base name
        try:
            name = validate_file_name(raw_name)
            if any(name == taken for taken, _ in named):
                raise InvalidName(f"file name {name!r} appears twice in this upload: the first "
                                  "is stored; rename the other, or upload it on its own with "
                                  "override=true to replace the first")
            named.append((name, await upload.read()))
        except InvalidName as exc:
            failed[raw_name] = str(exc)
            request.app.state.metrics.ingest_files_total.labels(_knowledge(request).store.kind,
                                                                "rejected").inc()
    return named, failed


class DeleteDocs(BaseModel):
    knowledge_base_name: str = Field(examples=["samples"])
    file_names: list[str] = Field(examples=[["file_name.md", "test.txt"]])
    delete_content: bool = False
    not_refresh_vs_cache: bool = False


def _file_names(raw_names: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The valid names as (as sent, validated) pairs, and the refused ones with their reasons
    (Chatchat's ``failed_files``)."""
    valid: list[tuple[str, str]] = []
    refused: dict[str, str] = {}
    for raw_name in raw_names:
        try:
            valid.append((raw_name, validate_file_name(raw_name)))
        except InvalidName as exc:
            refused[raw_name] = str(exc)
    return valid, refused


@router.post("/delete_docs", summary="Delete files from a knowledge base (Chatchat)",
             responses={**_ENVELOPE, **_JSON_BODY_ERRORS})
async def delete_docs(body: DeleteDocs, request: Request) -> Response:
    kb = validate_kb_name(body.knowledge_base_name)
    store = _knowledge(request).store
    names, failed = _file_names(body.file_names)
    for raw_name, name in names:
        if not await store.delete_file(kb, name, keep_content=not body.delete_content):
            failed[raw_name] = f"未找到文件 {name}"
    return envelope(200, "文件删除完成", {"failed_files": failed})


class UpdateInfo(BaseModel):
    knowledge_base_name: str = Field(examples=["samples"])
    kb_info: Utf8Text


@router.post("/update_info", summary="Change a knowledge base's description (Chatchat)",
             responses={**_ENVELOPE, **_JSON_BODY_ERRORS})
async def update_info(body: UpdateInfo, request: Request) -> Response:
    kb = validate_kb_name(body.knowledge_base_name)
    await _knowledge(request).store.update_kb_info(kb, body.kb_info)
    return envelope(200, "知识库介绍修改完成", {"kb_info": body.kb_info})


class UpdateDocs(BaseModel):
    knowledge_base_name: str = Field(examples=["samples"])
    file_names: list[str] = Field(examples=[["file_name.md", "test.txt"]])
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    zh_title_enhance: bool = False
    override_custom_docs: bool = Field(False, description="Re-split files whose chunks are "
                                       "custom docs too (otherwise they keep them)")
    docs: str | dict[str, Any] = Field("", description=_DOCS_HELP)
    not_refresh_vs_cache: bool = False


@router.post("/update_docs", summary="Re-split and re-embed stored files, or replace their "
             "chunks with the client's own (Chatchat)", responses={**_ENVELOPE, **_INGEST_ERRORS})
async def update_docs(body: UpdateDocs, request: Request) -> Response:
    kb = validate_kb_name(body.knowledge_base_name)
    custom = _custom_docs(body.docs)
    if isinstance(custom, Response):
        return custom
    split = _split(request, body.chunk_size, body.chunk_overlap)
    if isinstance(split, Response):
        return split
    knowledge = _knowledge(request)
    store = knowledge.store
    if await store.get_kb(kb) is None:
        raise KnowledgeBaseNotFound(kb)
    records = {record.file_name: record for record in await store.list_files(kb)}
    files: list[tuple[FileRecord, bytes]] = []
    kept: list[str] = []
    names, failed = _file_names(body.file_names)
    for raw_name, name in names:
        record = records.get(name)
        if name in custom:
            continue  # its chunks come from docs, below
        if record is None or (content := await store.get_file(kb, name)) is None:
            failed[raw_name] = f"未找到文件 {name} (no stored file of that name)"
        elif record.custom_docs and not body.override_custom_docs:
            kept.append(name)
        else:
            files.append((record, content))
    async with knowledge.ingestor.slot():
        for record, content in files:  # each replaced only if not deleted or rewritten meanwhile
            reason = await _store_one(request, kb, record.file_name, partial(
                knowledge.ingestor.ingest, kb, record.file_name, content, split, replaces=record))
            if reason is not None:
                failed[record.file_name] = reason
        failed |= await _apply_custom_docs(request, kb, custom)
    msg = "更新文档完成"
    if kept:
        msg += (f" (kept the custom docs of {', '.join(kept)}: send override_custom_docs=true "
                "to re-split them)")
    return envelope(200, msg, {"failed_files": failed})


@router.get("/download_doc", summary="Download a stored file (Chatchat)", responses={
    200: {"description": "The file as stored: an attachment typed by its name (no .json file is "
                         "ever stored); a preview shows text files as text/plain and PDFs inline; "
                         "a refused name or a missing file answers Chatchat's envelope instead",
          "content": {**json_content(ChatchatEnvelope),
                      "*/*": {"schema": {"type": "string", "format": "binary"}}}},
    **_QUERY_ERRORS})
async def download_doc(request: Request, knowledge_base_name: str, file_name: str,
                       preview: Annotated[bool, Query()] = False) -> Response:
    kb = validate_kb_name(knowledge_base_name)
    name = validate_file_name(file_name)
    content = await _knowledge(request).store.get_file(kb, name)
    if content is None:
        return envelope(500, f"{name} 读取文件失败 (no file '{name}' in '{kb}')")
    return stored_file_response(name, content, preview=preview)  # never a page of this origin


class RecreateVectorStore(BaseModel):
    knowledge_base_name: str = Field(examples=["samples"])
    allow_empty_kb: bool = True
    vs_type: str = ""
    embed_model: str = ""
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    zh_title_enhance: bool = False
    not_refresh_vs_cache: bool = False


def _event(payload: dict[str, Any]) -> bytes:
    return crlf_data_frame(json.dumps(payload, ensure_ascii=False))


@router.post("/recreate_vector_store", summary="Rebuild a knowledge base's chunks from its "
             "stored files (Chatchat; SSE progress)", responses={
                 200: {"description": "Progress events, one per file; refused split options or "
                                      "knowledge-base name answer an envelope instead",
                       "content": {**json_content(ChatchatEnvelope),
                                   **sse_content(KbProgressEvent)}},
                 **_JSON_BODY_ERRORS})
async def recreate_vector_store(body: RecreateVectorStore, request: Request) -> Response:
    knowledge = _knowledge(request)
    kb = validate_kb_name(body.knowledge_base_name)
    split = _split(request, body.chunk_size, body.chunk_overlap)
    if isinstance(split, Response):
        return split

    async def progress() -> Any:
        if await knowledge.store.get_kb(kb) is None:
            if not body.allow_empty_kb:
                yield _event({"code": 404, "msg": f"未找到知识库 ‘{kb}’"})
                return
            await knowledge.store.create_kb(kb, info="", embed_model=knowledge.embed_model)
        try:
            async with knowledge.ingestor.slot():
                async for step in knowledge.recreate(kb, split):
                    if step.error is not None:
                        yield _event({"code": 500, "msg": f"添加文件‘{step.file_name}’到知识库"
                                      f"‘{kb}’时出错：{step.error}。已跳过。"})
                        continue
                    event = {"code": 200, "msg": f"({step.finished} / {step.total}): "
                             f"{step.file_name}", "total": step.total, "finished": step.finished,
                             "doc": step.file_name}
                    if step.skipped is not None:  # deleted or rewritten meanwhile: left so
                        event |= {"msg": f"{event['msg']} (skipped: {step.skipped})",
                                  "skipped": step.skipped}
                    yield _event(event)
        except KnowledgeBaseNotFound:
            yield _event({"code": 404, "msg": f"未找到知识库 ‘{kb}’ (knowledge base '{kb}' was "
                          "deleted during the rebuild; one created since under its name is "
                          "left as it is)"})
        except IngestBusy as exc:
            yield _event({"code": 429, "msg": str(exc)})
        except IngestStopped as exc:
            yield _event({"code": 503, "msg": str(exc)})
        except EmbeddingError as exc:
            yield _event({"code": 500, "msg": f"the embeddings endpoint failed: {exc}"})

    return StreamingResponse(progress(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/upload_temp_docs", summary="Upload files into a temporary knowledge base for file "
             "chat (Chatchat; multipart); it expires after kb.temp_ttl_s",
             responses={**_ENVELOPE, **_INGEST_ERRORS})
async def upload_temp_docs(
    request: Request,
    files: Annotated[list[UploadFile], File(
        min_length=1, description="Files to chat with (txt, md, html, pdf, docx, csv)")],
    prev_id: Annotated[str | None, Form(description="A temporary knowledge base's id to empty "
                                        "and reuse, instead of a new one")] = None,
    chunk_size: Annotated[int | None, Form(description="Default: kb.chunk_size"),
                          _OPTIONAL_INT] = None,
    chunk_overlap: Annotated[int | None, Form(description="Default: kb.chunk_overlap"),
                             _OPTIONAL_INT] = None,
    zh_title_enhance: Annotated[bool, Form()] = False,
) -> Response:
    knowledge = _knowledge(request)
    limit = knowledge.settings.max_files_per_upload
    if len(files) > limit:
        return envelope(422, f"{len(files)} files in one upload; at most {limit} "
                             "(kb.max_files_per_upload): upload them in smaller groups",
                        error_data(request.url.path))
    split = _split(request, chunk_size, chunk_overlap)
    if isinstance(split, Response):
        return split
    named, refused = await _read_uploads(request, files)
    async with knowledge.ingestor.slot():
        temp_id, kb = await knowledge.temp.create(knowledge.embed_model, prev_id=prev_id)
        try:
            refused |= await _ingest_files(request, kb, named, split, override=True)
        except KnowledgeBaseNotFound:
            return envelope(409, "the temporary knowledge base was replaced or deleted during "
                                 "this upload (another upload with the same prev_id?): upload "
                                 "again", error_data(request.url.path))
    failed = [{name: reason} for name, reason in refused.items()]
    if len(refused) == len(files):
        await knowledge.temp.delete(kb)
        return envelope(422, "no file could be read, nothing to chat with: see failed_files",
                        {"id": None, "failed_files": failed})
    await knowledge.temp.enforce_bound()
    return envelope(200, "success", {"id": temp_id, "failed_files": failed})


class SearchTempDocs(BaseModel):
    knowledge_id: str = Field(description="The id upload_temp_docs answered")
    query: str = ""
    top_k: int = Field(ge=1, le=100)
    score_threshold: float = Field(ge=0.0, le=2.0)


@router.post("/search_temp_docs", summary="Search a temporary knowledge base (Chatchat)",
             responses={200: {"description": "The chunks found, or an envelope when the "
                                             "temporary knowledge base expired",
                              "content": _CHUNKS_OR_ENVELOPE},
                        **_JSON_BODY_ERRORS})
async def search_temp_docs(body: SearchTempDocs, request: Request) -> Response:
    knowledge = _knowledge(request)
    try:
        kb = await knowledge.temp.resolve(body.knowledge_id)
        result = await knowledge.retriever.retrieve(kb, body.query, top_k=body.top_k,
                                                    score_threshold=body.score_threshold)
    except TempKbNotFound as exc:
        return envelope(404, str(exc))
    except KnowledgeBaseNotFound:  # deleted between the lookup and the search
        return envelope(404, str(TempKbNotFound(body.knowledge_id, knowledge.temp.ttl_s)))
    except EmbeddingError as exc:
        return envelope(500, f"the embeddings endpoint failed: {exc}")
    docs = [_document(hit.chunk, hit.score) for hit in result.chunks]
    return Response(json.dumps(docs, ensure_ascii=False), media_type="application/json")
