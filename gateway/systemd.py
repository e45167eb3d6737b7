"""systemd integration without extra dependencies: sd_notify(3) and the service watchdog.

Every function is a no-op returning False when the daemon is not run by systemd
(`NOTIFY_SOCKET` unset), and no failure here ever raises: telling systemd how we are doing
must never be what takes the daemon down.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # asyncio is imported where a Watchdog runs: importing this module stays cheap
    import asyncio
    from collections.abc import Callable

__all__ = [
    "Watchdog",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]


def _address(env: str) -> str | bytes | None:
    """The socket address from `$NOTIFY_SOCKET`, or None if it is not one we can use."""
    if env.startswith("@"):
        # Linux abstract namespace: systemd writes it with '@', the kernel wants a NUL byte.
        return b"\0" + env[1:].encode()
    if env.startswith("/"):
        return env
    # Anything else (e.g. "vsock:..." from newer systemd inside VMs) is not AF_UNIX.
    return None


def notify(*fields: str) -> bool:
    """Send `KEY=VALUE` fields in one datagram to `$NOTIFY_SOCKET`.

    Returns True if the datagram was handed to the socket, False when there is no socket or
    sending failed. Never raises for I/O errors: the daemon goes on either way.
    """
    env = os.environ.get("NOTIFY_SOCKET", "")
    if not env or not fields:
        return False
    address = _address(env)
    if address is None:
        return False
    message = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Called from the event loop: a full receive queue must not block it. systemd reads
            # its notify socket promptly, so EAGAIN here means systemd is in trouble anyway.
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """`READY=1`: startup finished (or a reload completed); optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify("READY=1", "STATUS=" + _one_line(status_text))


def status(text: str) -> bool:
    """`STATUS=`: a one-line summary shown by `systemctl status`."""
    return notify("STATUS=" + _one_line(text))


def watchdog() -> bool:
    """`WATCHDOG=1`: keep-alive ping. Send it only when the daemon is known healthy."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """`STOPPING=1`: shutdown has begun (systemd then stops expecting watchdog pings)."""
    if status_text is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1", "STATUS=" + _one_line(status_text))


def reloading() -> bool:
    """`RELOADING=1`: a reload has begun; send `ready()` when it is done.

    `MONOTONIC_USEC` is what `Type=notify-reload` (systemd 253+) uses to match the reload to
    its request; older systemd ignores the field. Python's monotonic clock is CLOCK_MONOTONIC
    on Linux, the clock systemd expects.
    """
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when systemd expects none from this process.

    Like sd_watchdog_enabled(3): `$WATCHDOG_USEC` must be a positive integer and
    `$WATCHDOG_PID`, when set, must be our PID (a child that inherited the environment must not
    ping on our behalf). The result is half of `WatchdogSec=`, the margin systemd recommends.
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    pid_text = os.environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field and let a status text forge, say, READY=1.
    return " ".join(text.split())


class Watchdog:
    """Pings the systemd watchdog from an asyncio task, but only while `healthy()` says so.

    The task runs on the event loop, so a blocked loop stops the pings by itself; `healthy`
    adds what the loop cannot see (is the store's writer thread still committing?). When it
    returns False or raises, the ping is skipped: if the problem lasts `WatchdogSec=`, systemd
    kills and restarts the daemon, which is the point.
    """

    def __init__(self, healthy: Callable[[], bool], interval: float | None = None) -> None:
        """`interval` defaults to `watchdog_interval()`; with neither, `start()` does nothing."""
        if interval is not None and interval <= 0:
            raise ValueError(f"watchdog interval must be > 0, got {interval}")
        self._healthy = healthy
        self.interval = interval if interval is not None else watchdog_interval()
        self._task: asyncio.Task[None] | None = None
        #: Pings handed to systemd, and ticks skipped because the health check failed.
        self.sent = 0
        self.skipped = 0
        #: The last check's result (None before the first one); `last_error` if it raised.
        self.last_healthy: bool | None = None
        self.last_error: BaseException | None = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start pinging (call from the running loop). No-op when the watchdog is off."""
        if self.interval is None or self.running:
            return
        import asyncio

        self._task = asyncio.get_running_loop().create_task(
            self._run(self.interval), name="systemd-watchdog"
        )

    async def stop(self) -> None:
        """Stop pinging and wait for the task to end."""
        task, self._task = self._task, None
        if task is None:
            return
        import asyncio

        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Re-raise only if we ourselves are being cancelled, not because of our cancel().
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    def tick(self) -> bool:
        """Check health once and ping if healthy; returns whether a ping was sent."""
        try:
            ok = bool(self._healthy())
            self.last_error = None
        except Exception as exc:  # a broken health check is an unhealthy daemon, not a crash
            ok = False
            self.last_error = exc
        self.last_healthy = ok
        if not ok:
            self.skipped += 1
            return False
        if watchdog():
            self.sent += 1
            return True
        return False

    async def _run(self, interval: float) -> None:
        import asyncio

        # Ping at once (startup may have used part of the budget), then every interval.
        while True:
            self.tick()
            await asyncio.sleep(interval)
