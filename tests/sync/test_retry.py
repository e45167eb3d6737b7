"""Backoff with full jitter and the per-endpoint circuit breaker: pure logic, with the
random source and the clock injected."""

from __future__ import annotations

from gateway.sync.link import Backoff, Breaker, BreakerState


def test_full_jitter_is_uniform_below_an_exponential_ceiling_up_to_the_cap() -> None:
    draws = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    b = Backoff(base=1.0, cap=10.0, rng=lambda: next(draws))
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.next() == 5.0  # half of the (capped) ceiling
    b.reset()
    assert b.next() == 0.0 and b.attempt == 1


def test_breaker_opens_after_threshold_rests_then_lets_one_try_through() -> None:
    now = [0.0]
    br = Breaker(threshold=3, cooldown=30.0, clock=lambda: now[0])
    br.failure()
    br.failure()
    assert br.state is BreakerState.CLOSED and br.allows()
    br.failure()
    assert br.state is BreakerState.OPEN and not br.allows()
    now[0] = 29.0
    assert not br.allows() and br.reopens_in() == 1.0
    now[0] = 30.0
    assert br.state is BreakerState.HALF_OPEN and br.allows()
    br.failure()  # the trial failed: open again for a full cool-down
    assert br.state is BreakerState.OPEN
    now[0] = 60.0
    br.success()
    assert br.state is BreakerState.CLOSED and br.failures == 0


def test_a_hard_failure_opens_the_breaker_at_once() -> None:
    br = Breaker(threshold=5, cooldown=60.0, clock=lambda: 0.0)
    br.failure(hard=True)  # a refused password will not fix itself in a second
    assert br.state is BreakerState.OPEN
