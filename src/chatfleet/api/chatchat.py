"""Chatchat 0.3.1.3's chat routes: /chat/chat/completions, /chat/kb_chat, the OpenAI-style
/knowledge_base/{mode}/{param}/chat/completions, and /server/configs.

A knowledge-base answer is: retrieve (``rag``), build Chatchat's RAG prompt, then the same
``CompletionService`` as /v1 (admission queue, engine, metrics), rendered in Chatchat's shapes
(``serving/chatchat_format.py``) with its SSE framing (``data: <json>\\r\\n\\r\\n``, no [DONE]).
Retrieval happens before the request queues, so it never holds an engine slot; its time is the
``retrieval`` phase of chatfleet_knowledge_chat_ttft_seconds. Chatchat's own checks (missing knowledge
base, unknown mode or prompt) answer HTTP 200 with the code in the envelope, as Chatchat does.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from chatfleet.api.chatchat_envelope import envelope
from chatfleet.api.chatchat_schemas import (
    ChatchatChatRequest,
    ChatchatEnvelope,
    ChatchatRelayChunk,
    ChatchatRelayCompletion,
    KbChatChunk,
    KbChatCompletion,
    KbChatOptions,
    KbChatRequest,
)
from chatfleet.api.openai import (
    ClientDisconnected,
    cancel_on_disconnect,
    check_limits,
)
from chatfleet.api.responses import chatchat_errors, json_content, sse_content
from chatfleet.api.schemas import ErrorResponse
from chatfleet.api.sse import crlf_data_frame, relay_frames, sse_response
from chatfleet.engines.base import ChatMessage, GenerationRequest
from chatfleet.rag.embeddings import EmbeddingError
from chatfleet.rag.knowledge import KnowledgeService
from chatfleet.rag.names import validate_kb_name
from chatfleet.rag.prompts import RAG_TEMPLATES, render_rag_prompt
from chatfleet.rag.retrieval import RetrievalResult
from chatfleet.rag.stores.base import KnowledgeBaseNotFound
from chatfleet.serving.admission import Priority
from chatfleet.serving.chatchat_format import (
    ChatchatChunkFormatter,
    ChatchatRelayFormatter,
    chatchat_completion,
    chatchat_relay_completion,
)
from chatfleet.serving.completions import CompletionJob, CompletionService
from chatfleet.serving.openai_format import ChunkFormatter, new_request_id

__all__ = ["router"]

router = APIRouter(tags=["chatchat"])

_CLIENT_CLOSED = 499
_ERRORS = chatchat_errors(400, 413, 422, 429, 502, 503, _400=(
    "The body could not be read (JSON that is not UTF-8), or the engine refused the prompt "
    "before the stream started"))
_CHAT_ANSWER = {"description": "The answer (an event stream unless stream is false), or one of "
                               "Chatchat's own refusals as an envelope with its code",
                "content": {**json_content(ChatchatRelayCompletion, ChatchatEnvelope),
                            **sse_content(ChatchatRelayChunk, ErrorResponse)}}
_KB_ANSWER = {"description": "The answer with its references (an event stream unless stream is "
                             "false; with return_direct, one event holding the whole answer, as "
                             "Chatchat sends it), or one of Chatchat's own refusals (unknown mode, "
                             "model or prompt; missing knowledge base) as an envelope with its code",
              "content": {**json_content(KbChatCompletion, ChatchatEnvelope),
                          **sse_content(KbChatChunk, KbChatCompletion)}}
_NO_DOCS = "<span style='color:red'>未找到相关文档,该回答为大模型自身能力解答！</span>"
"""Chatchat's reference line when retrieval found nothing (the model answers on its own)."""


def _service(request: Request) -> CompletionService:
    return request.app.state.completions


def _knowledge(request: Request) -> KnowledgeService:
    return request.app.state.knowledge


def _model_error(request: Request, model: str | None) -> Response | None:
    served = _service(request).model
    if model in (None, "", served):
        return None
    return envelope(404, f"model '{model}' is not served here; this deployment serves '{served}' "
                         "(omit model, or see GET /v1/models)")


async def _answer(request: Request, *, route: str, messages: tuple[ChatMessage, ...],
                  stream: bool, max_tokens: int | None, sampling: dict[str, Any],
                  arrived_at: float, docs: list[str] | None = None,
                  extra: dict[str, Any] | None = None,
                  retrieved_at: float | None = None) -> Response:
    """Queue the generation and answer in Chatchat's shapes, streamed or whole: a knowledge-base
    answer (``docs`` given) as its OpenAIChatOutput objects, plain chat as the upstream's OpenAI
    objects with Chatchat's two added fields (what its chat route relays)."""
    service = _service(request)
    generation = GenerationRequest(request_id=new_request_id(chat=True), model=service.model,
                                   messages=messages, prompt=None, max_tokens=max_tokens or None,
                                   sampling=sampling)
    formatter: ChunkFormatter = (
        ChatchatRelayFormatter(request_id=generation.request_id, model=service.model)
        if docs is None else ChatchatChunkFormatter(model=service.model, docs=docs, extra=extra))
    job = CompletionJob(request=generation, route=route, priority=Priority.INTERACTIVE,
                        arrived_at=arrived_at, retrieved_at=retrieved_at, formatter=formatter)
    headers = {"X-Request-Id": generation.request_id}
    try:
        if stream:
            first, rest = await cancel_on_disconnect(request, service.open_stream(job))
            return sse_response(relay_frames(first, rest, crlf_data_frame), headers,
                                send_timeout_s=request.app.state.settings.server.send_timeout_s)
        answer = await cancel_on_disconnect(request, service.complete(job))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    if docs is None:
        return JSONResponse(chatchat_relay_completion(answer), headers=headers)
    choice = answer["choices"][0]
    return JSONResponse(chatchat_completion(model=service.model,
                                            content=choice["message"]["content"],
                                            finish_reason=choice["finish_reason"],
                                            extra={"docs": docs, **(extra or {})}),
                        headers=headers)


@router.post("/chat/chat/completions", summary="Chat (Chatchat's OpenAI-style chat route)",
             responses={200: _CHAT_ANSWER, **_ERRORS})
async def chat_completions(body: ChatchatChatRequest, request: Request) -> Response:
    arrived_at = time.perf_counter()
    if body.tools or body.tool_choice:
        return envelope(501, "tools and agents are not served by ChatFleet: send the chat without "
                             "'tools' and 'tool_choice'")
    if (error := _model_error(request, body.model)) is not None:
        return error
    check_limits(request, max_tokens=body.max_tokens, messages=len(body.messages))
    messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
    return await _answer(request, route="/chat/chat/completions", messages=messages,
                         stream=bool(body.stream), max_tokens=body.max_tokens,
                         sampling=body.sampling(), arrived_at=arrived_at)


def _reference(base_url: str, kb: str, index: int, file_name: str, text: str) -> str:
    """One entry of ``docs``, as Chatchat's format_reference writes it."""
    url = (f"{base_url}/knowledge_base/download_doc?"
           + urlencode({"knowledge_base_name": kb, "file_name": file_name}))
    return f"出处 [{index + 1}] [{file_name}]({url}) \n\n{text}\n\n"


def _retrieval_info(result: RetrievalResult) -> dict[str, Any]:
    """What the answer says about its retrieval (ChatFleet's addition to Chatchat's shape)."""
    return {"retrieval": {"mode": result.mode.value, "seconds": round(result.seconds, 6),
                          "chunks": [{"file_name": c.chunk.file_name, "chunk": c.chunk.seq,
                                      "score": c.score} for c in result.chunks]}}


async def _kb_answer(request: Request, *, route: str, mode: str, kb_name: str, query: str,
                     history: tuple[ChatMessage, ...], options: KbChatOptions, stream: bool,
                     model: str | None, max_tokens: int | None, sampling: dict[str, Any],
                     arrived_at: float) -> Response:
    if mode != "local_kb":
        return envelope(404, f"mode '{mode}' is not served by ChatFleet: only 'local_kb' "
                             "(temporary-file and search-engine chat are not)")
    kb = validate_kb_name(kb_name)
    if (error := _model_error(request, model)) is not None:
        return error
    check_limits(request, max_tokens=max_tokens, messages=len(history) + 1)
    if options.prompt_name not in RAG_TEMPLATES:
        return envelope(404, f"prompt_name '{options.prompt_name}' is not a RAG prompt template; "
                             f"use one of {', '.join(sorted(RAG_TEMPLATES))}")
    knowledge = _knowledge(request)
    if await knowledge.store.get_kb(kb) is None:
        raise KnowledgeBaseNotFound(kb)
    try:
        result = await knowledge.retriever.retrieve(
            kb, query, top_k=options.top_k or knowledge.settings.top_k,
            score_threshold=(knowledge.settings.score_threshold if options.score_threshold is None
                             else options.score_threshold))
    except EmbeddingError as exc:
        return envelope(500, f"retrieval failed: the embeddings endpoint failed: {exc}")
    retrieved_at = time.perf_counter()
    base_url = str(request.base_url).rstrip("/")
    docs = [_reference(base_url, kb, i, c.chunk.file_name, c.chunk.text)
            for i, c in enumerate(result.chunks)]
    extra = _retrieval_info(result)
    if options.return_direct:
        answer = chatchat_completion(model=_service(request).model, content="",
                                     finish_reason="stop", extra={"docs": docs, **extra})
        if stream:
            payload = json.dumps(answer, ensure_ascii=False)

            async def one_event() -> AsyncIterator[bytes]:
                yield crlf_data_frame(payload)
            return sse_response(one_event())
        return JSONResponse(answer)
    prompt = render_rag_prompt(options.prompt_name, question=query,
                               contexts=[c.chunk.text for c in result.chunks])
    messages = (*history, ChatMessage("user", prompt))
    return await _answer(request, route=route, messages=messages, stream=stream,
                         max_tokens=max_tokens, sampling=sampling, arrived_at=arrived_at,
                         docs=docs or [_NO_DOCS], extra=extra, retrieved_at=retrieved_at)


@router.post("/chat/kb_chat", summary="Knowledge-base chat (Chatchat)",
             responses={200: _KB_ANSWER, **_ERRORS})
async def kb_chat(body: KbChatRequest, request: Request) -> Response:
    arrived_at = time.perf_counter()
    history = tuple(ChatMessage(m.role, m.content) for m in body.history)
    return await _kb_answer(request, route="/chat/kb_chat", mode=body.mode, kb_name=body.kb_name,
                            query=body.query, history=history, options=body, stream=body.stream,
                            model=body.model, max_tokens=body.max_tokens,
                            sampling={"temperature": body.temperature}, arrived_at=arrived_at)


@router.post("/knowledge_base/{mode}/{param}/chat/completions",
             summary="Knowledge-base chat, OpenAI-style (Chatchat; the openai SDK with "
                     "base_url={api}/knowledge_base/local_kb/{kb} calls this)",
             responses={200: _KB_ANSWER, **_ERRORS})
async def kb_chat_completions(mode: str, param: str, body: ChatchatChatRequest,
                              request: Request) -> Response:
    arrived_at = time.perf_counter()
    *earlier, last = body.messages
    history = tuple(ChatMessage(m.role, m.text()) for m in earlier)
    return await _kb_answer(request, route="/knowledge_base/{mode}/{param}/chat/completions",
                            mode=mode, kb_name=param, query=last.text(), history=history,
                            options=body, stream=bool(body.stream), model=body.model,
                            max_tokens=body.max_tokens, sampling=body.sampling(),
                            arrived_at=arrived_at)


@router.post("/server/configs", summary="Server configuration (Chatchat), with ChatFleet's "
             "knowledge-base settings")
async def server_configs(request: Request) -> dict[str, Any]:
    knowledge = _knowledge(request)
    settings = knowledge.settings
    return {
        "api_address": str(request.base_url).rstrip("/"),
        "model": _service(request).model,
        "knowledge_base": {
            "store": knowledge.store.kind,
            "retrieval_mode": knowledge.mode.value,
            "embed_model": knowledge.embed_model or None,
            "chunk_size": settings.chunk_size, "chunk_overlap": settings.chunk_overlap,
            "top_k": settings.top_k, "score_threshold": settings.score_threshold,
            "max_upload_bytes": settings.max_upload_bytes,
            "prompt_names": sorted(RAG_TEMPLATES),
        },
    }
