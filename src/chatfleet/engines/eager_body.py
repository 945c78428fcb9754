"""aiohttp's request body written in the request's own step, not one pass of the loop later.

aiohttp's ``ClientRequest.send`` writes a request's head and body (``write_bytes``) from a task of
its own. On Python 3.12 and later it starts that task eagerly; on 3.11, this image's Python, the
task's first step waits behind everything already ready on the event loop, which under load is a
burst of other streams' tokens: with 256 streams relayed, a new chat's engine request left the
gateway 0.2 ms later at the median and 1.1 ms later on average than at rest (timed inside the
gateway, docs/benchmarks.md), on the way to its first token. Moving to Python 3.12 is not the way
out: it costs this code 17-26% more CPU (``bench/relay_cpu/in_process.py``).

``EagerBodyRequest``, the engine session's ``request_class``, runs ``write_bytes`` at once up to its
first wait, as 3.12's eager task start does. A body that the connection takes without waiting
(every request but a long prompt on a connection whose buffer is full, or one sent with
``Expect: 100-continue``, which the gateway never sends) is written before ``send`` returns, and
aiohttp's task gets a coroutine with nothing left to do. Otherwise the rest of ``write_bytes``
runs in aiohttp's task as before, stepped as a task steps a coroutine (``_finish``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiohttp

__all__ = ["EagerBodyRequest", "started"]


class EagerBodyRequest(aiohttp.ClientRequest):
    def write_bytes(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, None]:  # type: ignore[override]
        return started(super().write_bytes(*args, **kwargs))


def started(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    """Run ``coro`` now up to its first wait; a coroutine that does the rest (nothing if it
    finished, its exception if it failed), for the caller to await or run as a task."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return _nothing()
    except Exception as exc:  # noqa: BLE001 - raised where the task would have raised it
        return _raise(exc)
    return _finish(coro, waiting)


async def _nothing() -> None:
    return None


async def _raise(exc: Exception) -> None:
    raise exc


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive ``coro`` on from the point where it yielded ``waiting``, as an asyncio task does: it
    resumes once the future it waits for is done (or at the next pass for a bare ``yield``), and
    a cancellation cancels that future, so that ``coro`` raises CancelledError where it waits."""
    while True:
        resume: Any = coro.send
        arg: Any = None
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # taken, as Task.__step takes it
                await asyncio.wait((waiting,))
        except asyncio.CancelledError as cancel:
            if waiting is None or not waiting.cancel():  # nothing to cancel: raise it in coro
                resume, arg = coro.throw, cancel
        try:
            waiting = resume(arg)
        except StopIteration:
            return
