"""Durations in config: a number of seconds, or a string such as "30s", "15m", "1h", "1d"."""

from __future__ import annotations

import re
from typing import Any

from gateway.config import REQUIRED, Section

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def read_duration(sec: Section, key: str, default: Any = REQUIRED, *, zero_ok: bool = False) -> Any:
    """A duration key of `sec`, in seconds (the default as given when absent); it must be
    > 0 (>= 0 with `zero_ok`)."""
    value = sec.raw(key, default)
    if value is default:
        if default is REQUIRED:
            return 0.0
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        sec.error(key, f'must be a duration (seconds, or a string like "30s"), got {value!r}')
        return 0.0
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            sec.error(key, str(exc))
            return 0.0
    else:
        seconds = float(value)
    if seconds < 0 or (seconds == 0 and not zero_ok):
        sec.error(key, f"must be {'>=' if zero_ok else '>'} 0 s, got {value!r}")
    return seconds
