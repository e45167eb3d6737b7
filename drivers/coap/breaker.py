"""A circuit breaker with exponential backoff for one device's link. Pure: the caller gives time.

closed --(threshold consecutive failures)--> open --(backoff elapsed)--> half-open: one
attempt goes through; success closes the breaker, failure reopens it with a doubled backoff
(full jitter, capped). An authentication failure opens it at once with the longest backoff:
retrying a wrong key quickly only fills logs (and may lock the device's PSK slot).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(slots=True)
class Transition:
    """What a recorded outcome changed, so the caller logs and reports it exactly once."""

    first_failure: bool = False  # the first failure after a success (log at WARNING)
    opened: bool = False  # the breaker just opened (device unavailable)
    recovered: bool = False  # a success after failures (log at INFO; device available)


class Breaker:
    def __init__(
        self,
        threshold: int = 3,
        initial: float = 1.0,
        maximum: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.threshold = threshold
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self.state = State.CLOSED
        self.failures = 0  # consecutive
        self.opened_count = 0  # consecutive openings, drives the backoff exponent
        self.retry_at = 0.0
        self.last_error = ""
        self._probing = False

    def allow(self, now: float) -> bool:
        """May an attempt go out now? In half-open state only one attempt at a time."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and now >= self.retry_at:
            self.state = State.HALF_OPEN
        if self.state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until an attempt may go out (0 when closed)."""
        if self.state is State.CLOSED:
            return 0.0
        return max(0.0, self.retry_at - now)

    def backoff(self) -> float:
        """The current backoff ceiling (before jitter)."""
        return min(self.maximum, self.initial * 2.0 ** max(0, self.opened_count - 1))

    def success(self) -> Transition:
        t = Transition(recovered=self.failures > 0 or self.state is not State.CLOSED)
        self.state = State.CLOSED
        self.failures = 0
        self.opened_count = 0
        self._probing = False
        self.last_error = ""
        return t

    def abandon(self) -> None:
        """An attempt was cancelled before it had an outcome: free the half-open slot."""
        self._probing = False

    def failure(self, now: float, error: str, *, auth: bool = False) -> Transition:
        t = Transition(first_failure=self.failures == 0 and self.state is State.CLOSED)
        self.failures += 1
        self.last_error = error
        self._probing = False
        if auth or self.state is State.HALF_OPEN or self.failures >= self.threshold:
            t.opened = self.state is State.CLOSED
            self.state = State.OPEN
            self.opened_count += 1
            if auth:
                delay = self.maximum
            else:
                # Full jitter, but never less than half the ceiling: a dead device should
                # not be retried almost at once by bad luck.
                ceiling = self.backoff()
                delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
            self.retry_at = now + delay
        return t
