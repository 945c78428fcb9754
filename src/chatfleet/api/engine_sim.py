"""``chatfleet engine-sim``: the simulated engine as a standalone OpenAI-compatible server.

It stands in for the vLLM container where there is no GPU, and is the upstream in tests and
benchmarks. Like vLLM it has no admission queue of its own in front of the engine: every request
goes straight to the engine's scheduler, which batches up to max_num_seqs and keeps the rest
waiting (vllm:num_requests_waiting). It exports vLLM's metric names, not ChatFleet's.
Routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, /metrics.

/v1/embeddings answers with ``engines.hashed_embeddings`` (feature hashing, not a language model),
so knowledge bases' dense retrieval runs without an embedding model. It accepts the served model
id or the embedding model name (``--embedding-model``); /v1/models lists only the former.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from chatfleet import __version__
from chatfleet.api.errors import InvalidParameter, ModelNotFound, install_error_handlers
from chatfleet.api.middleware import BodySizeLimit
from chatfleet.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from chatfleet.api.sse import frames_of, sse_response
from chatfleet.engines.base import ChatMessage, GenerationRequest
from chatfleet.engines.engine_model import EngineProfile
from chatfleet.engines.hashed_embeddings import DEFAULT_DIM, hashed_embeddings
from chatfleet.engines.simulated import SimulatedEngine
from chatfleet.serving.openai_format import (
    Payloads,
    StreamFormatter,
    collect,
    completion_response,
    new_request_id,
    stream_payloads,
)
from chatfleet.telemetry.metrics import CONTENT_TYPE_LATEST, EngineSimMetrics, render

__all__ = ["create_engine_sim_app"]

_MAX_BODY_BYTES = 8 << 20
_CHARS_PER_TOKEN = 4
"""Embedding inputs are counted as the simulated engine counts prompts."""
_MAX_INPUT_CHARS = 8192 * _CHARS_PER_TOKEN
"""Longest text embedded: OpenAI's limit of 8192 tokens per input, in characters."""
_INLINE_TEXTS = 64
_INLINE_CHARS = 1 << 16
"""Larger batches are embedded and serialized in a thread, so that the engine's steps, which run
on this event loop, keep their modelled timing."""

router = APIRouter()


def _engine(request: Request) -> SimulatedEngine:
    return request.app.state.engine


async def _answer(request: Request, generation: GenerationRequest, stream: bool,
                  include_usage: bool) -> Response:
    engine = _engine(request)
    deltas = engine.generate(generation)
    if stream:
        fmt = StreamFormatter(request_id=generation.request_id, model=engine.model,
                              chat=generation.is_chat, include_usage=include_usage)
        payloads: AsyncIterator[Payloads] = stream_payloads(fmt, deltas)
        # Start the engine request now, so a rejection (prompt too long) is an HTTP error.
        first = await anext(payloads)

        async def frames() -> AsyncIterator[bytes]:
            yield frames_of(first)
            async for payload in payloads:
                yield frames_of(payload)

        return sse_response(frames())
    answer = await collect(deltas)
    return JSONResponse(completion_response(
        request_id=generation.request_id, model=engine.model, chat=generation.is_chat,
        text=answer.text, finish_reason=answer.finish_reason, usage=answer.usage))


def _check_model(request: Request, model: str) -> None:
    served = _engine(request).model
    if model != served:
        raise ModelNotFound(model, served)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    generation = GenerationRequest(
        request_id=new_request_id(chat=True), model=body.model,
        messages=tuple(ChatMessage(m.role, m.text()) for m in body.messages),
        max_tokens=body.output_limit(), sampling=body.sampling())
    return await _answer(request, generation, body.stream, body.include_usage())


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    generation = GenerationRequest(
        request_id=new_request_id(chat=False), model=body.model, prompt=body.prompt_text(),
        max_tokens=body.output_limit(), sampling=body.sampling())
    return await _answer(request, generation, body.stream, body.include_usage())


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    state = request.app.state
    if body.model not in (state.embedding_model, _engine(request).model):
        raise ModelNotFound(body.model, state.embedding_model)
    dim: int = state.embedding_dim
    if body.dimensions is not None:
        if body.dimensions > dim:
            raise InvalidParameter(f"dimensions={body.dimensions} is more than this model's {dim}; "
                                   f"ask for at most {dim} or omit it", param="dimensions")
        dim = body.dimensions
    texts = body.texts()
    for i, text in enumerate(texts):
        if len(text) > _MAX_INPUT_CHARS:
            raise InvalidParameter(f"input[{i}] has {len(text)} characters; the limit is "
                                   f"{_MAX_INPUT_CHARS} characters (8192 tokens) per input: "
                                   "split it", param="input")
    render = partial(_embedding_body, texts, dim=dim, model=body.model,
                     encoding_format=body.encoding_format)
    if len(texts) > _INLINE_TEXTS or sum(map(len, texts)) > _INLINE_CHARS:
        content = await asyncio.to_thread(render)
    else:
        content = render()
    return Response(content, media_type="application/json")


def _embedding_body(texts: list[str], *, dim: int, model: str, encoding_format: str) -> bytes:
    """The JSON of an EmbeddingResponse. A smaller ``dim`` hashes into that many dimensions
    (every token still counts) instead of cutting the full vector short.

    Built one row at a time: a single ``json.dumps`` of a large batch is one C call that holds the
    GIL for tens of milliseconds, and so stalls the event loop even from a worker thread."""
    vectors = hashed_embeddings(texts, dim)
    if encoding_format == "base64":  # what the openai SDK asks for by default
        rows = ('"' + base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") + '"'
                for row in vectors)
    else:
        rows = (json.dumps(row.tolist(), separators=(",", ":")) for row in vectors)
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{row}}}'
                    for i, row in enumerate(rows))
    tokens = sum(math.ceil(len(text) / _CHARS_PER_TOKEN) for text in texts)
    usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens}, separators=(",", ":"))
    return f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},"usage":{usage}}}'.encode()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=_engine(request).model, created=request.app.state.started_at,
                                     owned_by="chatfleet-sim")])


@router.get("/health")
async def health() -> Response:
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(render(request.app.state.sim_metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_engine_sim_app(profile: EngineProfile, *, seed: int = 0,
                          max_num_seqs: int | None = None,
                          embedding_model: str = "chatfleet-sim/hashed-embedding",
                          embedding_dim: int = DEFAULT_DIM) -> FastAPI:
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be at least 1, got {embedding_dim}")
    model = f"chatfleet-sim/{profile.name}"
    sim_metrics = EngineSimMetrics(model_name=model)
    engine = SimulatedEngine(profile, model=model, seed=seed, max_num_seqs=max_num_seqs,
                             metrics=sim_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.aclose()

    app = FastAPI(title="ChatFleet engine-sim", version=__version__, lifespan=lifespan,
                  summary=f"Simulated vLLM engine ({profile.name}); not a language model")
    app.state.engine = engine
    app.state.sim_metrics = sim_metrics
    app.state.embedding_model = embedding_model
    app.state.embedding_dim = embedding_dim
    app.state.started_at = int(time.time())
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=_MAX_BODY_BYTES)
    return app
