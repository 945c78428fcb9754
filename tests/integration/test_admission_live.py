"""The gateway's slot bound, queue gauge and priorities, observed from outside on real processes.

engine-sim (which would batch 64) is the upstream; the gateway lets 8 through. Truth comes from
the engine's own vllm:num_requests_running/waiting and from what the client has in flight.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import Server, chat, upstream_env
from tests.support.metrics import value


async def test_sixty_four_requests_through_eight_slots(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=8, admission__max_queue=128))
    in_flight = 0
    completed: list[int] = []
    samples: list[tuple[int, float, float, float]] = []

    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                r = await client.post(gw.v1 + "/chat/completions", json=chat(40 + (i % 7) * 10))
                assert r.status_code == 200, r.text
                completed.append(r.json()["usage"]["completion_tokens"])
            finally:
                in_flight -= 1

        async def sample() -> None:
            await asyncio.sleep(0.3)
            while in_flight:
                before, done_before = in_flight, len(completed)
                engine = (await client.get(sim.url + "/metrics")).text
                mine = (await client.get(gw.url + "/metrics")).text
                finished = value(mine, "chatfleet_requests_total", outcome="ok")
                arrived = (finished + value(mine, "chatfleet_queue_depth")
                           + value(mine, "chatfleet_requests_running"))
                # A consistent snapshot: no answer in transit, every request arrived.
                if (in_flight == before and len(completed) == done_before == finished
                        and arrived == 64):
                    samples.append((
                        before,
                        value(mine, "chatfleet_queue_depth"),
                        value(mine, "chatfleet_requests_running"),
                        value(engine, "vllm:num_requests_running") + value(engine, "vllm:num_requests_waiting"),
                    ))
                await asyncio.sleep(0.05)

        await asyncio.gather(sample(), *(one(i) for i in range(64)))

    assert len(completed) == 64 and sum(completed) == sum(40 + (i % 7) * 10 for i in range(64))
    assert len(samples) >= 10
    assert max(engine for *_, engine in samples) <= 8, "more than 8 requests reached the engine"
    assert max(engine for *_, engine in samples) == 8, "the slots were never all used"
    for client_in_flight, queued, running, _ in samples:
        assert queued + running == client_in_flight, samples
        assert queued == max(0, client_in_flight - 8), samples
    final = gw.metrics()
    assert value(final, "chatfleet_queue_depth") == 0
    assert value(final, "chatfleet_requests_total", outcome="ok") == 64


async def test_interactive_requests_are_admitted_before_earlier_batch_ones(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=2, admission__max_queue=64))
    started: dict[str, float] = {}

    async with httpx.AsyncClient(timeout=60) as client:
        async def one(name: str, priority: str | None, tokens: int, header: bool = False) -> None:
            body = chat(tokens, stream=True)
            headers = {}
            if header:
                headers["X-ChatFleet-Priority"] = priority
            elif priority:
                body["priority"] = priority
            async with client.stream("POST", gw.v1 + "/chat/completions", json=body,
                                     headers=headers) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"content":" ' in line and name not in started:
                        started[name] = time.perf_counter()

        blockers = [asyncio.create_task(one(f"block{i}", None, 400)) for i in range(2)]
        await gw.wait_for("chatfleet_requests_running", 2)
        batch = [asyncio.create_task(one(f"batch{i}", "batch", 5)) for i in range(4)]
        await gw.wait_for("chatfleet_queue_depth", 4, priority="batch")
        interactive = [asyncio.create_task(one(f"inter{i}", "interactive", 5, header=i % 2 == 0))
                       for i in range(4)]
        await gw.wait_for("chatfleet_queue_depth", 4, priority="interactive")
        assert value(gw.metrics(), "chatfleet_queue_depth", priority="batch") == 4
        await asyncio.gather(*blockers, *batch, *interactive)

    last_interactive = max(started[f"inter{i}"] for i in range(4))
    first_batch = min(started[f"batch{i}"] for i in range(4))
    assert last_interactive < first_batch
