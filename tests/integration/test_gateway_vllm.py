"""The gateway in front of a real vLLM server (CPU build, tiny random-weight Llama): the production
engine path. vLLM's own /metrics is the witness for aborts and for the engine bound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import Server, start_engine_sim, start_gateway
from tests.support.metrics import families, value
from tests.support.vllm_cpu import MAX_MODEL_LEN, VLLMServer

MODEL = "tiny"


def gateway_env(vllm: VLLMServer, **extra: str) -> dict[str, str]:
    return {"CHATFLEET_ENGINE__KIND": "openai", "CHATFLEET_ENGINE__URL": vllm.base_url,
            "CHATFLEET_ENGINE__MODEL": MODEL, **extra}


def test_streamed_and_whole_answers_through_the_gateway(vllm_server: VLLMServer, gateway) -> None:
    gw: Server = gateway(gateway_env(vllm_server))
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=12, extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = client.completions.create(model=MODEL, prompt="def f(", max_tokens=8,
                                     extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 8
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_requests_total", outcome="ok") == 3
    assert value(metrics, "chatfleet_completion_tokens_total") == 32


def test_a_prompt_over_vllms_context_is_a_400_with_vllms_reason(vllm_server: VLLMServer, gateway) -> None:
    gw: Server = gateway(gateway_env(vllm_server))
    r = httpx.post(gw.v1 + "/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]})
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"]["message"].lower()


async def test_a_disconnect_aborts_the_request_inside_vllm(vllm_server: VLLMServer, gateway) -> None:
    """vLLM 0.32 does not count client aborts in vllm:request_success_total{finished_reason="abort"}
    (checked: not even for a client that disconnects from vLLM directly). What it does show: the
    request leaves its running batch and generation stops short of max_tokens. vLLM takes most of
    both cores while it generates and its API process can stall for seconds while the engine goes
    on generating, so the answer asked for is long (about 8 s here) and the bound is loose."""
    max_tokens = MAX_MODEL_LEN - 48
    gw: Server = gateway(gateway_env(vllm_server))
    generated_before = vllm_server.metric("vllm:generation_tokens_total")
    finished_before = vllm_server.metric("vllm:request_success_total")
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", gw.v1 + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True}) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 5:
                    break
        cut_at = time.monotonic()
    while vllm_server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() - cut_at < 6.0, "vLLM kept running the request after the disconnect"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    # vLLM publishes token counts with the next step's stats: one more tiny request flushes them.
    async with httpx.AsyncClient(timeout=60) as client:
        await client.post(vllm_server.base_url + "/completions",
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    generated = vllm_server.metric("vllm:generation_tokens_total") - generated_before
    assert 5 <= generated < 0.9 * max_tokens, f"vLLM generated {generated} of {max_tokens} tokens"
    # Only the flushing request finished; the cut one was dropped, not completed (for any reason).
    assert vllm_server.metric("vllm:request_success_total") - finished_before == 1
    assert value(gw.metrics(), "chatfleet_requests_running") == 0
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="client_disconnected") == 1


async def _queue_seconds_in_vllm(vllm: VLLMServer, url: str, requests: int, max_tokens: int) -> float:
    """Send ``requests`` answers at once to ``url``; return the seconds they spent waiting in
    vLLM's own queue (vllm:request_queue_time_seconds, recorded per request as it finishes)."""
    queued_before = vllm.metric("vllm:request_queue_time_seconds_sum")
    counted_before = vllm.metric("vllm:request_queue_time_seconds_count")
    async with httpx.AsyncClient(timeout=120) as client:
        async def one() -> int:
            r = await client.post(url + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens, "ignore_eos": True})
            return r.json()["usage"]["completion_tokens"]
        assert await asyncio.gather(*(one() for _ in range(requests))) == [max_tokens] * requests
    deadline = time.monotonic() + 10
    while vllm.metric("vllm:request_queue_time_seconds_count") - counted_before < requests:
        assert time.monotonic() < deadline, "vLLM did not record the finished requests"
        await asyncio.sleep(0.1)
    return vllm.metric("vllm:request_queue_time_seconds_sum") - queued_before


async def test_engine_slots_bound_what_vllm_runs(vllm_server: VLLMServer, gateway) -> None:
    """vLLM here runs at most 4 at once and queues the rest; the gateway lets 2 through, so nothing
    should wait inside vLLM. The witness is vLLM's per-request queue time, not its running gauge,
    which vLLM publishes late and which a sampler starved of CPU by vLLM reads rarely. The same
    8 requests sent straight to vLLM show the witness can see queueing."""
    direct = await _queue_seconds_in_vllm(vllm_server, vllm_server.base_url, requests=8, max_tokens=160)
    gw: Server = gateway(gateway_env(vllm_server, CHATFLEET_ADMISSION__ENGINE_SLOTS="2"))
    gated = await _queue_seconds_in_vllm(vllm_server, gw.v1, requests=8, max_tokens=160)
    assert direct > 1.0, f"8 requests on 4 vLLM seats queued only {direct:.2f} s in all"
    assert gated < 0.05 * direct, f"behind 2 gateway slots, requests still queued {gated:.2f} s in vLLM"
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="ok") == 8


def test_readyz_is_false_until_vllm_lists_the_model(vllm_env: tuple[Path, Path], tmp_path: Path) -> None:
    """Started beside a vLLM that is still loading, the gateway is alive but not ready; it turns
    ready within one health interval (1 s here) of vLLM listing the model, never before."""
    python, model_dir = vllm_env
    vllm = VLLMServer(python, model_dir, log_path=tmp_path / "vllm.log").start(wait=False)
    gw = None
    try:
        gw = start_gateway(gateway_env(vllm, CHATFLEET_ENGINE__HEALTH_INTERVAL_S="1"), wait_ready=False)
        not_ready_polls, listed_at = 0, None
        while (status := httpx.get(gw.url + "/readyz", timeout=5).status_code) != 200:
            assert status == 503
            not_ready_polls += 1
            if listed_at is None and _lists_model(vllm):
                listed_at = time.monotonic()
            assert vllm.returncode is None, vllm.log_tail()
            assert listed_at is None or time.monotonic() - listed_at < 2.0, "vLLM lists it; still 503"
            time.sleep(0.1)
        assert _lists_model(vllm), "the gateway was ready before vLLM listed the model"
        assert not_ready_polls > 50, "the gateway was ready before vLLM could have loaded"
    finally:
        if gw is not None:
            gw.proc.terminate()
        vllm.terminate()


def _lists_model(vllm: VLLMServer) -> bool:
    try:
        r = httpx.get(vllm.base_url + "/models", timeout=2)
    except httpx.TransportError:
        return False
    return r.status_code == 200 and any(m["id"] == MODEL for m in r.json()["data"])


def test_every_vllm_family_and_label_engine_sim_exports_exists_in_real_vllm(vllm_server: VLLMServer) -> None:
    sim = start_engine_sim()
    try:
        ours = families(httpx.get(sim.url + "/metrics", timeout=5).text)
    finally:
        sim.proc.terminate()
    theirs = families(vllm_server.metrics_text())
    assert ours, "engine-sim exported nothing"
    for name, labels in ours.items():
        assert name in theirs, f"{name} is not a real vLLM metric"
        assert labels <= theirs[name], f"{name}: labels {labels - theirs[name]} are not in vLLM's"
