"""Server-sent events for streamed completions: framing, and the response that carries them.

The response is Starlette's ``StreamingResponse``: one task listens for the client's disconnect
and cancels the stream (closing the payload iterator, which frees the slot and aborts the
engine request), and each event costs one ASGI ``send``. sse-starlette's ``EventSourceResponse``
was used first; it opens an anyio cancel scope around every send, which was about 15% of the
gateway's CPU per relayed token (py-spy, docs/benchmarks.md), and its keep-alive pings are not
needed: queued streams get heartbeats from admission and running ones get tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping

from starlette.responses import StreamingResponse

__all__ = ["SSE_HEADERS", "comment_frame", "data_frame", "sse_response"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No caching, and no buffering in nginx-style proxies: each event must reach the client now."""


def data_frame(payload: str) -> bytes:
    """One ``data:`` event (a payload is a single line of JSON, or ``[DONE]``)."""
    return b"data: " + payload.encode() + b"\n\n"


def comment_frame(text: str) -> bytes:
    """An SSE comment: clients ignore it, proxies and idle timeouts see traffic."""
    return b": " + text.encode() + b"\n\n"


def sse_response(frames: AsyncIterable[bytes], headers: Mapping[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})
