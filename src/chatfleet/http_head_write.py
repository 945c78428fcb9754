"""A response's head leaves in one write with the first bytes of its body: one TCP segment, and
one wake-up of the client instead of two.

uvicorn writes a response's head (status line and headers) as soon as the app sends
``http.response.start``, and its body at each ``http.response.body``: two writes, so two segments,
for every answer, also when the app sends both at once (a JSON answer; a stream's head and first
event, ``api/sse.CompletionStream``). The client wakes for the head and, on a machine whose cores
are busy, runs before the gateway writes the body: at rest on a 2-core machine, writing a streamed
chat's head took the gateway 114 µs, 29 µs of them its own work (timed in the gateway,
docs/benchmarks.md), before its first event could follow: a wait on the way to the first token.

``HeadHolder`` stands in for the connection's transport in one request's response cycle until the
head is out: it keeps the head and writes it together with the cycle's next write, or, if none
comes before the loop runs its next callbacks (a stream whose first event is not ready yet), on
its own then. From that write on the cycle writes to the transport itself: the body's writes, one
a token in a stream, pass through nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["HeadHolder", "ResponseCycle"]


class ResponseCycle(Protocol):
    """What ``HeadHolder`` uses of uvicorn's ``RequestResponseCycle``."""

    transport: Any
    response_started: bool


class HeadHolder:
    """The transport of ``cycle`` until its response's head has been written (see the module)."""

    __slots__ = ("_cycle", "_flush", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: ResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._release(head + data)
        elif self._cycle.response_started:  # uvicorn marks the start, then writes the head
            self._head = data
            self._flush = asyncio.get_running_loop().call_soon(self._write_head)
        else:  # an interim answer before the head: "100 Continue"
            self._transport.write(data)

    def _write_head(self) -> None:
        if self._head is not None:
            self._release(self._head)

    def _release(self, data: bytes) -> None:
        """Write ``data`` (the head, and the body's first bytes if any) and hand the cycle its
        transport back."""
        self._head = None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._cycle.transport = self._transport
        if not self._transport.is_closing():  # the client left: nothing to write to
            self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            self._release(self._head)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
