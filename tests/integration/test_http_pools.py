"""The sharded upstream transport against a real server: requests spread over the small pools,
every closed response (finished, abandoned or failed) gives its place back, connections are reused."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
import pytest

from chatfleet.http_pools import ShardedTransport
from tests.conftest import Server, chat


async def test_streams_spread_over_pools_and_give_their_place_back(engine_sim) -> None:
    sim: Server = engine_sim()
    transport = ShardedTransport(connections=6, per_pool=2)
    assert transport.pools == 3
    async with httpx.AsyncClient(transport=transport, base_url=sim.v1, timeout=30) as client:
        async with AsyncExitStack() as streams:
            for _ in range(6):
                r = await streams.enter_async_context(
                    client.stream("POST", "/chat/completions", json=chat(400, stream=True)))
                assert r.status_code == 200
            assert transport.in_flight() == 6
            assert sorted(transport._busy) == [2, 2, 2]  # least busy first: no pool over its size
        assert transport.in_flight() == 0  # closed mid-answer
        answers = await asyncio.gather(*(client.post("/chat/completions", json=chat(3)) for _ in range(6)))
        assert [a.json()["usage"]["completion_tokens"] for a in answers] == [3] * 6
        assert transport.in_flight() == 0
        opened = open_connections(transport)
        assert 3 <= opened <= 6
        for _ in range(10):  # kept-alive connections are reused, none is opened
            assert (await client.get("/models")).status_code == 200
        assert open_connections(transport) == opened


def open_connections(transport: ShardedTransport) -> int:
    return sum(len(pool._pool.connections) for pool in transport._pools)


async def test_a_refused_connection_gives_its_place_back() -> None:
    transport = ShardedTransport(connections=2, per_pool=1)
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:9/")  # discard port: nothing listens
    assert transport.in_flight() == 0
