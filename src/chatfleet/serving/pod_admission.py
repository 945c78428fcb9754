"""The pod's one admission, shared by its gateway workers: the worker side.

A worker started by the supervisor (``server.workers`` above 1) gets the coordinator's socket
in ``CHATFLEET_POD_ADMISSION_SOCKET`` and uses :class:`PodAdmission` where a single process uses
its own ``AdmissionController``: the same calls (``enqueue``, ``certain_rejection``, the drain),
each request a round trip to the coordinator (``serving/pod_coordinator.py``). ``running`` and
``queued`` here count this worker's own requests: the pod's are the coordinator's, and its
metrics are the pod's queue gauges; ``load()`` asks the coordinator for the pod's.

If the coordinator goes away (the supervisor died), the pod is gone: queued requests get 503,
new ones too, and ``on_lost`` runs (the app drains and exits the worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from chatfleet.serving.admission import (
    AdmissionRejected,
    Draining,
    Load,
    LoadUnavailable,
    Priority,
    QueueFull,
    QueueTimeout,
    draining_rejection,
    queue_full_rejection,
)
from chatfleet.serving.pod_wire import BATCH, INTERACTIVE, LineProtocol

__all__ = ["POD_ADMISSION_SOCKET_ENV", "PodAdmission", "PodWaiter"]

log = logging.getLogger(__name__)

POD_ADMISSION_SOCKET_ENV = "CHATFLEET_POD_ADMISSION_SOCKET"
"""Set by the supervisor for its workers: the Unix socket of the pod's admission coordinator."""

_REFUSALS: dict[str, type[AdmissionRejected]] = {
    cls.reason: cls for cls in (QueueFull, QueueTimeout, Draining)}
_LOST_MESSAGE = "this replica's admission coordinator stopped; retry, another replica will answer"


class PodWaiter:
    """One request's claim on a pod engine slot (the interface of ``admission.Waiter``)."""

    __slots__ = ("_admission", "_future", "_id", "_refusal", "_state", "priority")

    _QUEUED, _GRANTED, _DONE = range(3)

    def __init__(self, admission: PodAdmission, rid: str, priority: Priority) -> None:
        self._admission = admission
        self._id = rid
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state = PodWaiter._QUEUED
        self._refusal: AdmissionRejected | None = None
        self.priority = priority

    @property
    def granted(self) -> bool:
        return self._state == PodWaiter._GRANTED

    @property
    def queued(self) -> bool:
        return self._state == PodWaiter._QUEUED

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a slot: True once granted, False if still queued.
        Raises the coordinator's refusal (queue full, deadline passed, displaced, draining)."""
        if self._state == PodWaiter._GRANTED:
            return True
        if self._state == PodWaiter._DONE:
            raise RuntimeError("wait() on a released waiter")
        if not self._future.done():
            await asyncio.wait((self._future,), timeout=timeout)
            if not self._future.done():
                return False
        if self._refusal is not None:
            raise self._refusal
        return True

    def release(self) -> None:
        """Give the slot back, or leave the queue. Idempotent."""
        if self._state != PodWaiter._DONE:
            self._state = PodWaiter._DONE
            self._admission._done(self._id)

    def _grant(self) -> None:
        if self._state == PodWaiter._QUEUED:
            self._state = PodWaiter._GRANTED
            if not self._future.done():
                self._future.set_result(None)

    def _refuse(self, exc: AdmissionRejected) -> None:
        if self._state == PodWaiter._QUEUED and not self._future.done():
            self._refusal = exc
            self._future.set_result(None)


class _CoordinatorLink(LineProtocol):
    def __init__(self, admission: PodAdmission) -> None:
        super().__init__()
        self._admission = admission

    def lines(self, lines: Sequence[list[str]]) -> None:
        self._admission._received(lines)

    def connection_lost(self, exc: Exception | None) -> None:
        self._admission._coordinator_lost(exc)


class PodAdmission:
    """This worker's handle on the pod's admission; one per worker process."""

    def __init__(self, *, slots: int, batch_slots: int, max_queue: int,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.slots = slots
        self.batch_slots = batch_slots
        self.max_queue = max_queue
        self._link = _CoordinatorLink(self)
        self._on_lost = on_lost
        self._next_id = 0
        self._held: dict[str, PodWaiter] = {}
        self._key_waits: dict[str, asyncio.Future[float]] = {}
        self._load_waits: dict[str, asyncio.Future[Load]] = {}
        self._blocked_until: dict[str, float] = {}
        self._refusals: tuple[str, str] = ("-", "-")
        self._retry_after_s = 1
        self._draining = False
        self._gone = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def connect(self, socket_path: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: self._link, socket_path)

    async def aclose(self) -> None:
        self._gone = True  # closing it ourselves: nothing to report
        if self._link.transport is not None:
            self._link.transport.close()

    # -- the AdmissionController interface -------------------------------------------------

    @property
    def running(self) -> int:
        """This worker's requests holding a pod slot."""
        return sum(1 for waiter in self._held.values() if waiter.granted)

    def queued(self, priority: Priority | None = None) -> int:
        """This worker's requests waiting in the pod's queue."""
        return sum(1 for waiter in self._held.values()
                   if waiter.queued and (priority is None or waiter.priority is priority))

    @property
    def draining(self) -> bool:
        return self._draining

    def certain_rejection(self, priority: Priority | None) -> AdmissionRejected | None:
        if self._draining:
            return draining_rejection(self._retry_after_s)
        reason = self._refusals[1 if priority is Priority.BATCH else 0]
        if reason == "-":
            return None
        if reason == Draining.reason:
            return draining_rejection(self._retry_after_s)
        return queue_full_rejection(self.max_queue, self._retry_after_s)

    def enqueue(self, priority: Priority) -> PodWaiter:
        """Ask the coordinator for a slot; the answer arrives in ``wait()``. Raises Draining at
        once while this worker drains."""
        if self._draining:
            raise draining_rejection(self._retry_after_s)
        self._next_id += 1
        rid = str(self._next_id)
        waiter = PodWaiter(self, rid, priority)
        self._held[rid] = waiter
        self._idle.clear()
        self._link.send(f"E {rid} {BATCH if priority is Priority.BATCH else INTERACTIVE}")
        return waiter

    def begin_drain(self) -> None:
        """Refuse this worker's new arrivals from now on (the supervisor drains the pod's queue)."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Return once this worker holds no slot and has nothing queued."""
        await self._idle.wait()

    async def load(self) -> Load:
        """The whole pod's slots and queue, from the coordinator (one round trip)."""
        if self._gone:
            raise LoadUnavailable(_LOST_MESSAGE)
        self._next_id += 1
        rid = str(self._next_id)
        future: asyncio.Future[Load] = asyncio.get_running_loop().create_future()
        self._load_waits[rid] = future
        self._link.send(f"L {rid}")
        try:
            return await future
        finally:
            self._load_waits.pop(rid, None)

    def _load(self, fields: Sequence[str]) -> Load:
        """The ``l`` line's counts (the wire splits a line into at most 5 fields, so rejoined)."""
        running, running_batch, queued_i, queued_b, draining, retry_after_s, arrivals = map(
            int, " ".join(fields[2:]).split(" "))
        return Load(slots=self.slots, batch_slots=self.batch_slots, running=running,
                    running_batch=running_batch, queued_interactive=queued_i, queued_batch=queued_b,
                    max_queue=self.max_queue, draining=bool(draining) or self._draining,
                    retry_after_s=retry_after_s, arrivals=arrivals)

    # -- the pod's rate limits ---------------------------------------------------------------

    async def key_wait(self, key_index: int) -> float:
        """Take one token of the key's pod-wide rate limit: 0.0, or the seconds until one is back."""
        if self._gone:
            return 0.0  # the worker is going away; its drain refuses new work
        self._next_id += 1
        rid = str(self._next_id)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._key_waits[rid] = future
        self._link.send(f"K {rid} {key_index}")
        try:
            return await future
        finally:
            self._key_waits.pop(rid, None)

    def address_wait(self, address: str) -> float:
        """Seconds this client address must wait after too many wrong keys pod-wide (0.0: none)."""
        now = time.monotonic()
        until = self._blocked_until.get(address)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocked_until[address]
            return 0.0
        return until - now

    def address_failed(self, address: str) -> None:
        """Count a wrong key from ``address`` against the pod's limit."""
        self._link.send(f"F {address.replace(' ', '_')}")

    # -- the coordinator's messages ----------------------------------------------------------

    def _received(self, lines: Sequence[list[str]]) -> None:
        for fields in lines:
            kind = fields[0]
            if kind == "G":
                waiter = self._held.get(fields[1])
                if waiter is None:  # released while the grant was on its way
                    self._link.send(f"R {fields[1]}")
                else:
                    waiter._grant()
            elif kind == "X":
                waiter = self._held.pop(fields[1], None)
                if waiter is not None:
                    waiter._refuse(_REFUSALS[fields[2]](fields[4], retry_after_s=int(fields[3])))
                    self._check_idle()
            elif kind == "k":
                future = self._key_waits.get(fields[1])
                if future is not None and not future.done():
                    future.set_result(float(fields[2]))
            elif kind == "l":
                future = self._load_waits.get(fields[1])
                if future is not None and not future.done():
                    future.set_result(self._load(fields))
            elif kind == "S":
                self._refusals = (fields[1], fields[2])
                self._retry_after_s = max(1, int(fields[3]))
            elif kind == "B":
                self._blocked_until[fields[1]] = time.monotonic() + float(fields[2])

    def _done(self, rid: str) -> None:
        if self._held.pop(rid, None) is not None and not self._gone:
            self._link.send(f"R {rid}")
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._held:
            self._idle.set()

    def _coordinator_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._draining = True
        log.error("pod admission: the coordinator's connection closed (%s); this worker stops "
                  "taking requests", exc or "closed by the supervisor")
        for rid, waiter in list(self._held.items()):
            if waiter.queued:
                waiter._refuse(Draining(_LOST_MESSAGE, retry_after_s=self._retry_after_s))
                del self._held[rid]
        for future in self._key_waits.values():
            if not future.done():
                future.set_result(0.0)
        for load in self._load_waits.values():
            if not load.done():
                load.set_exception(LoadUnavailable(_LOST_MESSAGE))
        self._check_idle()
        if self._on_lost is not None:
            self._on_lost()
