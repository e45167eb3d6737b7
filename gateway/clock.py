"""Time as the gateway records it: wall time, monotonic time, boot id, and whether the wall
clock is known to be synced (boards without an RTC boot in 1970 or at the last shutdown)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

_TIME_ERROR = 5  # adjtimex(2): clock not synchronized
_TIMEX_SIZE = 208  # sizeof(struct timex) on 64-bit Linux (more than enough on 32-bit)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import uuid  # no /proc: unique per process start, still recognisable

        return str(uuid.uuid4())


class SystemClock:
    """The real clocks. `synced()` asks timesyncd, then the kernel; cached for a minute."""

    def __init__(self) -> None:
        self.boot_id = _boot_id()
        self._synced: bool | None = None
        self._checked = -1e9
        self._adjtimex: Any = None

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def synced(self) -> bool:
        now = time.monotonic()
        if self._synced is None or now - self._checked > 60:
            self._checked = now
            self._synced = self._ask()
        return self._synced

    def _ask(self) -> bool:
        # systemd-timesyncd (Raspberry Pi OS's default) marks a sync with this file; under our
        # hardened unit adjtimex(2) is refused (ProtectClock), so ask it first.
        if Path("/run/systemd/timesync/synchronized").exists():
            return True
        # A wall clock before 2020 is certainly not synced, whatever the kernel says.
        return time.time() > 1_577_836_800 and self._kernel_synced()

    def _kernel_synced(self) -> bool:
        try:
            # Imported here, and libc taken from the process itself (dlopen(NULL)): ctypes.util
            # would pull in subprocess, tempfile and shutil, a megabyte of RSS for one call.
            import ctypes

            if self._adjtimex is None:
                self._adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
            buf = ctypes.create_string_buffer(_TIMEX_SIZE)  # modes = 0: read only
            state = int(self._adjtimex(buf))
        except (AttributeError, OSError):
            return False
        return state >= 0 and state != _TIME_ERROR
