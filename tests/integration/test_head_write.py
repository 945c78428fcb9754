"""A real gateway sends an answer's head together with the first bytes of its body: a client
waiting on its socket reads them in one read (uvicorn alone writes the head, then the body, and
the waiting client wakes with the head only)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Server, chat, gateway_before_engine_sim


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    yield from gateway_before_engine_sim()


def first_read(gw: Server, request: bytes) -> bytes:
    """What one read returns once the gateway answers ``request`` (the client waits in it)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        return sock.recv(65536)


def test_a_streamed_chat_arrives_with_its_first_event_in_the_heads_read(gw: Server) -> None:
    body = json.dumps(chat(4, stream=True)).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
    for _ in range(5):  # every time, not by luck
        received = first_read(gw, request)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"data: {" in rest and b'"role":"assistant"' in rest


def test_a_json_answer_arrives_whole_in_one_read(gw: Server) -> None:
    for _ in range(5):
        received = first_read(gw, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        assert len(body) == length
        assert json.loads(body)["data"][0]["id"] == "chatfleet-sim/tiny-cpu"
