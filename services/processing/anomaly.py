"""An anomaly detector per point: exponentially weighted mean and variance, a z-score band."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.processing.config import AnomalyConfig


@dataclass
class Detector:
    conf: AnomalyConfig
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    seq: int = 0  # the last event learnt from (saved with the state)

    def score(self, x: float) -> tuple[float, float, float] | None:
        """(z, low, high) when `x` is outside the band, else None; then learn from `x`
        (clipped to the band, so a spike does not widen it)."""
        c = self.conf
        flagged = None
        if self.n == 0:
            self.mean = x
            self.n = 1
            return None
        sd = math.sqrt(self.var) if self.var > 0 else 0.0
        floor = 1e-9 * max(1.0, abs(self.mean))
        lo, hi = self.mean - c.threshold * sd, self.mean + c.threshold * sd
        if self.n >= c.warmup:
            z = (x - self.mean) / max(sd, floor)
            if abs(z) > c.threshold:
                flagged = (z, lo, hi)
                x = min(max(x, lo), hi)
        diff = x - self.mean
        incr = c.alpha * diff
        self.mean += incr
        self.var = (1 - c.alpha) * (self.var + diff * incr)
        self.n += 1
        return flagged
