"""One serial port kept open: pyserial configures it, the event loop watches its descriptor.

Why not `pyserial-asyncio`: it is a separate package (one more dependency to ship) and wraps
the same non-blocking descriptor in a transport. Why not a reader thread: a thread per port
costs memory on a 512 MB board and makes shutdown and error paths harder to bound. pyserial
already opens POSIX ports with O_NONBLOCK, so `loop.add_reader` on `fileno()` and plain
`os.read`/`os.write` give one system call per wake-up and errors on the loop's thread.

A port that disappears (USB unplugged, the far end of a PTY closed) reads as end-of-file or
EIO; the link closes it, reports it down and reopens it with exponential backoff (with
jitter) until it comes back. The first failure is logged at WARNING, repeats at DEBUG, the
recovery at INFO. Local device paths only: URL handlers (rfc2217://, socket://) have no
descriptor to watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import termios
import time
from collections.abc import Callable
from typing import Any

from drivers.serial.options import RETRY, PortSettings
from gateway.aio import cancel_and_wait
from gateway.errors import DeviceUnavailableError
from gateway.retry import RetrySettings

READ_CHUNK = 4096

_PARITY = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}


def settings_text(s: PortSettings) -> str:
    """`9600 8N1` style summary for logs."""
    stop = f"{s.stopbits:g}"
    return f"{s.baudrate} {s.bytesize}{_PARITY.get(s.parity, '?')}{stop}"


def open_port(s: PortSettings) -> Any:
    """Open and configure the port (non-blocking, exclusive). Raises OSError/SerialException."""
    import serial  # here, not at module level: `config check` must not import pyserial

    ser = serial.Serial()
    ser.port = s.port
    ser.baudrate = s.baudrate
    ser.bytesize = s.bytesize
    ser.parity = _PARITY[s.parity]
    ser.stopbits = s.stopbits if s.stopbits == 1.5 else int(s.stopbits)
    ser.rtscts = s.flow_control == "rtscts"
    ser.dsrdtr = s.flow_control == "dsrdtr"
    ser.xonxoff = s.flow_control == "xonxoff"
    ser.timeout = 0
    ser.write_timeout = 0
    ser.exclusive = True  # flock: a second gatewayd or a stray minicom fails loudly
    ser.open()
    return ser


class SerialLink:
    """Keeps one port open; hands received bytes to `on_data`, state changes to `on_state`."""

    def __init__(
        self,
        name: str,
        settings: PortSettings,
        *,
        on_data: Callable[[bytes], None],
        on_state: Callable[[bool, str], None],
        logger: logging.Logger,
        retry: RetrySettings = RETRY,
    ) -> None:
        self.name = name
        self.settings = settings
        self._on_data = on_data
        self._on_state = on_state
        self.log = logger
        self.backoff = retry.backoff()  # between failed opens
        self._ser: Any = None
        self._fd = -1
        self._lost: asyncio.Future[str] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.reason = "not opened yet"
        self.opens = 0  # successful opens, for stats
        self.failures = 0  # failed open attempts and losses
        self.bytes_in = 0

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"serial:{self.name}")

    async def close(self) -> None:
        """Stop reopening and close the port. Bounded: cancels one task."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self._close_port("closed")

    # -- the reopen loop -------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failed = 0  # consecutive failed opens
        down_since: float | None = None
        while True:
            try:
                self._open(loop)
            except Exception as exc:
                # pyserial raises SerialException, OSError or ValueError; all mean "not now".
                failed += 1
                self.failures += 1
                why = f"cannot open {self.settings.port}: {exc}"
                if down_since is None:
                    down_since = time.monotonic()
                    self.log.warning("%s: %s; retrying with backoff", self.name, why)
                    self._set_state(False, why)
                else:
                    self.log.debug("%s: still unavailable (try %d): %s", self.name, failed, why)
                await asyncio.sleep(self.backoff.next())
                continue
            self.opens += 1
            if down_since is not None:
                downtime = time.monotonic() - down_since
                self.log.info(
                    "%s: %s reopened (%s) after %.1f s down, %d failed open(s)",
                    self.name, self.settings.port, settings_text(self.settings), downtime,
                    failed,
                )  # fmt: skip
            else:
                self.log.info(
                    "%s: opened %s (%s)", self.name, self.settings.port,
                    settings_text(self.settings),
                )  # fmt: skip
            failed = 0
            down_since = None
            self.backoff.reset()
            self._set_state(True, "")
            assert self._lost is not None
            why = await self._lost
            self.failures += 1
            down_since = time.monotonic()
            self.log.warning("%s: %s lost: %s; reopening with backoff", self.name,
                             self.settings.port, why)  # fmt: skip
            self._set_state(False, why)
            await asyncio.sleep(self.backoff.first())  # then retries start from the first step

    def _set_state(self, up: bool, why: str) -> None:
        self.reason = why
        try:
            self._on_state(up, why)
        except Exception:
            self.log.exception("%s: state callback failed", self.name)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        ser = open_port(self.settings)
        try:
            fd = ser.fileno()
            loop.add_reader(fd, self._readable)
        except BaseException:
            ser.close()
            raise
        self._ser = ser
        self._fd = fd
        self._lost = loop.create_future()

    def _close_port(self, why: str) -> None:
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
            self._fd = -1
        if self._ser is not None:
            with contextlib.suppress(Exception):
                self._ser.close()
            self._ser = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(DeviceUnavailableError(self.name, why))
        self._writable = None

    def _drop(self, why: str) -> None:
        """The port failed under us: close it now (no more callbacks) and wake the loop."""
        self._close_port(why)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)

    # -- I/O ---------------------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: the device went away
            self._drop(f"read failed: {exc}")
            return
        if not data:
            self._drop("device disconnected (end of file)")
            return
        self.bytes_in += len(data)
        try:
            self._on_data(data)
        except Exception:
            # A bug in frame handling must not stop reading the port.
            self.log.exception("%s: error handling received data", self.name)

    def discard_input(self) -> None:
        """Drop bytes received but not yet read (stale output before a query)."""
        if self._fd >= 0:
            try:
                termios.tcflush(self._fd, termios.TCIFLUSH)
            except termios.error as exc:
                self.log.debug("%s: cannot flush input: %s", self.name, exc)

    async def write(self, data: bytes) -> None:
        """Write all of `data`, waiting for the port to drain when its buffer is full."""
        async with self._write_lock:
            view = memoryview(data)
            while view:
                if self._fd < 0:
                    raise DeviceUnavailableError(
                        self.name, f"port {self.settings.port} is not open: {self.reason}"
                    )
                try:
                    n = os.write(self._fd, view)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    self._drop(f"write failed: {exc}")
                    raise DeviceUnavailableError(self.name, f"write failed: {exc}") from None
                view = view[n:]
                if view:
                    await self._wait_writable()

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._writable = fut
        fd = self._fd

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            if self._fd == fd:
                loop.remove_writer(fd)
            self._writable = None
