"""GATT devices: connect, read characteristics on a schedule, notifications, writes.

Connections are limited per adapter (`ConnectionPool`: a queue of waiters, a configurable
maximum); a device that keeps failing opens its breaker (`gateway.breaker`) and is left
alone for a while, then gets one trial connection;
reconnects back off exponentially. Values are decoded/encoded by `decode()`/`encode()`, pure.
bleak is imported only when a connection is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import Sequence
from typing import Any

from drivers.base import Clock, DriverContext, RawReading
from drivers.ble.common import Value
from drivers.ble.config import BleDevice, BleOptions, GattPoint
from drivers.ble.custom import TYPES, FieldSpec, read_field
from gateway.aio import wait_event
from gateway.breaker import Breaker
from gateway.errors import (
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
    PayloadError,
    PointNotFoundError,
)


def decode(point: GattPoint, data: bytes) -> Value:
    """A characteristic's bytes -> the point's value (DeviceProtocolError if too short)."""
    raw = bytes(data)[point.byte_offset :]
    if point.type == "bytes":
        return raw
    if point.type == "utf8":
        return raw.decode("utf-8", errors="replace")
    size = TYPES[point.type][1]
    if len(raw) < size:
        raise DeviceProtocolError(
            "", f"{point.name}: characteristic has {len(data)} bytes, {point.type} at offset "
            f"{point.byte_offset} needs {point.byte_offset + size}",
        )  # fmt: skip
    return read_field(raw, FieldSpec(point.name, 0, point.type, point.endian))


def encode(point: GattPoint, value: object) -> bytes:
    """A value to write -> bytes (PayloadError naming the point if it does not fit)."""
    try:
        if point.type == "bytes":
            if isinstance(value, bytes | bytearray):
                return bytes(value)
            if isinstance(value, str):
                return bytes.fromhex(value)
            raise TypeError("expected bytes or a hex string")
        if point.type == "utf8":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value.encode()
        code = TYPES[point.type][0]
        order = "<" if point.endian == "little" else ">"
        if point.type == "bool":
            if not isinstance(value, bool | int):
                raise TypeError("expected a boolean")
            return b"\x01" if value else b"\x00"
        if point.type.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError("expected a number")
            return struct.pack(order + code, float(value))
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("expected an integer")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise TypeError(f"{point.type} needs an integer, got {value!r}")
        n = int(value)
        if not code:  # 24-bit
            return n.to_bytes(3, point.endian, signed=point.type == "int24")  # type: ignore[arg-type]
        return struct.pack(order + code, n)
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        raise PayloadError(f"{point.name}: cannot write {value!r} as {point.type}: {exc}") from None


#: Shortest rest while the breaker is open (asyncio may wake a sleeper a hair early).
MIN_REST = 0.001


class ConnectionPool:
    """At most `size` connections on one adapter; waiters queue in arrival order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._sem = asyncio.Semaphore(size)
        self.in_use = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> Any:
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._sem.release()


class GattLink:
    """One GATT device: its connection, schedule, notifications and writes."""

    def __init__(
        self, device: BleDevice, options: BleOptions, pool: ConnectionPool, ctx: DriverContext
    ) -> None:
        self.device = device
        self.options = options
        self.pool = pool
        self.ctx = ctx
        self.clock: Clock = ctx.clock
        self.log: logging.Logger = ctx.logger
        self.breaker: Breaker = options.breaker.breaker()
        self.backoff = options.retry.backoff()  # between failed sessions
        self.client: Any = None
        self._conn_lock = asyncio.Lock()
        self._disconnected = asyncio.Event()
        self.available: bool | None = None
        self.last_error: str | None = None
        self.notifications = 0
        self._next_read: dict[str, float] = {}

    @property
    def _notify_points(self) -> list[GattPoint]:
        return [p for p in self.device.gatt if p.notify]

    @property
    def _read_points(self) -> list[GattPoint]:
        return [p for p in self.device.gatt if not p.notify]

    def _ble_device(self) -> Any:
        from bleak.backends.device import BLEDevice

        adapter = self.options.adapter or "hci0"
        path = f"/org/bluez/{adapter}/dev_{self.device.address.replace(':', '_')}"
        # BlueZ's object path for the address: connecting needs no scan of its own (which
        # would collide with the driver's shared scanner on the same adapter).
        return BLEDevice(self.device.address, None, {"path": path, "props": {}})

    async def _connect(self) -> Any:
        from bleak import BleakClient

        self._disconnected.clear()
        bluez: dict[str, Any] = {"adapter": self.options.adapter} if self.options.adapter else {}
        client = BleakClient(
            self._ble_device(),
            disconnected_callback=lambda _c: self._disconnected.set(),
            timeout=self.device.timeout,
            bluez=bluez,  # type: ignore[arg-type]
        )
        await client.connect()
        return client

    def _set_available(self, ok: bool, reason: str) -> None:
        if self.available is not ok:
            self.available = ok
            self.ctx.set_available(self.device.id, ok, reason)

    # -- the schedule ---------------------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled: connect, read on schedule, keep notifications flowing."""
        from drivers.ble.scanner import explain

        while True:
            now = self.clock.monotonic()
            if not self.breaker.allow(now):  # open: rest, then one trial (half-open)
                await asyncio.sleep(max(self.breaker.wait(now), MIN_REST))
                continue
            try:
                await self._session()
                self.backoff.reset()
            except asyncio.CancelledError:
                self.breaker.abandon()  # a cancelled trial must not keep the probe slot
                raise
            except Exception as exc:
                why = (
                    str(exc)
                    if isinstance(exc, DriverError)
                    else str(explain(exc, self.options.adapter, gatt=True))
                )
                self.breaker.failure(self.clock.monotonic(), why)
                first = self.last_error != why
                self.last_error = why
                delay = self.backoff.next()
                self.log.log(logging.WARNING if first else logging.DEBUG,
                             "BLE %s: %s (retry in %.3g s, breaker %s)", self.device.id, why,
                             delay, self.breaker.state)  # fmt: skip
                self._set_available(False, why)
                await asyncio.sleep(delay)
                continue
            if not self._notify_points:
                await asyncio.sleep(self._until_next_read())

    def _until_next_read(self) -> float:
        now = self.clock.monotonic()
        due = [self._next_read.get(p.name, now) for p in self._read_points]
        return max(0.0, min(due, default=now + self.device.interval) - now)

    async def _session(self) -> None:
        async with self.pool.slot():
            async with self._conn_lock:
                client = await self._connect()
                self.client = client
            try:
                self.breaker.success()
                self.last_error = None
                self._set_available(True, "connected")
                for p in self._notify_points:
                    await client.start_notify(p.char, self._on_notify(p))
                while True:
                    await self._read_due(client)
                    if not self._notify_points:
                        return
                    timeout = self._until_next_read() if self._read_points else None
                    await wait_event(self._disconnected, timeout)
                    if self._disconnected.is_set():
                        raise DeviceUnavailableError(self.device.id, "disconnected")
            except Exception as exc:
                # A link that drops mid-read surfaces as whatever bleak was doing at the time
                # ("Service Discovery has not been performed yet"); name the real cause.
                if self._disconnected.is_set() and not isinstance(exc, DeviceUnavailableError):
                    raise DeviceUnavailableError(self.device.id, "disconnected") from exc
                raise
            finally:
                self.client = None
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.device.timeout):
                        await client.disconnect()

    async def _read_due(self, client: Any) -> None:
        now = self.clock.monotonic()
        due = [p for p in self._read_points if self._next_read.get(p.name, now) <= now]
        if not due:
            return
        readings = await self._read(client, due)
        for p in due:
            self._next_read[p.name] = now + (p.interval or self.device.interval)
        self.ctx.emit(self.device.id, readings)

    def _on_notify(self, point: GattPoint) -> Any:
        def callback(_char: Any, data: bytearray) -> None:
            self.notifications += 1
            try:
                value = decode(point, bytes(data))
            except DriverError as exc:
                self.log.warning("BLE %s: bad notification: %s", self.device.id, exc)
                return
            self.ctx.emit(self.device.id, [RawReading(point.name, value)])

        return callback

    # -- on demand ------------------------------------------------------------------------
    async def _read(self, client: Any, points: Sequence[GattPoint]) -> list[RawReading]:
        out = []
        for p in points:
            async with asyncio.timeout(self.device.timeout):
                data = await client.read_gatt_char(p.char)
            try:
                out.append(RawReading(p.name, decode(p, bytes(data))))
            except DeviceProtocolError as exc:
                raise DeviceProtocolError(self.device.id, exc.message) from None
        return out

    @contextlib.asynccontextmanager
    async def _client(self) -> Any:
        """The live connection, or a short one of our own (through the pool). Our own is
        held under the connection lock, so the schedule cannot connect over it."""
        if self.client is not None:
            yield self.client
            return
        async with self.pool.slot(), self._conn_lock:
            if self.client is not None:  # the schedule connected while we queued
                yield self.client
                return
            client = await self._connect()
            try:
                yield client
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.device.timeout):
                        await client.disconnect()

    def _point(self, name: str) -> GattPoint:
        for p in self.device.gatt:
            if p.name == name:
                return p
        raise PointNotFoundError(self.device.id, f"no GATT point {name!r}")

    async def read(self, names: Sequence[str]) -> list[RawReading]:
        points = [self._point(n) for n in names]
        try:
            async with self._client() as client:
                return await self._read(client, points)
        except DriverError:
            raise
        except TimeoutError:
            raise DeviceTimeoutError(self.device.id, "GATT read timed out") from None
        except Exception as exc:
            raise self._as_driver_error(exc) from None

    async def write(self, name: str, value: object) -> None:
        point = self._point(name)
        if not point.writable:
            raise DriverError(self.device.id, f"point {name!r} is not writable (writable = true)")
        data = encode(point, value)
        try:
            async with self._client() as client:
                async with asyncio.timeout(self.device.timeout):
                    await client.write_gatt_char(point.char, data, response=True)
        except TimeoutError:
            raise DeviceTimeoutError(self.device.id, "GATT write timed out") from None
        except DriverError:
            raise
        except Exception as exc:
            raise self._as_driver_error(exc) from None

    def _as_driver_error(self, exc: Exception) -> DriverError:
        from drivers.ble.scanner import explain

        name = type(exc).__name__
        if name in ("BleakCharacteristicNotFoundError", "BleakDBusError"):
            return DeviceProtocolError(self.device.id, f"{name}: {exc}")
        return DeviceUnavailableError(
            self.device.id, str(explain(exc, self.options.adapter, gatt=True))
        )
