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
from tests.support.vllm_cpu import VLLMServer

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
        "model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "word " * 600}]})
    assert r.status_code == 400, r.text
    assert "context" in r.json()["error"]["message"].lower()


async def test_a_disconnect_aborts_the_request_inside_vllm(vllm_server: VLLMServer, gateway) -> None:
    """vLLM 0.32 does not count client aborts in vllm:request_success_total{finished_reason="abort"}
    (checked: not even for a client that disconnects from vLLM directly). What it does show: the
    request leaves its running batch and generation stops short of max_tokens. vLLM takes most of
    both cores while it generates, so it notices the closed connection late; the bounds allow it."""
    gw: Server = gateway(gateway_env(vllm_server))
    generated_before = vllm_server.metric("vllm:generation_tokens_total")
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", gw.v1 + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000,
                "stream": True, "ignore_eos": True}) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 5:
                    break
        cut_at = time.monotonic()
    while vllm_server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() - cut_at < 3.0, "vLLM kept running the request after the disconnect"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    # vLLM publishes token counts with the next step's stats: one more tiny request flushes them.
    async with httpx.AsyncClient(timeout=60) as client:
        await client.post(vllm_server.base_url + "/completions",
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    generated = vllm_server.metric("vllm:generation_tokens_total") - generated_before
    assert 5 <= generated < 900, f"vLLM generated {generated} of 1000 tokens after the client left"
    assert value(gw.metrics(), "chatfleet_requests_running") == 0
    assert value(gw.metrics(), "chatfleet_requests_total", outcome="client_disconnected") == 1


async def test_engine_slots_bound_what_vllm_runs(vllm_server: VLLMServer, gateway) -> None:
    """vLLM here would run 4 at once; the gateway lets 2 through. Answers are long enough that a
    sampler starved by vLLM's CPU use still sees the engine several times while it is busy."""
    gw: Server = gateway(gateway_env(vllm_server, CHATFLEET_ADMISSION__ENGINE_SLOTS="2"))
    seen: list[float] = []
    async with httpx.AsyncClient(timeout=120) as client:
        async def one() -> int:
            r = await client.post(gw.v1 + "/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 160,
                "ignore_eos": True})
            return r.json()["usage"]["completion_tokens"]

        async def watch(tasks: list[asyncio.Task[int]]) -> None:
            while not all(t.done() for t in tasks):
                text = (await client.get(vllm_server.root_url + "/metrics")).text
                seen.append(value(text, "vllm:num_requests_running") + value(text, "vllm:num_requests_waiting"))
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(one()) for _ in range(8)]
        await watch(tasks)
        assert [t.result() for t in tasks] == [160] * 8
    # vLLM publishes its gauges with its periodic stats, so a sample can lag; the bound is the claim.
    assert len(seen) >= 5 and 1 <= max(seen) <= 2, seen


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
