"""Payloads of CoAP devices: bytes and Content-Format in, point values out (and back for writes).

Pure: no asyncio, no aiocoap. SenML goes through the gateway's own codec
(`gateway.coap.senml`); plain CBOR, JSON and text are decoded here. Every problem raises
`PayloadError` (or `UnsupportedFormatError`) naming it; the driver turns that into a
`DeviceProtocolError` for the device.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from drivers.base import Value
from gateway.coap import senml
from gateway.errors import PayloadError, UnsupportedFormatError

CF_TEXT: Final = senml.CF_TEXT
CF_JSON: Final = senml.CF_JSON
CF_CBOR: Final = senml.CF_CBOR
CF_SENML_JSON: Final = senml.CF_SENML_JSON
CF_SENML_CBOR: Final = senml.CF_SENML_CBOR
CF_OCTETS: Final = 42

#: Names a technician can type for a Content-Format (`gatewayctl probe coap --content-format`).
CONTENT_FORMAT_NAMES: Final[Mapping[str, int]] = {
    "text": CF_TEXT, "text/plain": CF_TEXT, "octets": CF_OCTETS,
    "application/octet-stream": CF_OCTETS, "json": CF_JSON, "application/json": CF_JSON,
    "cbor": CF_CBOR, "application/cbor": CF_CBOR, "senml+json": CF_SENML_JSON,
    "application/senml+json": CF_SENML_JSON, "senml": CF_SENML_CBOR,
    "senml+cbor": CF_SENML_CBOR, "application/senml+cbor": CF_SENML_CBOR,
}  # fmt: skip

_INT_RE: Final = re.compile(r"[+-]?[0-9]+\Z")
_MAX_TEXT: Final = 1024  # a text value longer than this is not a point value


@dataclass(frozen=True, slots=True)
class Decoded:
    """One resource representation, decoded once and shared by every point read from it."""

    kind: str  # "scalar" | "map" | "senml"
    scalar: Value = None
    mapping: Mapping[str, Value] | None = None
    records: Sequence[senml.Record] = ()

    def value_for(self, point: str, record: str | None) -> tuple[Value, float | None]:
        """The value of `point` (named `record` in the payload, if given) and its device time."""
        if self.kind == "scalar":
            if record is not None:
                raise PayloadError(f"payload is a single value, but record {record!r} is asked")
            return self.scalar, None
        want = record if record is not None else point
        if self.kind == "map":
            assert self.mapping is not None
            if want in self.mapping:
                return self.mapping[want], None
            if record is None and len(self.mapping) == 1:
                return next(iter(self.mapping.values())), None
            raise PayloadError(f"no key {want!r} in the map (keys: {_list(self.mapping)})")
        for r in self.records:
            # A configured name matches the full resolved name or the record's own `n`
            # (the part after its base name): devices put their identity in `bn`.
            if r.name == want or (r.base_name and r.name[len(r.base_name) :] == want):
                return (r.value if r.value is not None else r.sum), r.time
        if record is None and len(self.records) == 1:
            r = self.records[0]
            return (r.value if r.value is not None else r.sum), r.time
        raise PayloadError(
            f"no SenML record {want!r} (records: {_list([r.name for r in self.records])})"
        )


def _list(names: Any) -> str:
    items = [repr(n) for n in list(names)[:8]]
    return ", ".join(items) + (", ..." if len(names) > 8 else "")


def _type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _scalar(value: object, where: str) -> Value:
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{where}: value {value!r} is not a finite number")
        return value
    raise PayloadError(f"{where}: expected a number, text, boolean or bytes, got {_type(value)}")


def _structured(data: object, what: str) -> Decoded:
    if isinstance(data, dict):
        out: dict[str, Value] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise PayloadError(f"{what} map key {key!r} is not text")
            out[key] = _scalar(value, f"{what} map entry {key!r}")
        return Decoded("map", mapping=out)
    if isinstance(data, list):
        raise PayloadError(f'{what} payload is an array: set format = "senml" for a SenML pack')
    return Decoded("scalar", scalar=_scalar(data, what))


def decode_text(payload: bytes) -> Decoded:
    """Plain text: an integer, a decimal number, true/false, or else the text itself."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PayloadError("text payload is not UTF-8") from None
    if not text:
        raise PayloadError("empty payload")
    if len(text) > _MAX_TEXT:
        raise PayloadError(f"text payload is longer than {_MAX_TEXT} characters")
    if _INT_RE.match(text):
        return Decoded("scalar", scalar=int(text))
    low = text.lower()
    if low in ("true", "false"):
        return Decoded("scalar", scalar=low == "true")
    try:
        number = float(text)
    except ValueError:
        return Decoded("scalar", scalar=text)
    if not math.isfinite(number):
        return Decoded("scalar", scalar=text)  # "nan", "inf": keep what the device said
    return Decoded("scalar", scalar=number)


def decode_cbor(payload: bytes) -> Decoded:
    if not payload:
        raise PayloadError("empty payload")
    try:
        data = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for bad input; all mean "malformed"
        raise PayloadError(f"malformed CBOR: {exc}") from None
    return _structured(data, "CBOR")


def decode_json(payload: bytes) -> Decoded:
    def bad_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=bad_constant)
    except UnicodeDecodeError:
        raise PayloadError("malformed JSON: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    return _structured(data, "JSON")


def decode(payload: bytes, content_format: int | None, fmt: str, now: float) -> Decoded:
    """Decode a representation as the point's `format` says; "auto" follows Content-Format.

    `now` resolves SenML relative times (RFC 8428 section 4.5.3)."""
    if fmt == "auto":
        if content_format in (None, CF_TEXT):
            fmt = "text"
        elif content_format in (CF_SENML_CBOR, CF_SENML_JSON):
            fmt = "senml"
        elif content_format == CF_CBOR:
            fmt = "cbor"
        elif content_format == CF_JSON:
            fmt = "json"
        else:
            raise UnsupportedFormatError(
                f"content-format {content_format} is not understood: set the point's format "
                "(senml, cbor, json, text)"
            )
    if fmt == "text":
        return decode_text(payload)
    if fmt == "cbor":
        return decode_cbor(payload)
    if fmt == "json":
        return decode_json(payload)
    if fmt == "senml":
        if content_format == CF_SENML_JSON:
            return Decoded("senml", records=senml.decode_json(payload, now))
        return Decoded("senml", records=senml.decode_cbor(payload, now))
    raise UnsupportedFormatError(f"unknown format {fmt!r}")


def encode(value: object, write_format: str, name: str) -> tuple[bytes, int]:
    """A value to write as (payload, Content-Format). `name` is the SenML record name."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PayloadError(f"cannot write {value!r}: not a finite number")
    if value is not None and not isinstance(value, bool | int | float | str | bytes):
        raise PayloadError(f"cannot write a {type(value).__name__}: give a number, text, "
                           "boolean or bytes")  # fmt: skip
    if write_format == "text":
        if isinstance(value, bytes):
            return value, CF_OCTETS
        if isinstance(value, bool):
            return (b"true" if value else b"false"), CF_TEXT
        if value is None:
            raise PayloadError("cannot write an empty value as text")
        return str(value).encode("utf-8"), CF_TEXT
    if write_format == "cbor":
        return cbor2.dumps(value), CF_CBOR
    if write_format == "json":
        if isinstance(value, bytes):
            raise PayloadError("cannot write bytes as JSON")
        return json.dumps(value).encode("utf-8"), CF_JSON
    if write_format in ("senml", "senml+json"):
        if value is None:
            raise PayloadError("cannot write an empty value as SenML")
        record = senml.Record(name=name, value=value)
        if write_format == "senml":
            return senml.encode_cbor([record]), CF_SENML_CBOR
        return senml.encode_json([record]), CF_SENML_JSON
    raise UnsupportedFormatError(f"unknown write format {write_format!r}")


def content_format_name(cf: int | None) -> str:
    if cf is None:
        return "no content-format"
    for name, number in CONTENT_FORMAT_NAMES.items():
        if number == cf and "/" in name:
            return name
    return str(cf)
