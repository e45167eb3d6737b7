"""A socat PTY pair for serial tests: the driver opens ttyA, the test plays the device on ttyB."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from drivers.base import Clock, DiscoveredDevice, RawReading
from gateway.clock import SystemClock
from tests.peers import Peer, require_binary, wait_until


class PtyPair:
    """`socat pty,link=ttyA pty,link=ttyB`; can be stopped and started on the same paths."""

    def __init__(self, directory: Path) -> None:
        self.socat = require_binary("socat")
        self.dir = directory
        self.a = directory / "ttyA"
        self.b = directory / "ttyB"
        self.peer: Peer | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.peer = Peer(
            [self.socat, "-d", "-d", f"pty,raw,echo=0,link={self.a}",
             f"pty,raw,echo=0,link={self.b}"],
            log=self.dir / f"socat-{self.starts}.log",
        )  # fmt: skip
        wait_until(lambda: self.a.exists() and self.b.exists(), "socat PTY links")

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None
        # socat removes its links when it exits on SIGTERM; be sure (SIGKILL would not).
        for link in (self.a, self.b):
            if link.is_symlink():
                link.unlink()

    def open_device_end(self) -> int:
        """The test's end of the line (blocking fd; PTY writes this small never block)."""
        return os.open(self.b, os.O_RDWR | os.O_NOCTTY)


class RecordingContext:
    """A DriverContext that queues what the driver reports, so tests can await it."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("gateway.driver.serial.test")
        self.clock: Clock = SystemClock()
        self.readings: asyncio.Queue[tuple[str, list[RawReading]]] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[str, bool, str]] = asyncio.Queue()

    def emit(self, device_id: str, readings: Sequence[RawReading]) -> None:
        self.readings.put_nowait((device_id, list(readings)))

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        self.states.put_nowait((device_id, available, reason))

    def discovered(self, device: DiscoveredDevice) -> None:
        raise AssertionError("serial devices are not discovered")

    async def next_readings(self) -> dict[str, object]:
        # The bound only keeps a broken test from hanging; it is not a timing assertion.
        _dev, readings = await asyncio.wait_for(self.readings.get(), 20)
        return {r.point: r.value for r in readings}

    async def next_state(self) -> tuple[bool, str]:
        _dev, up, why = await asyncio.wait_for(self.states.get(), 20)
        return up, why
