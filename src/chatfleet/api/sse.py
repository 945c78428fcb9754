"""Server-sent events for streamed completions: framing, and the response that carries them.

The response is Starlette's ``StreamingResponse``: one task listens for the client's disconnect
and cancels the stream (closing the payload iterator, which frees the slot and aborts the
engine request), and each event costs one ASGI ``send``. sse-starlette's ``EventSourceResponse``
was used first; it opens an anyio cancel scope around every send, which was about 15% of the
gateway's CPU per relayed token (py-spy, docs/benchmarks.md), and its keep-alive pings are not
needed: queued streams get heartbeats from admission and running ones get tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import aclosing

from starlette.responses import StreamingResponse

from chatfleet.serving.completions import HEARTBEAT

__all__ = ["SSE_HEADERS", "comment_frame", "crlf_data_frame", "data_frame", "relay_frames",
           "sse_response"]

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


def sse_response(frames: AsyncIterable[bytes], headers: Mapping[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})


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
