"""The one circuit breaker and retry backoff, shared by every driver and the sync link.

Pure: no asyncio, no I/O; the caller passes `now` (its monotonic clock) to every call that
needs time, so tests drive it with plain numbers.

    closed --`threshold` consecutive failures--> open --cool-down--> half-open
      ^                                            ^                     |
      |                                            '--- probe failed ----|
      '-------------------------- probe (or any) success ----------------'

In half-open exactly one attempt (the probe) is let through; its outcome closes or reopens
the breaker. An attempt that ends with no outcome (cancelled, or a busy bus that says nothing
about the device) must call `abandon()` to free the probe slot.

The cool-down is fixed (a float) or grows with each consecutive opening (a `Backoff`:
exponential, jittered, capped). A failure marked `auth=True` opens the breaker at once with
the longest cool-down: retrying a wrong key or password quickly only fills logs (and may lock
an account or a PSK slot).

`success()` and `failure()` return a `Transition`, so the caller logs a problem once
(first failure at WARNING, repeats at DEBUG, recovery at INFO) and reports availability once
per change.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "Breaker", "State", "Transition"]


class Backoff:
    """Exponential backoff with jitter: attempt n waits a random delay below the ceiling
    min(cap, base * multiplier^n). With `floor` 0 (the default) that is full jitter, uniform
    in [0, ceiling]; a `floor` of 0.5 waits at least half the ceiling (a dead device is then
    never retried almost at once by bad luck); a `floor` of 1 waits the ceiling itself.
    Settings from a config file come through `gateway.retry.RetrySettings.backoff()`."""

    def __init__(
        self,
        base: float,
        cap: float,
        rng: Callable[[], float] = random.random,
        *,
        floor: float = 0.0,
        multiplier: float = 2.0,
    ) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError(f"backoff base and cap must be > 0, got {base!r} and {cap!r}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"backoff floor must be within [0, 1], got {floor!r}")
        if not 1.0 <= multiplier <= 100.0:
            raise ValueError(f"backoff multiplier must be within [1, 100], got {multiplier!r}")
        self.base = base
        self.cap = cap
        self.floor = floor
        self.multiplier = multiplier
        self.attempt = 0  # delays handed out since the last reset
        self._rng = rng

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # The exponent is bounded: 2.0 ** 1100 overflows, and the cap wins long before.
        return float(min(self.cap, self.base * (self.multiplier ** min(self.attempt, 62))))

    def next(self) -> float:
        """The next delay (jittered below the ceiling); counts one attempt."""
        ceiling = self.ceiling()
        self.attempt += 1
        if self.floor == 0.0:
            return self._rng() * ceiling
        return ceiling * (self.floor + (1.0 - self.floor) * self._rng())

    def first(self) -> float:
        """A delay of the first step (jittered), leaving the backoff at its start: the pause
        after something that had worked fails, before the first retry of a new series."""
        self.reset()
        delay = self.next()
        self.reset()
        return delay

    def longest(self) -> float:
        """The cap, without jitter; counts one attempt (for failures that will not fix
        themselves soon, such as refused credentials)."""
        self.attempt += 1
        return float(self.cap)

    def reset(self) -> None:
        self.attempt = 0


class State(enum.StrEnum):
    """A breaker's state; the values are what status output shows."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class Transition:
    """What one recorded outcome changed, so the caller logs and reports it exactly once."""

    first_failure: bool = False  # the first failure after a success (log it at WARNING)
    opened: bool = False  # closed -> open: the device or endpoint is now unavailable
    recovered: bool = False  # a success after one or more failures (log it at INFO)
    closed: bool = False  # open/half-open -> closed: available again


class Breaker:
    """One breaker per device or endpoint. `cooldown` is seconds (fixed) or a `Backoff`
    (the delay grows with each consecutive opening; a success resets it)."""

    def __init__(self, threshold: int, cooldown: float | Backoff) -> None:
        if threshold < 1:
            raise ValueError(f"breaker threshold must be >= 1, got {threshold!r}")
        self.threshold = threshold
        self._backoff = cooldown if isinstance(cooldown, Backoff) else None
        self._fixed = 0.0 if isinstance(cooldown, Backoff) else float(cooldown)
        if self._backoff is None and self._fixed <= 0:
            raise ValueError(f"breaker cool-down must be > 0, got {cooldown!r}")
        self.state = State.CLOSED
        self.failures = 0  # consecutive, across openings (reset only by a success)
        self.retry_at = 0.0  # when an open breaker lets the probe through
        self.last_error = ""  # the latest failure's message ("" after a success)
        # The cool-down (before jitter) of the latest opening; when closed, the first one's.
        self.cooldown = self._first_cooldown()
        self._probing = False

    def _first_cooldown(self) -> float:
        return self._fixed if self._backoff is None else self._backoff.ceiling()

    # -- questions (no side effects) ---------------------------------------------------------
    def ready(self, now: float) -> bool:
        """Whether `allow(now)` would let an attempt through (without taking the probe)."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return now >= self.retry_at
        return not self._probing

    def state_at(self, now: float) -> State:
        """The state to show: an open breaker whose cool-down is over is shown half-open
        even before anyone asks to go through."""
        if self.state is State.OPEN and now >= self.retry_at:
            return State.HALF_OPEN
        return self.state

    def wait(self, now: float) -> float:
        """Seconds until an attempt may go out (0 when closed or the cool-down is over)."""
        if self.state is State.CLOSED:
            return 0.0
        return max(0.0, self.retry_at - now)

    # -- the gate and the outcomes -----------------------------------------------------------
    def allow(self, now: float) -> bool:
        """May an attempt go out now? Closed: yes. Open: no until the cool-down is over,
        then the breaker turns half-open and this call takes the one probe slot."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if now < self.retry_at:
                return False
            self.state = State.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> Transition:
        """Record a success (from any state): the breaker closes and forgets its failures."""
        t = Transition(
            recovered=self.failures > 0 or self.state is not State.CLOSED,
            closed=self.state is not State.CLOSED,
        )
        self.reset()
        return t

    def failure(self, now: float, error: str = "", *, auth: bool = False) -> Transition:
        """Record a failed attempt. It opens the breaker when it is the `threshold`-th in a
        row, when it was the half-open probe, or at once with the longest cool-down when
        `auth` (credentials refused). A failure arriving while the breaker is already open
        (an attempt let through before it opened) is counted but does not move the retry."""
        was = self.state
        t_first = self.failures == 0 and was is State.CLOSED
        self.failures += 1
        self.last_error = error
        self._probing = False
        opens = (
            auth
            or was is State.HALF_OPEN
            or (was is State.CLOSED and self.failures >= self.threshold)
        )
        if opens:
            self._open(now, auth)
        return Transition(first_failure=t_first, opened=opens and was is State.CLOSED)

    def abandon(self) -> None:
        """An attempt ended without an outcome (cancelled, or refused before it reached the
        device, e.g. a busy bus): free the half-open probe slot; nothing else changes."""
        self._probing = False

    def reset(self) -> None:
        """Forget everything: closed, no failures, the backoff back at its start."""
        self.state = State.CLOSED
        self.failures = 0
        self.last_error = ""
        self._probing = False
        if self._backoff is not None:
            self._backoff.reset()
        self.cooldown = self._first_cooldown()

    def _open(self, now: float, auth: bool) -> None:
        b = self._backoff
        if b is None:
            delay = self.cooldown = self._fixed
        elif auth:
            delay = self.cooldown = b.longest()
        else:
            self.cooldown = b.ceiling()
            delay = b.next()
        self.state = State.OPEN
        self.retry_at = now + delay
