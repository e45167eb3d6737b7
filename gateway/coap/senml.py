"""SenML (RFC 8428) codec: bytes in, resolved records out (and back). Pure: no asyncio, no I/O.

Decoding resolves base fields (bn, bt, bu, bv, bs, bver), relative times and the four value
kinds (v, vs, vb, vd) into `Record`s; every problem raises `PayloadError` naming the record
and the field. A plain CBOR map (`{"temp": 21.5}`) for the simplest firmware is decoded by
`decode_plain_cbor`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import cbor2

from gateway.errors import PayloadError, UnsupportedFormatError

# Content-Format numbers (IANA CoAP registry).
CF_TEXT: Final = 0
CF_LINK_FORMAT: Final = 40
CF_JSON: Final = 50
CF_CBOR: Final = 60
CF_SENML_JSON: Final = 110
CF_SENML_CBOR: Final = 112

#: SenML version we implement (RFC 8428 is version 10).
SENML_VERSION: Final = 10

#: Times below 2**28 are relative to "now" (RFC 8428 section 4.5.3).
RELATIVE_TIME_LIMIT: Final = 2**28

#: RFC 8428 Table 4: CBOR integer labels.
CBOR_LABELS: Final[Mapping[int, str]] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
_LABEL_NUMBERS: Final = {name: num for num, name in CBOR_LABELS.items()}

_KNOWN: Final = frozenset(CBOR_LABELS.values())
_BASE: Final = frozenset(("bver", "bn", "bt", "bu", "bv", "bs"))
_VALUES_BUT_V: Final = frozenset(("vs", "vb", "vd"))
# RFC 8428 section 4.5.1: a name starts with a letter or digit and uses only these.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*\Z")

MAX_RECORDS: Final = 1000
MAX_NAME: Final = 256


class Record(NamedTuple):
    """One resolved SenML record. `value` is float, str, bool or bytes (or None when only a
    sum is given); `time` is absolute (seconds since the epoch) or None when the pack gave
    no time at all (the receiver's clock then applies). A tuple: made for every reading
    that arrives, and a frozen dataclass took 1.5 us to make."""

    name: str
    value: float | str | bool | bytes | None
    unit: str | None = None
    time: float | None = None
    sum: float | None = None
    update_time: float | None = None
    #: The base name in force for this record ("" when none): tells device from point.
    base_name: str = ""


def _problem(index: int, message: str) -> PayloadError:
    return PayloadError(f"SenML record {index}: {message}")


def _type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "byte string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    if value is None:
        return "null"
    return type(value).__name__


def _number(index: int, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _problem(index, f"{key!r} must be a number, got {_type(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise _problem(index, f"{key!r} is out of range") from None
    if not math.isfinite(out):
        raise _problem(index, f"{key!r} must be finite, got {out!r}")
    return out


def _string(index: int, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _problem(index, f"{key!r} must be a string, got {_type(value)}")
    return value


def resolve(pack: object, now: float, *, binary_vd: bool) -> list[Record]:
    """Resolve a decoded pack (a list of maps with string labels) into records.

    `binary_vd`: the pack came from CBOR, where `vd` is a byte string; in JSON it is
    base64url text (RFC 8428 section 5)."""
    if not isinstance(pack, list):
        raise PayloadError(f"SenML pack must be an array, got {_type(pack)}")
    if not pack:
        raise PayloadError("SenML pack is empty")
    if len(pack) > MAX_RECORDS:
        raise PayloadError(f"SenML pack has {len(pack)} records, more than {MAX_RECORDS}")
    bn = ""
    bt = 0.0
    bu: str | None = None
    bv = 0.0
    bs = 0.0
    out: list[Record] = []
    for i, rec in enumerate(pack):
        if not isinstance(rec, dict):
            raise _problem(i, f"must be a map, got {_type(rec)}")
        if not _KNOWN.issuperset(rec):  # (known labels only: nothing to check one by one)
            for key in rec:
                if not isinstance(key, str):
                    raise _problem(i, f"label {key!r} is not a SenML label")
                # Labels ending in "_" must be understood (RFC 8428 section 4.4).
                if key.endswith("_") and key not in _KNOWN:
                    raise _problem(i, f"must-understand label {key!r} is not supported")
        if _BASE.isdisjoint(rec):  # most records of a pack: no base field
            pass
        else:
            if "bver" in rec:
                ver = rec["bver"]
                if isinstance(ver, bool) or not isinstance(ver, int):
                    raise _problem(i, f"'bver' must be an integer, got {_type(ver)}")
                if ver > SENML_VERSION:
                    raise _problem(i, f"SenML version {ver} is newer than {SENML_VERSION}")
            if "bn" in rec:
                bn = _string(i, "bn", rec["bn"])
            if "bt" in rec:
                bt = _number(i, "bt", rec["bt"])
            if "bu" in rec:
                bu = _string(i, "bu", rec["bu"])
            if "bv" in rec:
                bv = _number(i, "bv", rec["bv"])
            if "bs" in rec:
                bs = _number(i, "bs", rec["bs"])

        n = rec.get("n", "")
        name = bn + (n if type(n) is str else _string(i, "n", n))
        if not name:
            raise _problem(i, "has no name (neither 'bn' nor 'n')")
        if len(name) > MAX_NAME:
            raise _problem(i, f"name is longer than {MAX_NAME} characters")
        if not _NAME_RE.match(name):
            raise _problem(
                i,
                f"name {name!r} must start with a letter or digit and use only "
                "letters, digits and - : . / _",
            )

        value: float | str | bool | bytes | None = None
        v = rec.get("v")
        if type(v) is float and math.isfinite(v) and _VALUES_BUT_V.isdisjoint(rec):
            # The common case in short (same checks, same outcome as the general one below).
            value = bv + v
            if not math.isfinite(value):
                raise _problem(i, "'bv' + 'v' is out of range")
            kinds = None
        else:
            kinds = [k for k in ("v", "vs", "vb", "vd") if k in rec]
            if len(kinds) > 1:
                raise _problem(i, f"has more than one value ({', '.join(kinds)})")
        if kinds is None:
            pass
        elif kinds == ["v"]:
            value = bv + _number(i, "v", rec["v"])
            if not math.isfinite(value):
                raise _problem(i, "'bv' + 'v' is out of range")
        elif kinds == ["vs"]:
            value = _string(i, "vs", rec["vs"])
        elif kinds == ["vb"]:
            if not isinstance(rec["vb"], bool):
                raise _problem(i, f"'vb' must be a boolean, got {_type(rec['vb'])}")
            value = rec["vb"]
        elif kinds == ["vd"]:
            value = _data(i, rec["vd"], binary_vd)
        total: float | None = None
        if "s" in rec:
            total = bs + _number(i, "s", rec["s"])
        if value is None and total is None:
            raise _problem(i, "has no value ('v', 'vs', 'vb', 'vd') and no sum ('s')")

        time: float | None = None
        if "t" in rec or "bt" in rec or bt != 0.0:
            time = bt + (_number(i, "t", rec["t"]) if "t" in rec else 0.0)
            if not math.isfinite(time):
                raise _problem(i, "'bt' + 't' is out of range")
            if time < RELATIVE_TIME_LIMIT:
                time = now + time
        ut = _number(i, "ut", rec["ut"]) if "ut" in rec else None
        unit = _string(i, "u", rec["u"]) if "u" in rec else bu
        out.append(Record(name, value, unit, time, total, ut, bn))
    return out


def _data(index: int, value: object, binary: bool) -> bytes:
    if binary:
        if not isinstance(value, bytes):
            raise _problem(index, f"'vd' must be a byte string, got {_type(value)}")
        return value
    if not isinstance(value, str):
        raise _problem(index, f"'vd' must be base64url text, got {_type(value)}")
    try:
        padded = value + "=" * (-len(value) % 4)
        return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _problem(index, "'vd' is not valid base64url") from None


def _cbor_loads(payload: bytes) -> Any:
    try:
        return cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for bad input; all mean "malformed"
        raise PayloadError(f"malformed CBOR: {exc}") from None


def _json_loads(payload: bytes) -> Any:
    def bad_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(payload.decode("utf-8"), parse_constant=bad_constant)
    except UnicodeDecodeError:
        raise PayloadError("malformed JSON: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None


def _labels_from_cbor(pack: object) -> object:
    """Turn Table 4's integer labels into names; string labels are kept as they are."""
    if not isinstance(pack, list):
        return pack
    out: list[object] = []
    labels = CBOR_LABELS
    for rec in pack:
        if isinstance(rec, dict):
            named: dict[object, object] = {}
            for key, value in rec.items():
                if type(key) is int and key in labels:  # the common case, in short
                    named[labels[key]] = value
                    continue
                if isinstance(key, int) and not isinstance(key, bool):
                    if key not in CBOR_LABELS:
                        if key < 0:  # RFC 8428 section 6: negative = base/must-understand
                            raise PayloadError(f"unknown SenML CBOR label {key}")
                        continue
                    key = CBOR_LABELS[key]
                named[key] = value
            out.append(named)
        else:
            out.append(rec)
    return out


#: Labels `_resolve_plain` takes: bn, bt, bu, n, u, v, t (what a sensor's pack holds).
_PLAIN: Final = frozenset((-2, -3, -4, 0, 1, 2, 6))


def _resolve_plain(pack: object, now: float) -> list[Record] | None:
    """The common pack in one pass, straight from CBOR's integer labels: records of
    numeric values with names, units and times only, all valid. None for anything else
    (another label, a wrong type, a bad name...): `resolve` then decides, and says what
    is wrong. Same records as `resolve` for every pack it takes (tests compare them)."""
    if type(pack) is not list or not pack or len(pack) > MAX_RECORDS:
        return None
    bn = ""
    bt = 0.0
    bu: str | None = None
    out: list[Record] = []
    match = _NAME_RE.match
    isfinite = math.isfinite
    for rec in pack:
        if type(rec) is not dict or not rec.keys() <= _PLAIN:
            return None
        for key in rec:
            if type(key) is not int:  # (True == 1 and False == 0 pass the test above)
                return None
        if -2 in rec:
            bn = rec[-2]
            if type(bn) is not str:
                return None
        if -3 in rec:
            b = rec[-3]
            if type(b) is not float and type(b) is not int:
                return None
            bt = float(b)
            if not isfinite(bt):
                return None
        if -4 in rec:
            bu = rec[-4]
            if type(bu) is not str:
                return None
        n = rec.get(0, "")
        if type(n) is not str:
            return None
        name = bn + n
        if not name or len(name) > MAX_NAME or not match(name):
            return None
        v = rec.get(2)
        if type(v) is float:
            value = 0.0 + v
        elif type(v) is int and -(2**53) <= v <= 2**53:
            value = 0.0 + float(v)
        else:
            return None
        if not isfinite(value):
            return None
        if 1 in rec:
            unit = rec[1]
            if type(unit) is not str:
                return None
        else:
            unit = bu
        time: float | None = None
        if 6 in rec or -3 in rec or bt != 0.0:
            t = rec.get(6, 0.0)
            if type(t) is not float and type(t) is not int:
                return None
            time = bt + float(t)
            if not isfinite(time):
                return None
            if time < RELATIVE_TIME_LIMIT:
                time = now + time
        out.append(Record(name, value, unit, time, None, None, bn))
    return out


def decode_cbor(payload: bytes, now: float) -> list[Record]:
    """SenML CBOR (content-format 112), integer labels of RFC 8428 Table 4."""
    pack = _cbor_loads(payload)
    records = _resolve_plain(pack, now)
    if records is not None:
        return records
    return resolve(_labels_from_cbor(pack), now, binary_vd=True)


def decode_json(payload: bytes, now: float) -> list[Record]:
    """SenML JSON (content-format 110)."""
    return resolve(_json_loads(payload), now, binary_vd=False)


def decode_plain_cbor(payload: bytes, now: float) -> list[Record]:
    """A plain CBOR map `{point: value}` (content-format 60); values number/text/bool/bytes.
    An array with content-format 60 is taken as a SenML CBOR pack."""
    data = _cbor_loads(payload)
    if isinstance(data, list):
        return resolve(_labels_from_cbor(data), now, binary_vd=True)
    if not isinstance(data, dict):
        raise PayloadError(f"CBOR payload must be a map of point -> value, got {_type(data)}")
    if not data:
        raise PayloadError("CBOR map is empty")
    if len(data) > MAX_RECORDS:
        raise PayloadError(f"CBOR map has more than {MAX_RECORDS} entries")
    pack: list[dict[str, object]] = []
    for name, value in data.items():
        if not isinstance(name, str):
            raise PayloadError(f"CBOR map key {name!r} must be a text string (a point name)")
        if isinstance(value, bool):
            pack.append({"n": name, "vb": value})
        elif isinstance(value, int | float):
            pack.append({"n": name, "v": value})
        elif isinstance(value, str):
            pack.append({"n": name, "vs": value})
        elif isinstance(value, bytes):
            pack.append({"n": name, "vd": value})
        else:
            raise PayloadError(
                f"CBOR map value of {name!r} must be a number, text, boolean "
                f"or bytes, got {_type(value)}"
            )
    try:
        return resolve(pack, now, binary_vd=True)
    except PayloadError as exc:
        raise PayloadError(str(exc).replace("SenML record", "CBOR map entry")) from None


def decode(payload: bytes, content_format: int | None, now: float) -> list[Record]:
    """Decode by content-format (None: SenML CBOR, what a constrained device most likely
    means when it sends no Content-Format). Raises PayloadError / UnsupportedFormatError."""
    if content_format is None or content_format == CF_SENML_CBOR:
        return decode_cbor(payload, now)
    if content_format == CF_SENML_JSON:
        return decode_json(payload, now)
    if content_format == CF_CBOR:
        return decode_plain_cbor(payload, now)
    raise UnsupportedFormatError(
        f"content-format {content_format} not supported: use SenML CBOR (112), "
        "SenML JSON (110) or CBOR (60)"
    )


# -- encoding ------------------------------------------------------------------------------


def _to_pack(records: Sequence[Record], base_name: str) -> list[dict[str, Any]]:
    pack: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        if not r.name.startswith(base_name):
            raise ValueError(f"record {r.name!r} does not start with base name {base_name!r}")
        rec: dict[str, Any] = {}
        if i == 0 and base_name:
            rec["bn"] = base_name
        rest = r.name[len(base_name) :]
        if rest:
            rec["n"] = rest
        if r.unit is not None:
            rec["u"] = r.unit
        v = r.value
        if isinstance(v, bool):
            rec["vb"] = v
        elif isinstance(v, int | float):
            rec["v"] = v
        elif isinstance(v, str):
            rec["vs"] = v
        elif isinstance(v, bytes):
            rec["vd"] = v
        if r.sum is not None:
            rec["s"] = r.sum
        if r.time is not None:
            rec["t"] = r.time
        if r.update_time is not None:
            rec["ut"] = r.update_time
        pack.append(rec)
    return pack


def encode_cbor(records: Sequence[Record], base_name: str = "") -> bytes:
    """SenML CBOR with integer labels."""
    pack = _to_pack(records, base_name)
    return cbor2.dumps([{_LABEL_NUMBERS[k]: v for k, v in rec.items()} for rec in pack])


def encode_json(records: Sequence[Record], base_name: str = "") -> bytes:
    pack = _to_pack(records, base_name)
    for rec in pack:
        if "vd" in rec:
            rec["vd"] = base64.urlsafe_b64encode(rec["vd"]).rstrip(b"=").decode("ascii")
    return json.dumps(pack, separators=(",", ":")).encode("utf-8")


def encode(records: Sequence[Record], content_format: int, base_name: str = "") -> bytes:
    if content_format == CF_SENML_JSON:
        return encode_json(records, base_name)
    if content_format == CF_SENML_CBOR:
        return encode_cbor(records, base_name)
    raise UnsupportedFormatError(f"cannot encode SenML as content-format {content_format}")


def split_name(name: str, base_name: str = "") -> tuple[str, str]:
    """Split a resolved name into (device, point).

    With a base name `boiler-1/` and `n` = `temp` the device is the base name minus one
    trailing '/' or ':' separator. Otherwise the name is split at its last '/' or ':'
    (`urn:dev:ow:10e2073a01080063:voltage` -> device `urn:dev:ow:10e2073a01080063`)."""
    if base_name and name.startswith(base_name) and len(name) > len(base_name):
        device = base_name[:-1] if base_name[-1] in "/:" else base_name
        return device, name[len(base_name) :]
    cut = max(name.rfind("/"), name.rfind(":"))
    if cut <= 0 or cut == len(name) - 1:
        raise PayloadError(f"name {name!r} does not say which device: use 'bn' = '<device>/'")
    return name[:cut], name[cut + 1 :]


def names(records: Iterable[Record]) -> list[str]:
    return [r.name for r in records]
