"""The completion stream response: what reaches the server's send, through which path, and when."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatfleet.api.sse import BODY_SEND_EXTENSION, CompletionStream
from chatfleet.serving.completions import HEARTBEAT
from chatfleet.serving.openai_format import LastPayloads


class _Server:
    """Records what the response sends, by path: through the middlewares (``send``) or straight
    to the server (``body_send``)."""

    def __init__(self, disconnect: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self._disconnect = disconnect
        self._complete = asyncio.Event()
        self.scope = {"type": "http", "extensions": {BODY_SEND_EXTENSION: self.body_send}}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(("send", message))
        if message.get("more_body") is False:
            self._complete.set()

    async def body_send(self, message: dict[str, Any]) -> None:
        self.sent.append(("body_send", message))

    async def receive(self) -> dict[str, Any]:
        """A client that stays; as uvicorn does, a disconnect once the response is complete."""
        if not self._disconnect:
            await self._complete.wait()
        return {"type": "http.disconnect"}


async def test_each_item_is_one_send_and_the_last_payloads_end_the_body_in_one_event() -> None:
    closed = []

    async def rest() -> AsyncIterator[Any]:
        try:
            yield HEARTBEAT
            yield "b"
            yield LastPayloads(("stop", "[DONE]"))
        finally:
            closed.append(True)

    server = _Server()
    response = CompletionStream(("role", "a"), rest(), send_timeout_s=30)
    await response(server.scope, server.receive, server.send)
    assert [(path, m["type"], m.get("body"), m.get("more_body")) for path, m in server.sent] == [
        ("send", "http.response.start", None, None),
        ("body_send", "http.response.body", b"data: role\n\ndata: a\n\n", True),
        ("body_send", "http.response.body", b": queued: waiting for an engine slot\n\n", True),
        ("body_send", "http.response.body", b"data: b\n\n", True),
        ("send", "http.response.body", b"data: stop\n\ndata: [DONE]\n\n", False),
    ]
    assert closed == [True]


async def test_the_stream_finishes_after_its_last_payloads_are_sent() -> None:
    """The stream's own end (where it counts the request as answered) comes after the final
    event was handed to the server, never before: a client gone by then was not answered."""
    server = _Server()
    finished_after: list[int] = []

    async def rest() -> AsyncIterator[Any]:
        yield LastPayloads(("[DONE]",))
        finished_after.append(len(server.sent))

    await CompletionStream("a", rest(), send_timeout_s=30)(server.scope, server.receive, server.send)
    assert finished_after == [3]  # start, "a", and the final event

    async def goes_on() -> AsyncIterator[Any]:
        yield "more"

    other = _Server()
    with pytest.raises(RuntimeError, match="after its last payloads"):
        await CompletionStream(LastPayloads(("[DONE]",)), goes_on(), send_timeout_s=30)(
            other.scope, other.receive, other.send)


async def test_the_end_reported_as_a_disconnect_does_not_cut_the_stream_short() -> None:
    """uvicorn's ``receive`` answers a disconnect once the response is complete: the stream's
    own end, which may still await, runs all the same."""
    finished = []

    async def rest() -> AsyncIterator[Any]:
        yield LastPayloads(("[DONE]",))
        await asyncio.sleep(0.05)
        finished.append(True)

    server = _Server()
    await CompletionStream("a", rest(), send_timeout_s=30)(server.scope, server.receive, server.send)
    assert finished == [True]


async def test_a_disconnect_closes_the_stream_and_ends_nothing() -> None:
    """Even a client gone before the stream's first step: the payloads, started as
    ``CompletionService.open_stream`` starts them, are closed (their ``finally`` frees the slot)."""
    closed = []

    async def rest() -> AsyncIterator[Any]:
        try:
            yield "a"
            await asyncio.Event().wait()  # the engine's next token never comes
            yield "never"
        finally:
            closed.append(True)

    server = _Server(disconnect=True)
    events = rest()
    first = await anext(events)
    await CompletionStream(first, events, send_timeout_s=30)(server.scope, server.receive, server.send)
    assert closed == [True]
    assert not any(m.get("more_body") is False for _, m in server.sent)


async def test_without_the_extension_every_event_goes_through_the_middlewares() -> None:
    async def rest() -> AsyncIterator[Any]:
        yield LastPayloads(("[DONE]",))

    server = _Server()
    server.scope = {"type": "http"}
    await CompletionStream("a", rest(), send_timeout_s=30)(server.scope, server.receive, server.send)
    assert [path for path, _ in server.sent] == ["send", "send", "send"]


async def test_a_failing_stream_fails_the_request_while_the_client_stays() -> None:
    async def rest() -> AsyncIterator[Any]:
        yield "b"
        raise ValueError("the engine broke")

    server = _Server()
    with pytest.raises(ValueError, match="the engine broke"):
        await asyncio.wait_for(CompletionStream("a", rest(), send_timeout_s=30)(
            server.scope, server.receive, server.send), 5)


async def test_a_cancel_from_outside_closes_the_stream_and_propagates() -> None:
    closed = []
    started = asyncio.Event()

    async def rest() -> AsyncIterator[Any]:
        try:
            started.set()
            await asyncio.Event().wait()
            yield "never"
        finally:
            closed.append(True)

    server = _Server()
    request = asyncio.create_task(CompletionStream("a", rest(), send_timeout_s=30)(
        server.scope, server.receive, server.send))
    await asyncio.wait_for(started.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert closed == [True]


async def test_the_head_and_first_payload_go_out_before_the_stream_task_starts() -> None:
    """The first token is sent by the request's own task: a task started for it would wait
    behind everything else ready on the loop (under load, other streams' tokens)."""
    server = _Server()
    sent_by: list[asyncio.Task[Any] | None] = []
    request_task: list[asyncio.Task[Any] | None] = []

    async def body_send(message: dict[str, Any]) -> None:
        sent_by.append(asyncio.current_task())
        server.sent.append(("body_send", message))

    async def rest() -> AsyncIterator[Any]:
        yield "b"
        yield LastPayloads(("[DONE]",))

    async def request() -> None:
        request_task.append(asyncio.current_task())
        await CompletionStream("a", rest(), send_timeout_s=30)(server.scope, server.receive, server.send)

    server.scope["extensions"][BODY_SEND_EXTENSION] = body_send
    await asyncio.wait_for(request(), 5)
    assert [m.get("body") for _, m in server.sent] == [None, b"data: a\n\n", b"data: b\n\n",
                                                       b"data: [DONE]\n\n"]
    assert sent_by[0] is request_task[0]  # "a": the request's task
    assert sent_by[1] is not request_task[0]  # "b": the stream's


@pytest.mark.parametrize("stalled_send", [2, 3], ids=["on-the-first-payload", "on-a-later-one"])
async def test_a_client_that_reads_nothing_is_given_up_on_after_the_send_timeout(stalled_send: int) -> None:
    """Whether the send that never returns is the first payload's (from the request's task) or a
    later one (from the stream's): the stream is closed, its slot freed, the response unfinished."""
    closed = []

    async def rest() -> AsyncIterator[Any]:
        try:
            yield "a"
            yield "b"
        finally:
            closed.append(True)

    server = _Server()

    async def stuck(message: dict[str, Any]) -> None:
        server.sent.append(("body_send", message))
        if len(server.sent) >= stalled_send:
            await asyncio.Event().wait()  # the client's buffers are full

    server.scope["extensions"][BODY_SEND_EXTENSION] = stuck
    events = rest()
    first = await anext(events)  # started, as ``CompletionService.open_stream`` starts it
    await asyncio.wait_for(CompletionStream(first, events, send_timeout_s=0.05)(
        server.scope, server.receive, server.send), 5)
    assert closed == [True]
    assert [m.get("body") for _, m in server.sent] == [None, b"data: a\n\n", b"data: b\n\n"][:stalled_send]
