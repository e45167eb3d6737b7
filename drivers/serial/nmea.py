"""NMEA 0183 sentences (GPS receivers, marine sensors) into named values (pure: text in).

`parse_sentence` checks the framing characters and the XOR checksum, splits the address
into talker and sentence type, and decodes the fields: GGA and RMC fully (positions as signed
decimal degrees, RMC's date and time as a Unix timestamp), XDR transducer groups by their
names, a few common marine sentences by field name, and any other sentence as numbered
fields. Values are keyed `<type>.<name>` in lower case (`gga.lat`, `rmc.speed_knots`,
`mwv.speed`, `gsa.3`) so that several sentence types can share one stream.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from typing import Final

from drivers.base import Value
from drivers.serial.convert import auto_value

_ADDRESS: Final = re.compile(r"[A-Z][A-Z0-9]{2,}")
#: Characters that start a sentence ('!' for encapsulated ones, AIS); reserved elsewhere.
STARTS: Final = (b"$", b"!")


class NmeaError(ValueError):
    """A sentence that is not valid NMEA 0183 (framing, checksum or field contents)."""


@dataclass(frozen=True, slots=True)
class Sentence:
    talker: str  # "GP", "GN", "WI"...; "P" for proprietary sentences
    type: str  # "GGA", "RMC"...; for proprietary sentences the manufacturer code and type
    fields: tuple[str, ...]  # raw fields after the address
    values: dict[str, Value] = field(default_factory=dict)
    #: The sentence's own UTC time as Unix seconds, when it carries a full date and time (RMC).
    ts: float | None = None


def checksum(body: str) -> int:
    """XOR of the characters between '$' (or '!') and '*'."""
    c = 0
    for b in body.encode("ascii"):
        c ^= b
    return c


def sentence_start(data: bytes) -> int:
    """Where the last sentence in `data` starts (its last '$' or '!'), or -1. Both characters
    are reserved in NMEA 0183, so anything before the last one is not part of the sentence
    (binary UBX frames a u-blox receiver interleaves, a sentence cut short)."""
    return max(data.rfind(s) for s in STARTS)


def parse_sentence(text: str, *, require_checksum: bool = True) -> Sentence:
    """Parse one sentence (surrounding whitespace and CR/LF allowed); it starts at the last
    '$' or '!' in `text`, anything before that is ignored. Raises NmeaError."""
    s = text.strip()
    start = max(s.rfind("$"), s.rfind("!"))
    if start < 0:
        raise NmeaError("no '$' or '!' starting a sentence")
    s = s[start:]
    if not s.isascii() or not s.isprintable():
        raise NmeaError("contains non-printable or non-ASCII characters")
    body, star, given = s[1:].partition("*")
    if star:
        if len(given) != 2 or any(c not in "0123456789abcdefABCDEF" for c in given):
            raise NmeaError(f"bad checksum field {given!r} (expected two hex digits)")
        expected = checksum(body)
        if int(given, 16) != expected:
            raise NmeaError(f"checksum mismatch: sentence says {given}, computed {expected:02X}")
    elif require_checksum:
        raise NmeaError("no checksum ('*HH') and require_checksum is set")
    parts = body.split(",")
    address = parts[0]
    if not _ADDRESS.fullmatch(address):
        raise NmeaError(f"bad address field {address!r} (expected e.g. 'GPGGA')")
    if address.startswith("P"):
        talker, kind = "P", address[1:]
    else:
        talker, kind = address[:2], address[2:]
    fields = tuple(parts[1:])
    prefix = address.lower() if talker == "P" else kind.lower()
    decoder = _DECODERS.get(kind) if talker != "P" else None
    ts: float | None = None
    if decoder is not None:
        named, ts = decoder(fields)
    elif talker != "P" and kind in _FIELD_NAMES:
        named = _named(_FIELD_NAMES[kind], fields)
    else:
        named = {str(i): auto_value(f) for i, f in enumerate(fields, 1)}
    values = {f"{prefix}.{k}": v for k, v in named.items()}
    return Sentence(talker=talker, type=kind, fields=fields, values=values, ts=ts)


# -- field decoders ----------------------------------------------------------------------------


def _field(fields: tuple[str, ...], i: int) -> str:
    return fields[i].strip() if i < len(fields) else ""


def _float(fields: tuple[str, ...], i: int, name: str) -> float | None:
    s = _field(fields, i)
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        raise NmeaError(f"{name}: not a number: {s!r}") from None


def _int(fields: tuple[str, ...], i: int, name: str) -> int | None:
    s = _field(fields, i)
    if not s:
        return None
    if not s.isdigit():
        raise NmeaError(f"{name}: not an integer: {s!r}")
    return int(s)


def _angle(fields: tuple[str, ...], i: int, name: str, limit: int) -> float | None:
    """`(d)ddmm.mmmm` plus a hemisphere field (N/S or E/W) -> signed decimal degrees."""
    s, hemi = _field(fields, i), _field(fields, i + 1)
    if not s:
        return None
    head = s.partition(".")[0]
    if len(head) < 3 or not head.isdigit():
        raise NmeaError(f"{name}: bad angle {s!r} (expected (d)ddmm.mmmm)")
    try:
        minutes = float(s[len(head) - 2 :])
    except ValueError:
        raise NmeaError(f"{name}: bad angle {s!r}") from None
    degrees = int(head[:-2])
    if minutes >= 60 or degrees + minutes / 60 > limit:
        raise NmeaError(f"{name}: angle out of range: {s!r}")
    value = degrees + minutes / 60
    if hemi in ("S", "W"):
        return -value
    if hemi in ("N", "E"):
        return value
    raise NmeaError(f"{name}: bad hemisphere {hemi!r}")


def _time(fields: tuple[str, ...], i: int) -> tuple[str | None, float | None]:
    """`hhmmss(.sss)` -> ("hh:mm:ss(.sss)", seconds since midnight)."""
    s = _field(fields, i)
    if not s:
        return None, None
    head, dot, frac = s.partition(".")
    if len(head) != 6 or not head.isdigit() or (dot and not frac.isdigit()):
        raise NmeaError(f"time: bad UTC time {s!r} (expected hhmmss.ss)")
    h, m, sec = int(head[:2]), int(head[2:4]), int(head[4:])
    if h > 23 or m > 59 or sec > 60:  # 60: a leap second
        raise NmeaError(f"time: out of range: {s!r}")
    seconds = h * 3600 + m * 60 + sec + (float("0." + frac) if frac else 0.0)
    return f"{head[:2]}:{head[2:4]}:{head[4:]}{dot}{frac}", seconds


def _gga(fields: tuple[str, ...]) -> tuple[dict[str, Value], float | None]:
    clock, _ = _time(fields, 0)
    return {
        "time": clock,
        "lat": _angle(fields, 1, "lat", 90),
        "lon": _angle(fields, 3, "lon", 180),
        "quality": _int(fields, 5, "quality"),
        "satellites": _int(fields, 6, "satellites"),
        "hdop": _float(fields, 7, "hdop"),
        "altitude": _float(fields, 8, "altitude"),
        "geoid_separation": _float(fields, 10, "geoid_separation"),
        "dgps_age": _float(fields, 12, "dgps_age"),
        "dgps_station": _field(fields, 13) or None,
    }, None


def _rmc(fields: tuple[str, ...]) -> tuple[dict[str, Value], float | None]:
    clock, seconds = _time(fields, 0)
    status = _field(fields, 1)
    if status not in ("A", "V", ""):
        raise NmeaError(f"status: expected 'A' or 'V', got {status!r}")
    date_s = _field(fields, 8)
    date: str | None = None
    ts: float | None = None
    if date_s:
        if len(date_s) != 6 or not date_s.isdigit():
            raise NmeaError(f"date: bad date {date_s!r} (expected ddmmyy)")
        day, month, yy = int(date_s[:2]), int(date_s[2:4]), int(date_s[4:])
        # Two-digit years: NMEA predates 2000; receivers today report 20yy.
        year = 2000 + yy if yy < 80 else 1900 + yy
        if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year, month)[1]:
            raise NmeaError(f"date: out of range: {date_s!r}")
        date = f"{year:04d}-{month:02d}-{day:02d}"
        if seconds is not None:
            ts = calendar.timegm((year, month, day, 0, 0, 0)) + seconds
    variation = _float(fields, 9, "magnetic_variation")
    var_dir = _field(fields, 10)
    if variation is not None and var_dir == "W":
        variation = -variation
    return {
        "time": clock,
        "valid": status == "A" if status else None,
        "lat": _angle(fields, 2, "lat", 90),
        "lon": _angle(fields, 4, "lon", 180),
        "speed_knots": _float(fields, 6, "speed_knots"),
        "course": _float(fields, 7, "course"),
        "date": date,
        "magnetic_variation": variation,
        "mode": _field(fields, 11) or None,
        "timestamp": ts,
    }, ts


def _xdr(fields: tuple[str, ...]) -> tuple[dict[str, Value], float | None]:
    """Transducer measurements: groups of (type, value, unit, name); keyed by name."""
    out: dict[str, Value] = {}
    for n, i in enumerate(range(0, len(fields) - 3, 4), 1):
        name = fields[i + 3].strip() or str(n)
        out[name] = auto_value(fields[i + 1])
    return out, None


_DECODERS: Final = {"GGA": _gga, "RMC": _rmc, "XDR": _xdr}

#: Field names of the fully decoded sentences (for checking point mappings at load time).
KNOWN_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "GGA": ("time", "lat", "lon", "quality", "satellites", "hdop", "altitude",
            "geoid_separation", "dgps_age", "dgps_station"),
    "RMC": ("time", "valid", "lat", "lon", "speed_knots", "course", "date",
            "magnetic_variation", "mode", "timestamp"),
}  # fmt: skip

#: Field names of common sentences; "" marks a field that only says which unit the previous
#: one is in (the name already says it).
_FIELD_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "VTG": ("course_true", "", "course_magnetic", "", "speed_knots", "", "speed_kmh", "", "mode"),
    "MWV": ("angle", "reference", "speed", "speed_unit", "status"),
    "DPT": ("depth", "offset", "range"),
    "DBT": ("depth_feet", "", "depth_m", "", "depth_fathoms", ""),
    "MTW": ("temperature", ""),
    "HDT": ("heading", ""),
    "HDG": ("heading", "deviation", "deviation_dir", "variation", "variation_dir"),
    "ZDA": ("time", "day", "month", "year", "zone_hours", "zone_minutes"),
    "GSA": ("selection", "fix", *(f"prn{i}" for i in range(1, 13)), "pdop", "hdop", "vdop"),
}


for _kind, _names in _FIELD_NAMES.items():
    KNOWN_FIELDS[_kind] = tuple(n for n in _names if n)


def _named(names: tuple[str, ...], fields: tuple[str, ...]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for i, f in enumerate(fields):
        name = names[i] if i < len(names) else str(i + 1)
        if name:
            out[name] = auto_value(f)
    return out
