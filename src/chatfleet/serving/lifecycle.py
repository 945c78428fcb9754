"""Readiness and draining: whether this replica should get traffic, and how it stops.

Ready means the engine lists the served model and the replica is not draining. A background task
polls the engine's model list every ``health_interval_s``; /readyz answers from the latest result,
so probes stay cheap and never wait on the engine. Draining starts on SIGTERM: readiness turns false
at once, admission refuses new work with 503, and ``drain`` returns when the accepted work is done
or the drain timeout has passed. Background work (uploads being ingested) is waited for the
same way, and stopped when the drain ends: an ingest worker still reading a file at the drain
timeout is killed, its upload answered with an error, and the process can exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from chatfleet.aio import cancel_and_wait
from chatfleet.engines.base import Engine, EngineError
from chatfleet.serving.admission import Admission

__all__ = ["BackgroundWork", "Lifecycle"]

log = logging.getLogger(__name__)


class BackgroundWork(Protocol):
    """Work besides the admitted requests that a drain waits for, then stops."""

    async def wait_idle(self) -> None: ...

    def stop(self) -> None:
        """Cut off what still runs (it answers its clients with an error) and take no more."""


class Lifecycle:
    def __init__(self, *, engine: Engine, admission: Admission, model: str,
                 health_interval_s: float,
                 on_change: Callable[[Lifecycle], None] | None = None,
                 background: Sequence[BackgroundWork] = ()) -> None:
        self.engine = engine
        self.admission = admission
        self.model = model
        self.health_interval_s = health_interval_s
        self.engine_ready = False
        self.reason = "engine not checked yet"
        self._on_change = on_change
        self._background = tuple(background)
        self._task: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def ready(self) -> bool:
        return self.engine_ready and not self.draining

    async def check_engine(self) -> None:
        """List the engine's models once and update readiness."""
        try:
            models = await self.engine.list_models()
        except EngineError as exc:
            self._set(False, f"engine unreachable: {exc.message}")
            return
        if self.model in models:
            self._set(True, "engine lists the model")
        else:
            self._set(False, f"engine does not list model {self.model!r} yet (it lists {models})")

    def _set(self, ready: bool, reason: str) -> None:
        changed = ready != self.engine_ready
        self.engine_ready, self.reason = ready, reason
        if changed:
            log.info("engine %s: %s", "ready" if ready else "not ready", reason)
            if self._on_change is not None:
                self._on_change(self)

    async def _poll(self) -> None:
        while True:
            await self.check_engine()
            await asyncio.sleep(self.health_interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="chatfleet-readiness")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def begin_drain(self) -> None:
        self.admission.begin_drain()
        if self._on_change is not None:
            self._on_change(self)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for accepted work; True if it all finished in time. Then
        stop the background work either way."""
        self.begin_drain()
        log.info("draining: %d running, %d queued; waiting up to %g s",
                 self.admission.running, self.admission.queued(), timeout_s)
        try:
            await asyncio.wait_for(asyncio.gather(
                self.admission.wait_idle(), *(work.wait_idle() for work in self._background)),
                timeout_s)
        except TimeoutError:
            log.warning("drain timeout after %g s: %d running, %d queued are cut off",
                        timeout_s, self.admission.running, self.admission.queued())
            return False
        finally:
            for work in self._background:
                work.stop()
        log.info("drained: no request left")
        return True
