"""Admission: at most ``slots`` requests reach the engine; a bounded, prioritised queue holds the rest.

The queue is the autoscaler's signal, so its gauge is updated on every change and counts exactly the
requests waiting now. Rules:

- A request takes a free slot at once if nobody of its priority is queued; otherwise it queues.
- Interactive requests are granted before batch ones, first-come first-served within a priority.
- Batch requests hold at most ``slots - interactive_reserved`` slots at once: the rest are kept for
  interactive ones, so an interactive arrival never waits behind a pod full of long batch answers.
- The queue holds at most ``max_queue`` requests. When it is full, an interactive arrival displaces the
  newest queued batch request (which gets 429); otherwise the arrival itself gets 429.
- A queued request that waits ``max_queue_wait_s`` gets 429.
- While draining, new arrivals get 503; queued and running requests were accepted and finish.
- Cancelling a waiter (client gone) removes it from the queue or frees its slot at once.

Retry-After on a rejection is the time the queue ahead of the caller would take to drain at the
rate slots were freed recently, clamped to [1, 60] s.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum, auto
from typing import Protocol

__all__ = [
    "Admission",
    "AdmissionController",
    "Ticket",
    "AdmissionRejected",
    "Draining",
    "Load",
    "LoadUnavailable",
    "Priority",
    "QueueFull",
    "QueueTimeout",
    "Waiter",
    "draining_rejection",
    "queue_full_rejection",
]

_RETRY_AFTER_MIN_S = 1
_RETRY_AFTER_MAX_S = 60
_DRAIN_RATE_WINDOW = 64
"""Slot releases remembered to estimate the drain rate."""


_DRAINING_MESSAGE = "this replica is shutting down; retry, another replica will answer"


def _queue_full_message(max_queue: int) -> str:
    return f"the queue is full ({max_queue} requests waiting, max_queue); retry later"


def queue_full_rejection(max_queue: int, retry_after_s: int) -> QueueFull:
    return QueueFull(_queue_full_message(max_queue), retry_after_s=retry_after_s)


def draining_rejection(retry_after_s: int) -> Draining:
    return Draining(_DRAINING_MESSAGE, retry_after_s=retry_after_s)


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class AdmissionRejected(Exception):
    """The request was not admitted. ``status`` is 429 or 503; send ``Retry-After: retry_after_s``."""

    status = 429
    reason = "rejected"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class QueueFull(AdmissionRejected):
    reason = "queue_full"


class QueueTimeout(AdmissionRejected):
    reason = "queue_timeout"


class Draining(AdmissionRejected):
    status = 503
    reason = "draining"


@dataclass(frozen=True, slots=True)
class Load:
    """The pod's admission now, counted over the whole pod: what ``GET /load`` answers, for the
    endpoint picker that polls it to choose a pod (the names are its contract, docs/api.md)."""

    slots: int
    batch_slots: int
    """The most slots batch requests may hold at once (``slots - interactive_reserved``)."""
    running: int
    running_batch: int
    queued_interactive: int
    queued_batch: int
    max_queue: int
    draining: bool
    retry_after_s: int
    """What a refusal would say in ``Retry-After`` now."""
    arrivals: int
    """Requests admission has taken a decision on since the process started (granted, queued or
    refused): the picker matches them against what it sent the pod (routing/pool_load.py)."""


class LoadUnavailable(Exception):
    """The pod's load cannot be read (a worker whose admission coordinator is gone)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Entry(Enum):
    """Admission's decision for one arrival (``AdmissionController._decide``)."""

    GRANT = auto()
    QUEUE = auto()
    DISPLACE = auto()
    DRAINING = auto()
    FULL = auto()


class Waiter:
    """One request's claim on an engine slot: queued until granted, then holding the slot.

    Use ``await wait(timeout)`` until it returns True, then ``release()`` exactly once when done
    (also when cancelled or failed: ``release()`` on a queued waiter leaves the queue).
    """

    __slots__ = (
        "_controller",
        "_future",
        "_state",
        "arrived_at",
        "deadline",
        "granted_at",
        "priority",
    )

    _QUEUED, _GRANTED, _DONE = range(3)

    def __init__(self, controller: AdmissionController, priority: Priority, arrived_at: float,
                 deadline: float) -> None:
        self._controller = controller
        self._future: asyncio.Future[None] | None = None
        self._state = Waiter._QUEUED
        self.priority = priority
        self.arrived_at = arrived_at
        self.deadline = deadline
        self.granted_at: float | None = None

    @property
    def granted(self) -> bool:
        return self._state == Waiter._GRANTED

    @property
    def queued(self) -> bool:
        return self._state == Waiter._QUEUED

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a slot: True once granted, False if still queued.

        Raises QueueTimeout (and leaves the queue) once the request's deadline passes, or
        QueueFull if a higher-priority arrival displaced it.
        """
        if self._state == Waiter._GRANTED:
            return True
        future = self._future
        if self._state == Waiter._DONE:
            if future is not None and future.done() and not future.cancelled():
                future.result()  # displaced before its first wait: raises QueueFull
            raise RuntimeError("wait() on a released waiter")
        assert future is not None
        remaining = self.deadline - self._controller.clock()
        # Decided before waiting: the loop's timer may fire a hair before ``clock()`` reaches
        # the deadline, and that must still count as the deadline.
        until_deadline = timeout is None or remaining <= timeout
        limit = remaining if until_deadline else timeout
        if limit > 0 and not self._future.done():
            await asyncio.wait((self._future,), timeout=limit)
        if self._future.done():
            self._future.result()  # raises QueueFull when displaced
            return True
        if until_deadline:
            self._controller._leave_queue(self)
            raise self._controller._rejection(
                QueueTimeout, f"waited {self._controller.max_queue_wait_s:g} s in the queue "
                "(max_queue_wait_s) without getting an engine slot; retry later")
        return False

    def release(self) -> None:
        """Give the slot back, or leave the queue. Idempotent."""
        if self._state == Waiter._GRANTED:
            self._state = Waiter._DONE
            self._controller._release_slot(self.priority)
        elif self._state == Waiter._QUEUED:
            self._controller._leave_queue(self)

    def _grant(self, now: float) -> None:
        self._state = Waiter._GRANTED
        self.granted_at = now
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class Ticket(Protocol):
    """One request's claim on a slot: ``Waiter`` here, ``pod_admission.PodWaiter`` in a worker."""

    priority: Priority

    @property
    def granted(self) -> bool: ...

    async def wait(self, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


class Admission(Protocol):
    """What the completion service, the lifecycle and ``GET /load`` need of admission: this
    process's ``AdmissionController``, or a worker's handle on the pod's
    (``pod_admission.PodAdmission``)."""

    @property
    def running(self) -> int: ...

    def queued(self, priority: Priority | None = None) -> int: ...

    @property
    def draining(self) -> bool: ...

    def certain_rejection(self, priority: Priority | None) -> AdmissionRejected | None: ...

    def enqueue(self, priority: Priority) -> Ticket: ...

    def begin_drain(self) -> None: ...

    async def wait_idle(self) -> None: ...

    async def load(self) -> Load:
        """The whole pod's slots and queue now; raises LoadUnavailable when they cannot be read."""
        ...


class AdmissionController:
    """Slots plus a two-priority bounded queue. Single event loop; no locks needed."""

    def __init__(
        self,
        *,
        slots: int,
        max_queue: int,
        max_queue_wait_s: float,
        interactive_reserved: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[AdmissionController], None] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not 0 <= interactive_reserved < slots:
            raise ValueError(f"interactive_reserved must be in [0, slots), got {interactive_reserved}")
        self.slots = slots
        self.batch_slots = slots - interactive_reserved
        """The most slots batch requests may hold at once."""
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.clock = clock
        self._on_change = on_change
        self._queues: dict[Priority, deque[Waiter]] = {p: deque() for p in Priority}
        self._running = 0
        self._running_batch = 0
        self._draining = False
        self._arrivals = 0
        self._releases: deque[float] = deque(maxlen=_DRAIN_RATE_WINDOW)
        self._idle = asyncio.Event()
        self._idle.set()

    # -- observation -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return self._running

    @property
    def running_batch(self) -> int:
        return self._running_batch

    def queued(self, priority: Priority | None = None) -> int:
        if priority is None:
            return sum(len(q) for q in self._queues.values())
        return len(self._queues[priority])

    @property
    def draining(self) -> bool:
        return self._draining

    def drain_rate(self) -> float | None:
        """Slots freed per second over the recent window, or None before there is a window."""
        if len(self._releases) < 2:
            return None
        span = self._releases[-1] - self._releases[0]
        if span <= 0:
            return None
        return (len(self._releases) - 1) / span

    def retry_after_s(self) -> int:
        """Seconds until the current queue would have drained at the recent drain rate."""
        rate = self.drain_rate()
        if rate is None:
            estimate = self.max_queue_wait_s
        else:
            estimate = (self.queued() + 1) / rate
        return int(min(_RETRY_AFTER_MAX_S, max(_RETRY_AFTER_MIN_S, math.ceil(estimate))))

    async def load(self) -> Load:
        return self.snapshot()

    def snapshot(self) -> Load:
        """The admission now (``load()`` without the wait; the pod's coordinator answers with it)."""
        queues = self._queues
        return Load(slots=self.slots, batch_slots=self.batch_slots, running=self._running,
                    running_batch=self._running_batch,
                    queued_interactive=len(queues[Priority.INTERACTIVE]),
                    queued_batch=len(queues[Priority.BATCH]), max_queue=self.max_queue,
                    draining=self._draining, retry_after_s=self.retry_after_s(),
                    arrivals=self._arrivals)

    # -- entering ----------------------------------------------------------------------------

    def _decide(self, priority: Priority | None) -> _Entry:
        """What admission does with an arrival now. ``priority`` None means not known yet (the body
        may still say interactive), so an arrival that could displace a batch request is assumed."""
        if self._draining:
            return _Entry.DRAINING
        if self._can_start(priority or Priority.INTERACTIVE):
            return _Entry.GRANT
        if self.queued() < self.max_queue:
            return _Entry.QUEUE
        if priority is not Priority.BATCH and self._queues[Priority.BATCH]:
            return _Entry.DISPLACE
        return _Entry.FULL

    def _refusal(self, entry: _Entry) -> AdmissionRejected | None:
        if entry is _Entry.DRAINING:
            return self._rejection(Draining, _DRAINING_MESSAGE)
        if entry is _Entry.FULL:
            return self._rejection(QueueFull, _queue_full_message(self.max_queue))
        return None

    def certain_rejection(self, priority: Priority | None) -> AdmissionRejected | None:
        """The rejection an arrival would get for sure, without enqueueing; None if it may enter.
        The same decision as ``enqueue``'s, so the two cannot drift apart."""
        return self._refusal(self._decide(priority))

    def enqueue(self, priority: Priority) -> Waiter:
        """Claim a slot: granted at once when one is free and nobody waits, else queued.

        Raises Draining (503) while draining, QueueFull (429) when the queue is at its bound.
        """
        self._arrivals += 1
        entry = self._decide(priority)
        refusal = self._refusal(entry)
        if refusal is not None:
            raise refusal
        now = self.clock()
        waiter = Waiter(self, priority, now, now + self.max_queue_wait_s)
        if entry is _Entry.GRANT:
            self._take_slot(waiter, now)
            self._idle.clear()
            self._changed()
            return waiter
        if entry is _Entry.DISPLACE:
            victim = self._queues[Priority.BATCH].pop()
            victim._state = Waiter._DONE
            assert victim._future is not None
            victim._future.set_exception(self._rejection(
                QueueFull, "displaced from a full queue by an interactive request; retry later"))
        waiter._future = asyncio.get_running_loop().create_future()
        self._queues[priority].append(waiter)
        self._idle.clear()
        self._changed()
        return waiter

    # -- draining ----------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new arrivals from now on; queued and running requests carry on."""
        self._draining = True
        self._changed()

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running."""
        await self._idle.wait()

    # -- internals ---------------------------------------------------------------------------

    def _can_start(self, priority: Priority) -> bool:
        """Whether a request of ``priority`` at the head of its line may take a slot now."""
        if self._running >= self.slots or self._queues[priority]:
            return False
        return priority is Priority.INTERACTIVE or self._running_batch < self.batch_slots

    def _take_slot(self, waiter: Waiter, now: float) -> None:
        self._running += 1
        if waiter.priority is Priority.BATCH:
            self._running_batch += 1
        waiter._grant(now)

    def _release_slot(self, priority: Priority) -> None:
        now = self.clock()
        self._releases.append(now)
        self._running -= 1
        if priority is Priority.BATCH:
            self._running_batch -= 1
        self._grant_waiting(now)
        if self._running == 0:
            self._idle.set()
        self._changed()

    def _grant_waiting(self, now: float) -> None:
        """Give free slots to the heads of the queues: interactive first, then batch up to its
        share."""
        for priority in (Priority.INTERACTIVE, Priority.BATCH):
            queue = self._queues[priority]
            while queue and self._running < self.slots and (
                    priority is Priority.INTERACTIVE or self._running_batch < self.batch_slots):
                self._take_slot(queue.popleft(), now)

    def _leave_queue(self, waiter: Waiter) -> None:
        try:
            self._queues[waiter.priority].remove(waiter)
        except ValueError:
            pass
        waiter._state = Waiter._DONE
        if waiter._future is not None and not waiter._future.done():
            waiter._future.cancel()
        if self._running == 0 and self.queued() == 0:
            self._idle.set()
        self._changed()

    def _rejection(self, cls: type[AdmissionRejected], message: str) -> AdmissionRejected:
        return cls(message, retry_after_s=self.retry_after_s())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
