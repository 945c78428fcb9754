"""The per-address limit on wrong API keys (serving/rate_limit.py FailureLimiter), on plain
numbers for the clock: how many tries, when the next, and that its memory is bounded."""

from __future__ import annotations

import pytest

from chatfleet.serving.rate_limit import FailureLimiter, client_key


def test_an_address_gets_burst_tries_then_one_per_refill_and_others_are_not_held() -> None:
    limiter = FailureLimiter(rate=0.5, burst=3)
    for _ in range(3):
        assert limiter.wait("10.0.0.1", 0.0) == 0.0
        limiter.failed("10.0.0.1", 0.0)
    assert limiter.wait("10.0.0.1", 0.0) == pytest.approx(2.0)
    assert limiter.wait("10.0.0.1", 1.5) == pytest.approx(0.5)
    assert limiter.wait("10.0.0.2", 0.0) == 0.0
    assert limiter.wait("10.0.0.1", 2.0) == 0.0
    limiter.failed("10.0.0.1", 2.0)
    assert limiter.wait("10.0.0.1", 2.0) == pytest.approx(2.0)


def test_a_refilled_address_is_forgotten_and_the_table_is_bounded() -> None:
    limiter = FailureLimiter(rate=1.0, burst=2, max_addresses=100)
    limiter.failed("a", 0.0)
    assert len(limiter) == 1
    assert limiter.wait("a", 5.0) == 0.0 and len(limiter) == 0
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    assert limiter.wait("10.0.3.231", 0.0) == 0.0  # 999: the last one kept still has a try
    limiter.failed("10.0.3.231", 0.0)
    assert limiter.wait("10.0.3.231", 0.0) > 0


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    (None, "-"),
    ("not-an-address", "not-an-address"),
])
def test_an_ipv6_client_counts_as_its_slash_64(host: str | None, key: str) -> None:
    assert client_key(host) == key
