"""The per-device circuit breaker as the CoAP driver configures it (shared
`gateway.breaker` from the device's `retry` and `breaker` tables, an exponential backoff that
by default waits at least half its ceiling): pure state machine, time given by the test."""

from __future__ import annotations

import random

from drivers.coap.driver import device_breaker
from drivers.coap.options import compile_device
from gateway.breaker import Breaker, State
from gateway.config import loads


def coap_breaker(threshold: int, initial: float, maximum: float, seed: int = 0) -> Breaker:
    spec = loads(
        f'[devices.d]\ndriver = "coap"\nuri = "coap://h"\n'
        f"retry = {{ initial = {initial}, cap = {maximum} }}\n"
        f"breaker = {{ threshold = {threshold} }}\n"
    ).devices["d"]
    return device_breaker(compile_device(spec), random.Random(seed).random)


def test_opens_after_threshold_and_backs_off_exponentially() -> None:
    b = coap_breaker(threshold=3, initial=1.0, maximum=8.0, seed=1)
    t = b.failure(0.0, "timeout")
    assert t.first_failure and not t.opened and b.allow(0.0)
    assert not b.failure(0.0, "timeout").first_failure
    t = b.failure(0.0, "timeout")
    assert t.opened and b.state is State.OPEN
    assert 0.5 <= b.retry_at <= 1.0 and not b.allow(0.4)
    # Half-open: exactly one attempt goes out; its failure reopens with a doubled ceiling.
    assert b.allow(1.0) and not b.allow(1.0)
    t = b.failure(1.0, "timeout")
    assert not t.opened and b.state is State.OPEN and b.cooldown == 2.0
    for _ in range(10):
        b.allow(b.retry_at)
        b.failure(b.retry_at, "timeout")
    assert b.cooldown == 8.0  # capped
    assert b.allow(b.retry_at)
    t = b.success()
    assert t.recovered and b.state is State.CLOSED and b.allow(0.0) and b.cooldown == 1.0


def test_auth_failure_opens_at_once_with_the_longest_backoff() -> None:
    b = coap_breaker(threshold=5, initial=1.0, maximum=60.0)
    t = b.failure(100.0, "4.01", auth=True)
    assert t.opened and t.first_failure and b.retry_at == 160.0


def test_an_abandoned_half_open_attempt_frees_the_slot() -> None:
    b = coap_breaker(threshold=1, initial=1.0, maximum=1.0)
    b.failure(0.0, "x")
    assert b.allow(5.0) and not b.allow(5.0)
    b.abandon()
    assert b.allow(5.0)


def test_success_without_failures_is_not_a_recovery() -> None:
    assert not coap_breaker(threshold=3, initial=1.0, maximum=60.0).success().recovered
