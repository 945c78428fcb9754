"""The endpoint picker proven behind the real Envoy, in front of three real pods.

Each pod is a real `chatfleet serve` with its own `chatfleet engine-sim`; Envoy runs
deploy/envoy/epp-envoy.yaml (the Inference Extension's plain-Envoy configuration) asking a real
`chatfleet epp`; clients are the openai SDK and httpx, through Envoy only. Which pod answered is
read from the pods' own `chatfleet_requests_total`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SIM_MODEL, chat, start_engine_sim, start_gateway, upstream_env
from tests.support.envoy import Envoy, start_envoy
from tests.support.epp import EppServer, start_epp
from tests.support.metrics import value as metric_value
from tests.support.procs import wait_until

SLOTS, QUEUE = 2, 2


class Pod:
    def __init__(self) -> None:
        self.engine = start_engine_sim()
        self.gateway = start_gateway(upstream_env(self.engine, admission__engine_slots=SLOTS,
                                                  admission__max_queue=QUEUE,
                                                  admission__interactive_reserved_slots=0,
                                                  server__drain_timeout_s=1))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def answered(self) -> float:
        text = httpx.get(f"{self.gateway.url}/metrics", timeout=10).text
        return metric_value(text, "chatfleet_requests_total", outcome="ok")

    def load(self) -> dict[str, object]:
        return httpx.get(f"{self.gateway.url}/load", timeout=10).json()

    def stop(self) -> None:
        for server in (self.gateway, self.engine):
            server.proc.terminate()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Pod], EppServer, Envoy]]:
    pods = [Pod() for _ in range(3)]
    epp = start_epp([pod.endpoint for pod in pods])
    envoy = start_envoy(tmp_path_factory.mktemp("envoy"), picker=epp.address)
    yield pods, epp, envoy
    envoy.proc.terminate()
    epp.proc.terminate()
    for pod in pods:
        pod.stop()


def client(envoy: Envoy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="unused", max_retries=0, timeout=60.0)


def stream_text(envoy: Envoy, max_tokens: int) -> tuple[str, int]:
    """One streamed chat through Envoy: its text and the usage's completion tokens."""
    stream = client(envoy).chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage = "", 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_streams_through_envoy_arrive_whole_and_spread_over_the_pods(fleet: tuple[list[Pod], EppServer, Envoy]) -> None:
    pods, _, envoy = fleet
    before = [pod.answered() for pod in pods]

    answers = [stream_text(envoy, 40) for _ in range(9)]

    assert all(len(text.split()) == 40 and usage == 40 for text, usage in answers)
    served = [pod.answered() - b for pod, b in zip(pods, before, strict=True)]
    assert sum(served) == 9 and min(served) >= 1, served


def test_requests_avoid_the_full_pod_and_a_stopped_pod(fleet: tuple[list[Pod], EppServer, Envoy]) -> None:
    pods, epp, envoy = fleet
    full, other, last = pods
    # Fill one pod straight, not through Envoy: its slots with long streams, its queue behind them.
    holders = _hold(full, SLOTS + QUEUE)
    wait_until(lambda: full.load()["running"] == SLOTS and full.load()["queued_interactive"] == QUEUE,
               timeout=30, message="the full pod's slots and queue taken")
    before = [pod.answered() for pod in pods]

    statuses = _concurrent_chats(envoy, 8, max_tokens=20)

    assert statuses == [200] * 8
    assert full.answered() == before[0]
    assert other.answered() + last.answered() - before[1] - before[2] == 8

    other.stop()  # mid-test: its gateway and engine go away
    wait_until(lambda: metric_value(epp.metrics_text(), "chatfleet_epp_endpoints", state="ready") == 2,
               timeout=5, interval=0.05, message="the stopped pod out of the picker's pool")
    before_last = last.answered()
    assert _concurrent_chats(envoy, 4, max_tokens=20) == [200] * 4
    assert last.answered() - before_last == 4
    assert full.answered() == before[0]

    full.gateway.proc.terminate()  # ends the holders' streams
    for holder in holders:
        holder.join(timeout=30)


def test_every_pod_full_is_429_with_retry_after_through_envoy(tmp_path: Path) -> None:
    """One pod, its slots and queue taken: the picker refuses at the proxy, the pod sees nothing."""
    pod = Pod()
    epp = start_epp([pod.endpoint])
    envoy = start_envoy(tmp_path, picker=epp.address)
    holders = _hold(pod, SLOTS + QUEUE)
    try:
        wait_until(lambda: pod.load()["queued_interactive"] == QUEUE, timeout=30, message="pod full")
        wait_until(lambda: _post(envoy).status_code == 429, timeout=5, interval=0.05,
                   message="the picker refusing")
        requests_before = pod.answered()

        response = _post(envoy)

        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["content-type"] == "application/json"
        assert "queue is full" in response.json()["error"]["message"]
        assert pod.answered() == requests_before
    finally:
        envoy.proc.terminate()
        epp.proc.terminate()
        pod.stop()
        for holder in holders:
            holder.join(timeout=30)


def _hold(pod: Pod, count: int) -> list[threading.Thread]:
    """``count`` long streams sent straight to ``pod``, each in a thread, until the pod stops."""
    def one() -> None:
        try:
            httpx.post(f"{pod.gateway.url}/v1/chat/completions", json=chat(4000, stream=True), timeout=120)
        except httpx.HTTPError:
            pass  # the test stops the pod under it

    holders = [threading.Thread(target=one) for _ in range(count)]
    for holder in holders:
        holder.start()
    return holders


def _post(envoy: Envoy) -> httpx.Response:
    return httpx.post(f"{envoy.url}/v1/chat/completions", json=chat(5), timeout=30)


def _concurrent_chats(envoy: Envoy, count: int, *, max_tokens: int) -> list[int]:
    statuses: list[int] = [0] * count

    def one(i: int) -> None:
        statuses[i] = httpx.post(f"{envoy.url}/v1/chat/completions", json=chat(max_tokens, stream=True),
                                 timeout=60).status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return statuses
