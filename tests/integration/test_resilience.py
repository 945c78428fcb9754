"""Overload, client disconnects, a dying upstream and SIGTERM, on real processes.

Each test states the figure it asserts; all traffic goes to 127.0.0.1 and is bounded in time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import signal
import socket
import statistics
import time
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest

from tests.conftest import SIM_MODEL, Server, chat, poll_until, streamed_tokens, upstream_env
from tests.support.metrics import value
from tests.support.procs import wait_until

TOKEN = b'"content":" '
"""How each streamed token's chunk starts (engine-sim's token text begins with a space)."""

LOAD_S = 60
CLIENTS = 240
RAMP_S = 1.0
"""Overload clients start over the first second, as load tests ramp: 240 requests on 240 fresh
connections within one millisecond is a herd whose last 429 waits for 239 accepts and parses
(about 140 ms on one core, measured); docs/benchmarks.md reports it apart."""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_ten_times_overload_for_sixty_seconds(engine_sim, gateway) -> None:
    """240 clients against a bound of 24 (8 slots + 16 queued) for 60 s: every request completes or
    gets 429 + Retry-After within 50 ms (p99; the client shares 2 cores with both servers), nothing
    accepted is lost, the gateway's memory stays flat, and within 5 s of the load stopping a request
    is served at normal latency (1.5x the latency before the storm, plus 20 ms).
    Rejected clients come back after a jittered fraction of Retry-After, as SDK retry loops do.
    The load comes from aiohttp: httpx spends several ms of CPU per request at this concurrency
    and would starve the servers it is measuring."""
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=8, admission__max_queue=16))
    url = gw.v1 + "/chat/completions"
    ok = rejected = 0
    reject_latency: list[float] = []
    lost: list[str] = []
    rss: list[float] = []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def timed(stream: bool) -> tuple[int, float, str, str]:
            t0 = time.perf_counter()
            async with session.post(url, json=chat(20, stream=stream)) as r:
                body = await r.text()
                return r.status, time.perf_counter() - t0, body, r.headers.get("Retry-After", "")

        normal = statistics.median([(await timed(False))[1] for _ in range(5)])
        stop_at = time.monotonic() + LOAD_S

        async def hammer(i: int) -> None:
            nonlocal ok, rejected
            stream = i % 2 == 0
            await asyncio.sleep(i * RAMP_S / CLIENTS)
            while time.monotonic() < stop_at:
                status, elapsed, body, retry_after = await timed(stream)
                if status == 200:
                    if stream:
                        tokens = streamed_tokens(body)
                        complete = body.rstrip().endswith("data: [DONE]")
                    else:
                        tokens, complete = json.loads(body)["usage"]["completion_tokens"], True
                    if tokens != 20 or not complete:
                        lost.append(f"answer ended after {tokens} tokens")
                    ok += 1
                    continue
                assert status == 429, (status, body)
                assert int(retry_after) >= 1
                reject_latency.append(elapsed)
                rejected += 1
                await asyncio.sleep(random.uniform(0.25, 1.0) * int(retry_after))

        async def watch_memory() -> None:
            while time.monotonic() < stop_at:
                rss.append(rss_mib(gw.proc.pid))
                await asyncio.sleep(1)

        gc.disable()  # the load generator's own collection pauses are not the server's latency
        try:
            await asyncio.gather(watch_memory(), *(hammer(i) for i in range(CLIENTS)))
        finally:
            gc.enable()
        probes = 0
        while True:
            status, latency, _, _ = await timed(False)
            probes += 1
            assert status == 200, status
            if latency <= normal * 1.5 + 0.020:
                break
        recovered_after = time.monotonic() - stop_at

    assert not lost, lost[:5]
    assert ok > 600 and rejected > 2000, (ok, rejected)
    p50, p99 = statistics.median(reject_latency), statistics.quantiles(reject_latency, n=100)[98]
    figures = (f"{ok} ok, {rejected} rejected, 429 p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms "
               f"max {max(reject_latency) * 1000:.0f} ms, RSS {min(rss):.0f}-{max(rss):.0f} MiB, normal "
               f"latency ({latency * 1000:.0f} ms, before {normal * 1000:.0f} ms) {recovered_after:.2f} s "
               f"after the load stopped")
    print("overload:", figures)
    # Measured on 2 shared cores: p99 8-10 ms, max 15-27 ms.
    assert p99 <= 0.050, f"429 p99 over 50 ms: {figures}"
    assert max(rss[5:]) - min(rss[5:]) < 25, f"gateway RSS moved: {figures}"
    assert recovered_after <= 5.0, figures
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_requests_total", outcome="ok") == ok + 5 + probes
    assert value(metrics, "chatfleet_requests_total", outcome="queue_full") == rejected
    assert value(metrics, "chatfleet_requests_total", outcome="engine_error") == 0


async def test_client_disconnect_mid_stream_frees_the_slot_and_aborts_the_engine(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=4))
    async with httpx.AsyncClient(timeout=30) as client, httpx.AsyncClient(timeout=5) as probe:
        async def gateway_idle() -> bool:
            return value((await probe.get(gw.url + "/metrics")).text, "chatfleet_requests_running") == 0

        async def engine_aborted() -> bool:
            text = (await probe.get(sim.url + "/metrics")).text
            return (value(text, "vllm:request_success_total", finished_reason="abort") == 1
                    and value(text, "vllm:num_requests_running") == 0)

        async with client.stream("POST", gw.v1 + "/chat/completions",
                                 json=chat(2000, stream=True)) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += '"content":" ' in line
                if seen == 5:
                    break
            assert value((await probe.get(gw.url + "/metrics")).text, "chatfleet_requests_running") == 1
        freed = await poll_until(gateway_idle, timeout=1.0)
        await poll_until(engine_aborted, timeout=1.0)
    assert freed <= 0.100, f"slot freed after {freed * 1000:.0f} ms"
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="client_disconnected") == 1


async def test_client_disconnect_while_queued_leaves_the_queue(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=1))
    async with httpx.AsyncClient(timeout=30) as client, httpx.AsyncClient(timeout=5) as probe:
        holder = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(400)))
        await gw.wait_for("chatfleet_requests_running", 1)
        for stream in (False, True):
            waiter = asyncio.create_task(client.post(gw.v1 + "/chat/completions",
                                                     json=chat(5, stream=stream)))

            async def depth(n: int) -> bool:
                return value((await probe.get(gw.url + "/metrics")).text, "chatfleet_queue_depth") == n
            await poll_until(lambda: depth(1), timeout=2)
            waiter.cancel()
            left = await poll_until(lambda: depth(0), timeout=1)
            assert left <= 0.100
        assert (await holder).status_code == 200
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="client_disconnected") == 2


async def test_an_engine_killed_mid_stream_then_restarted(engine_sim, gateway) -> None:
    """The engine dies 10 tokens into a stream: the client gets a clean error event (the openai SDK
    raises APIError naming the engine), /readyz turns 503 within one readiness probe period
    (``engine.health_interval_s``, 0.5 s here), new requests get 503 + Retry-After; the engine
    comes back on its port and the same gateway process is ready and serving again within one
    more period, without a restart."""
    probe_period = 0.5
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, engine__health_interval_s=probe_period))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=30)
    stream = await client.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True})
    received = 0
    t_kill = None
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received += 1
            if received == 10:
                sim.proc.popen.kill()
                t_kill = time.perf_counter()
    assert t_kill is not None
    error_after = time.perf_counter() - t_kill
    assert "engine" in str(info.value.message)
    unready_after = time.perf_counter() - t_kill + await poll_until(lambda: _ready_is(gw, 503), timeout=3,
                                                                    interval=0.02)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(gw.v1 + "/chat/completions", json=chat(5))
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "not reachable" in r.json()["error"]["message"]

        t_restart = time.perf_counter()
        engine_sim(max_num_seqs=64, port=sim.port)
        engine_up = time.perf_counter() - t_restart
        ready_after = await poll_until(lambda: _ready_is(gw, 200), timeout=3, interval=0.02)
        served = await http.post(gw.v1 + "/chat/completions", json=chat(5))
    print(f"engine kill: error event after {error_after * 1000:.0f} ms, /readyz 503 after "
          f"{unready_after * 1000:.0f} ms; restarted engine up in {engine_up:.1f} s, gateway ready "
          f"{ready_after * 1000:.0f} ms later (probe period {probe_period * 1000:.0f} ms)")
    assert error_after < 1.0
    assert unready_after <= probe_period + 0.2
    assert ready_after <= probe_period + 0.2
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 5
    assert gw.proc.returncode is None  # the same gateway process throughout


async def _ready_is(gw: Server, status: int) -> bool:
    async with httpx.AsyncClient(timeout=2) as c:
        return (await c.get(gw.url + "/readyz")).status_code == status


async def test_sigterm_under_load_finishes_every_running_and_queued_request(engine_sim, gateway) -> None:
    """The scale-down path: SIGTERM while 16 streams run and 8 more requests (4 streamed, 4 whole)
    wait in the queue. /readyz turns 503 and new arrivals get 503 + Retry-After at once, every one
    of the 24 accepted requests is answered completely ([DONE] after 300 tokens), and the process
    exits 0."""
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=16, server__drain_timeout_s=60))
    streamed: list[tuple[int, str]] = []
    whole: list[int] = []

    async with httpx.AsyncClient(timeout=60) as client:
        async def stream_one() -> None:
            async with client.stream("POST", gw.v1 + "/chat/completions",
                                     json=chat(300, stream=True)) as r:
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                streamed.append((streamed_tokens("\n".join(lines)), lines[-1]))

        async def whole_one() -> None:
            r = await client.post(gw.v1 + "/chat/completions", json=chat(300))
            whole.append(r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.status_code)

        tasks = [asyncio.create_task(stream_one()) for _ in range(20)]
        await poll_until(lambda: _running(gw, 16), timeout=5, interval=0.05)
        tasks += [asyncio.create_task(whole_one()) for _ in range(4)]
        await gw.wait_for("chatfleet_queue_depth", 8, priority="interactive")
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        ready = await client.get(gw.url + "/readyz")
        late = await client.post(gw.v1 + "/chat/completions", json=chat(5))
        await asyncio.gather(*tasks)

    wait_until(lambda: gw.proc.returncode is not None, timeout=15, message="gateway exit")
    print(f"SIGTERM under load: {len(streamed)} streams and {len(whole)} whole answers finished "
          f"while draining; exit code {gw.proc.returncode}")
    assert ready.status_code == 503 and "draining" in ready.json()["reason"]
    assert late.status_code == 503 and int(late.headers["Retry-After"]) >= 1
    assert late.json()["error"]["type"] == "draining"
    assert streamed == [(300, "data: [DONE]")] * 20
    assert whole == [300] * 4
    assert gw.proc.returncode == 0, gw.proc.log_tail()


async def _running(gw: Server, n: int) -> bool:
    async with httpx.AsyncClient(timeout=2) as c:
        return value((await c.get(gw.url + "/metrics")).text, "chatfleet_requests_running") == n


def _read_rest(sock: socket.socket, timeout_s: float) -> bytes:
    """What the socket still delivers, until the gateway closes the connection."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


async def test_a_client_slow_to_read_is_not_an_engine_that_sent_nothing(engine_sim, gateway) -> None:
    """The engine read timeout counts only time spent waiting for the engine: a client that reads
    nothing for longer than it (but less than the send timeout), while the gateway's sends wait on
    full buffers and the engine's next bytes wait in the gateway, still gets its whole answer."""
    sim: Server = engine_sim(max_num_seqs=8)
    gw: Server = gateway(upstream_env(sim, engine__read_timeout_s=1, server__send_timeout_s=10,
                                      server__send_buffer_bytes=65536))
    tokens = 1500
    body = json.dumps(chat(tokens, stream=True)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    try:
        sock.sendall(request)
        await gw.wait_for("chatfleet_requests_running", 1)
        relayed, still_since, started = -1.0, time.perf_counter(), time.perf_counter()
        while time.perf_counter() - still_since < 0.5:  # until the gateway relays nothing more
            assert time.perf_counter() - started < 30, "the gateway never stalled"
            count = value(gw.metrics(), "chatfleet_itl_seconds_count")
            if count != relayed:
                relayed, still_since = count, time.perf_counter()
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)  # twice the engine read timeout more, still reading nothing
        received = _read_rest(sock, 30)
    finally:
        sock.close()
    assert b"data: [DONE]" in received and b'"error"' not in received, received[-300:]
    assert b'"finish_reason":"length"' in received  # the answer ran to max_tokens
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_requests_total", outcome="ok") == 1
    assert value(metrics, "chatfleet_completion_tokens_total") == tokens


async def test_a_client_that_reads_nothing_loses_its_slot_after_the_send_timeout(engine_sim, gateway) -> None:
    """A streaming client that never reads (slowloris-style, its receive buffer 4 KiB) fills the
    connection's buffers (a 64 KiB send buffer, ``server.send_buffer_bytes``) within a few hundred
    tokens of a 4,000-token answer. From then on the gateway relays nothing (its token count stops);
    ``server.send_timeout_s`` (2 s here) later it closes the connection, aborts the engine request
    and gives its only slot to the request queued behind it."""
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=1, server__send_timeout_s=2,
                                      server__send_buffer_bytes=65536))
    body = json.dumps(chat(4000, stream=True)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    samples: list[tuple[float, float, float]] = []  # (time, tokens relayed, disconnected outcomes)
    try:
        sock.sendall(request)
        await gw.wait_for("chatfleet_requests_running", 1)
        async with httpx.AsyncClient(timeout=30) as client:
            queued = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(5)))
            while not samples or samples[-1][2] == 0:
                text = (await client.get(gw.url + "/metrics")).text
                samples.append((time.perf_counter(), value(text, "chatfleet_itl_seconds_count"),
                                value(text, "chatfleet_requests_total", outcome="client_disconnected")))
                assert samples[-1][0] - samples[0][0] < 30, "the stalled stream kept its slot"
                await asyncio.sleep(0.05)
            answered = await queued
        received = _read_rest(sock, 5)
    finally:
        sock.close()
    freed_at = samples[-1][0]
    relayed_before_free = samples[-2][1]
    stalled_at = next(t for t, tokens, _ in samples if tokens == relayed_before_free)
    held = freed_at - stalled_at
    print(f"slow reader: relayed {received.count(TOKEN)} tokens ({len(received) // 1024} KiB), "
          f"then nothing; slot freed {held:.2f} s after the last token (send timeout 2 s)")
    assert 2 - 0.1 <= held <= 2 + 0.6, f"slot freed {held:.2f} s after the stream stalled"
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 5
    assert b"data: [DONE]" not in received  # the stalled stream was cut, not completed
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_requests_total", outcome="client_disconnected") == 1
    assert value(metrics, "chatfleet_requests_total", outcome="ok") == 1
    assert value(sim.metrics(), "vllm:request_success_total", finished_reason="abort") == 1
