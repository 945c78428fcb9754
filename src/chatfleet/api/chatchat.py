"""Chatchat 0.3.1.3's chat routes: /chat/chat/completions, /chat/kb_chat, the OpenAI-style
/knowledge_base/{mode}/{param}/chat/completions, /chat/file_chat, and /server/configs.

A knowledge-base answer is: retrieve (``rag``), build Chatchat's RAG prompt, then the same
``CompletionService`` as /v1 (admission queue, engine, metrics), rendered in Chatchat's shapes
(``serving/chatchat_format.py``) with its SSE framing (``data: <json>\\r\\n\\r\\n``, no [DONE]).
Retrieval happens before the request queues, so it never holds an engine slot; its time is the
``retrieval`` phase of chatfleet_knowledge_chat_ttft_seconds. Chatchat's own checks (missing knowledge
base, unknown mode, model or prompt) answer HTTP 200 with the code in the envelope, as Chatchat
does; to a streamed request, as a stream of one event that the openai SDK raises (``_refusal``).
File chat (``temp_kb``, /chat/file_chat) retrieves from a temporary knowledge base
(``rag/temp_kbs.py``) by the id its upload answered.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
    ChatchatRefusal,
    FileChatAnswer,
    FileChatEvent,
    FileChatRequest,
    KbChatChunk,
    KbChatCompletion,
    KbChatOptions,
    KbChatRequest,
)
from chatfleet.api.json_body_route import json_post
from chatfleet.api.openai import (
    ClientDisconnected,
    cancel_on_disconnect,
    check_limits,
)
from chatfleet.api.responses import chatchat_errors, json_content, sse_content
from chatfleet.api.schemas import ErrorResponse
from chatfleet.api.sse import CompletionStream, crlf_data_frame, sse_response
from chatfleet.engines.base import ChatMessage, GenerationRequest
from chatfleet.rag.embeddings import EmbeddingError
from chatfleet.rag.knowledge import KnowledgeService
from chatfleet.rag.names import InvalidName, validate_kb_name
from chatfleet.rag.prompts import RAG_TEMPLATES, render_rag_prompt
from chatfleet.rag.retrieval import RetrievalResult
from chatfleet.rag.stores.base import KnowledgeBaseNotFound
from chatfleet.rag.temp_kbs import TempKbNotFound
from chatfleet.serving.admission import Priority
from chatfleet.serving.chatchat_format import (
    ChatchatChunkFormatter,
    ChatchatRelayFormatter,
    FileChatFormatter,
    chatchat_completion,
    chatchat_relay_completion,
)
from chatfleet.serving.completions import ROUTES, CompletionJob, CompletionService
from chatfleet.serving.model_names import ModelNames
from chatfleet.serving.openai_format import ChunkFormatter, error_body, new_request_id

__all__ = ["router"]

router = APIRouter(tags=["chatchat"])

_CLIENT_CLOSED = 499
_ERRORS = chatchat_errors(400, 413, 422, 429, 502, 503, _400=(
    "The body could not be read (JSON that is not UTF-8), the engine refused the prompt before "
    "the stream started, or (/chat/chat/completions) tools were asked for, which are not served"))
_CHAT_ANSWER = {"description": "The answer (an event stream unless stream is false)",
                "content": {**json_content(ChatchatRelayCompletion),
                            **sse_content(ChatchatRelayChunk, ErrorResponse)}}
_KB_ANSWER = {"description": "The answer with its references (an event stream unless stream is "
                             "false; with return_direct, one event holding the whole answer, as "
                             "Chatchat sends it), or (/chat/kb_chat) one of Chatchat's own "
                             "refusals (unknown mode, model or prompt; missing knowledge base) as "
                             "an envelope with its code, or a stream of one event holding it",
              "content": {**json_content(KbChatCompletion, ChatchatEnvelope),
                          **sse_content(KbChatChunk, KbChatCompletion, ChatchatRefusal)}}
_FILE_CHAT_ANSWER = {"description": "The answer and its references (an event stream when stream "
                                    "is true: tokens, then the references), or one of Chatchat's "
                                    "own refusals (an expired temporary knowledge base: 404)",
                     "content": {**json_content(FileChatAnswer, ChatchatEnvelope),
                                 **sse_content(FileChatEvent, ChatchatRefusal)}}
_OPENAI_STYLE_REFUSALS = {
    status: {"description": description, "content": json_content(ChatchatRefusal)}
    for status, description in (
        (403, "The knowledge-base name is refused (Chatchat's 403)"),
        (404, "Unknown model, mode or prompt_name; no such knowledge base or temporary one"))}
"""The refusals of the OpenAI-style routes, under their code as HTTP status (``_refusal``)."""
_NO_DOCS = "<span style='color:red'>未找到相关文档,该回答为大模型自身能力解答！</span>"
"""Chatchat's reference line when retrieval found nothing (the model answers on its own)."""


def _service(request: Request) -> CompletionService:
    return request.app.state.completions


def _knowledge(request: Request) -> KnowledgeService:
    return request.app.state.knowledge


_OPENAI_STYLE = ("/chat/chat/completions", "/knowledge_base/{mode}/{param}/chat/completions")
"""Chatchat's routes whose clients are OpenAI SDKs (its WebUI's dialogue and RAG pages)."""


def _refusal(request: Request, code: int, msg: str, *, stream: bool, error_type: str,
             param: str | None = None) -> Response:
    """One of Chatchat's own refusals (unknown model, missing knowledge base ...), in a form the
    route's clients notice; a 4xx is counted as an invalid request of its route.

    Chatchat answers them with HTTP 200 and the code in its envelope, which an OpenAI SDK cannot
    see: a bare envelope read as a stream is no event, and the SDK ends the stream without a
    chunk and without an error, an empty answer that looks like success. So the OpenAI-style
    routes answer the envelope, with OpenAI's ``error`` beside it, under the code as HTTP status
    (the SDK raises ``APIStatusError``); the others keep HTTP 200, and a streamed request gets an
    event stream of one event holding the envelope and the ``error`` (``ChatchatRefusal``:
    Chatchat's clients read its ``code`` and ``msg``, an OpenAI SDK raises ``APIError``)."""
    route = getattr(request.scope.get("route"), "path", "")
    if route in ROUTES and code < 500:  # a 502 (the embeddings endpoint failed) is not invalid
        _service(request).record_invalid(route)
    body = {"code": code, "msg": msg, "data": None,
            **error_body(msg, error_type=error_type, code=code, param=param)}
    if route in _OPENAI_STYLE:
        return JSONResponse(body, status_code=code)
    if not stream:
        return envelope(code, msg)
    return _one_event(body)


def _one_event(payload: dict[str, Any]) -> Response:
    """An event stream of one event in Chatchat's framing: a refusal, or a return_direct answer."""
    frame = crlf_data_frame(json.dumps(payload, ensure_ascii=False))

    async def one_event() -> AsyncIterator[bytes]:
        yield frame
    return sse_response(one_event())


def _model_refusal(request: Request, model: str | None, *, stream: bool) -> Response | None:
    names: ModelNames = request.app.state.model_names
    if names.accepts(model):
        return None
    assert model is not None
    return _refusal(request, 404, names.refusal(model), stream=stream,
                    error_type="model_not_found", param="model")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Shape:
    """How one route renders its answer: each streamed payload (``formatter``, given the request
    id), and a whole answer from the OpenAI ``chat.completion`` the service returns (``whole``)."""

    formatter: Callable[[str], ChunkFormatter]
    whole: Callable[[dict[str, Any]], dict[str, Any]]


async def _answer(request: Request, *, route: str, messages: tuple[ChatMessage, ...],
                  stream: bool, max_tokens: int | None, sampling: dict[str, Any],
                  arrived_at: float, shape: _Shape, retrieved_at: float | None = None) -> Response:
    """Queue the generation and answer in the route's ``shape``, streamed or whole."""
    service = _service(request)
    generation = GenerationRequest(request_id=new_request_id(chat=True), model=service.model,
                                   messages=messages, prompt=None, max_tokens=max_tokens or None,
                                   sampling=sampling)
    job = CompletionJob(request=generation, route=route, priority=Priority.INTERACTIVE,
                        arrived_at=arrived_at, retrieved_at=retrieved_at,
                        formatter=shape.formatter(generation.request_id))
    headers = {"X-Request-Id": generation.request_id}
    try:
        if stream:
            first, rest = await cancel_on_disconnect(request, service.open_stream(job))
            return CompletionStream(first, rest, frame=crlf_data_frame, headers=headers,
                                    send_timeout_s=request.app.state.settings.server.send_timeout_s)
        answer = await cancel_on_disconnect(request, service.complete(job))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    return JSONResponse(shape.whole(answer), headers=headers)


def _content(answer: dict[str, Any]) -> tuple[str, str | None]:
    """The text and finish reason of a whole OpenAI chat answer."""
    choice = answer["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


@json_post(router, "/chat/chat/completions", summary="Chat (Chatchat's OpenAI-style chat route)",
           responses={200: _CHAT_ANSWER, **_ERRORS, **_OPENAI_STYLE_REFUSALS})
async def chat_completions(body: ChatchatChatRequest, request: Request) -> Response:
    arrived_at = time.perf_counter()
    stream = bool(body.stream)
    if body.tools or body.tool_choice:
        return _refusal(request, 400, "tools and agents are not served by ChatFleet: send the "
                        "chat without 'tools' and 'tool_choice' (in Chatchat's WebUI, select no "
                        "tool)", stream=stream, error_type="invalid_request_error", param="tools")
    if (refused := _model_refusal(request, body.model, stream=stream)) is not None:
        return refused
    check_limits(request, max_tokens=body.max_tokens, messages=len(body.messages))
    messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
    model = _service(request).model
    shape = _Shape(formatter=lambda request_id: ChatchatRelayFormatter(request_id=request_id,
                                                                        model=model),
                   whole=chatchat_relay_completion)
    return await _answer(request, route="/chat/chat/completions", messages=messages,
                         stream=stream, max_tokens=body.max_tokens, sampling=body.sampling(),
                         arrived_at=arrived_at, shape=shape)


def _public_url(request: Request) -> str:
    """The base of reference links: ``server.public_url``, or "" (links relative to the gateway).
    Never the request's Host header: any client sets that, and the link would lead elsewhere."""
    return request.app.state.settings.server.public_url or ""


def _api_address(request: Request) -> str:
    """Chatchat's ``api_address()``: ``server.public_url``, else the address the gateway is bound
    to (0.0.0.0 and :: read as the loopback address, as Chatchat does). Never the Host header."""
    server = request.app.state.settings.server
    if server.public_url:
        return server.public_url
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    return f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"


def _reference(base_url: str | None, kb: str, index: int, file_name: str, text: str) -> str:
    """One entry of ``docs``, as Chatchat's format_reference writes it; without ``base_url``
    (a temporary knowledge base, whose files are not served), as its file chat writes it."""
    if base_url is None:
        return f"出处 [{index + 1}] [{file_name}] \n\n{text}\n\n"
    url = (f"{base_url}/knowledge_base/download_doc?"
           + urlencode({"knowledge_base_name": kb, "file_name": file_name}))
    return f"出处 [{index + 1}] [{file_name}]({url}) \n\n{text}\n\n"


def _retrieval_info(result: RetrievalResult) -> dict[str, Any]:
    """What the answer says about its retrieval (ChatFleet's addition to Chatchat's shape)."""
    return {"retrieval": {"mode": result.mode.value, "seconds": round(result.seconds, 6),
                          "chunks": [{"file_name": c.chunk.file_name, "chunk": c.chunk.seq,
                                      "score": c.score} for c in result.chunks]}}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Retrieved:
    """A question's retrieval: the chunks, and their references as the answer's ``docs``."""

    result: RetrievalResult
    docs: list[str]
    at: float
    """perf_counter() when retrieval finished: the end of kb_chat's retrieval phase."""


async def _retrieve(request: Request, *, mode: str, target: str, query: str, top_k: int | None,
                    score_threshold: float | None, stream: bool) -> _Retrieved | Response:
    """Retrieve from a knowledge base (``local_kb``: ``target`` is its name) or a temporary one
    (``temp_kb``: its id); a refusal when there is none, or retrieval failed."""
    knowledge = _knowledge(request)
    base_url: str | None = _public_url(request)
    try:
        if mode == "local_kb":
            kb = validate_kb_name(target)
            if await knowledge.store.get_kb(kb) is None:
                raise KnowledgeBaseNotFound(kb)
        elif mode == "temp_kb":
            kb, base_url = await knowledge.temp.resolve(target), None
        else:
            return _refusal(request, 404, f"mode '{mode[:40]}' is not served by ChatFleet: use "
                            "'local_kb' (a knowledge base) or 'temp_kb' (the id of an "
                            "upload_temp_docs); search-engine chat is not served", stream=stream,
                            error_type="not_found", param="mode")
        result = await knowledge.retriever.retrieve(
            kb, query, top_k=top_k or knowledge.settings.top_k,
            score_threshold=(knowledge.settings.score_threshold if score_threshold is None
                             else score_threshold))
    except InvalidName as exc:
        return _refusal(request, 403, str(exc), stream=stream, error_type="invalid_request_error",
                        param="kb_name")
    except KnowledgeBaseNotFound as exc:
        message = (str(TempKbNotFound(target, knowledge.temp.ttl_s)) if mode == "temp_kb"
                   else f"未找到知识库 {exc.kb} (knowledge base '{exc.kb}' does not exist; see "
                        "/knowledge_base/list_knowledge_bases)")
        return _refusal(request, 404, message, stream=stream, error_type="not_found",
                        param="kb_name")
    except TempKbNotFound as exc:
        return _refusal(request, 404, str(exc), stream=stream, error_type="not_found",
                        param="knowledge_id")
    except EmbeddingError as exc:
        return _refusal(request, 502, f"retrieval failed: the embeddings endpoint failed: {exc}",
                        stream=stream, error_type="upstream_error")
    docs = [_reference(base_url, kb, i, c.chunk.file_name, c.chunk.text)
            for i, c in enumerate(result.chunks)]
    return _Retrieved(result=result, docs=docs, at=time.perf_counter())


def _prompt_refusal(request: Request, prompt_name: str, *, stream: bool) -> Response | None:
    if prompt_name in RAG_TEMPLATES:
        return None
    return _refusal(request, 404, f"prompt_name '{prompt_name[:40]}' is not a RAG prompt "
                    f"template; use one of {', '.join(sorted(RAG_TEMPLATES))}", stream=stream,
                    error_type="not_found", param="prompt_name")


async def _kb_answer(request: Request, *, route: str, mode: str, kb_name: str, query: str,
                     history: tuple[ChatMessage, ...], options: KbChatOptions, stream: bool,
                     model: str | None, max_tokens: int | None, sampling: dict[str, Any],
                     arrived_at: float) -> Response:
    if (refused := _model_refusal(request, model, stream=stream)) is not None:
        return refused
    check_limits(request, max_tokens=max_tokens, messages=len(history) + 1)
    if (refused := _prompt_refusal(request, options.prompt_name, stream=stream)) is not None:
        return refused
    retrieved = await _retrieve(request, mode=mode, target=kb_name, query=query,
                                top_k=options.top_k, score_threshold=options.score_threshold,
                                stream=stream)
    if isinstance(retrieved, Response):
        return retrieved
    served = _service(request).model
    info = _retrieval_info(retrieved.result)
    if options.return_direct:
        answer = chatchat_completion(model=served, content="", finish_reason="stop",
                                     extra={"docs": retrieved.docs, **info})
        return _one_event(answer) if stream else JSONResponse(answer)
    prompt = render_rag_prompt(options.prompt_name, question=query,
                               contexts=[c.chunk.text for c in retrieved.result.chunks])
    docs = retrieved.docs or [_NO_DOCS]

    def whole(answer: dict[str, Any]) -> dict[str, Any]:
        content, finish_reason = _content(answer)
        return chatchat_completion(model=served, content=content, finish_reason=finish_reason,
                                   extra={"docs": docs, **info})
    shape = _Shape(formatter=lambda _: ChatchatChunkFormatter(model=served, docs=docs, extra=info),
                   whole=whole)
    return await _answer(request, route=route, messages=(*history, ChatMessage("user", prompt)),
                         stream=stream, max_tokens=max_tokens, sampling=sampling,
                         arrived_at=arrived_at, shape=shape, retrieved_at=retrieved.at)


@router.post("/chat/kb_chat", summary="Knowledge-base chat (Chatchat): mode local_kb (kb_name) "
             "or temp_kb (kb_name is an upload_temp_docs id)",
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
                     "base_url={api}/knowledge_base/local_kb/{kb}, or temp_kb/{id} for file "
                     "chat, calls this)",
             responses={200: _KB_ANSWER, **_ERRORS, **_OPENAI_STYLE_REFUSALS})
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


@router.post("/chat/file_chat", summary="Chat with the files of a temporary knowledge base "
             "(Chatchat's file chat; upload them with /knowledge_base/upload_temp_docs)",
             responses={200: _FILE_CHAT_ANSWER, **_ERRORS})
async def file_chat(body: FileChatRequest, request: Request) -> Response:
    arrived_at = time.perf_counter()
    if (refused := _model_refusal(request, body.model_name, stream=body.stream)) is not None:
        return refused
    history = tuple(ChatMessage(m.role, m.content) for m in body.history)
    max_tokens = body.max_tokens or None
    check_limits(request, max_tokens=max_tokens, messages=len(history) + 1)
    if (refused := _prompt_refusal(request, body.prompt_name, stream=body.stream)) is not None:
        return refused
    retrieved = await _retrieve(request, mode="temp_kb", target=body.knowledge_id,
                                query=body.query, top_k=body.top_k,
                                score_threshold=body.score_threshold, stream=body.stream)
    if isinstance(retrieved, Response):
        return retrieved
    prompt = render_rag_prompt(body.prompt_name, question=body.query,
                               contexts=[c.chunk.text for c in retrieved.result.chunks])
    docs = retrieved.docs or [_NO_DOCS]
    shape = _Shape(formatter=lambda _: FileChatFormatter(docs=docs),
                   whole=lambda answer: {"answer": _content(answer)[0], "docs": docs})
    return await _answer(request, route="/chat/file_chat",
                         messages=(*history, ChatMessage("user", prompt)), stream=body.stream,
                         max_tokens=max_tokens, sampling={"temperature": body.temperature},
                         arrived_at=arrived_at, shape=shape, retrieved_at=retrieved.at)


@router.post("/server/configs", summary="Server configuration (Chatchat), with ChatFleet's "
             "knowledge-base settings")
async def server_configs(request: Request) -> dict[str, Any]:
    knowledge = _knowledge(request)
    settings = knowledge.settings
    return {
        "api_address": _api_address(request),
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
