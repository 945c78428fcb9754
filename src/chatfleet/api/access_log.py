"""One access-log line per request, as raw ASGI middleware: the outermost of ChatFleet's.

``create_app`` installs :class:`AccessLog` outside API-key authentication, the admission gate and
the body limit, so a request those refuse (401, 429, 503, 413) is logged with the status it got,
like one a route answered. The line, on logger ``chatfleet.access`` at INFO:

    POST /v1/chat/completions 200 latency_s=0.8123 request_id=chatcmpl-1f0c... priority=interactive queue_wait_s=0.0004

- ``latency_s``: from the request's arrival here until its last byte was handed to the server (a
  stream: its last event), or until it ended otherwise.
- ``request_id``: the answer's ``X-Request-Id``: the completion's id where a route set it, else one
  made here and added to the answer, so a client can quote the id of any answer.
- ``priority`` and ``queue_wait_s``: what admission did with a completion request (from
  ``serving/admission_record.py``, which this middleware sets up per request); absent otherwise.
- ``disconnected``: the client went away before the last byte. The status is then the one the
  answer had started with, or 499 (nginx's "client closed request") if none had started.
- ``/livez``, ``/readyz``, ``/load`` and ``/metrics(/engine)`` are logged at DEBUG: a kubelet
  probing every few seconds, the endpoint picker polling many times a second, or a Prometheus
  scrape, would otherwise flood the log.

Never logged: headers (Authorization and API keys among them), the query string (values there
may be secrets; the path is logged without it), request and response bodies, prompt text, and the
id of a temporary knowledge base: anyone who has it can search the files uploaded for a file chat
(``rag/temp_kbs.py``), so the path segment after ``/temp_kb/`` is logged as ``<redacted>``
(``/knowledge_base/temp_kb/<redacted>/chat/completions``; :func:`loggable_path`, which the other
lines that name a path use too). The raw path is redacted, not replaced by the matched route's
template: a request refused before routing (401, 429, 413) matched no route, and the template
would also hide a ``local_kb`` request's knowledge-base name, which is no secret.

With ``log.format=json`` the same fields are keys of the line (``logs.py``). The bookkeeping
costs about 5 µs a request and one extra call per ``send`` (a streamed token); writing the line
costs more, about as much as serving ``GET /v1/models`` (measurements: docs/operations.md#logs).
Where the log level filters the line out (``server.log_level=warning``), none of that is done: an
answer without an ``X-Request-Id`` still gets one, nothing else.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.logs import FIELDS
from chatfleet.serving.admission_record import AdmissionRecord, current_admission

__all__ = ["QUIET_PATHS", "AccessLog", "loggable_path"]

log = logging.getLogger("chatfleet.access")

QUIET_PATHS = frozenset({"/livez", "/readyz", "/load", "/metrics", "/metrics/engine"})
"""Probes, the endpoint picker's polls and scrapes: logged at DEBUG, not INFO."""

_REQUEST_ID = b"x-request-id"
_CLIENT_CLOSED = 499
_NO_RESPONSE = 500
"""What a request that ended without an answer got: uvicorn answers 500 for it (or the app's
exception handler did, outside this middleware)."""


_SECRET_SEGMENT = re.compile(r"(?<=/temp_kb/)[^/]+")
"""The segment of a path that is a temporary knowledge base's id, wherever ``temp_kb`` is followed
by one (a path that matches no route, e.g. with a typo after the id, is redacted too)."""


def loggable_path(path: str) -> str:
    """``path`` as a log line may show it: a temporary knowledge base's id replaced by
    ``<redacted>``, and control characters escaped (a path of ``%0A`` cannot forge a log line)."""
    text = _SECRET_SEGMENT.sub("<redacted>", path)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _identified(start: Message) -> tuple[Message, str]:
    """A response start with an ``X-Request-Id`` (the one it has, else a new ``req-<hex>`` one
    added), and that id."""
    headers = start.get("headers", ())
    for name, value in headers:
        if name == _REQUEST_ID:
            return start, value.decode("latin-1")
    request_id = "req-" + uuid.uuid4().hex
    return {**start, "headers": [*headers, (_REQUEST_ID, request_id.encode())]}, request_id


def _identifying(send: Send) -> Send:
    """``send`` that gives a response without an ``X-Request-Id`` one: what the middleware does
    to a request whose line the log level filters out. No timing, no admission record, no
    wrapped ``receive``: that bookkeeping only feeds the line."""

    async def identifying_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = _identified(message)[0]
        await send(message)

    return identifying_send


class AccessLog:
    """Log each HTTP request once it is over: see the module docstring for the line."""

    def __init__(self, app: ASGIApp, *, quiet_paths: frozenset[str] = QUIET_PATHS) -> None:
        self.app = app
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        level = logging.DEBUG if scope["path"] in self.quiet_paths else logging.INFO
        if not log.isEnabledFor(level):
            if level == logging.DEBUG:
                await self.app(scope, receive, send)  # an unlogged probe costs nothing more
            else:  # no line to write (the level filters it out), but the answer keeps its id
                await self.app(scope, receive, _identifying(send))
            return
        arrived_at = time.perf_counter()
        status = 0
        request_id = ""
        ended_at = 0.0
        complete = disconnected = False

        async def logged_send(message: Message) -> None:
            nonlocal status, request_id, ended_at, complete
            kind = message["type"]
            if kind == "http.response.body":
                if not message.get("more_body", False):
                    complete = True  # a disconnect seen from now on is not the client leaving early
                    await send(message)
                    ended_at = time.perf_counter()
                    return
            elif kind == "http.response.start":
                status = message["status"]
                message, request_id = _identified(message)
            await send(message)

        async def watched_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        record = AdmissionRecord()
        token = current_admission.set(record)
        try:
            await self.app(scope, watched_receive, logged_send)
        finally:
            current_admission.reset(token)
            if log.isEnabledFor(level):
                if not status:
                    status = _CLIENT_CLOSED if disconnected else _NO_RESPONSE
                self._log(level, scope, status, (ended_at or time.perf_counter()) - arrived_at,
                          request_id, record, disconnected)

    @staticmethod
    def _log(level: int, scope: Scope, status: int, latency_s: float, request_id: str,
             record: AdmissionRecord, disconnected: bool) -> None:
        method, path = scope["method"], loggable_path(scope["path"])
        priority = record.priority.value if record.priority is not None else None
        wait_s = record.queue_wait_s
        message = f"{method} {path} {status} latency_s={latency_s:.4f} request_id={request_id or '-'}"
        if priority is not None:
            message += f" priority={priority}"
        if wait_s is not None:
            message += f" queue_wait_s={wait_s:.4f}"
        if disconnected:
            message += " disconnected"
        log.log(level, message, extra={FIELDS: {
            "method": method, "path": path, "status": status, "latency_s": round(latency_s, 6),
            "request_id": request_id or None, "priority": priority,
            "queue_wait_s": None if wait_s is None else round(wait_s, 6),
            "disconnected": disconnected}})
