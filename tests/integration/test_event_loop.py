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
    gw: Server = gateway(upstream_env(sim, admission__engine_slots=8, admission__max_queue=10,
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

        # A process's first request costs one callback of about 40 ms (the same before this
        # suite's checks were added; nothing is imported then): served before the measurement, so
        # the bound is on what traffic does to the loop, not on that one-off. asyncio logs a slow
        # step after it ends, which may be after its response left: the next round trip waits
        # for that line.
        assert await whole(1) == 200
        assert (await client.get(gw.url + "/readyz")).status_code == 200
        warmed_up = len(gw.proc.log_text())
        statuses: list[int] = []
        for _ in range(3):
            # Invalid bodies first: once the queue is full, the admission gate answers 429
            # before reading any body, so later ones would never be validated.
            results = await asyncio.gather(
                *(invalid() for _ in range(4)),
                *(stream(100) for _ in range(12)), *(stream(200, stop_after=5) for _ in range(4)),
                *(whole(40) for _ in range(12)),
                client.get(gw.url + "/metrics"), client.get(gw.url + "/readyz"))
            statuses += [r for r in results if isinstance(r, int)]
        assert {200, 400, 429} <= set(statuses), "the traffic mixes answers, refusals and bad bodies"

    slow = [float(m.group(1)) for m in SLOW.finditer(gw.proc.log_text()[warmed_up:])]
    assert slow == [], f"callbacks over 50 ms: {slow}\n{gw.proc.log_tail()}"


async def test_ingestion_and_retrieval_never_hold_the_loop_over_100_ms(engine_sim, gateway) -> None:
    """A 2 MB upload (about 3,500 chunks to load, split, embed and index) while questions are
    asked: loading and splitting run in a worker process, the local store's indexes in threads,
    embeddings in concurrent async requests.

    The bound is 100 ms, not the 50 ms above: the loop's thread shares the GIL with the store's
    threads (tokenizing and indexing 3,500 chunks, searches), and waits for its turns; with the
    gateway's 1 ms switch interval (server.py) the longest callback seen over ten runs was 62 ms,
    with CPython's 5 ms one 166 ms. What this test catches is work on the loop: loading and
    splitting this file takes 330 ms, one stall that long on the loop.
    """
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, server__slow_callback_s=0.1,
                                         server__log_level="warning"),
                          "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1,
                          "CHATFLEET_KB__EMBEDDINGS__MODEL": "chatfleet-sim/hashed-embedding"})
    words = ["gateway", "queue", "replica", "engine", "token", "latency", "vector", "index", "chunk", "drain"]
    big = "\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(120)) + f" topic{i}."
                      for i in range(2500)).encode()
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
        await client.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "big"})
        await client.post("/knowledge_base/upload_docs", data={"knowledge_base_name": "big"},
                          files=[("files", ("seed.txt", b"topic0 gateway queue"))])
        # Once-per-process costs (start-up, the first multipart parse importing its parser) are
        # not what this test is about: count only what happens after this warm-up.
        warmed_up = len(gw.proc.log_text())

        async def upload() -> dict:
            response = await client.post("/knowledge_base/upload_docs",
                                         data={"knowledge_base_name": "big"},
                                         files=[("files", ("big.txt", big))])
            return response.json()

        async def ask(i: int) -> int:
            response = await client.post("/chat/kb_chat", json={
                "query": f"topic{i} queue", "kb_name": "big", "stream": False, "max_tokens": 4})
            return response.status_code

        results = await asyncio.gather(upload(), *(ask(i) for i in range(30)))
        assert results[0]["data"]["failed_files"] == {}
        assert set(results[1:]) == {200}
        files = (await client.get("/knowledge_base/list_files",
                                  params={"knowledge_base_name": "big"})).json()["data"]
        assert sum(f["docs_count"] for f in files) > 3000

    slow = [float(m.group(1)) for m in SLOW.finditer(gw.proc.log_text()[warmed_up:])]
    assert slow == [], f"callbacks over 100 ms: {slow}\n{gw.proc.log_tail()}"
