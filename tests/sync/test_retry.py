"""Backoff with full jitter and the per-endpoint circuit breaker as the MQTT link uses them
(the shared `gateway.breaker`, fixed cool-down): pure logic, with the random source injected
and the time given by the test."""

from __future__ import annotations

from gateway.breaker import Breaker, State
from gateway.sync.link import Backoff  # the name the relay imports


def test_full_jitter_is_uniform_below_an_exponential_ceiling_up_to_the_cap() -> None:
    draws = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    b = Backoff(base=1.0, cap=10.0, rng=lambda: next(draws))
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.next() == 5.0  # half of the (capped) ceiling
    b.reset()
    assert b.next() == 0.0 and b.attempt == 1


def test_breaker_opens_after_threshold_rests_then_lets_one_try_through() -> None:
    br = Breaker(threshold=3, cooldown=30.0)
    br.failure(0.0)
    br.failure(0.0)
    assert br.state_at(0.0) is State.CLOSED and br.allow(0.0)
    br.failure(0.0)
    assert br.state_at(0.0) is State.OPEN and not br.allow(0.0)
    assert not br.allow(29.0) and br.wait(29.0) == 1.0
    assert br.state_at(30.0) is State.HALF_OPEN and br.allow(30.0)
    br.failure(30.0)  # the trial failed: open again for a full cool-down
    assert br.state_at(30.0) is State.OPEN and br.wait(30.0) == 30.0
    br.success()
    assert br.state_at(60.0) is State.CLOSED and br.failures == 0


def test_a_hard_failure_opens_the_breaker_at_once() -> None:
    br = Breaker(threshold=5, cooldown=60.0)
    br.failure(0.0, "login refused", auth=True)  # a refused password will not fix itself
    assert br.state_at(0.0) is State.OPEN and br.wait(0.0) == 60.0


def test_the_shown_states_are_what_gatewayctl_outbox_prints() -> None:
    assert [s.value for s in State] == ["closed", "open", "half-open"]
