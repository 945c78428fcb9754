"""Nothing blocks the gateway's event loop: asyncio debug mode logs every callback over 50 ms."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.conftest import Server, upstream_env

MODEL = "chatfleet-sim/tiny-cpu"
SLOW = re.compile(r"Executing .* took (\d+\.\d+) seconds")


async def test_no_callback_holds_the_loop_over_50_ms_under_mixed_traffic(engine_sim, gateway) -> None:
    sim: Server = engine_sim(max_num_seqs=64)
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=8, admission__max_queue=14,
                                      server__slow_callback_s=0.05,
                                      server__log_level="warning"))

    def body(tokens: int, **extra: object) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 50}],
                "max_tokens": tokens, "ignore_eos": True, **extra}

    async with httpx.AsyncClient(timeout=60) as client:
        async def stream(tokens: int, stop_after: int | None = None) -> None:
            async with client.stream("POST", gw.v1 + "/chat/completions",
                                     json=body(tokens, stream=True)) as r:
                seen = 0
                async for _ in r.aiter_lines():
                    seen += 1
                    if stop_after is not None and seen >= stop_after:
                        return

        async def whole(tokens: int) -> int:
            return (await client.post(gw.v1 + "/chat/completions", json=body(tokens))).status_code

        async def invalid() -> int:
            return (await client.post(gw.v1 + "/chat/completions", json={"model": MODEL})).status_code

        for _ in range(3):
            results = await asyncio.gather(
                *(stream(60) for _ in range(12)), *(stream(200, stop_after=5) for _ in range(4)),
                *(whole(40) for _ in range(12)), *(invalid() for _ in range(4)),
                client.get(gw.url + "/metrics"), client.get(gw.url + "/readyz"))
            statuses = [r for r in results if isinstance(r, int)]
            assert 429 in statuses and 200 in statuses and 400 in statuses

    slow = [float(m.group(1)) for m in SLOW.finditer(gw.proc.log_text())]
    assert slow == [], f"callbacks over 50 ms: {slow}\n{gw.proc.log_tail()}"
