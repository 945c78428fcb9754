"""Admission rules, one case each: slots, bound, priorities, displacement, deadlines, drain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from chatfleet.serving.admission import (
    AdmissionController,
    Draining,
    Priority,
    QueueFull,
    QueueTimeout,
)

I, B = Priority.INTERACTIVE, Priority.BATCH


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(slots: int = 2, max_queue: int = 3, wait: float = 10.0,
               clock: FakeClock | None = None, reserved: int = 0) -> AdmissionController:
    return AdmissionController(slots=slots, max_queue=max_queue, max_queue_wait_s=wait,
                               interactive_reserved=reserved, clock=clock or FakeClock())


@dataclass(frozen=True)
class Case:
    name: str
    slots: int
    max_queue: int
    arrivals: list[Priority]
    granted: list[int]
    """Indexes of arrivals holding a slot after all arrived."""
    rejected: list[int] = field(default_factory=list)
    """Indexes refused with QueueFull (on arrival, or displaced later)."""
    order_after: list[int] = field(default_factory=list)
    """Indexes granted, in order, as the slots are released one by one."""
    reserved: int = 0
    """Slots batch requests may not take (interactive_reserved)."""


CASES = [
    Case("free slots are granted at once", 2, 3, [I, B], granted=[0, 1]),
    Case("beyond the slots requests queue", 1, 3, [I, I, I], granted=[0], order_after=[1, 2]),
    Case("beyond the bound an arrival is refused", 1, 2, [I, I, I, I], granted=[0], rejected=[3],
         order_after=[1, 2]),
    Case("interactive is granted before earlier batch", 1, 3, [B, B, B, I], granted=[0],
         order_after=[3, 1, 2]),
    Case("fifo within a priority", 1, 4, [I, B, I, B, I], granted=[0], order_after=[2, 4, 1, 3]),
    Case("a full queue sheds its newest batch request for an interactive one", 1, 2,
         [I, B, B, I], granted=[0], rejected=[2], order_after=[3, 1]),
    Case("a full queue of interactive requests refuses a batch arrival", 1, 2, [I, I, I, B],
         granted=[0], rejected=[3], order_after=[1, 2]),
    Case("a full queue of interactive requests refuses an interactive arrival", 1, 1, [I, I, I],
         granted=[0], rejected=[2], order_after=[1]),
    Case("zero queue refuses everything beyond the slots", 2, 0, [I, B, I], granted=[0, 1],
         rejected=[2]),
    Case("batch stops at its share, leaving the reserved slots free", 3, 5, [B, B, B], reserved=1,
         granted=[0, 1], order_after=[2]),
    Case("an interactive arrival takes a reserved slot past queued batch", 3, 5, [B, B, B, I],
         reserved=1, granted=[0, 1, 3], order_after=[2]),
    Case("interactive may take every slot", 2, 5, [I, I, B], reserved=1, granted=[0, 1],
         order_after=[2]),
    Case("a freed interactive slot goes to queued batch only within its share", 3, 5,
         [I, B, B, B, B], reserved=1, granted=[0, 1, 2], order_after=[3, 4]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_admission_rules(case: Case) -> None:
    adm = controller(case.slots, case.max_queue, reserved=case.reserved)
    waiters: dict[int, object] = {}
    refused: set[int] = set()
    for i, priority in enumerate(case.arrivals):
        try:
            waiters[i] = adm.enqueue(priority)
        except QueueFull:
            refused.add(i)
    for i, w in waiters.items():
        if w._future is not None and w._future.done() and w._future.exception():  # displaced
            refused.add(i)
    assert sorted(refused) == sorted(case.rejected)
    assert sorted(i for i, w in waiters.items() if w.granted) == case.granted
    assert adm.running == len(case.granted)
    assert adm.queued() == len(case.arrivals) - len(case.granted) - len(case.rejected)

    order: list[int] = []
    holders = list(case.granted)
    while holders:
        waiters[holders.pop(0)].release()
        newly = [i for i, w in waiters.items() if w.granted and i not in order
                 and i not in case.granted and i not in holders]
        order += newly
        holders += newly
    assert order == case.order_after
    assert adm.running == 0 and adm.queued() == 0


async def test_queue_depth_is_exact_per_priority() -> None:
    adm = controller(slots=1, max_queue=10)
    adm.enqueue(I)
    queued = [adm.enqueue(p) for p in (I, B, B, I, B)]
    assert (adm.queued(I), adm.queued(B), adm.queued()) == (2, 3, 5)
    queued[1].release()  # leaves the queue (client gone)
    assert (adm.queued(I), adm.queued(B)) == (2, 2)


async def test_a_waiter_is_refused_once_its_deadline_passes() -> None:
    clock = FakeClock()
    adm = controller(slots=1, max_queue=5, wait=3.0, clock=clock)
    adm.enqueue(I)
    late = adm.enqueue(I)
    assert await late.wait(timeout=0.01) is False
    clock.now += 3.0
    with pytest.raises(QueueTimeout) as info:
        await late.wait(timeout=0.01)
    assert "max_queue_wait_s" in info.value.message and info.value.status == 429
    assert adm.queued() == 0


async def test_a_wait_that_reaches_the_deadline_is_refused_even_if_the_clock_lags_the_timer() -> None:
    """The event loop's timer can fire a hair before the admission clock reads the deadline; the
    waiter must still be refused then, not sent round for another (heartbeat-long) wait."""
    adm = controller(slots=1, max_queue=5, wait=0.05, clock=FakeClock())  # the clock never moves
    adm.enqueue(I)
    late = adm.enqueue(I)
    with pytest.raises(QueueTimeout):
        await late.wait(timeout=5.0)
    assert adm.queued() == 0


async def test_a_queued_waiter_wakes_when_a_slot_frees() -> None:
    adm = controller(slots=1, max_queue=5)
    first = adm.enqueue(I)
    second = adm.enqueue(I)
    task = asyncio.create_task(second.wait())
    await asyncio.sleep(0)
    first.release()
    assert await asyncio.wait_for(task, 1) is True
    assert second.granted and adm.running == 1


async def test_cancelling_a_queued_wait_then_releasing_leaves_no_trace() -> None:
    adm = controller(slots=1, max_queue=5)
    holder = adm.enqueue(I)
    waiter = adm.enqueue(I)
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    waiter.release()
    assert adm.queued() == 0
    holder.release()
    assert adm.running == 0


async def test_release_is_idempotent() -> None:
    adm = controller(slots=1, max_queue=5)
    w = adm.enqueue(I)
    w.release()
    w.release()
    assert adm.running == 0


async def test_draining_refuses_new_work_with_503_and_lets_accepted_work_finish() -> None:
    adm = controller(slots=1, max_queue=5)
    running = adm.enqueue(I)
    queued = adm.enqueue(B)
    adm.begin_drain()
    with pytest.raises(Draining) as info:
        adm.enqueue(I)
    assert info.value.status == 503 and info.value.retry_after_s >= 1
    idle = asyncio.create_task(adm.wait_idle())
    running.release()
    assert queued.granted
    await asyncio.sleep(0)
    assert not idle.done()
    queued.release()
    await asyncio.wait_for(idle, 1)


@pytest.mark.parametrize(
    ("release_times", "queued", "expected"),
    [
        ([], 0, 10),             # no history yet: max_queue_wait_s
        ([0.0, 1.0], 4, 5),      # 1 release/s, 4 queued + the caller: 5 s
        ([0.0, 0.1, 0.2], 0, 1),  # fast drain: at least 1 s
        ([0.0, 100.0], 9, 60),   # slow drain: at most 60 s
    ],
    ids=["no-history", "one-per-second", "floor-one-second", "cap-sixty-seconds"],
)
async def test_retry_after_follows_the_recent_drain_rate(release_times: list[float], queued: int,
                                                         expected: int) -> None:
    clock = FakeClock()
    adm = controller(slots=1, max_queue=100, wait=10.0, clock=clock)
    start = clock.now
    for t in release_times:
        clock.now = start + t
        adm.enqueue(I).release()
    adm.enqueue(I)
    for _ in range(queued):
        adm.enqueue(B)
    assert adm.retry_after_s() == expected


async def test_batch_never_holds_the_reserved_slots() -> None:
    """Long batch answers fill the pod; interactive arrivals still start at once, and batch never
    holds more than its share however releases and arrivals interleave."""
    adm = controller(slots=4, max_queue=50, reserved=1)
    batch = [adm.enqueue(B) for _ in range(10)]
    assert adm.running_batch == 3 and adm.queued(B) == 7
    for _ in range(5):
        interactive = adm.enqueue(I)
        assert interactive.granted
        assert adm.running_batch <= 3
        interactive.release()
    for waiter in batch:
        waiter.release()
        assert adm.running_batch <= 3
    assert adm.running == 0 and adm.queued() == 0


@pytest.mark.parametrize("reserved", [-1, 2])
def test_reserved_slots_must_leave_batch_a_slot(reserved: int) -> None:
    with pytest.raises(ValueError, match="interactive_reserved"):
        AdmissionController(slots=2, max_queue=1, max_queue_wait_s=1.0,
                            interactive_reserved=reserved)
