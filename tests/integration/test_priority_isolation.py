"""Priority isolation: long batch answers fill the pod's batch share, and interactive requests
arriving meanwhile start at once on the reserved slots (admission.interactive_reserved_slots)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import Server, chat, upstream_env
from tests.support.metrics import value


async def test_interactive_requests_do_not_wait_behind_a_pod_full_of_batch(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=4, admission__max_queue=64,
                                      admission__interactive_reserved_slots=1))
    batch_done = 0

    async with httpx.AsyncClient(timeout=120) as client:
        async def long_batch() -> None:
            nonlocal batch_done
            async with client.stream("POST", gw.v1 + "/chat/completions",
                                     json=chat(1500, stream=True, priority="batch")) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    pass
            batch_done += 1

        batch = [asyncio.create_task(long_batch()) for _ in range(6)]
        # the batch share (3 of 4 slots) runs, the other 3 batch requests wait for it
        await gw.wait_for("chatfleet_queue_depth", 3, priority="batch")
        assert value(gw.metrics(), "chatfleet_requests_running") == 3

        waits = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = await client.post(gw.v1 + "/chat/completions", json=chat(5),
                                  headers={"X-ChatFleet-Priority": "interactive"})
            assert r.status_code == 200, r.text
            waits.append(time.perf_counter() - t0)
        assert batch_done == 0, "the batch answers were meant to outlast the interactive ones"
        metrics = gw.metrics()
        assert value(metrics, "chatfleet_queue_depth", priority="batch") == 3
        # each interactive request took the reserved slot at once
        assert value(metrics, "chatfleet_queue_wait_seconds_count", priority="interactive") == 5
        assert value(metrics, "chatfleet_queue_wait_seconds_sum", priority="interactive") < 0.05
        for task in batch:
            task.cancel()
        await asyncio.gather(*batch, return_exceptions=True)
    assert max(waits) < 5.0
