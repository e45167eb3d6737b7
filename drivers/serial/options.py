"""A serial device's options: read from its TOML table, checked, compiled once (pure).

Every problem is collected with its TOML path (`devices.gps.framing.delimiter: ...`) and
raised together as one ConfigError; nothing is adjusted silently. The result holds ready
factories for the deframer and the parser, and each point's field name and type.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from drivers.base import device_options, point_options, raise_issues
from drivers.serial import nmea
from drivers.serial.convert import TYPES
from drivers.serial.framing import (
    DEFAULT_MAX_FRAME,
    Deframer,
    DelimiterDeframer,
    FixedDeframer,
    LengthPrefixDeframer,
)
from drivers.serial.parsers import (
    PARSER_TYPES,
    CborParser,
    CsvParser,
    JsonParser,
    NmeaParser,
    Parser,
    RawParser,
    RegexParser,
)
from gateway.config import REQUIRED, DeviceSpec, Section
from gateway.errors import ConfigIssue
from gateway.retry import RetrySettings, read_retry

PARITIES: Final = ("none", "even", "odd", "mark", "space")
FLOW_CONTROLS: Final = ("none", "rtscts", "dsrdtr", "xonxoff")
FRAMINGS: Final = ("delimiter", "fixed", "length")
MODES: Final = ("stream", "request")

# Which framing/parser types use which keys: a key given for another type is an error that
# says which type it belongs to (rather than a bare "unknown key").
_FRAMING_KEYS: Final = {
    "delimiter": ("delimiter",),
    "length": ("fixed",),
    "start": ("delimiter", "fixed", "length"),
    "length_size": ("length",),
    "length_order": ("length",),
    "length_adjust": ("length",),
}
_PARSER_KEYS: Final = {
    "pattern": ("regex",),
    "columns": ("csv",),
    "separator": ("csv",),
    "encoding": ("regex", "csv", "json", "raw"),
    "require_checksum": ("nmea",),
    "sentences": ("nmea",),
}


@dataclass(frozen=True, slots=True)
class PortSettings:
    """How to open the port (pyserial's names and values)."""

    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "none"
    stopbits: float = 1
    flow_control: str = "none"


@dataclass(frozen=True, slots=True)
class FramingSpec:
    type: str = "delimiter"
    delimiter: bytes = b"\n"
    length: int = 0  # fixed: frame length after the start marker
    start: bytes = b""
    length_size: Literal[1, 2, 4] = 1
    length_order: Literal["big", "little"] = "big"
    length_adjust: int = 0
    max_frame: int = DEFAULT_MAX_FRAME
    #: delimiter: markers a line resynchronises on (`start`, or NMEA's `$` and `!`)
    starts: tuple[bytes, ...] = ()

    def deframer(self) -> Deframer:
        if self.type == "fixed":
            return FixedDeframer(self.length, self.start)
        if self.type == "length":
            return LengthPrefixDeframer(
                self.length_size, self.length_order, self.length_adjust, self.start,
                self.max_frame,
            )  # fmt: skip
        return DelimiterDeframer(self.delimiter, self.max_frame, self.starts)


@dataclass(frozen=True, slots=True)
class ParserSpec:
    type: str
    pattern: str = ""
    columns: tuple[str, ...] = ()
    separator: str = ","
    encoding: str | None = "utf-8"
    require_checksum: bool = True
    sentences: tuple[str, ...] = ()

    def parser(self) -> Parser:
        enc = self.encoding or "utf-8"
        if self.type == "regex":
            return RegexParser(self.pattern, enc)
        if self.type == "csv":
            return CsvParser(self.columns, self.separator, enc)
        if self.type == "json":
            return JsonParser(enc)
        if self.type == "cbor":
            return CborParser()
        if self.type == "nmea":
            return NmeaParser(self.require_checksum, self.sentences)
        return RawParser(self.encoding)

    def fields(self) -> frozenset[str] | None:
        """Field names this parser can produce, when known at load time."""
        if self.type == "regex":
            return frozenset(re.compile(self.pattern).groupindex)
        if self.type == "csv":
            return frozenset(c for c in self.columns if c)
        if self.type == "raw":
            return frozenset({"raw"})
        return None


@dataclass(frozen=True, slots=True)
class PointMap:
    """Where a point's value comes from in a parsed frame, and how to send a write."""

    name: str
    field: str
    type: str = "auto"
    command: str | None = None  # e.g. "SP {value}\r\n"; only for writable points


#: A lost or missing port is reopened after 0.5 s, doubling up to 30 s.
RETRY = RetrySettings(initial=0.5, cap=30.0)
RETRY_OLD_KEYS = {"initial": "reconnect_min", "cap": "reconnect_max"}


@dataclass(frozen=True, slots=True)
class SerialOptions:
    port: PortSettings
    framing: FramingSpec
    parser: ParserSpec
    mode: str = "stream"
    request: bytes = b""
    response_frames: int = 1
    response_timeout: float | None = None
    max_age: float | None = None
    retry: RetrySettings = RETRY  # reopening the port
    points: Mapping[str, PointMap] = field(default_factory=dict)
    #: What the config check found worth a look (deprecated keys), not errors.
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False, repr=False)

    def fields(self) -> dict[str, list[PointMap]]:
        """Parsed field name -> the points fed by it."""
        out: dict[str, list[PointMap]] = {}
        for p in self.points.values():
            out.setdefault(p.field, []).append(p)
        return out


def _bytes(sec: Section, key: str, default: bytes | None) -> bytes | None:
    """A TOML string of characters U+0000..U+00FF, one byte each ("\\u0002" is STX).

    `default=None` makes the key required."""
    text = sec.str(key, REQUIRED if default is None else default.decode("latin-1"))
    if not isinstance(text, str):
        return default
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        sec.error(key, "characters above U+00FF cannot be sent as one byte; write bytes as \\u00XX")
        return default


def _encoding(sec: Section, default: str | None) -> str | None:
    enc: str | None = sec.str("encoding", default)
    if isinstance(enc, str):
        try:
            codecs.lookup(enc)
        except LookupError:
            sec.error("encoding", f"unknown text encoding {enc!r}")
            return default
    return enc


def _wrong_type(sec: Section, kind: str, uses: Mapping[str, tuple[str, ...]], what: str) -> None:
    for key, types in uses.items():
        if sec.has(key) and kind not in types:
            sec.mark(key)
            names = " or ".join(repr(t) for t in types)
            sec.error(key, f"only used with {what} type = {names}, not {kind!r}")


def _framing(sec: Section) -> FramingSpec:
    kind = sec.str("type", "delimiter", choices=FRAMINGS)
    max_frame = sec.int("max_frame", DEFAULT_MAX_FRAME, min=1, max=1 << 20)
    spec = FramingSpec(type=kind, max_frame=max_frame)
    if kind == "delimiter":
        delim = _bytes(sec, "delimiter", b"\n")
        start = _bytes(sec, "start", b"") or b""
        spec = FramingSpec(
            type=kind, delimiter=delim or b"\n", start=start, max_frame=max_frame,
            starts=(start,) if start else (),
        )  # fmt: skip
    elif kind == "fixed":
        length = sec.int("length", min=1, max=max_frame)
        start = _bytes(sec, "start", b"") or b""
        spec = FramingSpec(type=kind, length=length, start=start, max_frame=max_frame)
    elif kind == "length":
        size = sec.int("length_size", 1)
        if size not in (1, 2, 4):
            sec.error("length_size", f"must be 1, 2 or 4 (bytes), got {size!r}")
            size = 1
        order = sec.str("length_order", "big", choices=["big", "little"])
        adjust = sec.int("length_adjust", 0, min=-65536, max=65536)
        start = _bytes(sec, "start", b"") or b""
        spec = FramingSpec(
            type=kind, start=start, length_size=size, length_order=order,
            length_adjust=adjust, max_frame=max_frame,
        )  # fmt: skip
    if kind in FRAMINGS:
        _wrong_type(sec, kind, _FRAMING_KEYS, "framing")
    sec.done()
    return spec


def _parser(sec: Section, framing: FramingSpec) -> ParserSpec:
    kind = sec.str("type", choices=PARSER_TYPES)
    spec = ParserSpec(type=kind if kind in PARSER_TYPES else "raw")
    if kind == "regex":
        pattern = sec.str("pattern")
        if isinstance(pattern, str) and pattern:
            try:
                groups = re.compile(pattern).groupindex
            except re.error as exc:
                sec.error("pattern", f"not a valid regular expression: {exc}")
                pattern = ""
            else:
                if not groups:
                    sec.error("pattern", "needs at least one named group, e.g. (?P<temp>[0-9.]+)")
                    pattern = ""
        spec = ParserSpec(type=kind, pattern=pattern or "", encoding=_encoding(sec, "utf-8"))
    elif kind == "csv":
        columns = sec.list("columns", of=str)
        names = [c for c in columns if isinstance(c, str) and c]
        if isinstance(columns, list) and not names:
            sec.error("columns", 'needs at least one named column ("" skips a column)')
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            sec.error("columns", f"duplicate column names: {', '.join(dupes)}")
        separator = sec.str("separator", ",")
        if isinstance(separator, str) and len(separator) != 1:
            sec.error("separator", f"must be one character, got {separator!r}")
            separator = ","
        spec = ParserSpec(
            type=kind, columns=tuple(c if isinstance(c, str) else "" for c in columns),
            separator=separator, encoding=_encoding(sec, "utf-8"),
        )  # fmt: skip
    elif kind == "json":
        spec = ParserSpec(type=kind, encoding=_encoding(sec, "utf-8"))
    elif kind == "nmea":
        sentences = sec.list("sentences", [], of=str)
        for i, s in enumerate(sentences):
            if isinstance(s, str) and not re.fullmatch(r"[A-Za-z0-9]{3,}", s):
                sec.issues.add(f"{sec.at('sentences')}[{i}]", f"not a sentence type: {s!r}")
        spec = ParserSpec(
            type=kind, require_checksum=sec.bool("require_checksum", True),
            sentences=tuple(s.upper() for s in sentences if isinstance(s, str)),
        )  # fmt: skip
    elif kind == "raw":
        spec = ParserSpec(type=kind, encoding=_encoding(sec, None))
    if kind in PARSER_TYPES:
        _wrong_type(sec, kind, _PARSER_KEYS, "parser")
        if kind == "cbor" and framing.type == "delimiter":
            sec.error("type", "CBOR frames are binary and may contain any delimiter byte: "
                      "use framing type 'length' or 'fixed'")  # fmt: skip
    sec.done()
    return spec


def _point_field_error(parser: ParserSpec, field_name: str) -> str | None:
    if (parser.type == "regex" and not parser.pattern) or (
        parser.type == "csv" and not any(parser.columns)
    ):
        return None  # the parser's own error says it all
    known = parser.fields()
    if known is not None and field_name not in known:
        return f"the {parser.type} parser gives no field {field_name!r}; it gives: " + ", ".join(
            sorted(known)
        )
    if parser.type == "nmea":
        kind, dot, name = field_name.partition(".")
        if not dot or not kind or not name:
            return f"NMEA fields are named <sentence>.<field>, e.g. gga.lat; got {field_name!r}"
        fields = nmea.KNOWN_FIELDS.get(kind.upper())
        if fields is not None and name not in fields:
            return f"{kind.upper()} has no field {name!r}; it has: " + ", ".join(fields)
        if parser.sentences and kind.upper() not in parser.sentences:
            return f"sentence {kind.upper()} is not in parser.sentences"
    return None


def parse_options(spec: DeviceSpec, *, require_points: bool = True) -> SerialOptions:
    """Check and compile a serial device's options; raises ConfigError listing every issue.

    `require_points=False` is for `gatewayctl probe serial`, which shows every field."""
    dev, issues = device_options(spec)
    port = dev.str("port")
    if isinstance(port, str) and port and not port.startswith("/"):
        dev.error("port", f"must be an absolute device path (/dev/ttyUSB0, /dev/serial/by-id/...), "
                  f"got {port!r}")  # fmt: skip
    settings = PortSettings(
        port=port if isinstance(port, str) else "",
        baudrate=dev.int("baudrate", 9600, min=50, max=4_000_000),
        bytesize=dev.int("bytesize", 8, min=5, max=8),
        parity=dev.str("parity", "none", choices=PARITIES),
        stopbits=_stopbits(dev),
        flow_control=dev.str("flow_control", "none", choices=FLOW_CONTROLS),
    )
    mode = dev.str("mode", "stream", choices=MODES)
    request = b""
    response_frames = 1
    response_timeout = None
    if mode == "request":
        request = _bytes(dev, "request", None) or b""
        response_frames = dev.int("response_frames", 1, min=1, max=100)
        response_timeout = dev.float("response_timeout", None, gt=0)
        if response_timeout is not None and response_timeout > spec.timeout:
            dev.error("response_timeout", f"must be <= the device's timeout ({spec.timeout:g} s)")
    else:
        for key in ("request", "response_frames", "response_timeout"):
            if dev.has(key):
                dev.mark(key)
                dev.error(key, "only used with mode = 'request'")
    max_age = dev.float("max_age", None, gt=0)
    retry = read_retry(dev, RETRY, old=RETRY_OLD_KEYS)
    framing = _framing(dev.table("framing"))
    parser = _parser(dev.table("parser", required=True), framing)
    if parser.type == "nmea" and framing.type == "delimiter" and not framing.starts:
        # u-blox receivers interleave binary UBX frames with sentences, without line breaks.
        framing = replace(framing, starts=nmea.STARTS)
    dev.done()

    points: dict[str, PointMap] = {}
    if not spec.points and require_points:
        issues.add(spec.path + ".points", "a serial device needs at least one point")
    for p in spec.points:
        sec = point_options(spec, p, issues)
        field_name = sec.str("field", p.name)
        kind = sec.str("type", "auto", choices=TYPES)
        command = sec.str("command", None)
        if isinstance(field_name, str) and field_name and parser.type in PARSER_TYPES:
            why = _point_field_error(parser, field_name)
            if why:
                sec.error("field" if sec.has("field") else "", why)
        if p.writable and command is None:
            sec.error("command", "a writable serial point needs a command, e.g. 'SP {value}\\r\\n'")
        if command is not None and not p.writable:
            sec.error("command", "only used with writable = true")
        if isinstance(command, str):
            try:
                command.format(value=0, point=p.name)
                command.encode("latin-1")
            except (KeyError, IndexError, ValueError) as exc:
                sec.error("command", f"bad template (use {{value}} and {{point}}): {exc}")
        sec.done()
        points[p.name] = PointMap(p.name, str(field_name), str(kind), command)
    raise_issues(issues)
    return SerialOptions(
        port=settings, framing=framing, parser=parser, mode=mode, request=request,
        response_frames=response_frames, response_timeout=response_timeout, max_age=max_age,
        retry=retry, points=points, warnings=tuple(issues.warnings),
    )  # fmt: skip


def _stopbits(dev: Section) -> float:
    value = dev.float("stopbits", 1.0)
    if value not in (1.0, 1.5, 2.0):
        dev.error("stopbits", f"must be 1, 1.5 or 2, got {value:g}")
        return 1.0
    return float(value)
