"""The engine's own metrics for /metrics/engine, scraped at most once per ``ttl_s``.

Every call of /metrics/engine used to scrape the engine: 300 clients calling it made 734 scrapes
a second and slowed chat (p50 54 -> 922 ms). Now an answer (or the engine's failure to give one)
is kept for ``ttl_s``, and callers that arrive while a scrape is in flight wait for that one
scrape. Prometheus scrapes every 15 s or so: a 1 s old exposition changes nothing for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chatfleet.engines.base import Engine, EngineUnavailable

__all__ = ["ENGINE_SCRAPE_TTL_S", "EngineMetricsCache"]

ENGINE_SCRAPE_TTL_S = 1.0
"""Seconds an engine scrape is served from the cache."""

Exposition = tuple[bytes, str] | None


class EngineMetricsCache:
    """``get()``: the engine's exposition, at most ``ttl_s`` old, one scrape in flight at a time."""

    def __init__(self, engine: Engine, *, ttl_s: float = ENGINE_SCRAPE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self.clock = clock
        self._result: Exposition | EngineUnavailable = None
        self._at = -float("inf")
        self._inflight: asyncio.Task[None] | None = None

    async def get(self) -> Exposition:
        """The exposition, or None if the engine has none; raises EngineUnavailable (also kept
        for ``ttl_s``: an engine that is down is not asked again by every caller)."""
        if self.clock() - self._at >= self.ttl_s:
            if self._inflight is None:
                self._inflight = asyncio.create_task(self._scrape())
            # shield: a caller that goes away does not cancel the scrape the others wait for.
            await asyncio.shield(self._inflight)
        if isinstance(self._result, EngineUnavailable):
            raise EngineUnavailable(self._result.message)
        return self._result

    async def _scrape(self) -> None:
        try:
            self._result = await self.engine.metrics_exposition()
        except EngineUnavailable as exc:
            self._result = exc
        finally:
            self._at = self.clock()
            self._inflight = None
