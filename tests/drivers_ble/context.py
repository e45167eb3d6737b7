"""A DriverContext for tests: records what the driver reports and lets a test await it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from drivers.base import DiscoveredDevice, RawReading


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock the test moves by hand (for the pure dispatch tests)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def time(self) -> float:
        return 1.7e9 + self.t

    def monotonic(self) -> float:
        return self.t


class RecordingContext:
    """Records emit / set_available / discovered. The lead wires emit to the store; here we
    assert exactly what the driver hands over."""

    def __init__(self, clock: Any = None) -> None:
        self.logger = logging.getLogger("test.ble")
        self.clock = clock or SystemClock()
        self.readings: list[tuple[str, str, object]] = []
        self.emits: list[tuple[str, list[RawReading]]] = []
        self.availability: list[tuple[str, bool, str]] = []
        self.found: list[DiscoveredDevice] = []
        self._waiters: list[asyncio.Event] = []

    def _changed(self) -> None:
        for ev in self._waiters:
            ev.set()

    def emit(self, device_id: str, readings: Sequence[RawReading]) -> None:
        self.emits.append((device_id, list(readings)))
        self.readings.extend((device_id, r.point, r.value) for r in readings)
        self._changed()

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        self.availability.append((device_id, available, reason))
        self._changed()

    def discovered(self, device: DiscoveredDevice) -> None:
        self.found.append(device)
        self._changed()

    # -- queries ----------------------------------------------------------------------------
    def values(self, device_id: str) -> dict[str, object]:
        """The latest value of each point the device emitted."""
        return {p: v for d, p, v in self.readings if d == device_id}

    def emitted(self, device_id: str) -> list[list[RawReading]]:
        return [r for d, r in self.emits if d == device_id]

    def last_availability(self, device_id: str) -> tuple[bool, str] | None:
        states = [(a, r) for d, a, r in self.availability if d == device_id]
        return states[-1] if states else None

    async def wait_for(self, check: Callable[[], bool], what: str, bound: float = 20.0) -> None:
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
