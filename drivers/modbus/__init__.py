"""Modbus RTU and TCP driver: typed register maps, coalesced reads, one lock per bus, breakers.

Importing this package does not import pymodbus (config checks stay cheap): the connection
code in `drivers.modbus.bus` is imported when the first device is added.
`read` returns raw values (decoded by type; the collection service applies the point's scale
and offset, as for every driver). `write` takes the value in engineering units (what a user or
a command gives, in the unit of the stored readings): it is range-checked against the point's
`min`/`max`, then scale and offset are removed and the raw type is encoded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from drivers.base import Driver, DriverContext, RawReading
from gateway.breaker import Breaker, State
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import (
    ConfigError,
    ConfigIssue,
    ConnectError,
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
    PayloadError,
    PointNotFoundError,
)

from .config import DeviceConfig, parse_device
from .errors import BusBusyError
from .plan import ModbusPoint, ReadRequest, compile_plan
from .registers import DEAD_UNIT_CODES, CodecError, encode, encode_bit

if TYPE_CHECKING:
    from .bus import Bus, Session

__all__ = ["ModbusDriver"]

#: Share of a device's `timeout` that one read or write may use in the driver.
DEADLINE_SHARE = 0.9


@dataclass(eq=False)
class _Device:
    config: DeviceConfig
    bus: Bus
    breaker: Breaker
    points: dict[str, ModbusPoint]
    full_plan: list[ReadRequest]
    spec_points: tuple[PointSpec, ...]
    plans: dict[frozenset[str], list[ReadRequest]] = field(default_factory=dict)
    failing: bool = False
    failures: int = 0
    available: bool | None = None

    def plan_for(self, names: frozenset[str]) -> list[ReadRequest]:
        if len(names) == len(self.points):
            return self.full_plan
        plan = self.plans.get(names)
        if plan is None:
            cfg = self.config
            plan = compile_plan(
                (self.points[n] for n in names), max_gap=cfg.max_gap,
                max_registers=cfg.max_registers, max_bits=cfg.max_bits,
            )  # fmt: skip
            if len(self.plans) >= 64:  # subsets come from per-point intervals: few in practice
                self.plans.clear()
            self.plans[names] = plan
        return plan


class ModbusDriver(Driver):
    kind: ClassVar[str] = "modbus"

    def __init__(self, ctx: DriverContext, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx, options)
        self._devices: dict[str, _Device] = {}
        self._buses: dict[tuple[str, str], Bus] = {}

    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> Sequence[ConfigIssue]:
        return parse_device(spec).warnings

    @classmethod
    def value_kind(cls, spec: DeviceSpec, point: PointSpec) -> str:
        o = point.options
        if o.get("table") in ("coil", "discrete_input") or "bit" in o or o.get("type") == "bool":
            return "bool"
        return "string" if o.get("type") == "string" else "number"

    async def start(self) -> None:
        pass  # buses open lazily, on a device's first request

    async def stop(self) -> None:
        for bus in list(self._buses.values()):
            await bus.close()
        self._buses.clear()
        self._devices.clear()

    async def add_device(self, spec: DeviceSpec) -> None:
        from .bus import Bus

        cfg = parse_device(spec)
        if spec.id in self._devices:
            await self.remove_device(spec.id)
        bus = self._buses.get(cfg.bus.key)
        if bus is None:
            bus = self._buses[cfg.bus.key] = Bus(cfg.bus, self.ctx.logger)
        elif bus.settings != cfg.bus:
            raise ConfigError(
                f"{bus.label} is already used by {', '.join(sorted(bus.users))} with other "
                "settings (baudrate, parity, frame_gap, queue_size...): a bus has one setting",
                spec.path,
            )
        for other in self._devices.values():
            if other.bus is bus and other.config.unit == cfg.unit:
                raise ConfigError(
                    f"unit {cfg.unit} on {bus.label} is already device {other.config.id!r}",
                    spec.path,
                )
        bus.users.add(spec.id)
        points = {p.name: p for p in cfg.points}
        plan = compile_plan(
            cfg.points, max_gap=cfg.max_gap, max_registers=cfg.max_registers,
            max_bits=cfg.max_bits,
        )  # fmt: skip
        self._devices[spec.id] = _Device(
            cfg,
            bus,
            cfg.breaker.breaker(),
            points,
            plan,
            spec.points,
        )

    async def remove_device(self, device_id: str) -> None:
        dev = self._devices.pop(device_id, None)
        if dev is None:
            return
        dev.bus.users.discard(device_id)
        if not dev.bus.users:
            self._buses.pop(dev.bus.settings.key, None)
            await dev.bus.close()

    def _device(self, device_id: str) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            raise DeviceUnavailableError(device_id, "not a device of the modbus driver")
        return dev

    def plan(self, device_id: str) -> list[ReadRequest]:
        """The compiled read plan of all of a device's points (for diagnostics and bench)."""
        return list(self._device(device_id).full_plan)

    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        dev = self._device(device_id)
        names: frozenset[str] = frozenset()
        if points is dev.spec_points:  # the usual poll: the spec's own tuple, nothing to check
            plan = dev.full_plan
        else:
            if not points:
                return []
            names = frozenset(p.name for p in points)
            for name in names:
                if name not in dev.points:
                    raise PointNotFoundError(device_id, f"no point {name!r}")
            plan = dev.plan_for(names)
        readings: list[RawReading] = []

        everything = plan is dev.full_plan

        async def run(s: Session) -> None:
            for req in plan:
                values = await s.read(req.table, req.address, req.count)
                if everything:
                    readings.extend(req.readings(values))
                else:
                    readings.extend(r for r in req.readings(values) if r.point in names)

        await self._guarded(dev, run)
        return readings

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        dev = self._device(device_id)
        mp = dev.points.get(point.name)
        if mp is None:
            raise PointNotFoundError(device_id, f"no point {point.name!r}")
        if not mp.writable:
            raise PayloadError(f"{device_id}.{mp.name}: the point is not writable")
        flag = mp.is_bit_table or mp.layout.type == "bool" or mp.layout.bit is not None
        regs: list[int] = []
        if flag:
            if isinstance(value, bool) or value in (0, 1):
                bit = bool(value)
            else:
                raise PayloadError(f"{device_id}.{mp.name}: needs true/false, got {value!r}")
        else:
            regs = _encode_value(device_id, mp, value)

        async def run(s: Session) -> None:
            if mp.is_bit_table:
                await s.write_coil(mp.address, bit)
                if mp.verify:
                    coil = await s.read("coil", mp.address, 1)
                    _check_readback(device_id, mp, [int(bit)], [int(coil[0])])
            elif flag and mp.layout.bit is None:
                # A whole register used as a boolean: 1 or 0.
                await s.write_registers(mp.address, [int(bit)])
                if mp.verify:
                    word = await s.read(mp.table, mp.address, 1)
                    _check_readback(device_id, mp, [int(bit)], [int(word[0])])
            elif flag:
                # A flag inside a register: read-modify-write, with the bus held throughout.
                current = await s.read(mp.table, mp.address, 1)
                new = encode_bit(int(current[0]), mp.layout, bit)
                await s.write_registers(mp.address, [new])
                if mp.verify:
                    again = await s.read(mp.table, mp.address, 1)
                    _check_readback(device_id, mp, [new], [int(v) for v in again])
            else:
                await s.write_registers(mp.address, regs)
                if mp.verify:
                    back = await s.read(mp.table, mp.address, len(regs))
                    _check_readback(device_id, mp, regs, [int(v) for v in back])

        await self._guarded(dev, run)

    async def _guarded(self, dev: _Device, run: Any) -> None:
        """Run requests on the device's bus behind its breaker; log and report availability."""
        cfg = dev.config
        clock = self.ctx.clock
        if not dev.breaker.allow(clock.monotonic()):
            raise ConnectError(
                cfg.id, f"circuit open after {dev.breaker.failures} failures; next probe in "
                f"{dev.breaker.wait(clock.monotonic()):.1f} s",
            )  # fmt: skip
        # Everything (waiting for the bus, connecting, each answer) must fit in the device's
        # timeout, with a margin: the collection service bounds a whole read by that timeout,
        # and our own DeviceTimeoutError must arrive first so the breaker hears of it.
        deadline = time.monotonic() + cfg.timeout * DEADLINE_SHARE
        try:
            async with dev.bus.session(cfg.id, cfg.unit, deadline) as s:
                await run(s)
        except DriverError as exc:
            self._failed(dev, exc)
            raise
        except BaseException:
            if time.monotonic() >= deadline:
                # The poll's deadline cut short what our own time-out should have ended: the
                # device did not answer in time, and its breaker must hear of it (else a silent
                # unit is asked on every poll and keeps taking the bus from its neighbours).
                self._failed(dev, DeviceTimeoutError(cfg.id, f"no answer within {cfg.timeout:g} s"))
            else:
                dev.breaker.abandon()  # cancelled: no outcome, free a half-open probe slot
            raise
        self._succeeded(dev)

    def _failed(self, dev: _Device, exc: DriverError) -> None:
        log = self.ctx.logger
        dev.failures += 1
        if not dev.failing:
            dev.failing = True
            log.warning("modbus %s", exc.message)  # the message starts with the device id
        else:
            log.debug("modbus %s (failure %d)", exc.message, dev.failures)
        if isinstance(exc, BusBusyError):
            dev.breaker.abandon()  # says nothing about the device
            return
        if isinstance(exc, DeviceProtocolError) and _is_live_answer(exc):
            # The unit answered (about a bad request): it is reachable, the breaker closes.
            dev.breaker.success()
            if dev.available is False:
                dev.available = True
                self.ctx.set_available(dev.config.id, True, "answering")
            return
        if dev.breaker.failure(self.ctx.clock.monotonic(), exc.message).opened:
            log.debug(
                "modbus %s: circuit open for %.1f s after %d failures",
                dev.config.id, dev.breaker.cooldown, dev.breaker.failures,
            )  # fmt: skip
        if dev.breaker.state is not State.CLOSED and dev.available is not False:
            dev.available = False
            self.ctx.set_available(dev.config.id, False, exc.message)

    def _succeeded(self, dev: _Device) -> None:
        dev.breaker.success()
        if dev.failing:
            self.ctx.logger.info(
                "modbus %s: recovered after %d failures", dev.config.id, dev.failures
            )
        dev.failing = False
        dev.failures = 0
        if dev.available is not True:
            dev.available = True
            self.ctx.set_available(dev.config.id, True, "answering")


def _is_live_answer(exc: DeviceProtocolError) -> bool:
    return exc.code is not None and exc.code not in DEAD_UNIT_CODES


def _encode_value(device_id: str, mp: ModbusPoint, value: object) -> list[int]:
    where = f"{device_id}.{mp.name}"
    if mp.layout.type == "string":
        if not isinstance(value, str):
            raise PayloadError(f"{where}: needs a string, got {value!r}")
        raw: object = value
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"{where}: needs a number, got {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise PayloadError(f"{where}: NaN cannot be written")
        # A raw value: `min`/`max` and scale/offset are the core's rules (services.points),
        # applied once before any driver; what is left here is what fits the wire.
        raw = value
    try:
        return encode(raw, mp.layout)
    except CodecError as exc:
        raise PayloadError(f"{where}: {exc}") from None


def _check_readback(device_id: str, mp: ModbusPoint, wrote: list[int], got: list[int]) -> None:
    if wrote != got:
        raise DeviceProtocolError(
            device_id, f"{mp.name}: read-back after write gave {got}, wrote {wrote}",
            code="verify",
        )  # fmt: skip
