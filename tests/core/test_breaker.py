"""The shared circuit breaker and backoff (`gateway.breaker`): pure, so every test passes
its `now` values and its random draws explicitly; nothing sleeps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.breaker import Backoff, Breaker, State, Transition


def draws(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


# -- Backoff ---------------------------------------------------------------------------------
def test_backoff_full_jitter_below_a_doubling_ceiling_up_to_the_cap() -> None:
    b = Backoff(0.5, 3.0, draws(1.0, 1.0, 1.0, 1.0, 1.0, 0.25))
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.next() == 0.75  # a quarter of the capped ceiling
    assert b.attempt == 6


def test_backoff_floor_keeps_a_share_of_the_ceiling() -> None:
    b = Backoff(4.0, 100.0, draws(0.0, 1.0, 0.5), floor=0.5)
    assert b.next() == 2.0  # the least: half of 4
    assert b.next() == 8.0  # the most: the whole ceiling
    assert b.next() == 12.0  # 16 * (0.5 + 0.5 * 0.5)


def test_backoff_longest_is_the_cap_and_counts_as_an_attempt() -> None:
    b = Backoff(1.0, 60.0, draws(1.0))
    assert b.longest() == 60.0 and b.attempt == 1
    assert b.ceiling() == 2.0 and b.next() == 2.0
    b.reset()
    assert b.attempt == 0 and b.ceiling() == 1.0


def test_backoff_ceiling_never_overflows() -> None:
    b = Backoff(1.0, 300.0)
    b.attempt = 10_000
    assert b.ceiling() == 300.0


@pytest.mark.parametrize(
    ("base", "cap", "floor"), [(0.0, 1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 2.0, 1.5)]
)
def test_backoff_refuses_nonsense(base: float, cap: float, floor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap, floor=floor)


# -- Breaker, fixed cool-down ----------------------------------------------------------------
def test_closed_until_threshold_consecutive_failures_then_open() -> None:
    b = Breaker(3, 10.0)
    assert b.failure(0.0, "timeout") == Transition(first_failure=True)
    assert b.failure(1.0, "timeout") == Transition()
    assert b.success() == Transition(recovered=True)  # failures, but never opened
    assert b.failures == 0 and b.last_error == ""
    b.failure(2.0, "a")
    b.failure(3.0, "b")
    assert b.state is State.CLOSED and b.allow(3.0)
    assert b.failure(4.0, "c") == Transition(opened=True)
    assert b.state_at(4.0) is State.OPEN and b.failures == 3 and b.last_error == "c"
    assert b.retry_at == 14.0 and b.cooldown == 10.0


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = Breaker(1, 5.0)
    b.failure(0.0)
    assert not b.allow(4.9) and b.wait(4.9) == pytest.approx(0.1)
    assert b.allow(5.0) and b.state is State.HALF_OPEN
    assert not b.allow(5.0) and not b.allow(100.0)  # the probe is out
    assert b.wait(6.0) == 0.0


def test_failed_probe_reopens_for_a_full_cool_down_without_a_new_opened_event() -> None:
    b = Breaker(2, 5.0)
    b.failure(0.0)
    b.failure(0.0)
    assert b.allow(5.0)
    t = b.failure(7.0, "still dead")
    assert t == Transition() and b.state is State.OPEN and b.retry_at == 12.0
    assert b.failures == 3  # consecutive, across openings


def test_successful_probe_closes_and_reports_the_change() -> None:
    b = Breaker(1, 5.0)
    b.failure(0.0)
    assert b.allow(5.0)
    assert b.success() == Transition(recovered=True, closed=True)
    assert b.state is State.CLOSED and b.failures == 0 and b.allow(5.0)
    assert b.success() == Transition()  # nothing to report the second time


def test_abandon_frees_the_probe_slot_and_changes_nothing_else() -> None:
    b = Breaker(1, 5.0)
    b.failure(0.0, "x")
    assert b.allow(5.0)
    b.abandon()
    assert b.state is State.HALF_OPEN and b.failures == 1 and b.last_error == "x"
    assert b.allow(5.0)


def test_a_late_failure_while_open_is_counted_but_does_not_move_the_retry() -> None:
    # Two attempts were let through while closed; the first one's failure opened it.
    b = Breaker(1, 5.0)
    b.allow(0.0)
    b.allow(0.0)
    assert b.failure(1.0).opened
    assert b.failure(3.0) == Transition()
    assert b.retry_at == 6.0 and b.failures == 2


def test_a_late_success_while_open_closes() -> None:
    b = Breaker(1, 5.0)
    b.failure(0.0)
    assert b.success().closed and b.state is State.CLOSED


def test_auth_failure_opens_at_once_even_below_the_threshold() -> None:
    b = Breaker(5, 30.0)
    t = b.failure(10.0, "bad password", auth=True)
    assert t == Transition(first_failure=True, opened=True)
    assert b.retry_at == 40.0


def test_questions_have_no_side_effects() -> None:
    b = Breaker(1, 5.0)
    assert b.ready(0.0) and b.state_at(0.0) is State.CLOSED and b.wait(0.0) == 0.0
    b.failure(0.0)
    assert not b.ready(4.0) and b.state_at(4.0) is State.OPEN
    # The cool-down is over: shown half-open, ready, but the state is untouched.
    assert b.ready(5.0) and b.state_at(5.0) is State.HALF_OPEN and b.state is State.OPEN
    assert b.allow(5.0)
    assert not b.ready(5.0) and b.state_at(5.0) is State.HALF_OPEN


def test_reset_forgets_everything() -> None:
    b = Breaker(1, Backoff(1.0, 8.0, draws(1.0, 1.0)))
    b.failure(0.0, "x")
    b.allow(1.0)
    b.failure(1.0, "y")
    assert b.cooldown == 2.0
    b.reset()
    assert b.state is State.CLOSED and b.failures == 0 and b.last_error == ""
    assert b.cooldown == 1.0 and b.allow(1.0)


def test_states_show_as_their_values() -> None:
    shown: str = State.OPEN  # a StrEnum is a str
    assert f"{State.HALF_OPEN}" == "half-open" and shown == "open"


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, 0.0), (1, -2.0)])
def test_breaker_refuses_nonsense(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        Breaker(threshold, cooldown)


# -- Breaker, fixed cool-down, as the drivers and the relay use it --------------------------
def test_fixed_cooldown_cycle_with_one_probe() -> None:
    b = Breaker(threshold=3, cooldown=10.0)
    assert b.allow(0.0)
    assert not b.failure(0.0).opened and not b.failure(1.0).opened
    assert b.success().closed is False  # closed stays closed; the count restarts
    assert not b.failure(2.0).opened and not b.failure(2.5).opened
    assert b.failure(3.0).opened  # third in a row: open
    assert b.state_at(12.9) is State.OPEN and not b.allow(12.9)
    assert b.wait(5.0) == pytest.approx(8.0)
    assert b.allow(13.0) and b.state is State.HALF_OPEN  # one probe after the cool-down...
    assert not b.allow(13.1)  # ...and only one
    t = b.failure(13.2)
    assert not t.opened and b.state_at(13.2) is State.OPEN  # failed probe: open again, no event
    assert not b.allow(20.0) and b.allow(23.2)
    assert b.success().closed is True and b.state_at(23.2) is State.CLOSED


def test_released_probe_may_be_retried() -> None:
    b = Breaker(threshold=1, cooldown=1.0)
    b.failure(0.0)
    assert b.allow(1.0)
    b.abandon()  # e.g. the bus was busy: the probe said nothing about the device
    assert b.allow(1.0)


def test_fixed_rest_as_gatt_links_use_it() -> None:
    b = Breaker(threshold=3, cooldown=10)
    b.failure(0)
    b.failure(1)
    assert b.state == "closed" and b.wait(1) == 0
    b.failure(2)
    assert b.state == "open" and b.wait(5) == 7
    assert b.wait(13) == 0 and b.allow(13)  # one trial allowed...
    assert b.state is State.HALF_OPEN and not b.allow(13)  # ...and only one
    b.success()
    assert b.state_at(13) == "closed" and b.failures == 0


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


# -- Breaker with a Backoff cool-down --------------------------------------------------------
def test_each_consecutive_opening_doubles_the_cool_down_up_to_the_cap() -> None:
    b = Breaker(2, Backoff(1.0, 4.0, draws(1.0, 1.0, 1.0, 0.5)))
    b.failure(0.0)
    assert b.failure(0.0).opened and b.retry_at == 1.0 and b.cooldown == 1.0
    now = 0.0
    for expected in (2.0, 4.0, 4.0):
        now = b.retry_at
        assert b.allow(now)
        b.failure(now)
        assert b.cooldown == expected
    assert b.retry_at == now + 2.0  # the last draw: half of the capped ceiling
    assert b.allow(b.retry_at)
    b.success()
    assert b.cooldown == 1.0  # a success starts the backoff over


def test_auth_failure_takes_the_longest_cool_down_and_the_next_one_doubles() -> None:
    b = Breaker(3, Backoff(1.0, 60.0, draws(1.0)))
    assert b.failure(100.0, "4.01", auth=True).opened
    assert b.retry_at == 160.0 and b.cooldown == 60.0
    assert b.allow(160.0)
    b.failure(160.0, "timeout")
    assert b.cooldown == 2.0 and b.retry_at == 162.0


def test_auth_failure_while_open_moves_the_retry_to_the_longest() -> None:
    b = Breaker(1, Backoff(1.0, 60.0, draws(1.0)))
    b.failure(0.0)
    assert b.retry_at == 1.0
    assert b.failure(0.5, "4.01", auth=True) == Transition()
    assert b.retry_at == 60.5


# -- properties over any sequence of calls -----------------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["allow", "success", "failure", "auth", "abandon"]),
        st.floats(min_value=0.0, max_value=5.0),
    ),
    max_size=60,
)


@given(OPS, st.integers(min_value=1, max_value=4))
def test_invariants_hold_for_any_sequence(ops: list[tuple[str, float]], threshold: int) -> None:
    b = Breaker(threshold, Backoff(1.0, 8.0, lambda: 0.5))
    now = 0.0
    probe_out = False
    available = True  # what a caller would report, driven only by the transitions
    for op, step in ops:
        now += step
        if op == "allow":
            was_half_open_busy = b.state is State.HALF_OPEN and probe_out
            ready = b.ready(now)
            granted = b.allow(now)
            assert granted == ready
            if was_half_open_busy:
                assert not granted  # never a second probe
            if b.state is State.HALF_OPEN and granted:
                probe_out = True
        elif op == "success":
            t = b.success()
            assert t.closed == (not available)
            available = True
            probe_out = False
        elif op in ("failure", "auth"):
            t = b.failure(now, op, auth=op == "auth")
            assert not (t.opened and not available)  # opened only from closed
            if t.opened:
                available = False
            probe_out = False
        else:
            b.abandon()
            probe_out = False
        assert available == (b.state is State.CLOSED)
        assert b.wait(now) >= 0.0 and b.cooldown <= 8.0
        assert (b.failures == 0) == (b.last_error == "")
