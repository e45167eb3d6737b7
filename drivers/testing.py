"""A DriverContext that records what a driver reports, for tests, benchmarks and one-shot tools
(a probe): the core's side of `drivers.base.DriverContext`, typed against it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from drivers.base import Clock, DiscoveredDevice, RawReading
from gateway.clock import SystemClock


class ManualClock:
    """A clock the test moves by hand: `now` is monotonic time, wall time is 1.7e9 + `now`."""

    boot_id = "test-boot"

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def time(self) -> float:
        return 1.7e9 + self.now

    def monotonic(self) -> float:
        return self.now

    def synced(self) -> bool:
        return True


class RecordingContext:
    """Records emit / set_available / discovered, and lets a test await a condition on them
    (woken by each report; the bound only stops a hang).

    `record=False` keeps only the count of readings (a benchmark's hot path, a probe);
    `discovery=False` makes a discovery report an assertion error (a driver that must not
    discover)."""

    def __init__(
        self,
        logger: str | logging.Logger = "test.driver",
        clock: Clock | None = None,
        *,
        record: bool = True,
        discovery: bool = True,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.record = record
        self.discovery = discovery
        self.count = 0  # readings emitted, recorded or not
        self.emits: list[tuple[str, list[RawReading]]] = []
        self.readings: list[tuple[str, RawReading]] = []
        self.availability: list[tuple[str, bool, str]] = []
        self.found: list[DiscoveredDevice] = []
        self._emits_read = 0
        self._availability_read = 0
        self._waiters: list[asyncio.Event] = []

    # -- DriverContext ------------------------------------------------------------------------
    def emit(self, device_id: str, readings: Sequence[RawReading]) -> None:
        self.count += len(readings)
        if not self.record:
            return
        self.emits.append((device_id, list(readings)))
        self.readings.extend((device_id, r) for r in readings)
        self._wake()

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        if self.record:
            self.availability.append((device_id, available, reason))
            self._wake()

    def discovered(self, device: DiscoveredDevice) -> None:
        if not self.discovery:
            raise AssertionError(f"{device.driver} devices are not discovered")
        if self.record:
            self.found.append(device)
            self._wake()

    def _wake(self) -> None:
        for ev in self._waiters:
            ev.set()

    # -- queries ------------------------------------------------------------------------------
    def values(self, device_id: str) -> dict[str, object]:
        """The latest value of each point the device emitted."""
        return {r.point: r.value for d, r in self.readings if d == device_id}

    def series(self, point: str) -> list[object]:
        """Every value emitted for `point` (any device), in order."""
        return [r.value for _, r in self.readings if r.point == point]

    def emitted(self, device_id: str) -> list[list[RawReading]]:
        """Each emit of the device, in order."""
        return [r for d, r in self.emits if d == device_id]

    def changes(self, device_id: str) -> list[bool]:
        """The device's availability reports, in order."""
        return [a for d, a, _ in self.availability if d == device_id]

    def last_availability(self, device_id: str) -> tuple[bool, str] | None:
        states = [(a, r) for d, a, r in self.availability if d == device_id]
        return states[-1] if states else None

    # -- awaiting -----------------------------------------------------------------------------
    async def wait_for(self, check: Callable[[], bool], what: str, bound: float = 30.0) -> None:
        """Wait until `check()` holds, woken by each report (the bound only stops a hang)."""
        ev = asyncio.Event()
        self._waiters.append(ev)
        try:
            async with asyncio.timeout(bound):
                while not check():
                    await ev.wait()
                    ev.clear()
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None
        finally:
            self._waiters.remove(ev)

    async def next_readings(self) -> dict[str, object]:
        """The next emit not yet taken by this method, as {point: value}."""
        await self.wait_for(lambda: len(self.emits) > self._emits_read, "readings")
        _dev, readings = self.emits[self._emits_read]
        self._emits_read += 1
        return {r.point: r.value for r in readings}

    async def next_state(self) -> tuple[bool, str]:
        """The next availability report not yet taken by this method, as (available, reason)."""
        await self.wait_for(
            lambda: len(self.availability) > self._availability_read, "an availability change"
        )
        _dev, up, why = self.availability[self._availability_read]
        self._availability_read += 1
        return up, why

    def unread_readings(self) -> int:
        """Emits that `next_readings` has not taken yet."""
        return len(self.emits) - self._emits_read

    def unread_states(self) -> int:
        """Availability reports that `next_state` has not taken yet."""
        return len(self.availability) - self._availability_read
