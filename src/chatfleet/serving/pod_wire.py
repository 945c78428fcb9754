"""The line protocol between a pod's gateway workers and its admission coordinator.

One Unix stream connection per worker, one ASCII line per message, fields separated by spaces
(the last field of a refusal is free text). Worker to coordinator:

- ``E <id> <i|b>``: enqueue request ``id`` (the worker's own counter) as interactive or batch.
- ``R <id>``: the worker is done with ``id``: frees its slot, or takes it out of the queue.
- ``K <id> <key index>``: take one token of that API key's rate limit; answered by ``k``.
- ``F <address>``: the client address sent a wrong API key.
- ``L <id>``: what the pod's admission looks like now (``GET /load``); answered by ``l``.

Coordinator to worker:

- ``G <id>``: ``id`` holds an engine slot.
- ``X <id> <reason> <retry after s> <message>``: ``id`` was refused (queue_full, queue_timeout,
  draining), on arrival or later (deadline, displaced by an interactive arrival).
- ``k <id> <wait s>``: the answer to ``K``: 0 when taken, else the seconds until a token is back.
- ``l <id> <running> <running batch> <queued interactive> <queued batch> <draining 0|1>
  <retry after s> <arrivals>``: the answer to ``L``, counted over the whole pod.
- ``S <unknown> <batch> <retry after s>``: the pod's certain refusal for an arrival of unknown
  priority and for a batch one (a reason or ``-``), sent to every worker when it changes, so a
  worker's edge can refuse without asking.
- ``B <address> <wait s>``: every worker must refuse that address's requests for ``wait s``.

Text lines, not a binary format: a message is parsed with one ``split``, which costs less than
any framing library's call, and the protocol stays readable in ``strace``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

__all__ = ["INTERACTIVE", "BATCH", "MAX_LINE_BYTES", "LineProtocol"]

log = logging.getLogger(__name__)

INTERACTIVE = "i"
BATCH = "b"
MAX_LINE_BYTES = 4096
"""Longest line either side sends (a refusal's message is the longest); a longer one is a bug or
a stranger on the socket, and closes the connection."""


class LineProtocol(asyncio.Protocol):
    """Splits the byte stream into lines and hands each batch of whole lines to ``lines``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (a worker's loop) do not derive from asyncio.Transport, so no
        # isinstance check: a stream transport is all this protocol is ever given.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self._partial + data if self._partial else data
        *whole, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:
            log.error("pod admission: a line over %d bytes; closing the connection", MAX_LINE_BYTES)
            assert self.transport is not None
            self.transport.close()
            return
        if whole:
            self.lines([line.decode("ascii", "replace").split(" ", 4) for line in whole])

    def lines(self, lines: Sequence[list[str]]) -> None:
        raise NotImplementedError

    def send(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode("ascii", "replace") + b"\n")
