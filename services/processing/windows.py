"""Tumbling windows over numeric readings: a running aggregate (min, max, sum, count, last)
per point, an `aggregate` event when a window closes (empty windows too, where asked)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.events import NewEvent
from services.processing.config import PointProcessing
from services.processing.projection import AGGREGATE, aggregate_stream

GRACE = 1.0  # seconds after a window's end before it closes (commits in flight land)
MAX_BACKFILL = 6 * 3600.0  # windows older than this are not rebuilt after a long outage

Key = tuple[str, str]


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


class Windows:
    """The open window and the watermark (the end of the last window emitted) of each point;
    the `aggregate` events go to `out`, counted in `figures`."""

    def __init__(self, out: list[NewEvent], figures: dict[str, int]) -> None:
        self.grace = GRACE
        self.open: dict[Key, Window] = {}
        self.emitted_to: dict[Key, float] = {}  # window watermark per point
        self._out = out
        self._figures = figures

    def clear(self) -> None:
        self.open.clear()
        self.emitted_to.clear()

    def configure(self, points: Mapping[Key, PointProcessing]) -> None:
        """Open windows of points no longer windowed are dropped."""
        for key in [k for k in self.open if not (k in points and points[k].window)]:
            del self.open[key]

    def add(self, key: Key, pp: PointProcessing, t: float, x: float | int) -> None:
        assert pp.window is not None
        start = math.floor(t / pp.window) * pp.window
        if start + pp.window <= self.emitted_to.get(key, -math.inf):
            self._figures["late"] += 1
            return
        w = self.open.get(key)
        if w is None or start > w.start:
            if w is not None:
                self.close(key, pp, w)
            if pp.empty:
                self.fill_empty(key, pp, start)
            w = self.open[key] = Window(start, start + pp.window)
        elif start < w.start:
            self._figures["late"] += 1
            return
        w.add(x)

    def close(self, key: Key, pp: PointProcessing, w: Window) -> None:
        self.emitted_to[key] = w.end
        if w.count == 0 and not pp.empty:
            return
        data: dict[str, Any] = {
            "n": key[1], "device": key[0], "start": w.start, "end": w.end,
            "window": pp.window, "count": w.count,
        }  # fmt: skip
        if w.count:
            data.update(min=w.min, max=w.max, mean=round(w.sum / w.count, 9), last=w.last)
            if pp.counter:
                data["sum"] = round(w.sum, 9)
        elif pp.counter:
            data["sum"] = 0
        self._figures["aggregates"] += 1
        self._out.append(NewEvent(aggregate_stream(*key), AGGREGATE, data))

    def close_due(self, points: Mapping[Key, PointProcessing], now: float) -> None:
        """Close every window that ended at least the grace ago (empty ones too, when asked)."""
        for key, pp in points.items():
            if not pp.window:
                continue
            w = self.open.get(key)
            if w is not None and w.end + self.grace <= now:
                del self.open[key]
                self.close(key, pp, w)
                w = None
            if pp.empty and w is None:
                self.fill_empty(key, pp, math.floor((now - self.grace) / pp.window) * pp.window)

    def fill_empty(self, key: Key, pp: PointProcessing, upto: float) -> None:
        """Emit count = 0 for the windows without readings between the watermark and `upto`."""
        assert pp.window is not None
        start = self.emitted_to.get(key)
        if start is None:
            self.emitted_to[key] = upto
            return
        start = max(start, upto - MAX_BACKFILL)
        while start + pp.window <= upto:
            self.close(key, pp, Window(start, start + pp.window))
            start += pp.window
