"""ASGI middleware, written against raw ASGI (no BaseHTTPMiddleware) to stay off the hot path."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.api.chatchat_envelope import envelope, error_data
from chatfleet.api.errors import error_response, rejection_response
from chatfleet.rag.ingest import IngestStopped
from chatfleet.serving.admission import Priority
from chatfleet.serving.completions import ROUTES

__all__ = ["AdmissionGate", "BodySizeLimit", "IngestGate"]

_PRIORITY_HEADER = b"x-chatfleet-priority"


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes``, by Content-Length or by counting the stream.

    A declared length over the limit is refused before the app runs; one within it is all the
    server reads as this request's body (more is the next request), so ``receive`` is left as it
    is, without a counting wrapper per read. A chunked body is counted as it is read; crossing the
    limit raises a 413 HTTPException inside the route's body parsing, which FastAPI re-raises as
    is, so the app's error handler answers it.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_paths: tuple[str, ...] = (),
                 max_upload_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = frozenset(upload_paths)
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, path: str) -> tuple[int, str, str]:
        """The limit for a path, the setting that holds it, and what to do instead."""
        if path in self.upload_paths:
            return (self.max_upload_bytes, "kb.max_upload_bytes",
                    "upload fewer or smaller files per request")
        return self.max_bytes, "limits.max_body_bytes", "send a shorter prompt"

    def _message(self, path: str, size: int) -> str:
        limit, setting, fix = self._limit(path)
        return f"request body is {size} bytes or more; the limit is {limit} bytes ({setting}): {fix}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self._limit(path)[0]
        bounded = chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                bounded = value.isdigit()
                declared = int(value) if bounded else 0
                if declared > limit:
                    await self._reject(scope, receive, send, declared)
                    return
            elif name == b"transfer-encoding":
                chunked = True
        if bounded and not chunked:  # the server reads no more than the declared length
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, self._message(path, received))
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        path = scope["path"]
        response = error_response(413, self._message(path, size), error_type="request_too_large",
                                  headers={"Connection": "close"}, path=path)
        await response(scope, receive, send)


class AdmissionGate:
    """Answer 429/503 to a completion request whose rejection is certain, before the body is read.

    Certain means: the replica is draining, or the queue is full and the arrival cannot displace a
    batch request (it is batch by header, or nothing queued is batch). Everything else goes on to
    the route, which validates the body and enqueues. The answer, headers and counted outcome are
    the same as the route's; only the cost differs (no routing, body read or validation).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTES:
            service = getattr(scope["app"].state, "completions", None)
            if service is not None:
                rejection = service.certain_rejection(scope["path"], _header_priority(scope))
                if rejection is not None:
                    await rejection_response(rejection, scope["path"])(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class IngestGate:
    """Answer 429 (all ingest slots taken and as many uploads waiting as may) or 503 (draining)
    to an upload before its body is read: 30 concurrent 60 MB uploads were read in full, and
    their multipart parsed on the event loop, only to be refused. The answer says
    ``Connection: close``: the unread body is not drained, the connection is closed after it
    (a client still sending sees its write fail, then reads this answer, as httpx does)."""

    def __init__(self, app: ASGIApp, *, upload_paths: tuple[str, ...]) -> None:
        self.app = app
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in self.upload_paths):
            state = scope["app"].state
            lifecycle = getattr(state, "lifecycle", None)
            refusal = (IngestStopped() if lifecycle is not None and lifecycle.draining
                       else state.knowledge.ingestor.refusal())
            if refusal is not None:
                status = 503 if isinstance(refusal, IngestStopped) else 429
                response = envelope(status, str(refusal), error_data(scope["path"]),
                                    http_status=status,
                                    headers={"Retry-After": str(refusal.retry_after_s),
                                             "Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header_priority(scope: Scope) -> Priority | None:
    for name, value in scope.get("headers", ()):
        if name == _PRIORITY_HEADER:
            try:
                return Priority(value.decode("latin-1").strip().lower())
            except ValueError:
                return None  # the route answers 400 for it
    return None
