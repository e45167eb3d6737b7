"""Frame parsers for serial devices (pure: one frame's bytes in, named values out).

Formats: a regular expression with named groups, CSV columns, a JSON object, a CBOR map,
NMEA 0183 sentences, and `raw` (the frame itself). Nested JSON/CBOR values are flattened
into dotted names (`{"a": {"b": 1}}` -> `a.b`). A frame that does not fit raises
`FrameError` saying why; the driver counts it and moves on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import cbor2

from drivers.base import Value
from drivers.serial import nmea

PARSER_TYPES: Final = ("regex", "csv", "json", "cbor", "nmea", "raw")
MAX_DEPTH: Final = 16  # nesting of JSON/CBOR values; deeper is not a sensor reading


class FrameError(ValueError):
    """A frame the parser cannot read; the message says why."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """Named values from one frame; `ts` is the device's own time (Unix seconds), if any."""

    values: dict[str, Value]
    ts: float | None = None
    #: bytes before the data that the parser skipped (e.g. junk before an NMEA sentence)
    skipped: int = 0


class Parser(Protocol):
    def parse(self, frame: bytes) -> Parsed | None:
        """Values of one frame; None for a valid frame the config asks to ignore."""
        ...


def _decode(frame: bytes, encoding: str) -> str:
    try:
        return frame.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FrameError(f"not valid {encoding}: {exc.reason} at byte {exc.start}") from None


class RegexParser:
    """Named groups of `pattern` (searched in the frame's text) become values (as text)."""

    def __init__(self, pattern: str, encoding: str = "utf-8") -> None:
        self.regex = re.compile(pattern)
        if not self.regex.groupindex:
            raise ValueError("pattern has no named groups ((?P<name>...))")
        self.encoding = encoding

    def parse(self, frame: bytes) -> Parsed:
        text = _decode(frame, self.encoding)
        m = self.regex.search(text)
        if m is None:
            raise FrameError(f"does not match the pattern: {_preview(text)}")
        return Parsed(dict(m.groupdict()))


class CsvParser:
    """Columns named by `columns` ("" skips a column); the count must match exactly."""

    def __init__(self, columns: Sequence[str], separator: str = ",", encoding: str = "utf-8"):
        if len(separator) != 1:
            raise ValueError("separator must be one character")
        self.columns = tuple(columns)
        self.separator = separator
        self.encoding = encoding

    def parse(self, frame: bytes) -> Parsed:
        text = _decode(frame, self.encoding).strip("\r\n")
        try:
            rows = list(csv.reader([text], delimiter=self.separator, strict=True))
        except csv.Error as exc:
            raise FrameError(f"bad CSV: {exc}") from None
        row = rows[0] if rows else []
        if len(row) != len(self.columns):
            raise FrameError(f"expected {len(self.columns)} columns, got {len(row)}")
        return Parsed({n: v for n, v in zip(self.columns, row, strict=True) if n})


def _reject_constant(name: str) -> float:
    raise FrameError(f"non-finite number {name} in JSON")


class JsonParser:
    """A JSON object per frame."""

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = encoding

    def parse(self, frame: bytes) -> Parsed:
        text = _decode(frame, self.encoding)
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise FrameError(f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise FrameError(f"expected a JSON object, got {type(doc).__name__}")
        return Parsed(flatten(doc))


class CborParser:
    """A CBOR map per frame (RFC 8949); trailing bytes after the map are an error."""

    def parse(self, frame: bytes) -> Parsed:
        fp = io.BytesIO(frame)
        try:
            doc = cbor2.CBORDecoder(fp).decode()
        except (cbor2.CBORDecodeError, RecursionError, ValueError, TypeError) as exc:
            raise FrameError(f"not valid CBOR: {exc}") from None
        if fp.tell() != len(frame):
            raise FrameError(f"{len(frame) - fp.tell()} bytes after the CBOR item")
        if not isinstance(doc, dict):
            raise FrameError(f"expected a CBOR map, got {type(doc).__name__}")
        return Parsed(flatten(doc))


class NmeaParser:
    """NMEA 0183 sentences; `sentences` (e.g. ["GGA", "RMC"]) limits which types are used."""

    def __init__(self, require_checksum: bool = True, sentences: Sequence[str] = ()) -> None:
        self.require_checksum = require_checksum
        self.sentences = frozenset(s.upper() for s in sentences)

    def parse(self, frame: bytes) -> Parsed | None:
        # Resynchronise on the last '$'/'!': binary junk before it is skipped (and counted).
        skipped = max(nmea.sentence_start(frame), 0)
        text = _decode(frame[skipped:], "ascii")
        try:
            s = nmea.parse_sentence(text, require_checksum=self.require_checksum)
        except nmea.NmeaError as exc:
            raise FrameError(f"{exc}: {_preview(text)}") from None
        if self.sentences and s.type not in self.sentences:
            return None
        return Parsed(s.values, s.ts, skipped)


class RawParser:
    """The frame itself as one value `raw`: text when `encoding` is set, else bytes."""

    def __init__(self, encoding: str | None = None) -> None:
        self.encoding = encoding

    def parse(self, frame: bytes) -> Parsed:
        if self.encoding is None:
            return Parsed({"raw": frame})
        return Parsed({"raw": _decode(frame, self.encoding).strip()})


def flatten(doc: dict[Any, Any]) -> dict[str, Value]:
    """Nested maps and arrays into dotted names; non-scalar leaves are a FrameError."""
    out: dict[str, Value] = {}

    def walk(prefix: str, value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise FrameError(f"nested deeper than {MAX_DEPTH} levels at {prefix!r}")
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, str | int):
                    raise FrameError(f"map key {k!r} at {prefix or 'top level'} is not text")
                walk(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}" if prefix else str(i), v, depth + 1)
        elif value is None or isinstance(value, bool | int | str | bytes):
            out[prefix] = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise FrameError(f"non-finite number at {prefix!r}")
            out[prefix] = value
        else:
            raise FrameError(f"unsupported value {type(value).__name__} at {prefix!r}")

    walk("", doc, 0)
    return out


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
