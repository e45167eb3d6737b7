"""A socat PTY pair for serial tests: the driver opens ttyA, the test plays the device on ttyB."""

from __future__ import annotations

import os
from pathlib import Path

from drivers.testing import RecordingContext
from tests.support.peers import Peer, require_binary, wait_until


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


def serial_context() -> RecordingContext:
    """The recording DriverContext for serial tests (serial devices are never discovered)."""
    return RecordingContext("gateway.driver.serial.test", discovery=False)
