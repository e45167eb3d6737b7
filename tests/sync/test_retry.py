"""Backoff with full jitter as the MQTT link imports it (the shared `gateway.breaker`; the
breaker itself is tested in tests/core/test_breaker.py): pure, with the random source injected."""

from __future__ import annotations

from gateway.sync.link import Backoff  # the name the relay imports


def test_full_jitter_is_uniform_below_an_exponential_ceiling_up_to_the_cap() -> None:
    draws = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    b = Backoff(base=1.0, cap=10.0, rng=lambda: next(draws))
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.next() == 5.0  # half of the (capped) ceiling
    b.reset()
    assert b.next() == 0.0 and b.attempt == 1
