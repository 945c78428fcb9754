"""The pod's one admission, shared by its gateway workers: the coordinator side.

With ``server.workers`` above 1 the supervisor (the pod's first process) runs one
:class:`AdmissionController` here, and every worker asks it for slots over a Unix socket
(``serving/pod_wire.py``). So the pod never lets more than ``engine_slots`` requests into the
engine, has one queue of ``max_queue``, one FIFO per priority and one Retry-After estimate,
whichever worker a client's connection landed on. A worker whose connection closes (it exited,
crashed or was killed as hung) has everything it held released at once: the kernel closes the
socket of a dead process, so no slot leaks. The per-key rate limits and the wrong-key limit live
here too, so they are per pod.

Why a coordinator process and not shared memory: the admission rules (priorities, displacement,
deadlines, the batch share) stay the one tested ``AdmissionController``; a lock in shared memory
held by a worker that is killed would wedge the pod, and a dead holder's slots could not be told
apart from a slow one's. docs/architecture.md gives the measured cost per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

from chatfleet.serving.admission import AdmissionController, AdmissionRejected, Priority, Waiter
from chatfleet.serving.pod_wire import BATCH, LineProtocol
from chatfleet.serving.rate_limit import FailureLimiter, KeyRateLimiter

__all__ = ["AdmissionCoordinator"]

log = logging.getLogger(__name__)


class _WorkerLink(LineProtocol):
    """One worker's connection: the requests it holds or has queued, by the worker's ids."""

    def __init__(self, coordinator: AdmissionCoordinator) -> None:
        super().__init__()
        self._coordinator = coordinator
        self.held: dict[str, Waiter] = {}
        self._waits: dict[str, asyncio.Task[None]] = {}
        self.pid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self.pid = int.from_bytes(creds[:4], "little")
        self._coordinator._links.add(self)
        self.send(self._coordinator._state_line)

    def lines(self, lines: Sequence[list[str]]) -> None:
        coordinator = self._coordinator
        admission = coordinator.admission
        for fields in lines:
            kind = fields[0]
            if kind == "E":
                self._enqueue(admission, fields[1], Priority.BATCH if fields[2] == BATCH
                              else Priority.INTERACTIVE)
            elif kind == "R":
                self._release(fields[1])
            elif kind == "K":
                limiter = coordinator.key_limiter
                wait_s = limiter.take(int(fields[2]), coordinator.clock()) if limiter else 0.0
                self.send(f"k {fields[1]} {wait_s:.3f}")
            elif kind == "F":
                coordinator._failed_key(fields[1])
            elif kind == "L":
                now = admission.snapshot()
                self.send(f"l {fields[1]} {now.running} {now.running_batch} {now.queued_interactive} "
                          f"{now.queued_batch} {int(now.draining)} {now.retry_after_s} {now.arrivals}")
        coordinator._publish()

    def _enqueue(self, admission: AdmissionController, rid: str, priority: Priority) -> None:
        try:
            waiter = admission.enqueue(priority)
        except AdmissionRejected as exc:
            self._refuse(rid, exc)
            return
        self.held[rid] = waiter
        if waiter.granted:
            self.send(f"G {rid}")
        else:
            self._waits[rid] = asyncio.create_task(self._wait(rid, waiter))

    async def _wait(self, rid: str, waiter: Waiter) -> None:
        try:
            await waiter.wait()
        except AdmissionRejected as exc:  # its deadline passed, or an interactive arrival displaced it
            self.held.pop(rid, None)
            self._refuse(rid, exc)
        else:
            self.send(f"G {rid}")
        finally:
            self._waits.pop(rid, None)
            self._coordinator._publish()

    def _refuse(self, rid: str, exc: AdmissionRejected) -> None:
        self.send(f"X {rid} {exc.reason} {exc.retry_after_s} {exc.message}")

    def _release(self, rid: str) -> None:
        task = self._waits.pop(rid, None)
        if task is not None:
            task.cancel()
        waiter = self.held.pop(rid, None)
        if waiter is not None:
            waiter.release()

    def connection_lost(self, exc: Exception | None) -> None:
        coordinator = self._coordinator
        coordinator._links.discard(self)
        if self.held:
            log.warning("pod admission: worker pid %s left holding %d request(s) (%d of them "
                        "queued); released", self.pid, len(self.held),
                        sum(1 for waiter in self.held.values() if waiter.queued))
        for rid in list(self.held):
            self._release(rid)
        coordinator._publish()


class AdmissionCoordinator:
    """Serves one ``AdmissionController`` (and the pod's rate limits) to the pod's workers.

    Runs on the supervisor's event loop: ``await start()`` listens on ``socket_path`` (mode 0600,
    so only the pod's own user can take slots), ``begin_drain()`` on SIGTERM, ``await aclose()``
    at exit.
    """

    def __init__(self, admission: AdmissionController, socket_path: str, *,
                 key_limiter: KeyRateLimiter | None = None,
                 failure_limiter: FailureLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admission = admission
        self.socket_path = socket_path
        self.key_limiter = key_limiter
        self.failure_limiter = failure_limiter
        self.clock = clock
        self._links: set[_WorkerLink] = set()
        self._server: asyncio.AbstractServer | None = None
        self._refusals = ("-", "-")
        self._state_line = self._state()

    @property
    def workers(self) -> int:
        """Workers connected now."""
        return len(self._links)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _WorkerLink(self), self.socket_path)
        os.chmod(self.socket_path, 0o600)

    def begin_drain(self) -> None:
        """Refuse new arrivals from every worker with 503; queued and running requests go on."""
        self.admission.begin_drain()
        self._publish()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for link in list(self._links):
                if link.transport is not None:
                    link.transport.close()
            await self._server.wait_closed()

    def _failed_key(self, address: str) -> None:
        limiter = self.failure_limiter
        if limiter is None:
            return
        now = self.clock()
        limiter.failed(address, now)
        wait_s = limiter.wait(address, now)
        if wait_s > 0:
            self._broadcast(f"B {address} {wait_s:.3f}")

    def _state(self) -> str:
        """The ``S`` line for now; also remembers its refusals in ``_refusals``."""
        admission = self.admission
        unknown = admission.certain_rejection(None)
        batch = admission.certain_rejection(Priority.BATCH)
        self._refusals = (unknown.reason if unknown else "-", batch.reason if batch else "-")
        retry_after = batch.retry_after_s if batch else 0
        return f"S {self._refusals[0]} {self._refusals[1]} {retry_after}"

    def _publish(self) -> None:
        """Tell every worker the pod's certain refusals when they change (not when only the
        Retry-After estimate does: that would be a broadcast per request while the queue is full)."""
        admission = self.admission
        if self._refusals == ("-", "-") and not admission.draining \
                and admission.queued() < admission.max_queue:
            return  # the common case, decided without building a refusal
        before = self._refusals
        line = self._state()
        if self._refusals != before:
            self._state_line = line
            self._broadcast(line)

    def _broadcast(self, line: str) -> None:
        for link in self._links:
            link.send(line)
