"""EagerBodyRequest and ``started``: a request's body leaves in the caller's step; a write that
must wait finishes later as a task would run it, cancellation and errors included."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from chatfleet.engines.eager_body import EagerBodyRequest, started


async def test_a_coroutine_that_does_not_wait_is_done_before_started_returns() -> None:
    done: list[str] = []

    async def write() -> None:
        done.append("written")

    rest = started(write())
    assert done == ["written"]
    await rest  # nothing left to do
    assert done == ["written"]


async def test_a_coroutine_that_waits_finishes_in_a_task_once_its_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    gate = loop.create_future()
    done: list[object] = []

    async def write() -> None:
        done.append("first part")
        done.append(await gate)
        await asyncio.sleep(0)  # a bare yield too
        done.append("end")

    task = loop.create_task(started(write()))
    assert done == ["first part"]
    await asyncio.sleep(0.01)
    assert done == ["first part"] and not task.done()
    gate.set_result("drained")
    await asyncio.wait_for(task, 1)
    assert done == ["first part", "drained", "end"]


async def test_cancelling_the_task_cancels_the_wait_inside_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    gate = loop.create_future()
    seen: list[str] = []

    async def write() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled where it waited")
            raise

    task = loop.create_task(started(write()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled where it waited"] and gate.cancelled()


async def test_an_error_in_the_first_step_is_raised_by_the_rest() -> None:
    async def write() -> None:
        raise OSError("broken pipe")

    rest = started(write())
    with pytest.raises(OSError, match="broken pipe"):
        await rest


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def read_request(peer: socket.socket, body: bytes) -> bytes:
    received = b""
    while not received.endswith(body):
        received += peer.recv(65536)
    return received


async def test_a_post_is_on_the_wire_before_the_loop_runs_anything_else() -> None:
    """On a kept-alive connection, a POST's head and body are in the server's socket as soon as
    the step that sent it ends, before any other callback of the loop runs (aiohttp's own task,
    on Python 3.11, would write them one pass later)."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/completions"
    body = b'{"model":"m","prompt":"' + b"x" * 2000 + b'"}'
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(request_class=EagerBodyRequest) as session:
        first = loop.create_task(session.post(url, data=body))
        peer, _ = await loop.run_in_executor(None, listener.accept)
        peer.settimeout(5)
        await loop.run_in_executor(None, read_request, peer, body)
        peer.sendall(RESPONSE)
        assert await (await asyncio.wait_for(first, 5)).read() == b"ok"

        second = loop.create_task(session.post(url, data=body))
        await asyncio.sleep(0)  # the task's first step runs; nothing scheduled by it has yet
        peer.setblocking(False)
        received = peer.recv(65536)  # BlockingIOError if the request is not out yet
        peer.settimeout(5)
        if not received.endswith(body):
            received += read_request(peer, body)
        assert received.startswith(b"POST /v1/completions HTTP/1.1\r\n") and received.endswith(body)
        peer.sendall(RESPONSE)
        assert await (await asyncio.wait_for(second, 5)).read() == b"ok"
        peer.close()
    listener.close()
