"""A tumbling window's running aggregate (min, max, sum, count, last) over numeric readings."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Window:
    start: float
    end: float
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    sum: float = 0.0
    last: float | int | None = None

    def add(self, v: float | int) -> None:
        self.count += 1
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.sum += v
        self.last = v
