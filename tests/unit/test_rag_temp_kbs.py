"""Temporary knowledge bases (file chat) on a real local store, with a clock the test moves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.temp_kbs import TempKbNotFound, TempKnowledgeBases, is_temp_kb


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    local = LocalStore(tmp_path)
    await local.start()
    yield local
    await local.aclose()


async def _temp(store: LocalStore, clock: Clock, *, ttl_s: float = 60,
                max_count: int = 10) -> TempKnowledgeBases:
    # The store stamps created_at with the wall clock: align the test clock with it.
    probe = await store.create_kb("probe", info="", embed_model="")
    clock.now = probe.created_at
    await store.delete_kb("probe")
    return TempKnowledgeBases(store, ttl_s=ttl_s, max_count=max_count, clock=clock)


async def test_a_temporary_kb_is_found_by_its_id_until_it_expires(store: LocalStore) -> None:
    clock = Clock()
    temp = await _temp(store, clock, ttl_s=60)
    temp_id, name = await temp.create("")
    assert len(temp_id) == 32 and is_temp_kb(name) and name.endswith(temp_id)
    assert await temp.resolve(temp_id) == name
    clock.now += 61
    with pytest.raises(TempKbNotFound, match="expired"):
        await temp.resolve(temp_id)
    assert await store.get_kb(name) is None  # deleted on the failed use


async def test_the_sweep_deletes_only_expired_ones(store: LocalStore) -> None:
    clock = Clock()
    temp = await _temp(store, clock, ttl_s=60)
    _, old = await temp.create("")
    await asyncio.sleep(0.05)  # the store stamps creation with the wall clock: set them apart
    _, fresh = await temp.create("")
    stamps = [(await store.get_kb(name)).created_at for name in (old, fresh)]  # type: ignore[union-attr]
    clock.now = sum(stamps) / 2 + 60  # past the old one's time to live, within the fresh one's
    assert await temp.sweep() == 1
    assert await store.get_kb(old) is None and await store.get_kb(fresh) is not None


async def test_past_the_bound_the_oldest_goes_first_and_its_id_is_not_logged(
        store: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    temp = await _temp(store, clock, max_count=2)
    first, _ = await temp.create("")
    second, _ = await temp.create("")
    third, _ = await temp.create("")
    assert await temp.resolve(first)  # over the bound only until an upload enforces it
    await temp.enforce_bound()
    with pytest.raises(TempKbNotFound):
        await temp.resolve(first)
    assert await temp.resolve(second) and await temp.resolve(third)
    [line] = [r.getMessage() for r in caplog.records if "early" in r.getMessage()]
    assert "kb.max_temp_kbs (2) reached" in line and first not in line


async def test_a_tiny_time_to_live_sweeps_at_most_twice_a_second(
        store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise LookupError("stop")  # ends the sweeper at its first wait

    monkeypatch.setattr(asyncio, "sleep", sleep)
    for ttl_s in (0.001, 2.0, 3600.0):
        with pytest.raises(LookupError, match="stop"):
            await TempKnowledgeBases(store, ttl_s=ttl_s, max_count=1).run_sweeper()
    assert slept == [0.5, 0.5, 60.0]


async def test_prev_id_empties_and_keeps_the_id(store: LocalStore) -> None:
    clock = Clock()
    temp = await _temp(store, clock)
    temp_id, name = await temp.create("")
    again, again_name = await temp.create("", prev_id=temp_id)
    assert (again, again_name) == (temp_id, name)
    for chosen in ("../../etc", "0" * 32):  # not a live one: the client cannot choose its id
        unknown, _ = await temp.create("", prev_id=chosen)
        assert unknown != chosen and len(unknown) == 32


@pytest.mark.parametrize("bad_id", ["", "nope", "A" * 32, "0" * 31, "../" + "0" * 29])
async def test_an_id_that_is_no_temporary_kb_is_not_found(store: LocalStore, bad_id: str) -> None:
    temp = await _temp(store, Clock())
    with pytest.raises(TempKbNotFound, match="upload_temp_docs"):
        await temp.resolve(bad_id)


class FlakyStore:
    """The local store, whose first listing fails as a store outage would."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self.failures = 1

    async def list_kbs(self):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise OSError("store unreachable")
        return await self._store.list_kbs()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_the_sweeper_outlives_a_store_outage_and_deletes_expired_ones(
        store: LocalStore) -> None:
    clock = Clock()
    temp = await _temp(store, clock, ttl_s=2)
    _, name = await temp.create("")
    flaky = FlakyStore(store)
    sweeping = TempKnowledgeBases(flaky, ttl_s=2, max_count=10, clock=clock)  # type: ignore[arg-type]
    clock.now += 3
    task = asyncio.create_task(sweeping.run_sweeper())
    try:
        for _ in range(100):  # it sweeps every TTL/4 (0.5 s here): a bounded wait
            if await store.get_kb(name) is None:
                break
            await asyncio.sleep(0.05)
        assert await store.get_kb(name) is None
        assert flaky.failures == 0 and not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
