"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models(/{model}),
/v1/embeddings.

Thin: validate, build a ``CompletionJob``, hand it to the ``CompletionService`` on ``app.state``,
wrap the result. A client that disconnects while its request waits for a slot or for a non-streamed
answer cancels the work at once (``cancel_on_disconnect``); a streamed answer is cancelled by the SSE
response when the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import WithJsonSchema

from chatfleet.api.errors import InvalidParameter, ModelNotFound, error_response
from chatfleet.api.json_body_route import json_post
from chatfleet.api.responses import RETRY_AFTER, sse_content
from chatfleet.api.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from chatfleet.api.sse import CompletionStream
from chatfleet.engines.base import ChatMessage, GenerationRequest
from chatfleet.logs import name_list
from chatfleet.rag.embeddings import EmbeddingError
from chatfleet.serving.admission import Priority
from chatfleet.serving.completions import CompletionJob, CompletionService
from chatfleet.serving.model_names import ModelNames
from chatfleet.serving.openai_format import new_request_id

__all__ = ["check_limits", "router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request: the message names the field"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Body over limits.max_body_bytes"},
    429: {"model": ErrorResponse, "headers": RETRY_AFTER,
          "description": "Queue full or queue wait exceeded"},
    502: {"model": ErrorResponse, "description": "The engine failed the request"},
    503: {"model": ErrorResponse, "headers": RETRY_AFTER,
          "description": "Draining, or the engine is unavailable"},
}
_EMBEDDING_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _ERRORS[400],
    404: {"model": ErrorResponse, "description": "Unknown model, or no embeddings endpoint configured"},
    413: _ERRORS[413],
    429: {"model": ErrorResponse, "description": "The embeddings endpoint's own 429, relayed"},
    502: {"model": ErrorResponse, "description": "The embeddings endpoint did not answer, or answered "
                                                 "a status other than those declared here"},
    503: {"model": ErrorResponse, "description": "The embeddings endpoint's own 503, relayed"},
}
_RELAYED_EMBEDDING_STATUSES = frozenset({200, 400, 404, 413, 429, 503})
"""The embeddings endpoint's answers passed on as they are; any other (a 500, or a 401 because the
gateway's key for it is wrong) is the deployment's failure, which the client sees as a 502."""
_STREAMED = ("The answer; with stream=true an event stream of chunks ending with [DONE] (an error "
             "after the stream started is an error event, then the stream ends)")
PriorityHeader = Annotated[str | None, Header(
    description="Admission priority, set by infrastructure (e.g. per ingress route); wins over the "
                "body's priority. Matched without regard to case or surrounding spaces"),
    WithJsonSchema({"type": "string", "enum": [p.value for p in Priority]})]
_CLIENT_CLOSED = 499
"""Status logged for a request whose client went away (nginx's convention); nobody receives it."""


class ClientDisconnected(Exception):
    pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (ClientDisconnected).

    ``work`` runs in the request's own task and a watcher task cancels that one, rather than
    ``work`` in a task of its own: a new task's first step, and the wake-up of the task awaiting
    it, each wait behind everything else ready on the loop, and under load (other streams'
    tokens arriving a whole engine step at a time) those two waits added to every request's time
    to first token.
    """
    owner = asyncio.current_task()
    assert owner is not None
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        owner.cancel()

    watcher = asyncio.create_task(disconnected())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and owner.uncancel() == 0:  # cancelled by the watcher alone
            raise ClientDisconnected from None
        raise
    finally:
        watcher.cancel()


def _priority(header: str | None, body: Priority | None) -> Priority:
    """The header (set by infrastructure, e.g. per ingress route) wins over the body field."""
    if header is not None:
        try:
            return Priority(header.strip().lower())
        except ValueError:
            raise InvalidParameter(f"X-ChatFleet-Priority: {header!r} is not a priority; use "
                                   "'interactive' or 'batch'", param="X-ChatFleet-Priority") from None
    return body or Priority.INTERACTIVE


def _service(request: Request) -> CompletionService:
    return request.app.state.completions


def check_limits(request: Request, *, max_tokens: int | None, messages: int) -> None:
    """Refuse an output limit or a conversation over the deployment's (limits.max_tokens,
    limits.max_messages), on every chat route."""
    limits = request.app.state.settings.limits
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidParameter(f"max_tokens is {max_tokens}; this deployment allows at most "
                               f"{limits.max_tokens} (limits.max_tokens): ask for fewer output tokens",
                               param="max_tokens")
    if messages > limits.max_messages:
        raise InvalidParameter(f"the conversation has {messages} messages; this deployment allows at "
                               f"most {limits.max_messages} (limits.max_messages): send fewer, e.g. "
                               "drop or summarize the oldest turns", param="messages")


def _check(request: Request, body: ChatCompletionRequest | CompletionRequest) -> None:
    names: ModelNames = request.app.state.model_names
    if not names.accepts(body.model):
        raise ModelNotFound(body.model, names.served)
    check_limits(request, max_tokens=body.output_limit(),
                 messages=len(body.messages) if isinstance(body, ChatCompletionRequest) else 1)
    ignored = body.ignored_fields()
    if ignored:
        log.info("ignored %d unknown request field(s): %s", len(ignored), name_list(ignored))


async def _serve(request: Request, body: ChatCompletionRequest | CompletionRequest, route: str,
                 priority_header: str | None, arrived_at: float) -> Response:
    """Check the request, build its job, and answer it streamed or whole."""
    _check(request, body)
    chat = isinstance(body, ChatCompletionRequest)
    generation = GenerationRequest(
        request_id=new_request_id(chat=chat), model=_service(request).model,
        messages=tuple(ChatMessage(m.role, m.text()) for m in body.messages) if chat else None,
        prompt=None if chat else body.prompt_text(),
        max_tokens=body.output_limit(), sampling=body.sampling())
    job = CompletionJob(request=generation, route=route,
                        priority=_priority(priority_header, body.priority),
                        include_usage=body.include_usage(), arrived_at=arrived_at)
    service = _service(request)
    headers = {"X-Request-Id": generation.request_id}
    try:
        if body.stream:
            first, rest = await cancel_on_disconnect(request, service.open_stream(job))
            return CompletionStream(first, rest, headers=headers,
                                    send_timeout_s=request.app.state.settings.server.send_timeout_s)
        answer = await cancel_on_disconnect(request, service.complete(job))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    return JSONResponse(answer, headers=headers)


@json_post(router, "/v1/chat/completions", responses={
    200: {"model": ChatCompletionResponse, "description": _STREAMED,
          "content": sse_content(ChatCompletionChunk, ErrorResponse, done=True)}, **_ERRORS},
           summary="Chat completion (OpenAI API), streamed with stream=true")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    x_chatfleet_priority: PriorityHeader = None,
) -> Response:
    return await _serve(request, body, "/v1/chat/completions", x_chatfleet_priority,
                        time.perf_counter())


@json_post(router, "/v1/completions", responses={
    200: {"model": CompletionResponse, "description": _STREAMED,
          "content": sse_content(CompletionChunk, ErrorResponse, done=True)}, **_ERRORS},
           summary="Text completion (OpenAI API), streamed with stream=true")
async def completions(
    body: CompletionRequest,
    request: Request,
    x_chatfleet_priority: PriorityHeader = None,
) -> Response:
    return await _serve(request, body, "/v1/completions", x_chatfleet_priority, time.perf_counter())


def _model_card(request: Request, model_id: str) -> ModelCard:
    return ModelCard(id=model_id, created=request.app.state.started_at, owned_by="chatfleet")


@router.get("/v1/models", response_model=ModelList, summary="The model this deployment serves, "
            "then its aliases (engine.model_aliases)")
async def list_models(request: Request) -> ModelList:
    names: ModelNames = request.app.state.model_names
    return ModelList(data=[_model_card(request, m) for m in names.listed])


@router.get("/v1/models/{model:path}", response_model=ModelCard,
            responses={404: {"model": ErrorResponse, "description": "Not a model served here; "
                                                                    "the message names the one that is"}},
            summary="One model by id (OpenAI's models.retrieve); ids may contain '/'")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    names: ModelNames = request.app.state.model_names
    if not model or not names.accepts(model):
        raise ModelNotFound(model, names.served)
    return _model_card(request, model)


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}, **_EMBEDDING_ERRORS},
             summary="Embeddings (OpenAI API), relayed to the configured kb.embeddings endpoint")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    embedder = request.app.state.knowledge.embedder
    if embedder is None:
        return error_response(404, "no embeddings endpoint is configured here: set "
                                   "CHATFLEET_KB__EMBEDDINGS__URL and __MODEL", error_type="not_found")
    if body.model != embedder.model:
        raise ModelNotFound(body.model, embedder.model)
    try:
        answer = await embedder.relay(body.model_dump(exclude_none=True, exclude_unset=False))
    except EmbeddingError as exc:
        return error_response(502, str(exc), error_type="upstream_error")
    if answer.status_code not in _RELAYED_EMBEDDING_STATUSES:
        return error_response(502, f"the embeddings endpoint failed: it answered HTTP "
                                   f"{answer.status_code}: {answer.text[:300]}", error_type="upstream_error")
    return Response(answer.content, status_code=answer.status_code,
                    media_type=answer.headers.get("content-type", "application/json"))
