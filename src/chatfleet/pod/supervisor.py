"""The pod's first process with ``server.workers`` above 1: N gateway workers on one socket.

The supervisor binds nothing itself (``chatfleet serve`` bound the socket before it started), runs
no app and serves no request. On one asyncio event loop it:

- serves the pod's one admission (``serving/pod_coordinator.py``) on a Unix socket in its private
  directory, so the workers share one queue, one set of engine slots and the API keys' limits, and
  sets the queue and slot gauges from it;
- starts each worker (``python -m chatfleet.pod.worker``, a fresh interpreter) with the listening
  socket and the write end of a heartbeat pipe as inherited descriptors;
- replaces a worker that exits (``backoff.py``: at once, then waits that double while it keeps
  dying young) or whose event loop sends no heartbeat for ``server.worker_hang_timeout_s`` (killed
  with SIGKILL first), counting each in ``chatfleet_worker_restarts_total`` and removing a dead
  worker's live gauges from the pod's metrics;
- on SIGTERM, drains: the coordinator refuses new arrivals, every worker gets SIGTERM at once (its
  own drain: /readyz fails, new requests 503, accepted ones finish within
  ``server.drain_timeout_s``), nothing is restarted, and once all have exited it exits 0. SIGINT
  is passed on the same way (uvicorn's shutdown) and exits 130. A second SIGTERM or SIGINT kills
  every worker at once. A worker that could not start its app (exit 3: e.g. the pgvector database
  is unreachable) stops the pod with 3, as one process would.

Every worker start, exit and restart is one log line with the worker's number, pid, exit status
and reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from chatfleet import __version__
from chatfleet.pod.backoff import RestartBackoff
from chatfleet.pod.heartbeat import HEARTBEAT_FD_ENV, LISTEN_FD_ENV, heartbeat_interval_s
from chatfleet.serving.admission_metrics import measured_admission
from chatfleet.serving.pod_admission import POD_ADMISSION_SOCKET_ENV
from chatfleet.serving.pod_coordinator import AdmissionCoordinator
from chatfleet.serving.rate_limit import FailureLimiter, KeyRateLimiter
from chatfleet.settings import Settings
from chatfleet.telemetry.metrics import GatewayMetrics, WorkerRestartReason

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3
"""uvicorn's exit status when the app's start-up failed (ExitCode.UNREACHABLE of docs/cli.md)."""
START_GRACE_S = 60.0
"""Added to the hang bound before a worker's first heartbeat: the time to import the app."""
KILL_GRACE_S = 10.0
"""After ``drain_timeout_s`` (and uvicorn's own 5 s), workers still running are killed."""


@dataclass
class _Worker:
    slot: int
    proc: asyncio.subprocess.Process
    beats: int  # read end of the heartbeat pipe
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    beaten: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    def __init__(self, settings: Settings, sock: socket.socket, *, workers: int,
                 run_dir: str) -> None:
        self.settings = settings
        self.sock = sock
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.hang_timeout_s = settings.server.worker_hang_timeout_s
        self.check_s = heartbeat_interval_s(self.hang_timeout_s)
        self._live: dict[int, _Worker] = {}
        self._stopping: signal.Signals | None = None
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._coordinator: AdmissionCoordinator | None = None
        self._metrics = GatewayMetrics(model=settings.served_model,
                                       engine_kind=settings.engine.kind.value, version=__version__)
        self._metrics.engine_slots.labels(settings.served_model).set(settings.admission.engine_slots)
        self._restarts = {why: self._metrics.worker_restarts_total.labels(reason=why.value)
                          for why in WorkerRestartReason}

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # The pod's one admission: started before any worker, which connects to it at start-up.
        socket_path = str(self.run_dir / "admission.sock")
        self._coordinator = self._admission_coordinator(socket_path)
        await self._coordinator.start()
        host, port = self.sock.getsockname()[:2]
        env = {**os.environ, POD_ADMISSION_SOCKET_ENV: socket_path,
               "CHATFLEET_SERVER__HOST": str(host), "CHATFLEET_SERVER__PORT": str(port)}
        log.info("supervisor pid %d: starting %d workers on %s:%s", os.getpid(), self.workers,
                 host, port)
        try:
            await asyncio.gather(*(self._keep(slot, env) for slot in range(self.workers)))
        finally:
            await self._coordinator.aclose()
        log.info("supervisor: every worker has exited; exiting %d", self._exit_code)
        return self._exit_code

    def _admission_coordinator(self, socket_path: str) -> AdmissionCoordinator:
        settings = self.settings
        auth, keys = settings.auth, settings.api_keys
        return AdmissionCoordinator(
            measured_admission(settings.admission, self._metrics), socket_path,
            key_limiter=KeyRateLimiter(keys=len(keys), rate=auth.rate_limit_rps,
                                       burst=auth.rate_limit_burst, now=time.monotonic())
            if keys and auth.rate_limit_rps > 0 else None,
            failure_limiter=FailureLimiter(rate=auth.failed_keys_per_s,
                                           burst=auth.failed_keys_burst)
            if keys and auth.failed_keys_per_s > 0 else None)

    async def _keep(self, slot: int, env: dict[str, str]) -> None:
        """Keep worker ``slot`` running until the pod stops."""
        backoff = RestartBackoff()
        while self._stopping is None:
            worker = await self._spawn(slot, env)
            reason = await self._watch(worker)
            returncode = worker.proc.returncode
            assert returncode is not None
            lived_s = time.monotonic() - worker.started
            del self._live[worker.pid]
            mark_process_dead(worker.pid)
            log.log(logging.INFO if self._stopping else logging.WARNING,
                    "worker %d (pid %d) %s after %.1f s%s", slot, worker.pid,
                    _exit_status(returncode), lived_s,
                    " (hung: no heartbeat)" if reason is WorkerRestartReason.HUNG else "")
            if self._stopping is not None:
                return
            if returncode == STARTUP_FAILURE:
                log.error("worker %d could not start the app (exit %d, its log says why): "
                          "stopping the pod", slot, returncode)
                self._exit_code = STARTUP_FAILURE
                self._on_signal(signal.SIGTERM)
                return
            self._restarts[reason].inc()
            delay = backoff.delay(lived_s)
            log.warning("worker %d: restarting in %.1f s (reason: %s)", slot, delay, reason.value)
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass

    async def _spawn(self, slot: int, env: dict[str, str]) -> _Worker:
        beats, beat_w = os.pipe()
        os.set_blocking(beat_w, False)
        os.set_blocking(beats, False)
        listen_fd = self.sock.fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chatfleet.pod.worker", stdin=asyncio.subprocess.DEVNULL,
                env={**env, LISTEN_FD_ENV: str(listen_fd), HEARTBEAT_FD_ENV: str(beat_w)},
                pass_fds=(listen_fd, beat_w))
        finally:
            os.close(beat_w)
        worker = _Worker(slot, proc, beats)
        self._live[proc.pid] = worker
        asyncio.get_running_loop().add_reader(beats, self._beat, worker)
        log.info("worker %d started (pid %d)", slot, proc.pid)
        if self._stopping is not None:  # started while the signal came
            proc.send_signal(self._stopping)
        return worker

    def _beat(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.beats, 4096)
        except BlockingIOError:
            return
        if data:
            worker.last_beat = time.monotonic()
            worker.beaten = True
        else:  # the worker closed its end: it is exiting
            asyncio.get_running_loop().remove_reader(worker.beats)

    async def _watch(self, worker: _Worker) -> WorkerRestartReason:
        """Wait until ``worker`` exits, or kill it once it has sent no heartbeat for the bound."""
        exited = asyncio.ensure_future(worker.proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait((exited,), timeout=self.check_s)
                if done:
                    return WorkerRestartReason.EXITED
                bound = self.hang_timeout_s + (0 if worker.beaten else START_GRACE_S)
                silent_s = time.monotonic() - worker.last_beat
                if silent_s > bound:
                    log.error("worker %d (pid %d) sent no heartbeat for %.1f s (bound %g s, "
                              "server.worker_hang_timeout_s): its event loop is blocked; killing "
                              "it", worker.slot, worker.pid, silent_s, self.hang_timeout_s)
                    worker.proc.kill()
                    await exited
                    return WorkerRestartReason.HUNG
        finally:
            loop = asyncio.get_running_loop()
            loop.remove_reader(worker.beats)
            os.close(worker.beats)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping is not None:
            log.warning("%s again: killing %d workers at once", sig.name, len(self._live))
            for worker in self._live.values():
                worker.proc.kill()
            return
        self._stopping = sig
        self._stop.set()
        if sig is signal.SIGINT:
            self._exit_code = 130
        drain_s = self.settings.server.drain_timeout_s
        log.info("%s: draining %d workers (up to %g s)", sig.name, len(self._live), drain_s)
        if self._coordinator is not None:
            self._coordinator.begin_drain()
        self._metrics.draining.set(1)
        for worker in self._live.values():
            worker.proc.send_signal(sig)
        asyncio.get_running_loop().call_later(drain_s + 5 + KILL_GRACE_S, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for worker in self._live.values():
            log.error("worker %d (pid %d) still running %g s after the drain began: killing it",
                      worker.slot, worker.pid, self.settings.server.drain_timeout_s + 5 + KILL_GRACE_S)
            worker.proc.kill()
