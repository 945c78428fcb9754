"""Worker processes for blocking CPU work (loading and splitting uploads), one job at a time each.

Why not ``concurrent.futures.ProcessPoolExecutor``: a worker it loses (the OOM killer) breaks the
whole pool and fails every job queued in it, so the next user's upload was refused with a message
blaming its own file; it cannot time out or stop a running job (a 30,000-page PDF held the only
worker for minutes); and its exit hook waits for running jobs, so a stopping gateway stayed up
until the file was read. Here each worker runs one job at a time over its own pipe, so a job
that dies or overruns is that worker's job only: the worker is killed, the job fails with
``WorkerDied`` or ``WorkerTimeout``, and a fresh worker takes its place on the next job. A worker
says when it starts a job, so one that died idle (found dead before it took the job) costs the
job nothing: the job runs on a fresh worker.
Workers are daemon processes (spawned: the gateway has threads), killed by ``stop`` and at exit.

Why not ``pebble.ProcessPool`` (5.2.3, evaluated): a worker that dies while the pool knows of no
running job (an idle worker, one still importing, or one just handed a job: killed within 200 ms
of a 64 MB file being scheduled) breaks the whole pool for good ("All workers expired"), so every
later upload failed until the gateway restarted; and its ``stop`` leaves running jobs unresolved.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["WorkerDied", "WorkerPool", "WorkerTimeout", "WorkersStopped"]

_READY = "ready"
_STARTED = "started"


class _DeadBeforeStart(Exception):
    """The worker was gone before it took the job (it died idle): the job never ran."""


class WorkerDied(Exception):
    """The worker process running the job died (killed, out of memory, crashed)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"the worker process died (exit code {exitcode})")
        self.exitcode = exitcode


class WorkerTimeout(Exception):
    """The job ran longer than its time limit; its worker was killed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the job ran longer than {timeout_s:g} s")
        self.timeout_s = timeout_s


class WorkersStopped(Exception):
    """The pool was stopped (the gateway is shutting down): the job was not run, or was cut off."""


def _serve(conn: Connection, preload: str) -> None:
    """The worker's loop: import ``preload``, say ready, then run jobs until the pipe closes,
    saying ``_STARTED`` as each one starts."""
    importlib.import_module(preload)
    conn.send(_READY)
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        conn.send(_STARTED)
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except Exception as exc:  # the caller re-raises it
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result or exception
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class _Worker:
    def __init__(self, preload: str) -> None:
        """Blocking: spawns the process and waits until it has imported ``preload``."""
        context = get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, preload), daemon=True,
                                       name="chatfleet-worker")
        self.process.start()
        child.close()
        try:
            if self.conn.recv() != _READY:
                raise RuntimeError("the worker process did not start")
        except EOFError:
            self.kill()
            raise WorkerDied(self.process.exitcode) from None

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
        """Blocking (run in a thread): the job's ("ok", result) or ("error", exception).
        Raises ``_DeadBeforeStart`` when the process was gone before it took the job, EOFError
        or OSError when it died running it."""
        try:
            self.conn.send((fn, args))
            started = self.conn.recv()
        except (EOFError, OSError):
            raise _DeadBeforeStart from None
        if started != _STARTED:
            raise RuntimeError(f"the worker process answered {started!r} to a job")
        return self.conn.recv()

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join()


class WorkerPool:
    """``size`` workers, started when first needed; jobs wait for a free one in arrival order."""

    def __init__(self, size: int, *, preload: str) -> None:
        self._preload = preload
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(size):
            self._idle.put_nowait(None)  # a worker not started yet
        self._live: set[_Worker] = set()
        self._stopped = False

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """``fn(*args)`` in a worker process (both picklable), its result or its exception.
        Raises ``WorkerTimeout`` after ``timeout_s`` of running (waiting for a worker does not
        count), ``WorkerDied`` and ``WorkersStopped``."""
        if self._stopped:
            raise WorkersStopped
        worker = await self._idle.get()
        healthy = False
        call: asyncio.Future[tuple[str, Any]] | None = None
        try:
            if self._stopped:
                raise WorkersStopped
            for attempt in range(2):  # a worker found dead before the job: once more, fresh
                if worker is None:
                    worker = await asyncio.to_thread(_Worker, self._preload)
                    self._live.add(worker)
                call = asyncio.ensure_future(asyncio.to_thread(worker.call, fn, args))
                done, _ = await asyncio.wait({call}, timeout=timeout_s)
                if not done:
                    raise WorkerTimeout(timeout_s)
                try:
                    status, value = call.result()
                    break
                except _DeadBeforeStart:
                    if self._stopped:
                        raise WorkersStopped from None
                    if attempt:
                        raise WorkerDied(worker.process.exitcode) from None
                    self._discard(worker)
                    worker, call = None, None
                except (EOFError, OSError):
                    if self._stopped:
                        raise WorkersStopped from None
                    raise WorkerDied(worker.process.exitcode) from None
            healthy = True
            if status == "error":
                raise value
            return value
        finally:
            if worker is not None and not healthy:
                self._discard(worker, call)
            self._idle.put_nowait(worker if healthy else None)

    def _discard(self, worker: _Worker, call: asyncio.Future[Any] | None = None) -> None:
        """Kill ``worker`` and close its pipe (once ``call``, a thread still reading it, ends)."""
        self._live.discard(worker)
        worker.kill()
        if call is None or call.done():
            worker.conn.close()
        else:  # its thread still reads the pipe: it gets EOF now, then the pipe closes
            call.add_done_callback(lambda _, conn=worker.conn: conn.close())

    def stop(self) -> None:
        """Kill every worker (running jobs fail with ``WorkersStopped``); later jobs are refused."""
        self._stopped = True
        for worker in list(self._live):
            worker.kill()
        self._live.clear()
