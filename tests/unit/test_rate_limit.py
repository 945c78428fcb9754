"""The per-key token bucket (serving/rate_limit.py): refill arithmetic and Retry-After, on plain
numbers for the clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from chatfleet.serving.rate_limit import (
    KeyRateLimiter,
    TokenBucket,
    retry_after_header_s,
)


@dataclass(frozen=True, kw_only=True)
class Case:
    rate: float
    burst: int
    takes: tuple[float, ...]
    """The ``now`` of each request, in order."""
    waits: tuple[float, ...]
    """What each take returns: 0.0 served, else seconds until a token is back."""
    retry_after: int | None = None
    """Retry-After of the last refusal."""


CASES = {
    "a full bucket serves a burst, then refuses for one token's time":
        Case(rate=1.0, burst=3, takes=(0, 0, 0, 0), waits=(0, 0, 0, 1.0), retry_after=1),
    "a slow rate asks for the whole refill":
        Case(rate=0.25, burst=1, takes=(0, 0, 3.0, 4.0), waits=(0, 4.0, 1.0, 0), retry_after=1),
    "partial refill shortens the wait":
        Case(rate=2.0, burst=1, takes=(0, 0.1), waits=(0, 0.4), retry_after=1),
    "a refusal takes nothing: asking again does not push the wait out":
        Case(rate=0.5, burst=1, takes=(10, 10, 10.5, 11), waits=(0, 2.0, 1.5, 1.0), retry_after=1),
    "idle time refills no further than the burst":
        Case(rate=10.0, burst=2, takes=(0, 0, 1000, 1000, 1000), waits=(0, 0, 0, 0, 0.1),
             retry_after=1),
    "refilled tokens are spent one request at a time":
        Case(rate=1.0, burst=5, takes=(0, 0, 0, 0, 0, 2.0, 2.0, 2.0), waits=(0, 0, 0, 0, 0, 0, 0, 1.0)),
    "a wait over a second rounds up":
        Case(rate=0.4, burst=1, takes=(0, 0), waits=(0, 2.5), retry_after=3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_token_bucket(case: Case) -> None:
    bucket = TokenBucket(rate=case.rate, burst=case.burst)
    got = tuple(bucket.take(now) for now in case.takes)
    assert got == pytest.approx(case.waits)
    if case.retry_after is not None:
        assert retry_after_header_s(got[-1]) == case.retry_after


@pytest.mark.parametrize(("wait_s", "header"), [
    (0.001, 1), (0.5, 1), (1.0, 1), (1.0 + 1e-12, 1), (1.01, 2), (2.0, 2), (59.2, 60),
], ids=["tiny", "half", "one", "one-plus-rounding", "just-over-one", "two", "long"])
def test_retry_after_is_whole_seconds_never_below_one_nor_below_the_wait(wait_s: float,
                                                                         header: int) -> None:
    assert retry_after_header_s(wait_s) == header


@pytest.mark.parametrize("rate", [0.1, 1 / 3, 0.7, 3.0, 7.5, 1000.0])
@pytest.mark.parametrize("waited", ["retry-after", "exact-wait"])
def test_a_client_that_waits_its_retry_after_is_served(rate: float, waited: str) -> None:
    bucket = TokenBucket(rate=rate, burst=2)
    now = 123.456
    while bucket.take(now) == 0:
        pass
    wait = bucket.take(now)
    assert wait > 0
    later = now + (retry_after_header_s(wait) if waited == "retry-after" else wait)
    assert bucket.take(later) == 0.0


def test_each_key_has_its_own_bucket() -> None:
    limiter = KeyRateLimiter(keys=2, rate=1.0, burst=1, now=0.0)
    assert limiter.take(0, 0.0) == 0.0
    assert limiter.take(0, 0.0) == pytest.approx(1.0)
    assert limiter.take(1, 0.0) == 0.0, "key 1 is not slowed down by key 0"


@pytest.mark.parametrize(("rate", "burst", "message"), [
    (0.0, 1, "rate must be above 0"), (-1.0, 1, "rate must be above 0"), (1.0, 0, "burst must be at least 1"),
])
def test_a_bucket_that_could_never_serve_is_refused(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(rate=rate, burst=burst)
