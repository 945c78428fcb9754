"""The pod's admission across workers: a real coordinator on a Unix socket, several worker
handles (each what one gateway worker process holds), one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatfleet.serving.admission import (
    AdmissionController,
    Draining,
    Load,
    LoadUnavailable,
    Priority,
    QueueFull,
    QueueTimeout,
)
from chatfleet.serving.pod_admission import PodAdmission
from chatfleet.serving.pod_coordinator import AdmissionCoordinator
from chatfleet.serving.rate_limit import FailureLimiter, KeyRateLimiter

I, B = Priority.INTERACTIVE, Priority.BATCH


class Pod:
    def __init__(self, coordinator: AdmissionCoordinator, path: str) -> None:
        self.coordinator = coordinator
        self.path = path
        self.workers: list[PodAdmission] = []

    async def worker(self) -> PodAdmission:
        admission = self.coordinator.admission
        handle = PodAdmission(slots=admission.slots, batch_slots=admission.batch_slots,
                              max_queue=admission.max_queue)
        await handle.connect(self.path)
        self.workers.append(handle)
        return handle


async def settle() -> None:
    """Let the messages in flight on the sockets arrive (a few loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


@pytest.fixture
async def pod(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pod]:
    options = getattr(request, "param", {})
    admission = AdmissionController(slots=options.get("slots", 2), max_queue=options.get("max_queue", 3),
                                    max_queue_wait_s=options.get("wait", 10.0),
                                    interactive_reserved=options.get("reserved", 0))
    path = str(tmp_path / "admission.sock")
    coordinator = AdmissionCoordinator(
        admission, path,
        key_limiter=KeyRateLimiter(keys=1, rate=1.0, burst=2, now=0.0) if options.get("keys") else None,
        failure_limiter=FailureLimiter(rate=0.5, burst=2) if options.get("keys") else None)
    await coordinator.start()
    pod = Pod(coordinator, path)
    yield pod
    for handle in pod.workers:
        await handle.aclose()
    await coordinator.aclose()


async def test_slots_are_the_pods_not_each_workers(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    tickets = []
    for handle in (a, b, a, b):
        tickets.append(handle.enqueue(I))
        await settle()
    assert [t.granted for t in tickets] == [True, True, False, False]
    assert pod.coordinator.admission.running == 2 and pod.coordinator.admission.queued() == 2
    assert (a.running, a.queued(), b.running, b.queued()) == (1, 1, 1, 1)


@pytest.mark.parametrize("pod", [{"slots": 2, "max_queue": 5}], indirect=True)
async def test_fifo_within_a_priority_across_workers_and_interactive_first(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    holders = [a.enqueue(I), b.enqueue(I)]
    await settle()
    order: list[str] = []

    async def wait(name: str, ticket) -> None:  # type: ignore[no-untyped-def]
        await ticket.wait()
        order.append(name)
        ticket.release()

    arrivals = [("a-batch", a, B), ("b-batch", b, B), ("b-int", b, I), ("a-int", a, I)]
    waits = []
    for name, handle, priority in arrivals:
        waits.append(asyncio.create_task(wait(name, handle.enqueue(priority))))
        await settle()  # arrival order at the coordinator is the order sent
    holders[0].release()
    await asyncio.wait_for(asyncio.gather(*waits), 5)
    holders[1].release()
    assert order == ["b-int", "a-int", "a-batch", "b-batch"]


@pytest.mark.parametrize("pod", [{"slots": 1, "max_queue": 1}], indirect=True)
async def test_a_full_pod_queue_refuses_on_every_worker_with_retry_after(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    a.enqueue(I)
    queued = a.enqueue(I)
    await settle()
    refused = b.enqueue(B)
    with pytest.raises(QueueFull) as info:
        await refused.wait(1.0)
    assert info.value.status == 429 and info.value.retry_after_s >= 1
    assert "max_queue" in info.value.message
    # every worker's edge knows the pod is full for a batch arrival, without asking
    rejection = b.certain_rejection(B)
    assert isinstance(rejection, QueueFull) and rejection.retry_after_s >= 1
    # only interactive requests are queued: nothing for an interactive arrival to displace either
    assert isinstance(b.certain_rejection(None), QueueFull)
    assert queued.queued


@pytest.mark.parametrize("pod", [{"slots": 1, "max_queue": 1}], indirect=True)
async def test_an_interactive_arrival_on_one_worker_displaces_batch_queued_on_another(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    a.enqueue(I)
    batch = a.enqueue(B)
    await settle()
    interactive = b.enqueue(I)
    with pytest.raises(QueueFull, match="displaced"):
        await batch.wait(1.0)
    assert interactive.queued and pod.coordinator.admission.queued(I) == 1


@pytest.mark.parametrize("pod", [{"slots": 1, "max_queue": 5, "wait": 0.2}], indirect=True)
async def test_the_queue_deadline_is_kept_by_the_coordinator(pod: Pod) -> None:
    a = await pod.worker()
    a.enqueue(I)
    late = a.enqueue(I)
    assert await late.wait(0.05) is False
    with pytest.raises(QueueTimeout, match="max_queue_wait_s"):
        await late.wait(2.0)
    assert pod.coordinator.admission.queued() == 0


async def test_a_worker_that_disconnects_leaks_no_slot_and_no_place(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    a.enqueue(I), a.enqueue(I), a.enqueue(B)
    await settle()
    waiting = b.enqueue(I)
    await settle()
    assert pod.coordinator.admission.running == 2 and pod.coordinator.admission.queued() == 2
    assert a._link.transport is not None
    a._link.transport.abort()  # what the kernel does for a worker killed with SIGKILL
    assert await waiting.wait(2.0) is True
    await settle()
    assert pod.coordinator.admission.running == 1 and pod.coordinator.admission.queued() == 0


async def test_releasing_while_the_grant_is_on_its_way_frees_the_slot(pod: Pod) -> None:
    a = await pod.worker()
    holders = [a.enqueue(I), a.enqueue(I)]
    await settle()
    queued = a.enqueue(I)
    await settle()
    holders[0].release()   # the coordinator grants `queued` ...
    queued.release()       # ... while the worker gives up on it (client gone)
    await settle()
    assert pod.coordinator.admission.running == 1 and pod.coordinator.admission.queued() == 0


async def test_draining_the_pod_refuses_new_work_on_every_worker(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    running = a.enqueue(I)
    await settle()
    pod.coordinator.begin_drain()
    await settle()
    assert isinstance(b.certain_rejection(I), Draining)
    with pytest.raises(Draining) as info:
        await b.enqueue(I).wait(1.0)
    assert info.value.status == 503
    assert running.granted


async def test_a_worker_whose_coordinator_is_gone_refuses_and_says_so(pod: Pod) -> None:
    lost = asyncio.Event()
    handle = PodAdmission(slots=2, batch_slots=2, max_queue=3, on_lost=lost.set)
    await handle.connect(pod.path)
    pod.workers.append(handle)
    handle.enqueue(I), handle.enqueue(I)
    queued = handle.enqueue(I)
    await settle()
    await pod.coordinator.aclose()
    await asyncio.wait_for(lost.wait(), 2)
    with pytest.raises(Draining, match="coordinator"):
        await queued.wait(1.0)
    with pytest.raises(Draining):
        handle.enqueue(I)
    with pytest.raises(LoadUnavailable, match="coordinator"):
        await handle.load()


@pytest.mark.parametrize("pod", [{"slots": 3, "max_queue": 5, "reserved": 1}], indirect=True)
async def test_every_worker_reports_the_pods_load(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    tickets = []
    for handle, priority in ((a, B), (b, B), (a, I), (b, B), (a, I), (b, I)):
        tickets.append(handle.enqueue(priority))
        await settle()
    expected = Load(slots=3, batch_slots=2, running=3, running_batch=2, queued_interactive=2,
                    queued_batch=1, max_queue=5, draining=False,
                    retry_after_s=pod.coordinator.admission.retry_after_s(), arrivals=6)
    assert await a.load() == await b.load() == await pod.coordinator.admission.load() == expected
    for ticket in tickets:
        ticket.release()
    pod.coordinator.begin_drain()
    await settle()
    loads = await asyncio.gather(a.load(), b.load(), a.load())
    assert {(load.running, load.queued_interactive + load.queued_batch, load.draining)
            for load in loads} == {(0, 0, True)}


@pytest.mark.parametrize("pod", [{"keys": True}], indirect=True)
async def test_rate_limits_are_counted_once_for_the_pod(pod: Pod) -> None:
    a, b = await pod.worker(), await pod.worker()
    # key 0: burst 2 at 1/s, shared by the workers
    waits = [await a.key_wait(0), await b.key_wait(0), await a.key_wait(0)]
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0.5
    # wrong keys from one address through two workers: burst 2, then every worker refuses it
    a.address_failed("10.0.0.9")
    b.address_failed("10.0.0.9")
    await settle()
    assert a.address_wait("10.0.0.9") > 1.0 and b.address_wait("10.0.0.9") > 1.0
    assert a.address_wait("10.0.0.10") == 0.0


@pytest.mark.parametrize("pod", [{"slots": 8, "max_queue": 16, "wait": 5.0}], indirect=True)
async def test_a_burst_across_workers_never_exceeds_the_slots(pod: Pod) -> None:
    workers = [await pod.worker() for _ in range(3)]
    admission = pod.coordinator.admission
    most = 0
    outcomes: list[str] = []

    async def request(handle: PodAdmission, priority: Priority) -> None:
        nonlocal most
        ticket = handle.enqueue(priority)
        try:
            await ticket.wait()
        except QueueFull:
            outcomes.append("429")
            return
        most = max(most, admission.running)
        await asyncio.sleep(0.005)
        ticket.release()
        outcomes.append("ok")

    await asyncio.gather(*(request(workers[i % 3], B if i % 4 else I) for i in range(300)))
    assert len(outcomes) == 300
    assert most <= 8 and outcomes.count("ok") >= 24
    await settle()
    assert admission.running == 0 and admission.queued() == 0
    assert all(w.running == 0 and w.queued() == 0 for w in workers)
