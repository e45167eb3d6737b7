"""The per-device circuit breaker: pure state machine, time given by the test."""

from __future__ import annotations

import random

from drivers.coap.breaker import Breaker, State


def test_opens_after_threshold_and_backs_off_exponentially() -> None:
    b = Breaker(threshold=3, initial=1.0, maximum=8.0, rng=random.Random(1))
    t = b.failure(0.0, "timeout")
    assert t.first_failure and not t.opened and b.allow(0.0)
    assert not b.failure(0.0, "timeout").first_failure
    t = b.failure(0.0, "timeout")
    assert t.opened and b.state is State.OPEN
    assert 0.5 <= b.retry_at <= 1.0 and not b.allow(0.4)
    # Half-open: exactly one attempt goes out; its failure reopens with a doubled ceiling.
    assert b.allow(1.0) and not b.allow(1.0)
    t = b.failure(1.0, "timeout")
    assert not t.opened and b.state is State.OPEN and b.backoff() == 2.0
    for _ in range(10):
        b.allow(b.retry_at)
        b.failure(b.retry_at, "timeout")
    assert b.backoff() == 8.0  # capped
    assert b.allow(b.retry_at)
    t = b.success()
    assert t.recovered and b.state is State.CLOSED and b.allow(0.0) and b.backoff() == 1.0


def test_auth_failure_opens_at_once_with_the_longest_backoff() -> None:
    b = Breaker(threshold=5, initial=1.0, maximum=60.0)
    t = b.failure(100.0, "4.01", auth=True)
    assert t.opened and t.first_failure and b.retry_at == 160.0


def test_an_abandoned_half_open_attempt_frees_the_slot() -> None:
    b = Breaker(threshold=1, initial=1.0, maximum=1.0)
    b.failure(0.0, "x")
    assert b.allow(5.0) and not b.allow(5.0)
    b.abandon()
    assert b.allow(5.0)


def test_success_without_failures_is_not_a_recovery() -> None:
    assert not Breaker().success().recovered
