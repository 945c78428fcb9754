"""API-key authentication with a per-key request-rate limit, as raw ASGI middleware.

``create_app`` installs :class:`ApiKeyAuth` only when ``api_keys`` is set, as the outermost of
ChatFleet's middleware: a request without a valid key is answered before admission, body reading,
routing or validation, and learns nothing about the deployment but that it needs a key.

- Every path needs a key except :data:`PUBLIC_PATHS` (probes, the endpoint picker's /load,
  Prometheus' scrape of /metrics, the API docs). Unknown paths need one too, so a caller without
  a key cannot tell which routes exist.
  /metrics/engine needs one: each call of it can reach the engine (the chart's ServiceMonitor
  sends a key there, ``auth.scrapeSecretKey``).
- The key comes in ``Authorization: Bearer <key>`` (what the openai SDK sends; the scheme is
  case-insensitive). Keys are compared as SHA-256 digests with ``hmac.compare_digest``, against
  every configured key each time: the time taken does not depend on which key, or how much of
  one, matched. Only the digests are kept here.
- No key: 401 (``missing``); a key that matches none: 401 (``invalid``); both with
  ``WWW-Authenticate: Bearer`` (RFC 6750). A valid key over ``auth.rate_limit_rps``: 429 with
  Retry-After (``rate_limited``). Bodies are OpenAI's error envelope, or Chatchat's
  ``{code, msg, data}`` on its routes with the same HTTP status, as for 413 and 429 elsewhere.
- Both limits are per pod: with ``server.workers`` above 1 the buckets live in the pod's admission
  coordinator (``serving/pod_coordinator.py``; a key's take is one round trip to it, a blocked
  address is broadcast to every worker), else in this process.
- Wrong keys are limited per client address (``auth.failed_keys_per_s``, ``failed_keys_burst``):
  an address over it gets 429 with Retry-After (``too_many_failures``) before its key is even
  compared, whatever key it sends, until it is back under the rate. The address is the
  connection's peer (uvicorn's proxy headers are believed only from ``server.forwarded_allow_ips``).
- Neither a presented nor a configured key ever reaches a response, a log line or a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from chatfleet.api.access_log import loggable_path
from chatfleet.api.errors import error_response
from chatfleet.serving.pod_admission import PodAdmission
from chatfleet.serving.rate_limit import (
    FailureLimiter,
    KeyRateLimiter,
    client_key,
    retry_after_header_s,
)
from chatfleet.telemetry.metrics import AuthRejection

__all__ = ["PUBLIC_PATHS", "ApiKeyAuth", "KeyRing", "bearer_token"]

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({
    "/livez", "/readyz",                    # kubelet probes
    "/load",                                # the endpoint picker's poll (counts only, no user data)
    "/metrics",                             # Prometheus' scrape of the gateway's own metrics
    "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",  # the API's own description
})
"""Paths served without a key (exact matches). Everything else needs one."""

_FIX = "send the header 'Authorization: Bearer <key>' (the openai SDK's api_key)"
MISSING_MESSAGE = f"this API needs an API key: {_FIX}"
MALFORMED_MESSAGE = f"the Authorization header is not of the form 'Bearer <key>': {_FIX}"
INVALID_MESSAGE = ("the API key sent in 'Authorization: Bearer' is not accepted here: send a key "
                   "this deployment issued (its operator sets them)")


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The key of the first ``Authorization: Bearer <key>`` header, and whether an Authorization
    header was present at all (to tell a malformed one from none)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None, True
            token = token.strip()
            return (token or None), True
    return None, False


class KeyRing:
    """The configured keys as SHA-256 digests; :meth:`match` compares in constant time."""

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        if not keys:
            raise ValueError("KeyRing needs at least one key")
        self._digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._digests)} keys)"

    def match(self, presented: bytes) -> int | None:
        """The index of the configured key equal to ``presented``, or None. Every digest is
        compared, whatever matched: no early exit, and digests all have the same length."""
        digest = hashlib.sha256(presented).digest()
        found = -1
        for index, candidate in enumerate(self._digests):
            equal = hmac.compare_digest(digest, candidate)
            found = index if equal and found < 0 else found
        return found if found >= 0 else None


class ApiKeyAuth:
    """Refuse a request without a valid API key (401), or over its key's rate (429).

    ``on_reject(reason)`` is called once per refusal (the metric); ``clock`` is the rate limits'
    time source (monotonic seconds). ``failed_keys_per_s`` 0: wrong keys are not limited.
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[SecretStr], rate_limit_rps: float = 0.0,
                 rate_limit_burst: int = 1, failed_keys_per_s: float = 0.0,
                 failed_keys_burst: int = 1, public_paths: frozenset[str] = PUBLIC_PATHS,
                 on_reject: Callable[[AuthRejection], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 pod: PodAdmission | None = None) -> None:
        self.app = app
        self.pod = pod
        self.keys = KeyRing(keys)
        self.public_paths = public_paths
        self.on_reject = on_reject
        self.clock = clock
        self.limiter = (KeyRateLimiter(keys=len(self.keys), rate=rate_limit_rps,
                                       burst=rate_limit_burst, now=clock())
                        if rate_limit_rps > 0 else None)
        self.failures = (FailureLimiter(rate=failed_keys_per_s, burst=failed_keys_burst)
                         if failed_keys_per_s > 0 else None)
        log.info("API keys required on every route but %s: %d key(s), %s",
                 ", ".join(sorted(public_paths)), len(self.keys),
                 f"each limited to {rate_limit_rps:g} requests/s (burst {rate_limit_burst}) per "
                 f"{'pod' if pod else 'gateway process'}" if self.limiter else "no rate limit")
        if self.failures:
            log.info("wrong API keys limited to %g/s (burst %d) per client address", failed_keys_per_s,
                     failed_keys_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        address = client_key((scope.get("client") or (None, 0))[0])
        if self.failures is not None and (wait_s := self._address_wait(address)) > 0:
            failures = self.failures
            await self._over_limit(scope, receive, send, AuthRejection.TOO_MANY_FAILURES, wait_s,
                                   lambda retry_after: (
                                       f"too many wrong API keys from this address (more than "
                                       f"{failures.burst} at once, or {failures.rate:g} a "
                                       f"second): retry after {retry_after} s with a key this "
                                       f"deployment issued"))
            return
        token, had_header = bearer_token(scope.get("headers", ()))
        index = self.keys.match(token) if token is not None else None
        if index is None:
            if token is not None and self.failures is not None:
                if self.pod is not None:
                    self.pod.address_failed(address)
                else:
                    self.failures.failed(address, self.clock())
            reason = AuthRejection.MISSING if token is None else AuthRejection.INVALID
            message = (INVALID_MESSAGE if token is not None else
                       MALFORMED_MESSAGE if had_header else MISSING_MESSAGE)
            challenge = 'Bearer error="invalid_token"' if token is not None else "Bearer"
            await self._refuse(scope, receive, send, reason, 401, message, "authentication_error",
                               {"WWW-Authenticate": challenge})
            return
        if self.limiter is not None:
            wait_s = (await self.pod.key_wait(index) if self.pod is not None
                      else self.limiter.take(index, self.clock()))
            if wait_s > 0:
                limiter = self.limiter
                await self._over_limit(scope, receive, send, AuthRejection.RATE_LIMITED, wait_s,
                                       lambda retry_after: (
                                           f"this API key is over its rate limit of "
                                           f"{limiter.rate:g} requests/s (bursts of "
                                           f"{limiter.burst}) on this gateway replica: retry "
                                           f"after {retry_after} s, or send fewer requests per "
                                           f"second"))
                return
        await self.app(scope, receive, send)

    def _address_wait(self, address: str) -> float:
        """Seconds ``address`` must wait after too many wrong keys: counted by the pod's
        coordinator when there is one (``server.workers`` above 1), else in this process."""
        if self.pod is not None:
            return self.pod.address_wait(address)
        assert self.failures is not None
        return self.failures.wait(address, self.clock())

    async def _over_limit(self, scope: Scope, receive: Receive, send: Send, reason: AuthRejection,
                          wait_s: float, message: Callable[[int], str]) -> None:
        """429 with a Retry-After (whole seconds) that covers ``wait_s``; ``message`` is given it."""
        retry_after = retry_after_header_s(wait_s)
        await self._refuse(scope, receive, send, reason, 429, message(retry_after),
                           "rate_limit_exceeded", {"Retry-After": str(retry_after)})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, reason: AuthRejection,
                      status: int, message: str, error_type: str, headers: dict[str, str]) -> None:
        log.debug("refused %s %s: %s", scope.get("method", "WEBSOCKET"),
                  loggable_path(scope["path"]), reason.value)
        if self.on_reject is not None:
            self.on_reject(reason)
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        response = error_response(status, message, error_type=error_type, headers=headers,
                                  path=scope["path"])
        await response(scope, receive, send)
