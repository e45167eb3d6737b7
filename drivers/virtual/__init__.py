"""Simulated devices (after EdgeX's device-virtual): sine, random walk, counter, constant,
with configurable noise and failure rate. Lets the gateway show data flowing on any machine."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import (
    Driver,
    RawReading,
    device_options,
    point_options,
    raise_issues,
)
from gateway.config import DeviceSpec, PointSpec, Section
from gateway.errors import DeviceTimeoutError, DriverError, PointNotFoundError

SIGNALS = ("sine", "random_walk", "counter", "constant", "boolean")


@dataclass(frozen=True, slots=True)
class _Signal:
    kind: str
    amplitude: float
    period: float
    base: float
    noise: float
    step: float
    type: str
    spike: float = 0.0  # added to every `spike_every`-th reading (anomaly detection demos)
    spike_every: int = 0


def _parse_point(sec: Section) -> _Signal:
    kind = sec.str("signal", "sine", choices=SIGNALS)
    sig = _Signal(
        kind=kind,
        amplitude=sec.float("amplitude", 1.0, min=0),
        period=sec.float("period", 60.0, gt=0),
        base=sec.float("base", 0.0),
        noise=sec.float("noise", 0.0, min=0),
        step=sec.float("step", 1.0),
        type=sec.str("type", "float", choices=["float", "int", "bool"]),
        spike=sec.float("spike", 0.0),
        spike_every=sec.int("spike_every", 0, min=0),
    )
    sec.done()
    return sig


def _parse(spec: DeviceSpec) -> tuple[float, dict[str, _Signal]]:
    dev, issues = device_options(spec)
    failure_rate = dev.float("failure_rate", 0.0, min=0, max=1)
    dev.mark("seed")
    dev.int("seed", 0)
    dev.done()
    signals = {p.name: _parse_point(point_options(spec, p, issues)) for p in spec.points}
    if not spec.points:
        issues.add(spec.path + ".points", "a virtual device needs at least one point")
    raise_issues(issues)
    return failure_rate, signals


class VirtualDriver(Driver):
    kind: ClassVar[str] = "virtual"

    def __init__(self, ctx: Any, options: Any = None) -> None:
        super().__init__(ctx, options)
        self._devices: dict[str, tuple[float, dict[str, _Signal], random.Random]] = {}
        self._state: dict[tuple[str, str], float] = {}
        self._counts: dict[tuple[str, str], int] = {}

    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> None:
        _parse(spec)

    @classmethod
    def value_kind(cls, spec: DeviceSpec, point: PointSpec) -> str:
        return "number"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._devices.clear()

    async def add_device(self, spec: DeviceSpec) -> None:
        failure_rate, signals = _parse(spec)
        seed = spec.options.get("seed")
        rng = random.Random(seed if isinstance(seed, int) and seed else None)
        self._devices[spec.id] = (failure_rate, signals, rng)

    async def remove_device(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        for key in [k for k in self._state if k[0] == device_id]:
            del self._state[key]
        for key in [k for k in self._counts if k[0] == device_id]:
            del self._counts[key]

    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        try:
            failure_rate, signals, rng = self._devices[device_id]
        except KeyError:
            raise DriverError(device_id, "no such virtual device") from None
        if failure_rate and rng.random() < failure_rate:
            raise DeviceTimeoutError(device_id, "simulated failure (failure_rate)")
        now = self.ctx.clock.time()
        out = []
        for p in points:
            sig = signals.get(p.name)
            if sig is None:
                raise PointNotFoundError(device_id, f"no point {p.name!r}")
            out.append(RawReading(p.name, self._value(device_id, p.name, sig, rng, now)))
        return out

    def _value(self, dev: str, name: str, s: _Signal, rng: random.Random, now: float) -> Any:
        key = (dev, name)
        if s.kind == "sine":
            v = s.base + s.amplitude * math.sin(2 * math.pi * now / s.period)
        elif s.kind == "random_walk":
            v = self._state.get(key, s.base) + rng.uniform(-s.step, s.step)
            self._state[key] = v
        elif s.kind == "counter":
            v = self._state.get(key, s.base - s.step) + s.step
            self._state[key] = v
        elif s.kind == "boolean":
            return rng.random() < 0.5
        else:
            v = self._state.get(key, s.base)
        if s.noise:
            v += rng.gauss(0, s.noise)
        if s.spike_every:
            n = self._counts[key] = self._counts.get(key, 0) + 1
            if n % s.spike_every == 0:
                v += s.spike
        if s.type == "int":
            return round(v)
        if s.type == "bool":
            return v > 0
        return round(v, 6)

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        if device_id not in self._devices:
            raise DriverError(device_id, "no such virtual device")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DriverError(device_id, f"{point.name}: value must be a number, got {value!r}")
        self._state[(device_id, point.name)] = float(value)
