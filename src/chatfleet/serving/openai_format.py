"""OpenAI response shapes: chat.completion(.chunk) and text_completion, built as JSON text.

Stream chunks are on the hot path (one per token), so each stream pre-renders the constant part of
its chunk once and only the token text is JSON-escaped per chunk. The shapes follow OpenAI's API
(and vLLM's, which copies it): a first chunk carrying the assistant role, one chunk per token,
a final chunk with ``finish_reason``, then with ``stream_options.include_usage`` a chunk with empty
``choices`` and the usage, and ``usage: null`` on every other chunk.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from chatfleet.engines.base import GenerationDelta, Usage

__all__ = ["Answer", "ChunkFormatter", "StreamFormatter", "collect", "completion_response",
           "error_body", "new_request_id", "stream_payloads"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def new_request_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def error_body(message: str, *, error_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def completion_response(*, request_id: str, model: str, chat: bool, text: str,
                        finish_reason: str | None, usage: Usage | None,
                        created: int | None = None) -> dict[str, Any]:
    """The non-streamed answer: ``chat.completion`` or ``text_completion``."""
    created = int(time.time()) if created is None else created
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": _usage(usage)}


class ChunkFormatter(Protocol):
    """Renders the payloads of one streamed answer (JSON text, without the SSE framing).

    ``StreamFormatter`` renders OpenAI's chunks; ``serving/chatchat_format.py`` renders Chatchat's.
    A method returning None sends nothing.
    """

    def first(self) -> str | None: ...

    def token(self, text: str) -> str: ...

    def finish(self, finish_reason: str) -> str | None: ...

    def usage(self, usage: Usage | None) -> str | None: ...

    def done(self) -> str | None: ...

    def error(self, message: str, *, error_type: str, code: int,
              retry_after_s: float | None = None) -> str: ...


class StreamFormatter:
    """Renders the chunks of one streamed OpenAI answer as JSON strings (without the SSE framing)."""

    __slots__ = ("_chat", "_head", "_include_usage", "_tail", "created", "model", "request_id")

    def __init__(self, *, request_id: str, model: str, chat: bool, include_usage: bool,
                 created: int | None = None) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._chat = chat
        self._include_usage = include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'{{"id":{_dumps(request_id)},"object":"{obj}","created":{self.created},'
                      f'"model":{_dumps(model)},"choices":[{{"index":0,')
        self._tail = ',"usage":null}' if include_usage else "}"

    def first(self) -> str | None:
        """The role chunk that opens a chat stream (None for text completions)."""
        if not self._chat:
            return None
        return (self._head + '"delta":{"role":"assistant","content":""},"logprobs":null,'
                '"finish_reason":null}]' + self._tail)

    def token(self, text: str) -> str:
        if self._chat:
            return (self._head + '"delta":{"content":' + _dumps(text) +
                    '},"logprobs":null,"finish_reason":null}]' + self._tail)
        return self._head + '"text":' + _dumps(text) + ',"logprobs":null,"finish_reason":null}]' + self._tail

    def finish(self, finish_reason: str) -> str:
        body = '"delta":{}' if self._chat else '"text":""'
        return (self._head + body + ',"logprobs":null,"finish_reason":' + _dumps(finish_reason) +
                "}]" + self._tail)

    def usage(self, usage: Usage | None) -> str | None:
        """The trailing usage chunk, when the client asked for it."""
        if not self._include_usage:
            return None
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        return _dumps({"id": self.request_id, "object": obj, "created": self.created,
                       "model": self.model, "choices": [], "usage": _usage(usage)})

    def done(self) -> str:
        return "[DONE]"

    def error(self, message: str, *, error_type: str, code: int,
              retry_after_s: float | None = None) -> str:
        body = error_body(message, error_type=error_type, code=code)
        if retry_after_s is not None:
            body["error"]["retry_after"] = retry_after_s
        return _dumps(body)


OnToken = Callable[[int], None]


@dataclass(slots=True)
class Answer:
    """What a stream of deltas added up to."""

    text: str = ""
    finish_reason: str = "stop"
    usage: Usage | None = None


async def collect(deltas: AsyncIterator[GenerationDelta], on_token: OnToken | None = None) -> Answer:
    """Read a whole generation (closing the stream on any exit), for non-streamed answers."""
    answer, parts = Answer(), []
    async with aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            if delta.text:
                parts.append(delta.text)
                if on_token is not None:
                    on_token(delta.tokens)
            if delta.finish_reason is not None:
                answer.finish_reason, answer.usage = delta.finish_reason, delta.usage
    answer.text = "".join(parts)
    return answer


async def stream_payloads(fmt: ChunkFormatter, deltas: AsyncIterator[GenerationDelta],
                          on_token: OnToken | None = None, answer: Answer | None = None) -> AsyncIterator[str]:
    """The SSE payloads of a streamed answer, ending with ``fmt.done()``; fills ``answer`` if given.

    Nothing is yielded before the engine's first delta, so a caller that primes this iterator
    sees an engine's refusal as an exception before any byte of the response is sent.
    """
    answer = answer if answer is not None else Answer()
    opened = False
    async with aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            if not opened:
                opened = True
                first = fmt.first()
                if first is not None:
                    yield first
            if delta.text:
                if on_token is not None:
                    on_token(delta.tokens)
                yield fmt.token(delta.text)
            if delta.finish_reason is not None:
                answer.finish_reason, answer.usage = delta.finish_reason, delta.usage
    for payload in (fmt.finish(answer.finish_reason), fmt.usage(answer.usage), fmt.done()):
        if payload is not None:
            yield payload
