"""A misbehaving OpenAI-compatible upstream: a real HTTP server that sends scripted bad data.

Run as ``python -m tests.support.bad_upstream --port N`` (``start_bad_upstream`` does it). It serves
``/v1/models`` (model :data:`MODEL`), ``/health``, ``/metrics`` (a vLLM-style exposition, counted and
slow, so that concurrent scrapes overlap) and ``/stats`` (``{"scrapes": n}``). A completion
(``/v1/chat/completions`` or ``/v1/completions``, always streamed, as the gateway asks) follows the
script named in its prompt text (the last message, so a RAG prompt that holds the question
works too), as ``script=<name>`` with optional ``:<arg>``:

- ``bad:<payload>`` / ``bad_after:<payload>``: the bad payload (:data:`BAD_PAYLOADS`) as the first
  event, or after a role chunk and a token;
- ``finish:<reason>``: a token, then that finish reason;
- ``error_body:<bytes>``: HTTP 500 with a body of that many bytes, sent in 1 MiB pieces;
- ``long_line:<bytes>``: HTTP 200, then one line of that many bytes without an end;
- ``stall:<ms>``: a token, then nothing for that many milliseconds, then the rest of the answer;
- ``head_stall:<ms>``: nothing at all (not even the response's head) for that many milliseconds,
  then a normal answer;
- ``escaped``: tokens whose JSON has escapes (quotes, a tab, ``\\u00e9``, ``\\/``): :data:`ESCAPED`;
- ``bad_templated``: two tokens, then a chunk alike but for a raw control character in its text;
- no script: a short normal answer.
Nothing big is held in memory here: bodies are generated piece by piece.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import Server
from tests.support.procs import ManagedProcess, free_port

MODEL = "bad-upstream"
SCRAPE_S = 0.2
"""How long one /metrics scrape takes here: concurrent scrapes of the gateway overlap."""
_PIECE = 1 << 20

BAD_PAYLOADS: dict[str, str] = {
    "null": "null",
    "number": "42",
    "string": '"abc"',
    "list": "[1, 2]",
    "choices_string": '{"choices": "abc"}',
    "choice_null": '{"choices": [null]}',
    "delta_string": '{"choices": [{"index": 0, "delta": "abc"}]}',
    "content_number": '{"choices": [{"index": 0, "delta": {"content": 5}}]}',
    "usage_text": '{"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": 1}}',
    "usage_missing": '{"choices": [], "usage": {"prompt_tokens": 3}}',
    "no_choices": '{"id": "x", "object": "chat.completion.chunk"}',
    "not_json": "{not json",
    "finish_number": '{"choices": [{"index": 0, "delta": {}, "finish_reason": 7}]}',
}
"""Payloads (the text after ``data: ``) that are no OpenAI stream chunk."""

ESCAPED = ["hello", ' "quoted"', "\ttab", " caf\u00e9", " a/b", " back\\slash", " 日本"]
"""The texts of the ``escaped`` script's tokens, each sent JSON-escaped as ``json.dumps`` does
(non-ASCII as ``\\u`` escapes), the "/" as ``\\/``."""

_SCRIPT = re.compile(r"script=([a-z_]+)(?::([A-Za-z0-9_]+))?")
_scrapes = 0


def _chunk(chat: bool, *, text: str | None = None, role: bool = False,
           finish: str | None = None) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return json.dumps({"id": "x", "object": "chunk", "created": 0, "model": MODEL,
                       "choices": [choice]})


def _event(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def _normal(chat: bool, reason: str = "stop") -> list[bytes]:
    usage = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 3,
                                                            "completion_tokens": 2}})
    return [_event(_chunk(chat, text="hello")), _event(_chunk(chat, text=" world")),
            _event(_chunk(chat, finish=reason)), _event(usage), _event("[DONE]")]


async def _filler(size: int, end: bytes = b"") -> AsyncIterator[bytes]:
    piece = b"x" * _PIECE
    while size > 0:
        yield piece[:size]
        size -= _PIECE
        await asyncio.sleep(0)
    if end:
        yield end


async def _events(frames: list[bytes], stall_after: int = -1, stall_s: float = 0.0
                  ) -> AsyncIterator[bytes]:
    for i, frame in enumerate(frames):
        yield frame
        if i == stall_after:
            await asyncio.sleep(stall_s)


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        return str(body["messages"][-1].get("content", ""))
    return str(body.get("prompt", ""))


async def completions(request: Request) -> Response:
    body = await request.json()
    chat = "messages" in body
    match = _SCRIPT.search(_prompt(body))
    name, arg = (match.group(1), match.group(2) or "") if match else ("", "")
    sse = {"media_type": "text/event-stream"}
    if name in ("bad", "bad_after"):
        frames = [_event(_chunk(chat, role=True)), _event(_chunk(chat, text="hello"))] \
            if name == "bad_after" else []
        frames.append(_event(BAD_PAYLOADS[arg]))
        frames.append(_event("[DONE]"))
        return StreamingResponse(_events(frames), **sse)
    if name == "stall":
        return StreamingResponse(_events(_normal(chat), 0, int(arg) / 1000), **sse)
    if name == "head_stall":
        await asyncio.sleep(int(arg) / 1000)
        return StreamingResponse(_events(_normal(chat)), **sse)
    if name == "escaped":
        texts = [_event(_chunk(chat, text=t).replace("a/b", "a\\/b")) for t in ESCAPED]
        return StreamingResponse(_events([*texts, *_normal(chat)[2:]]), **sse)
    if name == "bad_templated":
        good = [_event(_chunk(chat, text=t)) for t in ("hello", " world")]
        bad = _event(_chunk(chat, text="bad\x01")).replace(b"\\u0001", b"\x01")
        return StreamingResponse(_events([*good, bad, *_normal(chat)[2:]]), **sse)
    if name == "finish":
        return StreamingResponse(_events(_normal(chat, arg)), **sse)
    if name == "error_body":
        return StreamingResponse(_filler(int(arg)), status_code=500, media_type="text/plain")
    if name == "long_line":
        return StreamingResponse(_filler(int(arg)), **sse)
    return StreamingResponse(_events(_normal(chat)), **sse)


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                     "created": 0, "owned_by": "test"}]})


async def metrics(request: Request) -> Response:
    global _scrapes
    _scrapes += 1
    await asyncio.sleep(SCRAPE_S)
    return PlainTextResponse('# TYPE vllm:num_requests_running gauge\n'
                             f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n')


async def stats(request: Request) -> Response:
    return JSONResponse({"scrapes": _scrapes})


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/v1/chat/completions", completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models), Route("/metrics", metrics), Route("/stats", stats),
    Route("/health", health)])


def start_bad_upstream() -> Server:
    """The server in a subprocess on a free port, ready."""
    port = free_port()
    proc = ManagedProcess([sys.executable, "-m", "tests.support.bad_upstream", "--port", str(port)],
                          name="bad-upstream").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    return Server(proc, port)


def bad_upstream_env(upstream: Server, **extra: str) -> dict[str, str]:
    """Gateway environment pointing at the bad upstream."""
    return {"CHATFLEET_ENGINE__KIND": "openai", "CHATFLEET_ENGINE__URL": upstream.v1,
            "CHATFLEET_ENGINE__MODEL": MODEL, **extra}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
