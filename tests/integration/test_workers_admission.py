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
