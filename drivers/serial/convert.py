"""Text-to-value conversion shared by the serial parsers and the point mapping (pure).

Text formats (regex, CSV, NMEA fields) yield strings; a point's `type` says what to make of
them. `auto` turns decimal numbers into int/float and leaves everything else as text, so a
serial number such as "0012A" stays a string and an empty field means "no value".
"""

from __future__ import annotations

import math
import re
from typing import Final

from drivers.base import Value

TYPES: Final = ("auto", "str", "int", "float", "bool")

_INT = re.compile(r"[+-]?\d+")
# Decimal notation only: "nan", "inf" and "1_000" are text, not numbers, on a serial line.
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TRUE: Final = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "off", "no", "n", "f"})


def auto_value(text: str) -> Value:
    """A decimal number as int/float, an empty field as None, anything else as stripped text."""
    s = text.strip()
    if not s:
        return None
    if _INT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        return float(s)
    return s


def convert(value: Value, kind: str) -> Value:
    """Convert a parsed value to a point's `type`. Raises ValueError naming what went wrong."""
    if value is None or (kind == "auto" and not isinstance(value, str)):
        return value
    if kind == "auto":
        assert isinstance(value, str)
        return auto_value(value)
    if kind == "str":
        if isinstance(value, bytes):
            return value.hex()
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bytes):
        raise ValueError(f"cannot convert bytes to {kind}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return value != 0
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if kind == "int":
            if not _INT.fullmatch(s):
                raise ValueError(f"not an integer: {value!r}")
            return int(s)
        if not _FLOAT.fullmatch(s):
            raise ValueError(f"not a number: {value!r}")
        return float(s)
    # bool, int or float from a typed format (JSON, CBOR)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"not a finite number: {value!r}")
    return f
