"""Collection: holds the drivers, polls devices on their schedules and turns readings into
events. Push drivers hand readings in through their context (`emit`).

A poll that overruns its interval skips the cycles it missed (counted) instead of piling up.
Availability is evented once per change; the first failure of a device is logged at WARNING,
repeats at DEBUG, recovery at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drivers import driver_class
from drivers.base import Clock, DiscoveredDevice, Driver, RawReading
from gateway import events as ev
from gateway import names
from gateway.aio import cancel_and_wait
from gateway.clock import SystemClock
from gateway.config import DeviceSpec, GatewayConfig, PointSpec
from gateway.errors import DriverError, GatewayError, StoreError
from gateway.logs import RateLimitedLog
from gateway.service import Health, Service, ServiceContext

PUSH_QUEUE = 10_000


@dataclass
class DeviceStats:
    polls: int = 0
    failures: int = 0
    consecutive: int = 0  # failed polls in a row
    skipped: int = 0  # cycles skipped because a poll overran its interval
    last_read_s: float | None = None  # how long the last answered read took
    last_error: str = ""
    available: bool | None = None
    last_values: dict[str, Any] = field(default_factory=dict)


class _Context:
    """The DriverContext handed to drivers: emit, set_available, discovered, logger, clock."""

    def __init__(self, owner: CollectionService, kind: str) -> None:
        self._owner = owner
        self.logger = logging.getLogger(f"gateway.driver.{kind}")
        self.clock = owner.clock

    def emit(self, device_id: str, readings: Sequence[RawReading]) -> None:
        self._owner._push(device_id, readings)

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        self._owner._set_available(device_id, available, reason)

    def discovered(self, device: DiscoveredDevice) -> None:
        self._owner._discovered(device)


def convert(point: PointSpec, value: Any) -> Any:
    """Apply the point's scale and offset to numbers; other values pass unchanged."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if point.scale == 1.0 and point.offset == 0.0:
        return value
    return value * point.scale + point.offset


class CollectionService(Service):
    name: ClassVar[str] = "collection"
    requires: ClassVar[tuple[str, ...]] = ("devices",)

    def __init__(
        self, clock: Clock | None = None, sleep: Callable[[float], Awaitable[None]] | None = None
    ) -> None:
        # Both injectable so the poll schedule can be tested in the clock's time.
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self.drivers: dict[str, Driver] = {}
        self.specs: dict[str, DeviceSpec] = {}
        self.stats: dict[str, DeviceStats] = defaultdict(DeviceStats)
        self._pollers: dict[str, list[asyncio.Task[None]]] = {}
        self._push_q: asyncio.Queue[tuple[str, Sequence[RawReading]]] = asyncio.Queue(PUSH_QUEUE)
        self._push_dropped = 0
        self._status_tasks: set[asyncio.Task[None]] = set()
        self._discovered_seen: dict[tuple[str, str], float] = {}
        self._ctx: ServiceContext | None = None
        self._driver_errors: dict[str, str] = {}

    # -- life -----------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self.log = ctx.logger
        # A full store refuses every reading: one line per kind of refusal per interval.
        self._refusals = RateLimitedLog(ctx.logger)
        self.store = ctx.store
        ctx.create_task(self._push_loop(), "push")
        ctx.control.register("read", self._cmd_read, mutating=False)
        for spec in ctx.config.devices.values():
            if spec.enabled:
                await self._add(spec, ctx.config)

    async def stop(self) -> None:
        for dev_id in list(self.specs):
            await self._remove(dev_id)
        for kind, drv in list(self.drivers.items()):
            try:
                async with asyncio.timeout(5):
                    await drv.stop()
            except Exception as exc:
                self.log.warning("driver %s did not stop cleanly: %s", kind, exc)
        self.drivers.clear()
        # Readings already handed in by push drivers are committed before we go, and so
        # are the ones held back for the commit interval (their refusals counted below).
        await self._flush_push()
        if self.store is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):  # not wait_for: it can swallow a cancellation
                    await self.store.flush()
        for t in list(self._status_tasks):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await t
        self._refusals.flush()

    async def reload(self, config: GatewayConfig) -> None:
        new = {i: s for i, s in config.devices.items() if s.enabled}
        for dev_id in [d for d in self.specs if d not in new or new[d] != self.specs[d]]:
            await self._remove(dev_id)
        for dev_id, spec in new.items():
            if dev_id not in self.specs:
                await self._add(spec, config)

    def health(self) -> Health:
        down = [d for d, s in self.stats.items() if s.available is False and d in self.specs]
        figures = {
            "devices": len(self.specs),
            "unavailable": down,
            "polls": sum(s.polls for s in self.stats.values()),
            "failures": sum(s.failures for s in self.stats.values()),
            "skipped_cycles": sum(s.skipped for s in self.stats.values()),
            "push_dropped": self._push_dropped,
            "driver_errors": dict(self._driver_errors),
            # Per device, for `gatewayctl metrics` (labelled by device there).
            "per_device": {
                d: {"polls": st.polls, "failures": st.failures, "available": st.available,
                    "last_read_s": st.last_read_s}
                for d, st in self.stats.items() if d in self.specs
            },
        }  # fmt: skip
        if down or self._driver_errors:
            return Health.degraded(
                f"{len(down)} of {len(self.specs)} devices unavailable", **figures
            )
        return Health.ok(f"{len(self.specs)} devices", **figures)

    # -- devices --------------------------------------------------------------------------
    async def _driver(self, kind: str, config: GatewayConfig) -> Driver:
        drv = self.drivers.get(kind)
        if drv is None:
            cls = driver_class(kind)
            drv = cls(_Context(self, kind), config.drivers.get(kind, {}))
            await drv.start()
            self.drivers[kind] = drv
        return drv

    async def _add(self, spec: DeviceSpec, config: GatewayConfig) -> None:
        try:
            drv = await self._driver(spec.driver, config)
            await drv.add_device(spec)
        except (GatewayError, OSError) as exc:
            self._driver_errors[spec.id] = str(exc)
            self.log.error("device %s: cannot be added to driver %s: %s", spec.id, spec.driver, exc)
            self._set_available(spec.id, False, str(exc))
            return
        self._driver_errors.pop(spec.id, None)
        self.specs[spec.id] = spec
        assert self._ctx is not None
        if drv.polls(spec) and spec.points:
            groups: dict[float, list[PointSpec]] = defaultdict(list)
            for p in spec.points:
                groups[p.interval or spec.interval].append(p)
            self._pollers[spec.id] = [
                self._ctx.create_task(self._poll(drv, spec, interval, pts), f"poll:{spec.id}")
                for interval, pts in groups.items()
            ]

    async def _remove(self, dev_id: str) -> None:
        spec = self.specs.pop(dev_id, None)
        await cancel_and_wait(*self._pollers.pop(dev_id, []))
        if spec is not None and spec.driver in self.drivers:
            with contextlib.suppress(Exception):
                await self.drivers[spec.driver].remove_device(dev_id)

    # -- polling --------------------------------------------------------------------------
    async def _poll(
        self, drv: Driver, spec: DeviceSpec, interval: float, points: list[PointSpec]
    ) -> None:
        st = self.stats[spec.id]
        task = asyncio.current_task()
        # Spread the first polls of many devices over the interval.
        await self._sleep(random.uniform(0, min(interval, 1.0) * spec.jitter))
        next_at = self.clock.monotonic()
        while True:
            st.polls += 1
            readings: list[RawReading] | None = None
            started = self.clock.monotonic()
            try:
                # Not wait_for: on Python 3.11 it can swallow a cancellation (a device removed,
                # a stop) that lands as the read completes, and this loop would poll on.
                async with asyncio.timeout(spec.timeout):
                    readings = await drv.read(spec.id, points)
                st.last_read_s = self.clock.monotonic() - started
            except TimeoutError:
                self._failed(spec, st, f"no answer within {spec.timeout:g} s")
            except DriverError as exc:
                self._failed(spec, st, str(exc))
            if task is not None and task.cancelling():
                # A library below (pymodbus, bleak) swallowed our cancellation with its own
                # wait_for: it still stands, honour it.
                raise asyncio.CancelledError
            if readings is not None:
                st.consecutive = 0
                if st.available is not True:
                    self._set_available(spec.id, True, "")
                await self._record(spec, readings)
            next_at += interval
            now = self.clock.monotonic()
            if now > next_at:  # overran: skip the missed cycles, do not pile up
                missed = int((now - next_at) // interval) + 1
                st.skipped += missed
                next_at += missed * interval
            delay = next_at - now
            if spec.jitter:
                delay += random.uniform(0, spec.jitter * interval * 0.1)
            await self._sleep(max(0.0, delay))

    def _failed(self, spec: DeviceSpec, st: DeviceStats, why: str) -> None:
        st.failures += 1
        st.consecutive += 1
        st.last_error = why
        # One lost poll on a noisy RS-485 line is not an outage: flapping availability would
        # flood the log and the cloud. (Drivers with their own breaker report it directly.)
        if st.available is not False and st.consecutive >= spec.offline_after:
            self._set_available(spec.id, False, why)

    async def _record(self, spec: DeviceSpec, readings: Sequence[RawReading]) -> None:
        records = self._records(spec, readings)
        if not records:
            return
        # Nobody waits for a polled reading: the store commits it within commit_interval
        # (fewer, larger commits save the SD card); the poll loop does not wait for that.
        future = self.store.append_many([ev.readings_event(spec.id, records)], lazy=True)
        future.add_done_callback(lambda f: self._stored(f, spec.id))

    def _stored(self, future: asyncio.Future[Any], device_id: str | None) -> None:
        """A lazy append's outcome: refusals are counted in the log, once per kind."""
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            return
        if device_id is not None and device_id in self.stats:
            self.stats[device_id].last_error = str(exc)
        what = f"device {device_id}: readings" if device_id else "pushed readings"
        kind = "readings" if device_id else "pushed"
        self._refusals.warning(f"{kind}:{type(exc).__name__}", "%s not stored: %s", what, exc)

    def _records(self, spec: DeviceSpec, readings: Sequence[RawReading]) -> list[dict[str, Any]]:
        st = self.stats[spec.id]
        out = []
        for r in readings:
            p = spec.point(r.point)
            if p is None:
                value, unit = r.value, None
            else:
                value, unit = convert(p, r.value), p.unit
                if p.deadband is not None and isinstance(value, int | float):
                    last = st.last_values.get(r.point)
                    if isinstance(last, int | float) and abs(value - last) <= p.deadband:
                        continue
            st.last_values[r.point] = value
            out.append(ev.reading_record(r.point, value, unit, r.ts))
        return out

    # -- push path ------------------------------------------------------------------------
    def _push(self, device_id: str, readings: Sequence[RawReading]) -> None:
        try:
            self._push_q.put_nowait((device_id, readings))
        except asyncio.QueueFull:
            self._push_dropped += 1

    async def _push_loop(self) -> None:
        while True:
            first = await self._push_q.get()
            await self._append_pushed([first, *self._drain()])

    def _drain(self) -> list[tuple[str, Sequence[RawReading]]]:
        items = []
        while not self._push_q.empty():
            items.append(self._push_q.get_nowait())
        return items

    async def _flush_push(self) -> None:
        items = self._drain()
        if items and self.store is not None and not self.store.closed:
            await self._append_pushed(items)

    async def _append_pushed(self, items: list[tuple[str, Sequence[RawReading]]]) -> None:
        per_device: dict[str, list[RawReading]] = defaultdict(list)
        for dev, rs in items:
            per_device[dev].extend(rs)
        batch = []
        for dev, rs in per_device.items():
            spec = self.specs.get(dev)
            st = self.stats[dev]
            if spec is not None and st.available is not True:
                self._set_available(dev, True, "")
            records = (
                self._records(spec, rs)
                if spec is not None
                else [ev.reading_record(r.point, r.value, None, r.ts) for r in rs]
            )
            if records:
                batch.append(ev.readings_event(dev, records))
        if batch:
            future = self.store.append_many(batch, lazy=True)
            future.add_done_callback(lambda f: self._stored(f, None))

    # -- availability and discovery -------------------------------------------------------
    def _set_available(self, device_id: str, available: bool, reason: str) -> None:
        st = self.stats[device_id]
        if st.available is available:
            return
        before = st.available
        st.available = available
        if available:
            if before is False:
                self.log.info("device %s is available again", device_id)
        else:
            self.log.warning("device %s unavailable: %s", device_id, reason)
        spec = self.specs.get(device_id)
        data: dict[str, Any] = {"reason": reason} if reason else {}
        if spec is not None:
            data["driver"] = spec.driver
        etype = ev.DEVICE_AVAILABLE if available else ev.DEVICE_UNAVAILABLE
        self._spawn(self.store.append(ev.device_stream(device_id), etype, data))

    def _discovered(self, d: DiscoveredDevice) -> None:
        key = (d.driver, d.address)
        now = self.clock.monotonic()
        if now - self._discovered_seen.get(key, -1e9) < 3600:
            return
        self._discovered_seen[key] = now
        data = {"driver": d.driver, "address": d.address, "name": d.name, "kind": d.kind,
                "rssi": d.rssi, "values": dict(d.values)}  # fmt: skip
        if d.name is not None and not names.is_valid(d.name):
            # An advertised name is anyone's to choose: kept only as escaped text, never
            # as a name (it cannot become a device id, a topic or a log line of its own).
            data["name"] = None
            data["advertised_name"] = names.escape(d.name[:64])
        self._spawn(self.store.append("discovered", ev.DEVICE_DISCOVERED, data, outbox=False))

    def _spawn(self, coro: Any) -> None:
        async def run() -> None:
            try:
                await coro
            except StoreError as exc:
                self._refusals.warning(f"event:{type(exc).__name__}", "event not stored: %s", exc)

        t = asyncio.create_task(run())
        self._status_tasks.add(t)
        t.add_done_callback(self._status_tasks.discard)

    # -- control --------------------------------------------------------------------------
    def driver_for(self, device_id: str) -> Driver | None:
        """The driver holding `device_id` (the control service writes through it, so there is
        one driver instance per kind); None when the device is not added (disabled, failed)."""
        spec = self.specs.get(device_id)
        return None if spec is None else self.drivers.get(spec.driver)

    def why_not(self, device_id: str) -> str:
        return self._driver_errors.get(device_id) or f"{device_id}: not running in any driver"

    async def _cmd_read(self, args: Mapping[str, Any]) -> Any:
        """Read a device now (for `gatewayctl probe`-like checks of configured devices)."""
        dev = str(args.get("device", ""))
        spec = self.specs.get(dev)
        if spec is None:
            from gateway.errors import NotFoundError

            raise NotFoundError(f"no configured device {dev!r}")
        readings = await self.drivers[spec.driver].read(dev, spec.points)
        return [{"point": r.point, "value": r.value, "ts": r.ts} for r in readings]
