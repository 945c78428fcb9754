"""Server-sent events for streamed completions: framing, and the response that carries them.

The response is Starlette's ``StreamingResponse``: one task listens for the client's disconnect
and cancels the stream (closing the payload iterator, which frees the slot and aborts the
engine request), and each event costs one ASGI ``send``. sse-starlette's ``EventSourceResponse``
was used first; it opens an anyio cancel scope around every send, which was about 15% of the
gateway's CPU per relayed token (py-spy, docs/benchmarks.md), and its keep-alive pings are not
needed: queued streams get heartbeats from admission and running ones get tokens.

A client that stops reading (its socket buffers full) would block ``send`` forever and hold its
engine slot; ``send_timeout_s`` ends such a stream (see ``StalledSendGuard``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Send

from chatfleet.serving.completions import HEARTBEAT

__all__ = ["SSE_HEADERS", "GuardedStreamingResponse", "StalledSendGuard", "comment_frame",
           "crlf_data_frame", "data_frame", "relay_frames", "sse_response"]

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No caching, and no buffering in nginx-style proxies: each event must reach the client now."""


def data_frame(payload: str) -> bytes:
    """One ``data:`` event (a payload is a single line of JSON, or ``[DONE]``)."""
    return b"data: " + payload.encode() + b"\n\n"


def crlf_data_frame(payload: str) -> bytes:
    """Chatchat's framing (sse-starlette 1.8 ends lines with CRLF); its clients split on it."""
    return b"data: " + payload.encode() + b"\r\n\r\n"


def comment_frame(text: str) -> bytes:
    """An SSE comment: clients ignore it, proxies and idle timeouts see traffic."""
    return b": " + text.encode() + b"\n\n"


class StalledSendGuard:
    """Cancels the sending task when one ``send`` has waited ``timeout_s`` for the client to read.

    uvicorn's ``send`` waits while the connection's write buffer is full, that is while the client
    reads nothing. ``asyncio.timeout`` around every send would bound that too, but it costs about
    9 µs a send (a timer armed and cancelled per token, measured), 5% of the gateway's CPU per
    relayed token; this guard keeps one timer per stream that fires every ``timeout_s`` and checks
    the send in progress (about 0.3 µs a send).
    """

    def __init__(self, send: Send, timeout_s: float) -> None:
        self._send = send
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._sending_since: float | None = None
        self.stalled = False
        self._timer = self._loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self._sending_since
        if since is not None and now - since >= self.timeout_s:
            self.stalled = True
            assert self._task is not None
            self._task.cancel()
            return
        self._timer = self._loop.call_at((since if since is not None else now) + self.timeout_s,
                                         self._check)

    async def send(self, message: Message) -> None:
        self._sending_since = self._loop.time()
        await self._send(message)
        self._sending_since = None

    def stop(self) -> None:
        self._timer.cancel()


class GuardedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that gives up on a client which has read nothing for
    ``send_timeout_s``: it closes the frames (freeing the request's slot and aborting its engine
    request) and returns without finishing the response, so uvicorn closes the connection."""

    def __init__(self, content: AsyncIterable[bytes], *, send_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        guard = StalledSendGuard(send, self.send_timeout_s)
        try:
            await super().stream_response(guard.send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not guard.stalled or task is None or task.uncancel() > 0:
                raise
            log.warning("closed a stream whose client read nothing for %.0f s "
                        "(server.send_timeout_s); its engine slot is free", self.send_timeout_s)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            guard.stop()


def sse_response(frames: AsyncIterable[bytes], headers: Mapping[str, str] | None = None, *,
                 send_timeout_s: float | None = None) -> StreamingResponse:
    """An event stream; with ``send_timeout_s``, one that a client reading nothing cannot hold."""
    merged = {**SSE_HEADERS, **(headers or {})}
    if send_timeout_s is None:
        return StreamingResponse(frames, media_type="text/event-stream", headers=merged)
    return GuardedStreamingResponse(frames, send_timeout_s=send_timeout_s,
                                    media_type="text/event-stream", headers=merged)


_HEARTBEAT_FRAME = comment_frame("queued: waiting for an engine slot")


async def relay_frames(first: str | object, rest: AsyncIterator[str | object],
                       frame: Callable[[str], bytes] = data_frame) -> AsyncIterator[bytes]:
    """The frames of a completion stream (``CompletionService.open_stream``'s first payload and
    the rest): each payload framed by ``frame``, a queued stream's heartbeats as comments. Closes
    ``rest`` on any exit, which frees the request's slot."""
    async with aclosing(rest):
        item = first
        while True:
            yield _HEARTBEAT_FRAME if item is HEARTBEAT else frame(item)  # type: ignore[arg-type]
            try:
                item = await anext(rest)
            except StopAsyncIteration:
                return
