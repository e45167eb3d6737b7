"""Parsers: literal frames in, named values out; malformed frames raise FrameError with a reason."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.serial.convert import auto_value, convert
from drivers.serial.parsers import (
    CborParser,
    CsvParser,
    FrameError,
    JsonParser,
    NmeaParser,
    Parsed,
    RawParser,
    RegexParser,
)


def test_regex_named_groups() -> None:
    p = RegexParser(r"T=(?P<temp>-?\d+\.\d+)C H=(?P<hum>\d+)%( S=(?P<status>\w+))?")
    assert p.parse(b"T=21.50C H=40%") == Parsed({"temp": "21.50", "hum": "40", "status": None})
    with pytest.raises(FrameError, match="does not match"):
        p.parse(b"ERR 12")
    with pytest.raises(FrameError, match="not valid utf-8"):
        p.parse(b"T=\xff")


def test_regex_needs_named_groups() -> None:
    with pytest.raises(ValueError, match="named groups"):
        RegexParser(r"(\d+)")


def test_csv_columns_skip_and_count() -> None:
    p = CsvParser(["id", "", "temp", "hum"])
    assert p.parse(b"A7,x,21.5,40\r") == Parsed({"id": "A7", "temp": "21.5", "hum": "40"})
    assert CsvParser(["a", "b"], separator=";").parse(b'"x;y";2') == Parsed({"a": "x;y", "b": "2"})
    with pytest.raises(FrameError, match="expected 4 columns, got 3"):
        p.parse(b"A7,21.5,40")


def test_json_object_flattened() -> None:
    p = JsonParser()
    frame = b'{"t": 21.5, "ok": true, "env": {"hum": 40, "p": [1013, null]}, "id": "A7"}'
    assert p.parse(frame) == Parsed(
        {"t": 21.5, "ok": True, "env.hum": 40, "env.p.0": 1013, "env.p.1": None, "id": "A7"}
    )


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b'{"t": 21.5', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"t": NaN}', "non-finite"),
        (b"[" * 50 + b"{}", "not valid JSON"),
        (b'{"a":' * 20 + b"1" + b"}" * 20, "nested deeper"),
    ],
)
def test_json_malformed(frame: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        JsonParser().parse(frame)


def test_cbor_map() -> None:
    # RFC 8949 Appendix A: {"a": 1, "b": [2, 3]} = a26161016162820203
    assert CborParser().parse(bytes.fromhex("a26161016162820203")) == Parsed(
        {"a": 1, "b.0": 2, "b.1": 3}
    )
    # {1: 1.5 (half float f93e00), "s": h'0102'}
    assert CborParser().parse(bytes.fromhex("a201f93e00617342" + "0102")) == Parsed(
        {"1": 1.5, "s": b"\x01\x02"}
    )


@pytest.mark.parametrize(
    ("hexframe", "why"),
    [
        ("a2616101", "not valid CBOR"),  # truncated map
        ("83010203", "expected a CBOR map"),  # [1, 2, 3]
        ("a1616101ff", "1 bytes after"),
        ("a16174c074323031332d30332d32315432303a30343a30305a", "unsupported value"),  # tag 0
        ("ff", "not valid CBOR"),
    ],
)
def test_cbor_malformed(hexframe: str, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        CborParser().parse(bytes.fromhex(hexframe))


def test_nmea_parser_filters_and_rejects() -> None:
    gga = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
    rmc = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
    p = NmeaParser(sentences=["gga"])
    parsed = p.parse(gga)
    assert parsed is not None and parsed.values["gga.satellites"] == 8
    assert p.parse(rmc) is None
    with pytest.raises(FrameError, match="checksum mismatch"):
        p.parse(gga[:-1] + b"8")
    with pytest.raises(FrameError, match="not valid ascii"):
        p.parse(b"$GP\xc3\xa9*00")


def test_raw_parser() -> None:
    assert RawParser().parse(b"\x01\x02") == Parsed({"raw": b"\x01\x02"})
    assert RawParser("ascii").parse(b" OK \r") == Parsed({"raw": "OK"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("21.5", 21.5), ("-3", -3), ("+7", 7), (" 0012 ", 12), ("1e3", 1000.0), ("", None),
     ("nan", "nan"), ("0012A", "0012A"), (".5", 0.5)],
)  # fmt: skip
def test_auto_value(text: str, value: Any) -> None:
    assert auto_value(text) == value
    assert type(auto_value(text)) is type(value)


def test_convert_point_types() -> None:
    assert convert("0012", "str") == "0012"
    assert convert("0012", "int") == 12
    assert convert("21.5", "float") == 21.5
    assert convert(3, "float") == 3.0
    assert convert("ON", "bool") is True
    assert convert(0, "bool") is False
    assert convert(21.0, "int") == 21
    assert convert(b"\x01", "str") == "01"
    assert convert(True, "auto") is True
    assert convert(None, "int") is None
    bad: list[tuple[Any, str]] = [("x", "float"), ("2.5", "int"), (2.5, "int"), ("maybe", "bool")]
    for value, kind in bad:
        with pytest.raises(ValueError):
            convert(value, kind)
