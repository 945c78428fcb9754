"""Fixtures that start real ChatFleet processes on free 127.0.0.1 ports.

``engine_sim(...)`` starts ``chatfleet engine-sim``; ``gateway(...)`` starts ``chatfleet serve``
with the given CHATFLEET_* environment. Both are real subprocesses, stopped at the test's end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import pytest

from tests.support.metrics import value
from tests.support.procs import ManagedProcess, free_port

SIM_MODEL = "chatfleet-sim/tiny-cpu"
"""The model name engine-sim serves with its default profile."""


def chat(max_tokens: int, **extra: object) -> dict:
    """A chat request body for engine-sim that generates exactly ``max_tokens`` tokens."""
    return {"model": SIM_MODEL, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, "ignore_eos": True, **extra}


def streamed_tokens(sse: str) -> int:
    """engine-sim's tokens (one word each) in the content of an SSE chat stream's data lines.

    Words, not events: the gateway relays the tokens that reached it together as one event."""
    tokens = 0
    for line in sse.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", ()):
                tokens += len(((choice.get("delta") or {}).get("content") or "").split())
    return tokens


async def poll_until(predicate: Callable[[], Awaitable[bool]], timeout: float,
                     interval: float = 0.005) -> float:
    """Seconds until ``predicate()`` is true; fails the test after ``timeout``."""
    t0 = time.perf_counter()
    while not await predicate():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(interval)
    return time.perf_counter() - t0


@dataclass
class Server:
    proc: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    async def wait_for(self, sample: str, expected: float, timeout: float = 10.0, **labels: str) -> None:
        """Wait until this server's /metrics shows ``sample`` at ``expected`` (e.g. until a request
        that was just sent holds its slot): a fixed sleep races a slow machine."""
        async with httpx.AsyncClient(timeout=5) as probe:
            async def reached() -> bool:
                text = (await probe.get(self.url + "/metrics")).text
                return value(text, sample, **labels) == expected
            await poll_until(reached, timeout, interval=0.01)


def start_engine_sim(*, profile: str = "tiny-cpu", max_num_seqs: int | None = None,
                     seed: int = 0, port: int | None = None) -> Server:
    """``port``: a given one, e.g. to restart an engine where a gateway expects it."""
    port = port or free_port()
    args = [sys.executable, "-m", "chatfleet", "engine-sim", "--host", "127.0.0.1", "--port",
            str(port), "--profile", profile, "--seed", str(seed), "--log-level", "warning"]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    proc = ManagedProcess(args, name="engine-sim").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    return Server(proc, port)


def start_gateway(env: dict[str, str] | None = None, *, wait_ready: bool = True,
                  args: Sequence[str] = ()) -> Server:
    """``args``: more ``chatfleet serve`` flags, e.g. ``["--workers", "2"]``."""
    port = free_port()
    # Knowledge bases go to a fresh directory, never the working directory's ./data.
    full_env = {"CHATFLEET_SERVER__LOG_LEVEL": "warning",
                "CHATFLEET_KB__DATA_DIR": tempfile.mkdtemp(prefix="chatfleet-kb-"), **(env or {})}
    proc = ManagedProcess([sys.executable, "-m", "chatfleet", "serve", "--host", "127.0.0.1",
                           "--port", str(port), *args], env=full_env, name="gateway").start()
    proc.wait_http(f"http://127.0.0.1:{port}/readyz" if wait_ready else
                   f"http://127.0.0.1:{port}/livez", timeout=30)
    return Server(proc, port)


def upstream_env(sim: Server, **extra: str | float) -> dict[str, str]:
    """Gateway environment pointing at an engine-sim server."""
    env = {"CHATFLEET_ENGINE__KIND": "openai", "CHATFLEET_ENGINE__URL": sim.v1,
           "CHATFLEET_ENGINE__MODEL": "chatfleet-sim/tiny-cpu"}
    env.update({f"CHATFLEET_{key.upper()}": str(value) for key, value in extra.items()})
    return env


def gateway_before_engine_sim(**extra: str | float) -> Iterator[Server]:
    """A gateway in front of its own engine-sim (``upstream_env``'s ``extra`` settings), for a
    module-scoped fixture to ``yield from``; both stop after it."""
    sim = start_engine_sim()
    server = start_gateway(upstream_env(sim, **extra))
    yield server
    server.proc.terminate()
    sim.proc.terminate()


@pytest.fixture
def engine_sim() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(**kwargs: object) -> Server:
        server = start_engine_sim(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.proc.terminate()


@pytest.fixture
def gateway() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(env: dict[str, str] | None = None, **kwargs: object) -> Server:
        server = start_gateway(env, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.proc.terminate()
