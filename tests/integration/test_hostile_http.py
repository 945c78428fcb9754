"""Hostile HTTP at the connection level (issue 12, points 1, 5 and 15): huge or countless headers,
connections that send nothing, half a head or half a body, against a real gateway on raw sockets.

The gateway runs with 1 s timeouts (``server.keep_alive_s``, ``header_timeout_s``,
``body_timeout_s``) and the default head limits (64 KiB, 100 headers), in front of engine-sim.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, chat, gateway_before_engine_sim

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    yield from gateway_before_engine_sim(server__keep_alive_s=TIMEOUT_S,
                                         server__header_timeout_s=TIMEOUT_S,
                                         server__body_timeout_s=TIMEOUT_S)


def connect(gw: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (10 s at most)."""
    received = b""
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    return received


def send_huge_header(gw: Server, size: int, pause_s: float) -> tuple[float, bytes]:
    """Send a request with one ``size``-byte header, 64 KiB at a time (``pause_s`` between pieces),
    until the gateway answers; (seconds from the first byte to the end of its answer, answer)."""
    sock = connect(gw)
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    t0 = time.perf_counter()
    for start in range(0, len(head), 65536):
        if select.select([sock], [], [], pause_s)[0]:
            break  # answered
        sock.sendall(head[start:start + 65536])
    return time.perf_counter() - t0, read_to_close(sock)


def test_huge_headers_get_431_at_once_and_livez_stays_responsive(gw: Server) -> None:
    """Four clients send a 4 MB header each, two as fast as they can, two in 64 KiB pieces
    10 ms apart; meanwhile /livez keeps answering at once. (httptools alone parsed each to the
    end, by quadratic concatenation, and answered 200.)"""
    answers: list[tuple[float, bytes]] = []
    attackers = [threading.Thread(target=lambda p=pause: answers.append(send_huge_header(gw, 4 << 20, p)))
                 for pause in (0.0, 0.0, 0.01, 0.01)]
    worst = 0.0
    with httpx.Client(timeout=10) as probe:
        probe.get(gw.url + "/livez")
        for attacker in attackers:
            attacker.start()
        while any(a.is_alive() for a in attackers):
            t0 = time.perf_counter()
            assert probe.get(gw.url + "/livez").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
    assert len(answers) == 4
    for seconds, answer in answers:
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
        assert b"\r\nconnection: close\r\n" in answer and answer.endswith(b"at most 65536 bytes.")
        assert seconds < 3
    assert worst < 0.5, f"/livez took {worst:.3f} s"


def test_a_1_mb_header_gets_431_before_the_gateway_reads_it(gw: Server) -> None:
    seconds, answer = send_huge_header(gw, 1 << 20, pause_s=0.05)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert seconds < 2  # 16 pieces 50 ms apart would take 0.8 s: it stopped after the first two


@pytest.mark.parametrize(("count", "status"), [(100, b"200"), (101, b"431")])
def test_more_than_100_headers_get_431(gw: Server, count: int, status: bytes) -> None:
    sock = connect(gw)
    sock.sendall(b"GET /livez HTTP/1.1\r\nConnection: close\r\n"
                 + b"".join(b"X-%d: 1\r\n" % i for i in range(count - 1)) + b"\r\n")
    answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    if status == b"431":
        assert answer.endswith(b"at most 100 headers.")


UPLOAD_HEAD = (b"POST /knowledge_base/upload_docs HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
               b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")


@pytest.mark.parametrize(("sent", "answer"), [
    pytest.param(b"", b"", id="nothing"),
    pytest.param(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Half: a", b"HTTP/1.1 408 ", id="half-a-head"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ", b"HTTP/1.1 408 ", id="half-a-body"),
    pytest.param(UPLOAD_HEAD + b"--b\r\nContent-Disposition: form-data; name=\"files\"; "
                 b"filename=\"a.txt\"\r\n\r\n" + b"x" * 300_000, b"HTTP/1.1 408 ", id="part-of-an-upload"),
])
def test_a_connection_that_stalls_is_closed_after_its_timeout(gw: Server, sent: bytes, answer: bytes) -> None:
    """Nothing at all (closed after keep_alive_s), half a head (header_timeout_s), half a body
    (body_timeout_s; the upload's first 300 KB are more than uvicorn buffers before the app
    takes them, so its reading pauses and resumes on the way)."""
    sock = connect(gw)
    t0 = time.perf_counter()
    sock.sendall(sent)
    received = read_to_close(sock)
    seconds = time.perf_counter() - t0
    assert received.startswith(answer), received[:200]
    assert TIMEOUT_S * 0.9 < seconds < TIMEOUT_S + 3


def test_a_body_that_keeps_coming_slowly_is_not_timed_out(gw: Server) -> None:
    """The body timeout is on pauses, not on the whole body: eight pieces 0.3 s apart."""
    body = json.dumps(chat(2)).encode()
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    step = -(-len(body) // 8)
    for offset in range(0, len(body), step):
        assert not select.select([sock], [], [], 0.3)[0], sock.recv(200)
        sock.sendall(body[offset:offset + step])
    assert read_to_close(sock).startswith(b"HTTP/1.1 200 ")


def test_a_stream_longer_than_every_timeout_is_not_cut(gw: Server) -> None:
    """A request is complete once its body is read: its answer may stream for minutes."""
    t0 = time.perf_counter()
    events = []
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat(700, stream=True),
                      timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert time.perf_counter() - t0 > 2.5 * TIMEOUT_S
    assert events[-1] == "data: [DONE]"
    finish = [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"]]
    assert finish[-1] == "length" and len(finish) >= 700

@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
def test_head_on_probes_answers_like_get_without_a_body(gw: Server, path: str) -> None:
    head = httpx.head(gw.url + path, timeout=10)
    get = httpx.get(gw.url + path, timeout=10)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
