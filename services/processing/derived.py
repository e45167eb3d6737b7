"""Derived points: a value computed from other points' latest values by an expression, as a
`readings` event on the derived device's stream; a value that cannot be computed (inputs
unseen, stale, or an error) is recorded as missing once, not every time."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from gateway import events as ev
from gateway.config import GatewayConfig
from gateway.events import NewEvent
from services.expr import EvalError
from services.processing.config import DerivedPoint

Key = tuple[str, str]


class DerivedPoints:
    """The configured derived points and their inputs' latest values; events go to `out`,
    counted in `figures`; `flush` sends `out` (after a rate-limited trailing evaluation)."""

    def __init__(
        self, out: list[NewEvent], figures: dict[str, int], flush: Callable[[], None]
    ) -> None:
        #: Inputs are judged as of this many seconds ago (the store's commit interval).
        self.lag = 0.0
        self.specs: dict[Key, DerivedPoint] = {}
        self.by_input: dict[Key, list[DerivedPoint]] = defaultdict(list)
        self.inputs: dict[Key, tuple[Any, float]] = {}  # latest value and its time
        self.state: dict[Key, str] = {}  # derived point -> "value" | "missing"
        self.last_emit: dict[Key, float] = {}
        self.trailing: dict[Key, asyncio.TimerHandle] = {}
        self._out = out
        self._figures = figures
        self._flush = flush

    def cancel_timers(self) -> None:
        for h in self.trailing.values():
            h.cancel()

    def clear(self) -> None:
        self.cancel_timers()
        for table in (self.inputs, self.state, self.last_emit, self.trailing):
            table.clear()

    def configure(self, config: GatewayConfig, log: logging.Logger) -> None:
        derived: Mapping[Key, DerivedPoint] = config.sections.get("derived") or {}
        self.specs = dict(derived)
        for (device, point), dp in self.specs.items():
            spec = config.devices.get(device)
            if spec is not None and spec.point(point) is not None:
                log.warning(
                    "%s: %s/%s is also a point the device reports: both write its value",
                    dp.path, device, point,
                )  # fmt: skip
        self.by_input = defaultdict(list)
        for dp in self.specs.values():
            for ref in dict.fromkeys(dp.inputs.values()):
                self.by_input[ref].append(dp)

    def load_inputs(self, rows: Any, upto: int) -> None:
        """Latest values from the store (rows of `queries.latest`) committed up to `upto`."""
        for r in rows:
            key = (r["device"], r["point"])
            # Newer ones come through the subscription (and make a value then).
            if key in self.by_input and r["seq"] <= upto:
                self.inputs[key] = (r["value"], float(r["ts"]))

    def max_ages(self) -> list[float]:
        return [dp.max_age for dp in self.specs.values() if dp.max_age]

    def derive(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        if dp.min_interval:
            now = time.monotonic()
            wait = self.last_emit.get(key, -math.inf) + dp.min_interval - now
            if wait > 0:
                if key not in self.trailing:
                    loop = asyncio.get_running_loop()
                    self.trailing[key] = loop.call_later(wait, self._trailing, dp)
                return
            self.last_emit[key] = now
        self.evaluate(dp)

    def _trailing(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        self.trailing.pop(key, None)
        self.last_emit[key] = time.monotonic()
        self.evaluate(dp)
        self._flush()

    def evaluate(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        # Inputs are judged as of `commit_interval` ago: a polled reading may be held back
        # that long before it is committed, so a fresh one can arrive with that age.
        now = time.time() - self.lag
        env: dict[str, Any] = {}
        stale: list[str] = []
        for name, ref in dp.inputs.items():
            got = self.inputs.get(ref)
            if got is None or got[0] is None:
                stale.append(name)
                continue
            if dp.max_age is not None and now - got[1] > dp.max_age:
                stale.append(name)
                continue
            env[name] = got[0]
        if stale:
            unseen = any(self.inputs.get(dp.inputs[n], (None,))[0] is None for n in stale)
            self._missing(dp, "no value" if unseen else "stale", stale)
            return
        try:
            value = dp.expr.evaluate(env)
        except EvalError as exc:
            self._missing(dp, "error", [str(exc)])
            return
        if isinstance(value, float):
            value = round(value, 9)
        rec = ev.reading_record(dp.point, value, dp.unit)
        self.state[key] = "value"
        self._figures["derived"] += 1
        self._out.append(ev.readings_event(dp.device, [rec]))

    def _missing(self, dp: DerivedPoint, why: str, detail: list[str]) -> None:
        """A value that cannot be computed is recorded as missing once (not every time)."""
        key = (dp.device, dp.point)
        before = self.state.get(key)
        if before == "missing" or (before is None and why == "no value"):
            return  # inputs not all seen yet since start: nothing to say
        self.state[key] = "missing"
        self._figures["missing"] += 1
        rec = ev.reading_record(dp.point, None, dp.unit)
        rec["q"] = why
        rec["why"] = detail
        self._out.append(ev.readings_event(dp.device, [rec]))

    def check_stale(self) -> None:
        now = time.time() - self.lag
        for dp in self.specs.values():
            if dp.max_age is None or self.state.get((dp.device, dp.point)) != "value":
                continue
            if any(
                (got := self.inputs.get(ref)) is None or now - got[1] > dp.max_age
                for ref in dp.inputs.values()
            ):
                self.evaluate(dp)
