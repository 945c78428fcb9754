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
from json.encoder import encode_basestring
from typing import Any, Protocol

from chatfleet.engines.base import GenerationDelta, Usage

__all__ = ["Answer", "ChunkFormatter", "LastPayloads", "PayloadRenderer", "Payloads", "StreamFormatter",
           "collect", "completion_response", "error_body", "last_payloads", "new_request_id",
           "stream_payloads"]

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
        # encode_basestring: the text as JSON, as ``_dumps`` writes it, without its dispatch.
        if self._chat:
            return (self._head + '"delta":{"content":' + encode_basestring(text) +
                    '},"logprobs":null,"finish_reason":null}]' + self._tail)
        return (self._head + '"text":' + encode_basestring(text) +
                ',"logprobs":null,"finish_reason":null}]' + self._tail)

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


class LastPayloads(tuple[str, ...]):
    """The payloads that end a stream (finish, usage and ``[DONE]``; or an error and ``[DONE]``):
    the response sends them together as its final body event, one write with the end of the
    chunked body, and the stream yields nothing after them."""

    __slots__ = ()


def last_payloads(*payloads: str | None) -> LastPayloads:
    return LastPayloads(payload for payload in payloads if payload is not None)


Payloads = str | tuple[str, ...]
"""What a stream yields: one payload, or several to send as one event write (a tuple; the last
ones a ``LastPayloads``)."""


class PayloadRenderer:
    """Turns one stream's deltas into its payloads: the opening payload (the role chunk) together
    with the first text, a payload per delta with text (counting its tokens with ``on_token``), and
    the last payloads; fills ``answer`` with the finish reason and usage. A plain method per delta,
    so that a relay loop need not be one generator deeper for it."""

    __slots__ = ("_fmt", "_on_token", "_opened", "answer")

    def __init__(self, fmt: ChunkFormatter, on_token: OnToken | None = None,
                 answer: Answer | None = None) -> None:
        self._fmt = fmt
        self._on_token = on_token
        self._opened = False
        self.answer = answer if answer is not None else Answer()

    def payload(self, delta: GenerationDelta) -> Payloads | None:
        payload: Payloads | None = None
        if delta.text:
            if self._on_token is not None:
                self._on_token(delta.tokens)
            payload = self._fmt.token(delta.text)
        if not self._opened:
            self._opened = True
            first = self._fmt.first()
            if first is not None:
                payload = first if payload is None else (first, payload)
        if delta.finish_reason is not None:
            self.answer.finish_reason, self.answer.usage = delta.finish_reason, delta.usage
        return payload

    def last(self) -> LastPayloads:
        fmt, answer = self._fmt, self.answer
        return last_payloads(fmt.finish(answer.finish_reason), fmt.usage(answer.usage), fmt.done())


async def stream_payloads(fmt: ChunkFormatter, deltas: AsyncIterator[GenerationDelta]
                          ) -> AsyncIterator[Payloads]:
    """The SSE payloads of a streamed answer (``PayloadRenderer``), ending with ``fmt.done()``.

    Nothing is yielded before the engine's first delta, so a caller that primes this iterator
    sees an engine's refusal as an exception before any byte of the response is sent. The opening
    payload and the first text go out together, and so do the last payloads (``LastPayloads``): a
    stream costs its tokens' writes and one more.
    """
    render = PayloadRenderer(fmt)
    async with aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            payload = render.payload(delta)
            if payload is not None:
                yield payload
    yield render.last()
