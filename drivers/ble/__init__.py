"""The BLE driver: advertisement sensors (BTHome v2, RuuviTag, custom) and GATT devices.

Advertisement devices are push-only: one shared scanner hears them and the driver emits
readings through `ctx.emit` (deduplicated, rate-limited). GATT devices are connected, read
on the driver's own schedule, and send notifications; `read()`/`write()` work on demand.
Importing this package does not import bleak (nor cryptography): that happens in `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from drivers.base import Driver, DriverContext, RawReading
from drivers.ble.config import BleDevice, BleOptions, compile_device, parse_options
from drivers.ble.dispatch import Advert, Dispatcher
from drivers.ble.gatt import ConnectionPool, GattLink
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import (
    ConfigIssue,
    DeviceUnavailableError,
    DriverError,
    NotFoundError,
    PointNotFoundError,
)

__all__ = ["BleDriver"]


class BleDriver(Driver):
    kind: ClassVar[str] = "ble"
    polled: ClassVar[bool] = False

    def __init__(self, ctx: DriverContext, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx, options)
        self.opts: BleOptions = parse_options(self.options, "drivers.ble")
        self.dispatcher = Dispatcher(ctx, discovery=self.opts.discovery)
        self.pool = ConnectionPool(self.opts.max_connections)
        self.devices: dict[str, BleDevice] = {}
        self.links: dict[str, GattLink] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scanner: Any = None
        self._started = False

    # -- config ---------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: Mapping[str, Any], path: str) -> Sequence[ConfigIssue]:
        return parse_options(options, path).warnings

    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> None:
        compile_device(spec)

    # -- life -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        # The scanner also runs for GATT-only setups: BlueZ only keeps objects for devices it
        # hears, and connecting needs that object.
        if self.opts.discovery or self.devices:
            self._ensure_scanner()
        for dev in self.devices.values():
            if not dev.advertises:
                self._start_link(dev)

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            # Bounded: a task stuck in a D-Bus call must not hold up the gateway's shutdown.
            await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            if t.done() and not t.cancelled():
                with contextlib.suppress(BaseException):
                    t.result()
        self._scanner = None

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"ble-{name}")
        self._tasks[name] = task

    def _ensure_scanner(self) -> None:
        if self._scanner is not None:
            return
        from drivers.ble.scanner import Scanner

        customs = [d.custom for d in self.devices.values() if d.custom is not None]
        self._scanner = Scanner(
            self.opts, self._on_advert, self._on_scan_state, self.ctx.logger, customs
        )
        self._spawn("scanner", self._scanner.run())
        self._spawn("unseen", self._watch_unseen())

    def _start_link(self, dev: BleDevice) -> None:
        link = GattLink(dev, self.opts, self.pool, self.ctx)
        self.links[dev.id] = link
        self._spawn(f"gatt:{dev.id}", link.run())

    def _on_advert(self, adv: Advert) -> None:
        self.dispatcher.handle(adv)

    def _on_scan_state(self, ok: bool, why: str) -> None:
        # Scanning resumed: devices come back one by one as they are heard again.
        if not ok:
            self.dispatcher.mark_all_unavailable(why)

    async def _watch_unseen(self) -> None:
        while True:
            timeouts = [d.unseen_timeout for d in self.devices.values() if d.advertises]
            # Check often enough to be late by at most a quarter of the shortest timeout.
            await asyncio.sleep(min(max(min(timeouts, default=60.0) / 4, 0.05), 15.0))
            self.dispatcher.check_unseen()

    # -- devices --------------------------------------------------------------------------
    async def add_device(self, spec: DeviceSpec) -> None:
        dev = compile_device(spec, load_secrets=True)
        if dev.id in self.devices:
            await self.remove_device(dev.id)
        self.devices[dev.id] = dev
        if dev.advertises:
            self.dispatcher.add(dev)
            fault = self._scanner.fault if self._scanner is not None else None
            if fault is not None:  # added while Bluetooth is down: say so at once
                self.dispatcher.mark_all_unavailable(str(fault))
        if self._started:
            self._ensure_scanner()
            if dev.custom is not None and self._scanner is not None:
                self._scanner.customs.append(dev.custom)
            if not dev.advertises:
                self._start_link(dev)

    async def remove_device(self, device_id: str) -> None:
        self.devices.pop(device_id, None)
        self.dispatcher.remove(device_id)
        self.links.pop(device_id, None)
        task = self._tasks.pop(f"gatt:{device_id}", None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)

    def _device(self, device_id: str) -> BleDevice:
        dev = self.devices.get(device_id)
        if dev is None:
            raise NotFoundError(f"no BLE device {device_id!r}")
        return dev

    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        dev = self._device(device_id)
        if not dev.advertises:
            link = self.links.get(device_id)
            if link is None:
                raise DeviceUnavailableError(device_id, "the BLE driver is not started")
            return await link.read([p.name for p in points])
        state = self.dispatcher.by_id[device_id]
        out = []
        for p in points:
            if p.name not in dev.fields:
                raise PointNotFoundError(device_id, f"no point {p.name!r}")
            if p.name not in state.latest:
                raise DeviceUnavailableError(device_id, f"{p.name}: nothing received yet")
            out.append(RawReading(p.name, state.latest[p.name]))
        return out

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        dev = self._device(device_id)
        if dev.advertises:
            raise DriverError(device_id, "advertisement devices cannot be written")
        link = self.links.get(device_id)
        if link is None:
            raise DeviceUnavailableError(device_id, "the BLE driver is not started")
        await link.write(point.name, value)

    # -- diagnostics ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For `gatewayctl status` / health: scanner state, fault, per-device counters."""
        sc = self._scanner
        return {
            "scanning": bool(sc and sc.scanning),
            "fault": str(sc.fault) if sc and sc.fault else None,
            "adverts": sc.adverts if sc else 0,
            "connections": {
                "in_use": self.pool.in_use,
                "waiting": self.pool.waiting,
                "max": self.pool.size,
            },
            "devices": {
                s.device.id: {
                    "available": s.available,
                    "accepted": s.accepted,
                    "emitted": s.emitted,
                    "rejected": dict(s.rejected),
                    "rssi": s.rssi,
                }
                for s in self.dispatcher.by_id.values()
            }
            | {
                i: {
                    "available": link.available,
                    "breaker": link.breaker.state,
                    "notifications": link.notifications,
                    "error": link.last_error,
                }
                for i, link in self.links.items()
            },
        }
