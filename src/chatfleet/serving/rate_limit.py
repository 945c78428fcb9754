"""Token buckets: the per-API-key request-rate limit (``auth.rate_limit_rps``, ``auth.rate_limit_burst``).

Pure arithmetic on a clock the caller passes in (``now``, seconds, monotonic); no I/O, no wall
clock, so tests drive it with plain numbers. ``api/auth.py`` keeps one bucket per configured key
and calls :meth:`KeyRateLimiter.take` once per request.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second. A request takes one;
with none left it is refused, and the wait until a whole token is back is its Retry-After.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KeyRateLimiter", "TokenBucket", "retry_after_header_s"]

_EPSILON = 1e-9
"""Refill arithmetic in floats: a bucket waited for exactly its Retry-After must have its token."""


@dataclass(slots=True, kw_only=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; full when made."""

    rate: float
    """Tokens added per second (the sustained request rate); above 0."""
    burst: int
    """Most tokens held (requests allowed at once after an idle spell); at least 1."""
    tokens: float = -1.0
    """Tokens now; below 0 at construction means full."""
    updated: float = 0.0
    """The ``now`` of the last refill."""

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be above 0 tokens/s, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill (``now`` never goes back)."""
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is back (nothing taken)."""
        self.refill(now)
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


def retry_after_header_s(wait_s: float) -> int:
    """A Retry-After value in whole seconds, never below 1, that is never shorter than ``wait_s``."""
    return max(1, math.ceil(wait_s - _EPSILON))


class KeyRateLimiter:
    """One :class:`TokenBucket` per key, by the key's index among the configured ones.

    Buckets live in this process only: each gateway pod limits its own share.
    """

    def __init__(self, *, keys: int, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets = [TokenBucket(rate=rate, burst=burst, updated=now) for _ in range(keys)]

    def take(self, key_index: int, now: float) -> float:
        """0.0 when the key may send this request, else the seconds until it may."""
        return self._buckets[key_index].take(now)
