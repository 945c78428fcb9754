"""A stream that waits for a slot gets SSE comment heartbeats, then its answer or an error event."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import SIM_MODEL, Server, chat, streamed_tokens, upstream_env
from tests.support.metrics import value


async def test_a_queued_stream_gets_heartbeats_then_its_tokens(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=1,
                                      admission__heartbeat_interval_s=0.2))
    async with httpx.AsyncClient(timeout=30) as client:
        holder = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(300)))
        await gw.wait_for("chatfleet_requests_running", 1)
        comments, tokens, first_comment_at = 0, 0, None
        t0 = time.perf_counter()
        async with client.stream("POST", gw.v1 + "/chat/completions", json=chat(5, stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith(":"):
                    comments += 1
                    first_comment_at = first_comment_at or time.perf_counter() - t0
                    assert tokens == 0, "a heartbeat after the answer started"
                tokens += streamed_tokens(line)
        assert (await holder).status_code == 200
    assert comments >= 3 and tokens == 5
    assert first_comment_at is not None and first_comment_at < 1.0


async def test_a_queue_timeout_after_heartbeats_is_an_in_band_429_error(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=1, admission__max_queue_wait_s=1,
                                      admission__heartbeat_interval_s=0.2))
    async with httpx.AsyncClient(timeout=30) as client:
        holder = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(600)))
        await gw.wait_for("chatfleet_requests_running", 1)
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError) as info:
            async for _ in await sdk.chat.completions.create(
                    model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                    stream=True, extra_body={"ignore_eos": True}):
                pass
        assert "max_queue_wait_s" in info.value.message
        body = info.value.body
        assert body["code"] == 429 and body["type"] == "queue_timeout" and body["retry_after"] >= 1
        await holder
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="queue_timeout") == 1


async def test_a_queue_timeout_before_any_heartbeat_is_a_real_429(engine_sim, gateway) -> None:
    sim: Server = engine_sim()
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=1, admission__max_queue_wait_s=0.3,
                                      admission__heartbeat_interval_s=5))
    async with httpx.AsyncClient(timeout=30) as client:
        holder = asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(300)))
        await gw.wait_for("chatfleet_requests_running", 1)
        r = await client.post(gw.v1 + "/chat/completions", json=chat(5, stream=True))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "queue_timeout"
        await holder
