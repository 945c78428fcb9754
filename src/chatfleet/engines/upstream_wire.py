"""What an OpenAI-compatible upstream may send, read with bounds: stream lines, chunks, error bodies.

The upstream (vLLM) is another process, and what it sends is checked like any input: a stream
chunk that is not the shape OpenAI's API gives (``data: null``, ``{"choices": "abc"}``, a usage
that is no count, ...) is :class:`~chatfleet.engines.base.EngineBadData` (502, counted as an
engine error), never an exception of the parsing code. Nothing is read whole: a stream line
longer than :data:`MAX_LINE_BYTES` ends the request, and of an error body only
:data:`MAX_ERROR_BODY_BYTES` are read.

The chunk models are pydantic's: parsing and checking a chunk in pydantic-core is also faster than
``json.loads`` and dictionary look-ups (about 2.0 against 2.6 µs a token chunk, measured).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatfleet.engines.base import (
    EngineBadData,
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerationDelta,
    Usage,
)

__all__ = ["MAX_ERROR_BODY_BYTES", "MAX_LINE_BYTES", "ContentTemplate", "StreamChunk", "StreamLines",
           "UpstreamStream", "choice_text", "finish_reason", "parse_chunk", "read_at_most"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
"""Longest stream line accepted (1 MiB). A token chunk is a few hundred bytes; a longer line is
an upstream gone wrong, and buffering it whole would let it take the gateway's memory."""
MAX_ERROR_BODY_BYTES = 64 << 10
"""Bytes of an upstream error body read for the message to the client (64 KiB); the rest is not
read (the connection is closed instead of reused)."""

_Count = Annotated[int, Field(strict=True, ge=0, le=1 << 31)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Delta(_Wire):
    content: str | None = None


class _Choice(_Wire):
    delta: _Delta | None = None
    """A chat chunk's new text."""
    text: str | None = None
    """A text completion chunk's new text."""
    finish_reason: Annotated[str, Field(max_length=64)] | None = None


class _Usage(_Wire):
    prompt_tokens: _Count
    completion_tokens: _Count


class StreamChunk(_Wire):
    """One ``data:`` payload of a streamed chat or text completion; an error payload has
    ``error`` (OpenAI, vLLM today) or ``object: "error"`` and ``message`` (older vLLM)."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: dict[str, Any] | str | None = None
    object: str | None = None
    message: str | None = None


def _bad(what: str, exc: ValidationError | None = None) -> EngineBadData:
    detail = ""
    if exc is not None:  # the first problem, located, without the (upstream-chosen) input
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "the payload"
        detail = f": {where}: {first['msg']}"
    return EngineBadData(f"the upstream engine sent bad data: {what}{detail}")


def parse_chunk(data: bytes) -> StreamChunk:
    """The chunk in one ``data:`` payload (JSON); EngineBadData if it is not one,
    EngineUnavailable (503) if the upstream reports an error in it."""
    try:
        chunk = StreamChunk.model_validate_json(data)
    except ValidationError as exc:
        raise _bad("a stream chunk is not an OpenAI chunk", exc) from None
    if chunk.error is not None or chunk.object == "error":
        error = chunk.error
        message = (error.get("message") if isinstance(error, dict) else error) or chunk.message
        raise EngineUnavailable(f"the engine failed the request mid-stream: {str(message)[:512]}"
                                if message else "the engine failed the request mid-stream")
    if chunk.choices is None:
        raise _bad("a stream chunk has no 'choices'")
    return chunk


class ContentTemplate:
    """The bytes of one stream's plain text chunks around their text, learnt from one of them, so
    that the next ones are read without parsing the whole chunk.

    An engine renders every token chunk of a stream alike: the same id, created, model and fields,
    only the text differs. Once a chunk with exactly one choice, text and nothing else that
    matters (no finish reason, usage or error) has been parsed and checked (``parse_chunk``), its
    bytes before and after the text are kept (from the stream's second such chunk: see
    ``learn``); a later payload with that prefix and suffix is the
    same chunk with another text, and only its text is decoded (orjson, a JSON string: escapes,
    UTF-8 and control characters checked as the full parse checks them). Anything else (the role
    chunk, the finish, usage, errors, another shape) returns None from ``text`` and is parsed in
    full. A chunk whose key is ambiguous (two ``"content":"``) teaches nothing.

    The learnt chunk's whole event is kept too (its ``data:`` line as it came, and the blank line
    after it), for ``event_text``: an engine sends an event per read when the gateway keeps up, so
    a read that is exactly one such event with another text gives its text without being split
    into lines first.
    """

    __slots__ = ("_event_head", "_event_tail", "_event_trimmed", "_key", "_passed_first", "_prefix",
                 "_suffix", "_trimmed")

    def __init__(self, *, chat: bool) -> None:
        self._key = b'"content":"' if chat else b'"text":"'
        self._prefix = b""
        self._suffix = b""
        self._trimmed = 0
        """len(prefix) + len(suffix); 0 until a chunk was learnt."""
        self._event_head = b""
        self._event_tail = b""
        self._event_trimmed = 0
        """len(event head) + len(event tail); 0 while no event was learnt."""
        self._passed_first = False
        """A plain text chunk went by unlearnt: the stream's first (see ``learn``)."""

    def event_text(self, piece: bytes) -> str | None:
        """The text of ``piece`` if it is exactly one event of the learnt chunk with another text
        (``data:``, the chunk, ``\\n\\n``), else None.

        The bytes between the learnt head and tail must be one JSON string, which holds no raw
        quote or line end: so ``piece`` is one line and its blank line, read as ``text`` reads
        that line's payload, and nothing else.
        """
        trimmed = self._event_trimmed
        if (not trimmed or len(piece) <= trimmed or not piece.startswith(self._event_head)
                or not piece.endswith(self._event_tail)):
            return None
        try:
            text = orjson.loads(piece[len(self._event_head) - 1:len(piece) - len(self._event_tail) + 1])
        except orjson.JSONDecodeError:
            return None
        return text if text else None

    def text(self, data: bytes) -> str | None:
        """The text of ``data`` if it is the learnt chunk with another text, else None."""
        trimmed = self._trimmed
        if (not trimmed or len(data) <= trimmed or not data.startswith(self._prefix)
                or not data.endswith(self._suffix)):
            return None
        try:  # the text with its quotes: the prefix ends with one, the suffix starts with one
            text = orjson.loads(data[len(self._prefix) - 1:len(data) - len(self._suffix) + 1])
        except orjson.JSONDecodeError:
            return None  # a quote in the middle (another shape) or a bad string: parse in full
        return text if text else None

    def learn(self, data: bytes, chunk: StreamChunk, text: str | None, line: bytes = b"") -> None:
        """Keep ``data``'s bytes around its text, if ``chunk`` (parsed from it) is a plain text
        chunk whose text ``text`` sits in exactly one place a changed text can take; and, if
        ``line`` (the ``data:`` line that carried it) ends with it, the event's too.

        The stream's first plain text chunk is let go by: learning costs a search and a second
        full parse, and the first token is on the way to the client's time to first token, which
        the learnt template cannot shorten (a one-token answer would never use it)."""
        if self._trimmed or not text or chunk.usage is not None or not chunk.choices:
            return
        if len(chunk.choices) != 1 or chunk.choices[0].finish_reason is not None:
            return
        if not self._passed_first:
            self._passed_first = True
            return
        start = data.find(self._key)
        if start < 0 or data.find(self._key, start + 1) >= 0:
            return
        start += len(self._key)
        end = start
        while True:  # the closing quote: one not escaped by an odd run of backslashes
            end = data.find(b'"', end)
            if end < 0:
                return
            run = 0
            while data[end - 1 - run] == 0x5C:  # a backslash
                run += 1
            if run % 2 == 0:
                break
            end += 1
        prefix, suffix = data[:start], data[end:]
        try:  # the text found is the one parsed, and a probe text in its place is read as text
            if orjson.loads(b'"' + data[start:end] + b'"') != text:
                return
            probe = parse_chunk(prefix + b"probe" + suffix)
        except (orjson.JSONDecodeError, EngineError):
            return
        choice = probe.choices[0] if probe.choices and len(probe.choices) == 1 else None
        if choice is None or choice_text(choice) != "probe" or choice.finish_reason is not None:
            return
        self._prefix, self._suffix, self._trimmed = prefix, suffix, len(prefix) + len(suffix)
        if line.startswith(b"data:") and line.endswith(data):
            self._event_head = line[:len(line) - len(data)] + prefix
            self._event_tail = suffix + b"\n\n"
            self._event_trimmed = len(self._event_head) + len(self._event_tail)


def choice_text(choice: _Choice) -> str | None:
    """A choice's text: its delta's content (chat) or its ``text`` (completions)."""
    return choice.delta.content if choice.delta is not None else choice.text


_OPENAI_REASONS: frozenset[str] = frozenset(get_args(FinishReason))


def finish_reason(reason: str) -> FinishReason:
    """An upstream finish reason as one of OpenAI's, whose SDKs type it as a closed enum.

    vLLM's ``abort`` (the engine dropped the request: shutting down, or its own failure) and
    ``error`` are failures, not answers: EngineUnavailable (503, retry) and EngineError (502).
    Any other reason outside OpenAI's set (other servers' ``eos``, ``stop_sequence``, ...) ended
    the answer normally: ``stop``.
    """
    if reason in _OPENAI_REASONS:
        return reason  # type: ignore[return-value]
    if reason == "abort":
        raise EngineUnavailable("the engine aborted the request before it finished "
                                "(finish_reason 'abort'); retry it")
    if reason == "error":
        raise EngineError("the engine failed the request while generating (finish_reason 'error')")
    log.debug("upstream finish_reason %r is not OpenAI's; sent as 'stop'", reason)
    return "stop"


class StreamLines:
    """The lines (without their ends: LF, CRLF or CR, as SSE has them) of a byte stream fed a read
    at a time, never holding more than ``max_line_bytes`` of one line: a longer one is
    EngineBadData. A line without its end yet waits for the next read (an SSE event is complete
    only at its end). Growing the unended line in place keeps a line sent a byte at a time linear."""

    __slots__ = ("_limit", "_pending")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._limit = max_line_bytes
        self._pending = bytearray()

    def feed(self, piece: bytes) -> list[bytes]:
        """The lines that ``piece`` ends (none if it ends none)."""
        if b"\n" not in piece and b"\r" not in piece:
            self._pending += piece
            if len(self._pending) > self._limit:
                raise self._too_long()
            return []
        data = bytes(self._pending) + piece if self._pending else piece
        lines = data.splitlines()
        if data[-1:] not in (b"\n", b"\r"):
            self._pending = bytearray(lines.pop())
        elif self._pending:
            self._pending = bytearray()
        limit = self._limit
        if len(self._pending) > limit or (len(data) > limit
                                         and any(len(line) > limit for line in lines)):
            raise self._too_long()
        return lines

    def _too_long(self) -> EngineBadData:
        return _bad(f"a stream line is longer than {self._limit} bytes")


class UpstreamStream:
    """What one streamed completion's upstream bytes say, read by ``feed`` a read at a time: the
    text of all the chunks that arrived in one read as one delta (``tokens``: how many chunks), so
    that a gateway or client that fell behind relays what is waiting as one event, in order,
    nothing dropped; then the finish reason and usage. Plain text chunks after the first are read
    by their bytes (``ContentTemplate``), the others parsed in full (``parse_chunk``). What is not
    OpenAI's stream raises EngineBadData (or EngineUnavailable for an error payload).

    A synchronous reader, so that the relay's loop is one generator deep: the read, the lines and
    the chunks are one step per read, not a generator each (docs/benchmarks.md, "relay CPU").
    """

    __slots__ = ("_lines", "_template", "done", "failure", "reason", "usage")

    def __init__(self, *, chat: bool, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._lines = StreamLines(max_line_bytes)
        self._template = ContentTemplate(chat=chat)
        self.done = False
        """``data: [DONE]`` was read: the stream is over."""
        self.failure: EngineError | None = None
        """A bad chunk that came after text in the same read: that text is returned first, and
        the caller raises this after relaying it."""
        self.reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, piece: bytes) -> GenerationDelta | None:
        """The text that ``piece`` completes, as one delta (None if it completes no text)."""
        template = self._template
        lines = self._lines
        if not lines._pending and len(piece) <= lines._limit:  # one token's event, the usual read
            text = template.event_text(piece)
            if text is not None:
                return GenerationDelta(text, 1)
        texts: list[str] = []
        for line in lines.feed(piece):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            text = template.text(data)
            if text is not None:
                texts.append(text)
                continue
            if data == b"[DONE]":
                self.done = True
                break
            try:
                chunk = parse_chunk(data)
            except EngineError as exc:
                if not texts:
                    raise
                self.failure = exc
                break
            for choice in chunk.choices or ():
                text = choice_text(choice)
                if text:
                    texts.append(text)
                if choice.finish_reason:
                    self.reason = choice.finish_reason
            if chunk.usage is not None:
                self.usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            template.learn(data, chunk, text, line)
        return GenerationDelta("".join(texts), len(texts)) if texts else None

    def finish(self) -> GenerationDelta:
        """The last delta, once ``done``: the finish reason (OpenAI's) and the usage."""
        if self.reason is None:
            raise EngineBadData("the upstream engine sent bad data: the stream ended ([DONE]) "
                                "without a finish reason")
        return GenerationDelta("", tokens=0, finish_reason=finish_reason(self.reason),
                               usage=self.usage)


async def read_at_most(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a body, and whether there was more (left unread)."""
    body = bytearray()
    async for piece in chunks:
        body += piece
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False
