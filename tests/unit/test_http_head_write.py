"""HeadHolder: a response's head is written with the first bytes of its body, or alone one loop
pass later; nothing is reordered, lost or written after the client left."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatfleet.http_head_write import HeadHolder

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class _Transport:
    """Records each write (one write is one segment for the client) and the close."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name == "sockname" else default


class _Cycle:
    """What uvicorn's RequestResponseCycle holds that the holder uses."""

    def __init__(self, transport: _Transport) -> None:
        self.transport: Any = transport
        self.response_started = False

    def start(self) -> None:  # uvicorn's send of http.response.start: mark, then write the head
        self.response_started = True
        self.transport.write(HEAD)


def _held(transport: _Transport) -> _Cycle:
    cycle = _Cycle(transport)
    cycle.transport = HeadHolder(transport, cycle)  # type: ignore[arg-type]
    return cycle


async def test_head_and_first_body_leave_in_one_write_and_later_writes_go_straight() -> None:
    transport = _Transport()
    cycle = _held(transport)
    cycle.start()
    assert transport.writes == []
    cycle.transport.write(b"5\r\nfirst\r\n")
    assert transport.writes == [HEAD + b"5\r\nfirst\r\n"]
    assert cycle.transport is transport  # the token writes of a stream pass through nothing
    cycle.transport.write(b"6\r\nsecond\r\n")
    await asyncio.sleep(0)  # the cancelled flush of the head writes nothing more
    assert transport.writes == [HEAD + b"5\r\nfirst\r\n", b"6\r\nsecond\r\n"]


async def test_a_head_alone_goes_out_when_the_loop_next_runs_its_callbacks() -> None:
    transport = _Transport()
    cycle = _held(transport)
    cycle.start()
    await asyncio.sleep(0)
    assert transport.writes == [HEAD]
    cycle.transport.write(b"5\r\nlater\r\n")
    assert transport.writes == [HEAD, b"5\r\nlater\r\n"]


async def test_100_continue_is_written_at_once_before_the_head() -> None:
    transport = _Transport()
    cycle = _held(transport)
    cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.start()
    cycle.transport.write(b"0\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", HEAD + b"0\r\n\r\n"]


async def test_close_writes_a_held_head_first() -> None:
    transport = _Transport()
    cycle = _held(transport)
    cycle.start()
    cycle.transport.close()
    assert transport.writes == [HEAD] and transport.closed
    await asyncio.sleep(0)
    assert transport.writes == [HEAD]


@pytest.mark.parametrize("then_write", [True, False])
async def test_nothing_is_written_once_the_client_has_left(then_write: bool) -> None:
    transport = _Transport()
    cycle = _held(transport)
    cycle.start()
    transport.close()  # the connection was lost
    if then_write:
        cycle.transport.write(b"0\r\n\r\n")
    await asyncio.sleep(0)
    assert transport.writes == []
    assert cycle.transport.is_closing()


async def test_other_transport_calls_reach_the_transport() -> None:
    cycle = _held(_Transport())
    assert cycle.transport.get_extra_info("sockname") == ("127.0.0.1", 8000)
