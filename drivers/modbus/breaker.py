"""A circuit breaker per device: a dead unit stops costing bus time. Pure (the caller's clock).

closed --N consecutive failures--> open --cool-down--> half-open --probe ok--> closed
                                     ^------------------- probe failed ---------'
"""

from __future__ import annotations

from typing import Literal

State = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state: State = "closed"
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a request go to the device now? In half-open, only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if now < self.opened_at + self.cooldown:
                return False
            self.state = "half_open"
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_in(self, now: float) -> float:
        return max(0.0, self.opened_at + self.cooldown - now)

    def success(self) -> bool:
        """Record a success; True when this closes an open or half-open breaker."""
        was_open = self.state != "closed"
        self.state = "closed"
        self.failures = 0
        self._probing = False
        return was_open

    def failure(self, now: float) -> bool:
        """Record a failure; True when this opens the breaker (from closed)."""
        self.failures += 1
        self._probing = False
        if self.state == "half_open":
            self.state = "open"
            self.opened_at = now
            return False
        if self.state == "closed" and self.failures >= self.threshold:
            self.state = "open"
            self.opened_at = now
            return True
        return False

    def release(self) -> None:
        """A probe ended without telling us anything about the device (e.g. bus busy)."""
        self._probing = False
