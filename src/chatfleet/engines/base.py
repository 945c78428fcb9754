"""The Engine protocol: what the serving layer needs from anything that generates tokens.

Serving code takes an ``Engine``, never a concrete class. Two implementations exist:
``openai_compat.OpenAICompatEngine`` (vLLM or any OpenAI-compatible upstream) and
``simulated.SimulatedEngine`` (the engine model, in-process). A request is a ``GenerationRequest``;
the answer is an async stream of ``GenerationDelta`` values, the last one carrying the finish reason
and the token usage. Closing the stream early (``aclose``, or cancelling the task that iterates it)
aborts the request in the engine at once.

Exceptions (all ``EngineError``)::

    EngineError                  base; carries an HTTP-like status and a message for the client
    ├── EngineRequestRejected    the engine refused this request (4xx upstream: bad parameter, too long)
    ├── EngineUnavailable        the engine cannot serve now (connection refused, died mid-stream, 5xx)
    └── EngineBadData            the engine answered, but not in its protocol (502)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineBadData",
    "EngineError",
    "EngineRequestRejected",
    "EngineUnavailable",
    "FinishReason",
    "GenerationDelta",
    "GenerationRequest",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
"""OpenAI's finish reasons, the only ones a client sees: its SDKs type the field as this closed set."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """One generation, engine-neutral.

    Exactly one of ``messages`` (chat) and ``prompt`` (text completion) is set. ``sampling`` holds
    the OpenAI sampling fields the client sent (temperature, top_p, stop, seed, ...) and is passed to
    an upstream as is; the simulated engine reads only ``seed`` and ``ignore_eos`` from it.
    """

    request_id: str
    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of messages and prompt")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class GenerationDelta:
    """A piece of output: ``text`` holds ``tokens`` new tokens (0 for a final, text-less delta).

    The last delta of a stream has ``finish_reason`` set and, when the engine reports it, ``usage``.
    Nothing changes a delta once built, but it is not a frozen dataclass: one is built per read on
    the relay's hot path, and a frozen one's ``__init__`` sets each field through
    ``object.__setattr__`` (0.6 against 0.2 µs).
    """

    text: str
    tokens: int = 1
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class EngineError(Exception):
    """An engine failed a request; ``status`` is the HTTP status the client should see."""

    status: int = 502
    error_type: str = "engine_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class EngineRequestRejected(EngineError):
    """The engine refused the request as given (a client error: fix the request, do not retry)."""

    status = 400
    error_type = "invalid_request_error"


class EngineUnavailable(EngineError):
    """The engine cannot answer now (down, restarting, overloaded, died mid-stream). Retry later."""

    status = 503
    error_type = "engine_unavailable"


class EngineBadData(EngineError):
    """The engine sent what its protocol does not allow (a stream chunk of the wrong shape, a line
    over the bound): a 502 before the answer starts, an error event after; not worth a retry."""


@runtime_checkable
class Engine(Protocol):
    """Anything that turns a GenerationRequest into a stream of deltas."""

    @property
    def kind(self) -> str:
        """Short name for logs and build_info: 'simulated' or 'openai'."""
        ...

    async def start(self) -> None:
        """Open connections or start the engine loop. Called once, from the app's lifespan."""
        ...

    async def aclose(self) -> None:
        """Release everything start() acquired."""
        ...

    async def list_models(self) -> list[str]:
        """Model ids the engine serves now. Raises EngineUnavailable when it cannot be reached."""
        ...

    async def metrics_exposition(self) -> tuple[bytes, str] | None:
        """The engine's own Prometheus exposition and its content type, or None if it has none.

        The gateway serves it on /metrics/engine, so Prometheus can scrape the engine (vLLM's
        names) through the gateway's port while the engine port stays closed to the network.
        Raises EngineUnavailable when the engine cannot be reached.
        """
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the answer. Raises EngineError (before or during the stream) on failure.

        Closing the iterator before the end aborts the request in the engine.
        """
        ...
