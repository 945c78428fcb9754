"""A worker's proof of life: one byte to the supervisor from its event loop, every interval.

It is written by a loop callback, so it stops when the loop stops turning (a blocking call, a
deadlock, a process stopped by SIGSTOP) even while the process lives and its socket accepts: the
supervisor sees no byte for ``server.worker_hang_timeout_s`` and replaces the worker. No HTTP
probe: it would queue behind the very requests that hold the loop, and cost a request per beat.
When the supervisor is gone (the write fails) the beats stop; the worker's connection to the
pod's admission coordinator, which lived in the supervisor, closed at the same moment, and that
is what drains and exits the worker (``serving/pod_admission.py``, ``app.py``): one signal, not a
second SIGTERM that would cut its drain short.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["HEARTBEAT_FD_ENV", "LISTEN_FD_ENV", "Heartbeat", "heartbeat_interval_s"]


LISTEN_FD_ENV = "CHATFLEET_WORKER_LISTEN_FD"
"""The inherited listening socket's descriptor, set by the supervisor for a worker."""
HEARTBEAT_FD_ENV = "CHATFLEET_WORKER_HEARTBEAT_FD"
"""The inherited heartbeat pipe's write end, set by the supervisor for a worker."""


def heartbeat_interval_s(hang_timeout_s: float) -> float:
    """A beat a second, or five per hang bound when that is shorter: a late beat or two (a slow
    callback, a busy machine) never looks like a hang."""
    return min(1.0, hang_timeout_s / 5)


class Heartbeat:
    def __init__(self, fd: int, interval_s: float) -> None:
        """``fd``: the write end of the supervisor's pipe, non-blocking."""
        self._fd = fd
        self._interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.call_soon(self._beat)

    def _beat(self) -> None:
        try:
            os.write(self._fd, b".")
        except BlockingIOError:  # the supervisor is behind on reading: it is alive
            pass
        except BrokenPipeError:  # the supervisor is gone: the admission link stops this worker
            return
        assert self._loop is not None
        self._loop.call_later(self._interval_s, self._beat)
