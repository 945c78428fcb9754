"""One admission for a pod of two worker processes (``server.workers=2``), observed from outside:
the engine never sees more than the pod's slots, and neither clients that vanish nor a worker
killed with SIGKILL leak a slot or a queue place."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import httpx

from tests.conftest import Server, chat, poll_until, upstream_env
from tests.support.metrics import value


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's child processes (its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == supervisor:
                pids.append(int(entry.name))
    return pids


async def test_disconnects_and_a_killed_worker_leak_no_slot(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, server__workers=2, admission__engine_slots=8,
                                      admission__max_queue=64, admission__interactive_reserved_slots=0))
    await poll_until(lambda: asyncio.sleep(0, len(worker_pids(gw.proc.pid)) == 2), 30)
    rng = random.Random(13)
    most_in_engine = 0

    async def watch_engine(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        nonlocal most_in_engine
        while not stop.is_set():
            text = (await client.get(sim.url + "/metrics")).text
            most_in_engine = max(most_in_engine, int(value(text, "vllm:num_requests_running")
                                                     + value(text, "vllm:num_requests_waiting")))
            await asyncio.sleep(0.02)

    async def vanishing_client(i: int) -> None:
        # a fresh connection each, so both workers get some; each leaves after a random number
        # of lines (0: while still queued)
        async with httpx.AsyncClient(timeout=30) as client:
            try:
                async with client.stream("POST", gw.v1 + "/chat/completions",
                                         json=chat(400, stream=True)) as r:
                    lines = rng.randrange(0, 20)
                    async for _ in r.aiter_lines():
                        lines -= 1
                        if lines <= 0:
                            break
            except httpx.HTTPError:
                pass  # cut off by the killed worker

    async with httpx.AsyncClient(timeout=30) as probe:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_engine(probe, stop))
        clients = [asyncio.create_task(vanishing_client(i)) for i in range(100)]
        await gw.wait_for("chatfleet_requests_running", 8, timeout=30)
        victim = worker_pids(gw.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)  # mid-stream: the pod is full
        await asyncio.gather(*clients)
        # the killed worker was replaced, and nothing it or the clients held is still held
        await poll_until(lambda: asyncio.sleep(0, len(worker_pids(gw.proc.pid)) == 2
                                               and victim not in worker_pids(gw.proc.pid)), 30)
        await gw.wait_for("chatfleet_requests_running", 0, timeout=30)
        await gw.wait_for("chatfleet_queue_depth", 0, timeout=10)

        # all 8 slots are free again: 8 long streams run at once in the engine, a 9th waits
        async def long_stream() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                async with client.stream("POST", gw.v1 + "/chat/completions",
                                         json=chat(300, stream=True)) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        pass

        streams = [asyncio.create_task(long_stream()) for _ in range(9)]
        await gw.wait_for("chatfleet_requests_running", 8, timeout=30)
        await gw.wait_for("chatfleet_queue_depth", 1, timeout=10)
        await asyncio.gather(*streams)
        stop.set()
        await watcher
    assert most_in_engine <= 8, f"the engine had {most_in_engine} requests at once"
    assert "chatfleet_worker_restarts_total" in gw.metrics()


async def test_api_key_limits_are_the_pods_not_each_workers(engine_sim, gateway) -> None:
    """A key's rate and an address's wrong-key tries are counted once for the pod: with two
    workers, per-process buckets would let twice as many through."""
    key, wrong = "sk-test-" + "a" * 32, "sk-test-" + "b" * 32
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, server__workers=2, auth__rate_limit_rps=0.05,
                                         auth__rate_limit_burst=4, auth__failed_keys_per_s=0.05,
                                         auth__failed_keys_burst=4),
                          "CHATFLEET_API_KEYS": key})
    await poll_until(lambda: asyncio.sleep(0, len(worker_pids(gw.proc.pid)) == 2), 30)

    async def statuses(token: str, n: int) -> list[int]:
        found = []
        for _ in range(n):  # one connection each: the kernel spreads them over both workers
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(gw.v1 + "/models", headers={"Authorization": f"Bearer {token}"})
                found.append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1
        return found

    assert await statuses(key, 12) == [200] * 4 + [429] * 8
    assert await statuses(wrong, 12) == [401] * 4 + [429] * 8
    metrics = gw.metrics()
    assert value(metrics, "chatfleet_auth_rejections_total", reason="rate_limited") == 8
    assert value(metrics, "chatfleet_auth_rejections_total", reason="too_many_failures") == 8
