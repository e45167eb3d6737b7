"""Serial line devices (UART, USB-serial, RS-232/485 adapters): frames in, named values out.

A device is one port. Its bytes are cut into frames (`framing.py`), each frame is parsed
into named fields (`parsers.py`, `nmea.py`), and points take their values from those fields.
Two modes:

- `stream` (default): the device talks on its own (a GPS, a scale, a sensor printing lines).
  Every frame's values are pushed with `ctx.emit`; `read()` returns the latest value of each
  asked point (with the time it was received) without touching the line.
- `request`: the device answers queries. `read()` sends `request` and parses the next
  `response_frames` frames as the answer (the collection service's schedule is the query
  schedule). Frames that arrive while nobody asked are counted and dropped.

Malformed frames are counted, logged at DEBUG and skipped. pyserial is imported only when a
port is opened (`link.py`), so validating a config stays cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from drivers.base import Driver, DriverContext, RawReading, Value
from drivers.serial.convert import convert
from drivers.serial.framing import Discarded
from drivers.serial.options import PointMap, SerialOptions, parse_options
from drivers.serial.parsers import FrameError, Parser
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import (
    ConfigError,
    ConfigIssue,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
    PointNotFoundError,
)

if TYPE_CHECKING:
    from drivers.serial.link import SerialLink

__all__ = ["DeviceStats", "SerialDevice", "SerialDriver", "SerialOptions", "parse_options"]


@dataclass
class DeviceStats:
    frames: int = 0  # frames parsed into values
    malformed: int = 0  # frames or bytes that could not be framed or parsed
    ignored: int = 0  # valid frames the config does not use (filtered NMEA sentence types)
    unsolicited: int = 0  # request mode: frames nobody asked for
    conversion_errors: int = 0  # a field that did not convert to its point's type
    last_error: str = ""


@dataclass
class _Waiter:
    """A request waiting for its answer frames."""

    need: int
    future: asyncio.Future[list[RawReading]]
    readings: list[RawReading] = field(default_factory=list)
    got: int = 0


class SerialDevice:
    """One configured device on its port: deframer, parser, latest values, request state."""

    def __init__(self, spec: DeviceSpec, opts: SerialOptions, ctx: DriverContext) -> None:
        self.spec = spec
        self.opts = opts
        self.ctx = ctx
        self.log = ctx.logger
        self.deframer = opts.framing.deframer()
        self.parser: Parser = opts.parser.parser()
        self.fields: dict[str, list[PointMap]] = opts.fields()
        self.stats = DeviceStats()
        # point -> (value, ts, monotonic time received)
        self.latest: dict[str, tuple[Value, float, float]] = {}
        self.last_frame: float | None = None  # monotonic time of the last good frame
        self.lock = asyncio.Lock()  # one request (or write) on the line at a time
        self.waiter: _Waiter | None = None
        self.link: SerialLink | None = None

    # -- frames in ---------------------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        for item in self.deframer.feed(data):
            if isinstance(item, Discarded):
                self._malformed(f"{item.size} byte(s) discarded: {item.reason}")
            else:
                self._frame(item)

    def _malformed(self, why: str) -> None:
        self.stats.malformed += 1
        self.stats.last_error = why
        self.log.debug("%s: malformed frame #%d: %s", self.spec.id, self.stats.malformed, why)

    def _frame(self, frame: bytes) -> None:
        try:
            parsed = self.parser.parse(frame)
        except FrameError as exc:
            self._malformed(str(exc))
            return
        except Exception as exc:
            # A library surprise on odd bytes (cbor2, re) is a bad frame, not a dead driver.
            self._malformed(f"{type(exc).__name__}: {exc}")
            return
        if parsed is None:
            self.stats.ignored += 1
            return
        if parsed.skipped:
            self._malformed(f"{parsed.skipped} byte(s) before the data discarded")
        self.stats.frames += 1
        self.last_frame = mono = self.ctx.clock.monotonic()
        received = self.ctx.clock.time()
        readings: list[RawReading] = []
        for name, value in parsed.values.items():
            for pm in self.fields.get(name, ()):
                try:
                    v = convert(value, pm.type)
                except ValueError as exc:
                    self.stats.conversion_errors += 1
                    self.log.debug("%s: point %s: %s", self.spec.id, pm.name, exc)
                    continue
                readings.append(RawReading(pm.name, v, parsed.ts))
                ts = parsed.ts if parsed.ts is not None else received
                self.latest[pm.name] = (v, ts, mono)
        if self.opts.mode == "request":
            w = self.waiter
            if w is None or w.future.done():
                self.stats.unsolicited += 1
                self.log.debug("%s: unsolicited frame dropped: %r", self.spec.id, frame[:60])
                return
            w.readings.extend(readings)
            w.got += 1
            if w.got >= w.need:
                w.future.set_result(w.readings)
            return
        if readings:
            self.ctx.emit(self.spec.id, readings)

    def on_state(self, up: bool, why: str) -> None:
        # A partial frame from before a reopen would glue onto the first new one.
        self.deframer.reset()
        if not up and self.waiter is not None and not self.waiter.future.done():
            self.waiter.future.set_exception(DeviceUnavailableError(self.spec.id, why))
        self.ctx.set_available(self.spec.id, up, why)

    # -- reads -------------------------------------------------------------------------------
    def _check_open(self) -> SerialLink:
        link = self.link
        if link is None or not link.is_open:
            why = link.reason if link is not None else "not started"
            raise DeviceUnavailableError(
                self.spec.id, f"port {self.opts.port.port} is not open: {why}"
            )
        return link

    def latest_readings(self, points: Sequence[PointSpec]) -> list[RawReading]:
        self._check_open()
        max_age = self.opts.max_age
        now = self.ctx.clock.monotonic()
        if max_age is not None and self.last_frame is not None and now - self.last_frame > max_age:
            raise DeviceTimeoutError(
                self.spec.id, f"no frame for {now - self.last_frame:.1f} s (max_age {max_age:g})"
            )
        out = []
        for p in points:
            if p.name not in self.opts.points:
                raise PointNotFoundError(self.spec.id, f"no point {p.name!r}")
            got = self.latest.get(p.name)
            if got is not None and (max_age is None or now - got[2] <= max_age):
                out.append(RawReading(p.name, got[0], got[1]))
        return out

    async def request(self, points: Sequence[PointSpec]) -> list[RawReading]:
        for p in points:
            if p.name not in self.opts.points:
                raise PointNotFoundError(self.spec.id, f"no point {p.name!r}")
        timeout = self.opts.response_timeout or self.spec.timeout
        async with self.lock:
            link = self._check_open()
            # The answer starts a fresh frame: stale bytes (a late answer to an earlier
            # query, chatter) must not be taken for it.
            link.discard_input()
            self.deframer.reset()
            loop = asyncio.get_running_loop()
            w = _Waiter(self.opts.response_frames, loop.create_future())
            self.waiter = w
            malformed_before = self.stats.malformed
            try:
                await link.write(self.opts.request)
                async with asyncio.timeout(timeout):
                    readings = await w.future
            except TimeoutError:
                bad = self.stats.malformed - malformed_before
                extra = f"; {bad} malformed frame(s): {self.stats.last_error}" if bad else ""
                raise DeviceTimeoutError(
                    self.spec.id,
                    f"no answer to {self.opts.request!r} within {timeout:g} s{extra}",
                ) from None
            finally:
                self.waiter = None
        wanted = {p.name for p in points}
        return [r for r in readings if r.point in wanted]


class SerialDriver(Driver):
    """Serial devices, one port each; see the module docstring."""

    kind: ClassVar[str] = "serial"

    def __init__(self, ctx: DriverContext, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx, options)
        self.devices: dict[str, SerialDevice] = {}

    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> Sequence[ConfigIssue]:
        return parse_options(spec).warnings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for dev_id in list(self.devices):
            await self.remove_device(dev_id)

    def polls(self, spec: DeviceSpec) -> bool:
        """Streaming devices push every frame through `ctx.emit`; only request/response
        devices are polled (polling a stream would store its latest values twice)."""
        return bool(spec.options.get("mode", "stream") == "request")

    async def add_device(self, spec: DeviceSpec) -> None:
        from drivers.serial.link import SerialLink

        opts = parse_options(spec)
        if spec.id in self.devices:
            await self.remove_device(spec.id)
        for other in self.devices.values():
            if other.opts.port.port == opts.port.port:
                raise ConfigError(
                    f"port {opts.port.port} is already used by device {other.spec.id!r}",
                    spec.path + ".port",
                )
        dev = SerialDevice(spec, opts, self.ctx)
        dev.link = SerialLink(
            spec.id, opts.port, on_data=dev.on_data, on_state=dev.on_state,
            logger=self.ctx.logger, retry=opts.retry,
        )  # fmt: skip
        self.devices[spec.id] = dev
        dev.link.start()

    async def remove_device(self, device_id: str) -> None:
        dev = self.devices.pop(device_id, None)
        if dev is None:
            return
        w = dev.waiter
        if w is not None and not w.future.done():
            w.future.set_exception(DeviceUnavailableError(device_id, "device removed"))
        if dev.link is not None:
            await dev.link.close()

    def _device(self, device_id: str) -> SerialDevice:
        try:
            return self.devices[device_id]
        except KeyError:
            raise DriverError(device_id, "no such serial device") from None

    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        dev = self._device(device_id)
        if dev.opts.mode == "request":
            return await dev.request(points)
        return dev.latest_readings(points)

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        dev = self._device(device_id)
        pm = dev.opts.points.get(point.name)
        if pm is None:
            raise PointNotFoundError(device_id, f"no point {point.name!r}")
        if pm.command is None:
            raise DriverError(device_id, f"point {point.name!r} is not writable")
        if isinstance(value, bool):
            value = int(value)  # "1"/"0" on the wire, not "True"
        try:
            data = pm.command.format(value=value, point=point.name).encode("latin-1")
        except (UnicodeEncodeError, ValueError, KeyError) as exc:
            raise DriverError(device_id, f"{point.name}: cannot format {value!r}: {exc}") from None
        async with dev.lock:
            await dev._check_open().write(data)

    def stats(self, device_id: str) -> DeviceStats:
        return self._device(device_id).stats
