"""Bounds on what one client connection may send, and for how long, before the gateway answers.

uvicorn's default HTTP protocol here (httptools) bounds nothing of this. httptools buffers a header
until its end by repeated ``bytes`` concatenation, so one 150 MB header held the event loop for
seconds at a time (84 s to parse, /livez stalled 10 s, +240 MB); and uvicorn arms no timer on a
connection until it has answered a request, so an idle connection, a half-sent head or a stalled
body stayed open for ever. ``BoundedHttpToolsProtocol`` keeps httptools (uvicorn's fast path) and
adds, per request:

- the head (request line and headers) may be ``max_header_bytes`` long, counted as the bytes
  arrive, before the parser sees them, and hold ``max_headers`` headers; past either, ``431``;
- it must arrive within ``header_timeout_s`` of its first byte; past that, ``408``;
- the body may pause at most ``body_timeout_s`` between reads; past that, ``408`` if no answer
  has started, and the connection closes (the app sees ``http.disconnect``). Time the gateway
  itself holds the body back does not count: reading paused because the app has not taken what
  came (uvicorn's flow control), or an ``Expect: 100-continue`` not yet answered;
- a new connection that sends nothing is closed after ``keep_alive_s``, as one idle between
  requests is (uvicorn arms that timer only once a response is complete).

Each refusal closes the connection (``Connection: close``). A request is complete once its body
is read: no timer runs while its answer streams, however long.

Each answer's head goes out in one write with the first bytes of its body (``http_head_write``).

A head that begins in the same read as the previous request's end (pipelining) is counted from
the next read on, so it may reach ``max_header_bytes`` plus the part of that read, which is at
most ``max_header_bytes`` again: the parser is fed at most that much at a time.
"""

from __future__ import annotations

import logging
from asyncio import TimerHandle, Transport
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from chatfleet.http_head_write import HeadHolder

__all__ = ["BoundedHttpToolsProtocol", "HttpLimits", "bounded_protocol"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float


LINGER_S = 2.0
"""After a refusal, how long the client's further input is read and dropped before the connection
closes (it closes at once when the client closes its side)."""


class _TooManyHeaders(Exception):
    """Raised in a parser callback: httptools stops parsing and re-raises it as the context of an
    ``HttpParserCallbackError``."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a request's end (or the connection's start) and its headers' end
        self._head_bytes = 0
        self._in_body = False  # between a request's headers' end and its body's end
        self._last_read = 0.0
        self._refused = False
        self._head_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._linger_timer: TimerHandle | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering after a refusal: what the client still sends is dropped
            return
        self._unset_keepalive_if_required()
        self._last_read = self.loop.time()
        limit = self.limits.max_header_bytes
        view = memoryview(data)
        while view:
            size = limit - self._head_bytes if self._in_head else limit
            piece, view = view[:size], view[size:]
            if self._in_head:
                self._head_bytes += len(piece)
            if not self._feed(piece):
                return
            if self._in_head and self._head_bytes >= limit:
                self._refuse(431, f"Request header fields too large: the request line and headers "
                                  f"may be at most {limit} bytes.")
                return
        # Timers are armed for what this read left unfinished, not before it: a head and body that
        # arrive in one read (most requests) arm and cancel nothing.
        if self._in_head:
            if self._head_bytes and self._head_timer is None and not self._answering():
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                        self._head_timed_out)
        elif self._in_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_check)

    def _feed(self, piece: memoryview) -> bool:
        """Parse ``piece``; False once the connection is being closed or handed over."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _TooManyHeaders):
                self._refuse(431, f"Request header fields too large: at most "
                                  f"{self.limits.max_headers} headers.")
            else:
                log.warning("Invalid HTTP request received.")
                self._refuse(400, "Invalid HTTP request received.")
            return False
        return not (self._refused or self.transport.is_closing())

    # Parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_headers:
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        self._cancel_timers()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request's cycle (none for an upgrade)
            self.cycle.transport = HeadHolder(self.transport, self.cycle)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._in_body = True, 0, False
        self._cancel_timers()
        super().on_message_complete()

    # Timers
    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, f"Request timeout: the request line and headers did not arrive within "
                          f"{self.limits.header_timeout_s:g} s.")

    def _body_check(self) -> None:
        self._body_timer = None
        held = self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        if held:  # the gateway holds the body back, not the client
            self._last_read = self.loop.time()
        due = self._last_read + self.limits.body_timeout_s
        if due > self.loop.time():
            self._body_timer = self.loop.call_at(due, self._body_check)
        else:
            self._refuse(408, f"Request timeout: the request body paused longer than "
                              f"{self.limits.body_timeout_s:g} s.")

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, message: str) -> None:
        """Close the connection, first answering ``status`` with ``message`` if that answer
        belongs to the request being read (not to one whose answer is under way or done). A
        request whose body was being read sees ``http.disconnect``."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_timers()
        if self.client:
            log.info("%s:%d: %d %s", *self.client, status, message)
        answer = self._in_head and not self._answering()
        if (self._in_body and self._answering() and not self.cycle.response_started
                and not self.pipeline):  # the answer to the request whose body was being read
            self.cycle.disconnected = True  # whatever the app sends after this answer is dropped
            self.cycle.message_event.set()
            answer = True
        if not answer or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._write_answer(status, message)
        # Closing with unread input would send a reset, which may destroy the answer in the
        # client's buffers before it reads it (a client still sending a huge header): end the
        # sending side instead and drop what comes for a moment, as nginx's lingering close does.
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _write_answer(self, status: int, message: str) -> None:
        body = message.encode("ascii")
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: text/plain; charset=utf-8\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: uvicorn makes each connection's
    protocol from the class and its config alone, so the limits ride on a subclass."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})
