"""Server-sent events for streamed completions: framing, and the response that carries them.

``CompletionStream`` relays a completion: a task of its own per stream, which the request's task
cancels when the client disconnects (closing the payload iterator, which frees the slot and aborts
the engine request), and one call of the server's ``send`` per event. sse-starlette's
``EventSourceResponse`` was used first; it opens an anyio cancel scope around every send, which
was about 15% of the gateway's CPU per relayed token (py-spy, docs/benchmarks.md), and its
keep-alive pings are not needed: queued streams get heartbeats from admission and running ones
get tokens.

A client that stops reading (its socket buffers full) would block ``send`` forever and hold its
engine slot; ``send_timeout_s`` ends such a stream (see ``_StallTimer``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from chatfleet.serving.openai_format import LastPayloads, Payloads

__all__ = ["BODY_SEND_EXTENSION", "SSE_HEADERS", "CompletionStream", "DirectBodySend", "comment_frame",
           "crlf_data_frame", "data_frame", "frames_of", "sse_response"]

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


def sse_response(frames: AsyncIterable[bytes], headers: Mapping[str, str] | None = None
                 ) -> StreamingResponse:
    """An event stream of ready frames (the engine simulator's streams, one-event answers);
    completions stream through ``CompletionStream``."""
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})


def frames_of(payloads: Payloads) -> bytes:
    """``data:`` events of one payload, or of several yielded together."""
    return data_frame(payloads) if isinstance(payloads, str) else b"".join(map(data_frame, payloads))


BODY_SEND_EXTENSION = "chatfleet.body_send"
"""The ASGI scope extension that holds the server's own ``send`` (``DirectBodySend``)."""


class DirectBodySend:
    """Outermost ASGI wrapper: puts the server's ``send`` in the scope's extensions, so that a
    completion stream sends its body events past the middlewares' send wrappers.

    Every middleware here (Starlette's error and exception middlewares, the access log) wraps
    ``send`` to look at ``http.response.start`` and at the final body event only; a token event
    passing through them cost four coroutine calls, about 7% of the gateway's py-spy samples per
    relayed token. ``CompletionStream`` still sends the start and the final event through them, so what
    they see is unchanged. A middleware that needs every body event (compression) must not be
    added to completion routes.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            extensions = scope.get("extensions")
            if extensions is None:
                scope["extensions"] = extensions = {}
            extensions[BODY_SEND_EXTENSION] = send
        await self.app(scope, receive, send)


class _StallTimer:
    """Cancels a stream's task when one ``send`` has waited ``timeout_s`` for the client to read.

    uvicorn's ``send`` waits while the connection's write buffer is full, that is while the client
    reads nothing. ``asyncio.timeout`` around every send would bound that too, but it costs about
    9 µs a send (a timer armed and cancelled per token, measured), 5% of the gateway's CPU per
    relayed token; this keeps one timer per stream that fires every ``timeout_s`` and checks the
    send in progress, whose start the stream notes in ``sending_since``.
    """

    __slots__ = ("_loop", "_task", "_timer", "sending_since", "stalled", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.sending_since: float | None = None
        self.stalled = False

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` on a stall from now on (the timer starts with the first call)."""
        self._task = task
        if self._timer is None:
            self._timer = self._loop.call_later(self.timeout_s, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.sending_since
        if since is not None and now - since >= self.timeout_s:
            self.stalled = True
            assert self._task is not None
            self._task.cancel()
            return
        self._timer = self._loop.call_at((since if since is not None else now) + self.timeout_s,
                                         self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_HEARTBEAT_FRAME = comment_frame("queued: waiting for an engine slot")


class CompletionStream(Response):
    """The event stream of a streamed completion: ``first`` and ``rest`` as
    ``CompletionService.open_stream`` returns them, each payload framed by ``frame``, a queued
    stream's heartbeats as comments, payloads yielded together in one write, the last ones
    (``LastPayloads``) as the final body event, after which ``rest`` runs to its end (counting the
    request as answered: a client that leaves before the final event is sent is counted as gone).
    ``rest`` is closed on any exit, which frees the request's slot and aborts its engine request.

    This is the relay's hot path, one event per token per client, so a token costs one framing and
    one call of the server's ``send``: the stream runs in a task of its own, as Starlette's
    ``StreamingResponse`` does (resuming it per token does not pass through every middleware's
    frame), and body events go to the server's send directly (``DirectBodySend``). The head and the
    first payload go out from the request's own task, before the stream's task starts: a new task
    runs only after everything else ready on the loop, which under load is a whole engine step's
    worth of other streams' tokens, and that wait would add to this stream's time to first token.
    The request's task then waits for the client to disconnect, and cancels the stream. A client
    that has read nothing for ``send_timeout_s`` is given up on: the stream is closed and the
    connection too, without finishing the response.
    """

    media_type = "text/event-stream"

    def __init__(self, first: Payloads | object, rest: AsyncIterator[Payloads | object], *,
                 frame: Callable[[str], bytes] = data_frame, headers: Mapping[str, str] | None = None,
                 send_timeout_s: float) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})
        self._first = first
        self._rest = rest
        self._frame = frame
        self.send_timeout_s = send_timeout_s
        self._delivered = False
        """The final body event was sent: the answer is the client's."""

    def _framed(self, item: Payloads | object) -> bytes:
        if isinstance(item, str):
            return self._frame(item)
        if isinstance(item, tuple):
            return b"".join(map(self._frame, item))
        return _HEARTBEAT_FRAME

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_send = (scope.get("extensions") or {}).get(BODY_SEND_EXTENSION, send)
        timer = _StallTimer(self.send_timeout_s)
        owner = asyncio.current_task()
        assert owner is not None
        opened = not isinstance(self._first, LastPayloads)
        if opened:
            timer.watch(owner)
            try:
                await self._open(send, body_send, timer)
            except BaseException:
                timer.stop()
                if timer.stalled and owner.uncancel() == 0:
                    await self._close_stalled()
                    return
                await self._rest.aclose()  # type: ignore[attr-defined]
                raise
        stream = asyncio.create_task(self._stream(send, body_send, timer, opened=opened))
        timer.watch(stream)
        listening = True

        def stream_ended(_: asyncio.Task[None]) -> None:
            if listening:  # it ended (delivered, failed or stalled) before the server said so
                owner.cancel()

        # This task listens for the disconnect itself: one task and one ``asyncio.wait`` fewer a
        # request than a watcher task beside the stream.
        stream.add_done_callback(stream_ended)
        try:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except asyncio.CancelledError:
                if not stream.done() or owner.uncancel() > 0:  # cancelled from outside
                    raise
            finally:
                listening = False
            if not stream.done() and self._delivered:  # the server reports the end as a
                await asyncio.wait((stream,))          # disconnect: let the stream finish
        finally:
            timer.stop()
            if not stream.done():
                stream.cancel()
                await asyncio.wait((stream,))
        if stream.cancelled():
            if timer.stalled:
                await self._close_stalled()
            else:  # a stream cancelled before its first step never entered its ``aclosing``
                await self._rest.aclose()  # type: ignore[attr-defined]
            return
        stream.result()  # an exception of the stream is the request's

    async def _close_stalled(self) -> None:
        await self._rest.aclose()  # type: ignore[attr-defined]
        log.warning("closed a stream whose client read nothing for %.0f s "
                    "(server.send_timeout_s); its engine slot is free", self.send_timeout_s)

    async def _open(self, send: Send, body_send: Send, timer: _StallTimer) -> None:
        """The response's head and its first payload (not the last one)."""
        timer.sending_since = asyncio.get_running_loop().time()
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await body_send({"type": "http.response.body", "body": self._framed(self._first),
                         "more_body": True})
        timer.sending_since = None

    async def _stream(self, send: Send, body_send: Send, timer: _StallTimer, *, opened: bool) -> None:
        """The rest of the response: after ``_open`` if ``opened``, else all of it."""
        loop = asyncio.get_running_loop()
        rest, framed = self._rest, self._framed
        async with aclosing(rest):  # type: ignore[type-var]
            if opened:  # the first payload is out (``_open``): the next ones, each as it comes
                while True:
                    try:
                        item = await anext(rest)
                    except StopAsyncIteration:
                        timer.sending_since = loop.time()
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        return
                    if isinstance(item, LastPayloads):
                        break
                    timer.sending_since = loop.time()
                    await body_send({"type": "http.response.body", "body": framed(item),
                                     "more_body": True})
                    timer.sending_since = None
            else:  # the last payloads came first: the head, and they end the body
                item = self._first
                timer.sending_since = loop.time()
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
            timer.sending_since = loop.time()
            await send({"type": "http.response.body", "body": framed(item), "more_body": False})
            timer.sending_since = None
            self._delivered = True
            try:  # the stream's own end, once its answer is delivered: its outcome is "ok" now
                await anext(rest)
            except StopAsyncIteration:
                return
            raise RuntimeError("a completion stream yielded after its last payloads")
