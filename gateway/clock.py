"""Time as the gateway records it: wall time, monotonic time, boot id, and whether the wall
clock is known to be synced (boards without an RTC boot in 1970 or at the last shutdown)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import uuid
from pathlib import Path

_TIME_ERROR = 5  # adjtimex(2): clock not synchronized


class _Timex(ctypes.Structure):
    # struct timex is 208 bytes on 64-bit Linux; we only need the return value.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())  # no /proc: unique per process start, still recognisable


class SystemClock:
    """The real clocks. `synced()` asks the kernel (adjtimex), cached for a minute."""

    def __init__(self) -> None:
        self.boot_id = _boot_id()
        self._synced: bool | None = None
        self._checked = -1e9
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def synced(self) -> bool:
        now = time.monotonic()
        if self._synced is None or now - self._checked > 60:
            self._checked = now
            self._synced = self._ask_kernel()
        return self._synced

    def _ask_kernel(self) -> bool:
        # systemd-timesyncd (Raspberry Pi OS's default) marks a sync with this file; under our
        # hardened unit adjtimex(2) is refused (ProtectClock), so ask it first.
        if Path("/run/systemd/timesync/synchronized").exists():
            return True
        if self._libc is None:
            return False
        tx = _Timex()
        try:
            state = self._libc.adjtimex(ctypes.byref(tx))
        except (AttributeError, OSError):
            return False
        # A wall clock before 2020 is certainly not synced, whatever the kernel says.
        return bool(state != _TIME_ERROR and state >= 0 and time.time() > 1_577_836_800)
