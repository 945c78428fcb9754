"""Token buckets: the per-API-key request-rate limit (``auth.rate_limit_rps``, ``auth.rate_limit_burst``)
and the per-address limit on wrong API keys (``auth.failed_keys_per_s``, ``auth.failed_keys_burst``).

Pure arithmetic on a clock the caller passes in (``now``, seconds, monotonic); no I/O, no wall
clock, so tests drive it with plain numbers. ``api/auth.py`` keeps one bucket per configured key
and calls :meth:`KeyRateLimiter.take` once per request, and one bucket per client address that
sent a wrong key (:class:`FailureLimiter`).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens per second. A request takes one;
with none left it is refused, and the wait until a whole token is back is its Retry-After.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["FailureLimiter", "KeyRateLimiter", "TokenBucket", "client_key", "retry_after_header_s"]

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

    def wait(self, now: float) -> float:
        """The seconds until a token is there (0.0: one is), taking none."""
        self.refill(now)
        return 0.0 if self.tokens >= 1.0 - _EPSILON else (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to ``burst``: it then says nothing a new one would not."""
        self.refill(now)
        return self.tokens >= self.burst - _EPSILON

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


def client_key(host: str | None) -> str:
    """The address a client's failures count against: its IPv4 address, or its IPv6 /64 (one
    host usually holds a whole /64, and could otherwise take a fresh address per attempt).
    Anything else (none, a Unix socket's name) is one shared key."""
    if not host:
        return "-"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureLimiter:
    """Per client address, a bucket of ``burst`` failures refilled at ``rate`` per second.

    :meth:`wait` says whether an address may try again (0.0) or how long until it may; a caller
    refuses a request from an address that must wait before doing the work that could fail (the
    key comparison), so a guesser gets at most ``burst`` tries at once and ``rate`` per second
    after. :meth:`failed` spends one try.

    Memory is bounded: an address whose bucket has refilled is forgotten, and past
    ``max_addresses`` the least recently failed address is dropped (it starts again full).
    """

    def __init__(self, *, rate: float, burst: int, max_addresses: int = 10_000) -> None:
        if max_addresses < 1:
            raise ValueError(f"max_addresses must be at least 1, got {max_addresses}")
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        TokenBucket(rate=rate, burst=burst)  # the bucket's own checks of rate and burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, address: str, now: float) -> float:
        """0.0 when ``address`` may try, else the seconds until it may."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return 0.0
        if bucket.full(now):
            del self._buckets[address]
            return 0.0
        return bucket.wait(now)

    def failed(self, address: str, now: float) -> None:
        """Count one failure of ``address``."""
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = TokenBucket(rate=self.rate, burst=self.burst, updated=now)
        self._buckets[address] = bucket  # the most recently failed last
        bucket.take(now)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
