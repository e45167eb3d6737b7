"""Decoding device payloads into point values, and encoding writes: literal bytes in, values out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.coap import payload as pl
from gateway.errors import PayloadError, UnsupportedFormatError

NOW = 1_700_000_000.0

# RFC 8428 section 5.1.2 (multiple data points), SenML JSON, verbatim.
RFC_5_1_2 = (
    b'[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},'
    b'{"n":"current","u":"A","v":1.2}]'
)
# The same pack in SenML CBOR with Table 4 labels: -2 bn, 0 n, 1 u, 2 v.
RFC_5_1_2_CBOR = bytes.fromhex(
    "82"  # array(2)
    "a4"
    "21"
    "781c" + b"urn:dev:ow:10e2073a01080063:".hex() + "00"
    "67" + b"voltage".hex() + "01"
    "61" + b"V".hex() + "02"
    "fb405e066666666666" + "a3"
    "00"
    "67" + b"current".hex() + "01"
    "61" + b"A".hex() + "02"
    "fb3ff3333333333333"
)


def test_senml_json_records_by_own_name_or_full_name() -> None:
    d = pl.decode(RFC_5_1_2, pl.CF_SENML_JSON, "auto", NOW)
    assert d.kind == "senml"
    assert d.value_for("voltage", None) == (120.1, None)
    assert d.value_for("amps", "current") == (1.2, None)
    assert d.value_for("x", "urn:dev:ow:10e2073a01080063:current") == (1.2, None)
    with pytest.raises(PayloadError, match="no SenML record 'power'"):
        d.value_for("power", None)


def test_senml_cbor_literal_bytes() -> None:
    d = pl.decode(RFC_5_1_2_CBOR, pl.CF_SENML_CBOR, "senml", NOW)
    assert d.value_for("voltage", None) == (120.1, None)
    assert d.value_for("current", None) == (1.2, None)
    # A device that sends no Content-Format: format = "senml" means SenML CBOR.
    assert pl.decode(RFC_5_1_2_CBOR, None, "senml", NOW).value_for("current", None)[0] == 1.2


def test_senml_relative_time_becomes_device_time() -> None:
    # [{0: "temp", 2: 21.5, 6: -5}]: t = -5 is 5 s before now (RFC 8428 section 4.5.3).
    d = pl.decode(bytes.fromhex("81a3006474656d7002f94d6006 24".replace(" ", "")),
                  pl.CF_SENML_CBOR, "auto", NOW)  # fmt: skip
    assert d.value_for("temp", None) == (21.5, NOW - 5)


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b"21", 21),
        (b"-3\n", -3),
        (b"21.5", 21.5),
        (b" 1e3 ", 1000.0),
        (b"true", True),
        (b"FALSE", False),
        (b"Nov 28 20:31:55", "Nov 28 20:31:55"),
        (b"nan", "nan"),
    ],
)
def test_text(body: bytes, value: object) -> None:
    d = pl.decode(body, None, "auto", NOW)
    assert d.value_for("p", None) == (value, None)
    assert type(d.value_for("p", None)[0]) is type(value)


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ("f94d60", 21.5),
        ("1864", 100),
        ("20", -1),
        ("f5", True),
        ("6368656c", "hel"),
        ("43010203", b"\x01\x02\x03"),
        ("f6", None),
    ],
)
def test_cbor_scalars(body: str, value: object) -> None:
    assert pl.decode(bytes.fromhex(body), pl.CF_CBOR, "auto", NOW).value_for("p", None)[0] == value


def test_cbor_and_json_maps_pick_the_record_or_point_name() -> None:
    cbor_map = bytes.fromhex("a2647465 6d70 f94d60 63 68756d 1828".replace(" ", ""))
    d = pl.decode(cbor_map, pl.CF_CBOR, "auto", NOW)  # {"temp": 21.5, "hum": 40}
    assert d.value_for("temp", None)[0] == 21.5
    assert d.value_for("humidity", "hum")[0] == 40
    with pytest.raises(PayloadError, match="no key 'x'"):
        d.value_for("x", None)
    j = pl.decode(b'{"count": 3}', pl.CF_JSON, "auto", NOW)
    assert j.value_for("anything", None)[0] == 3  # a single-entry map needs no name


@pytest.mark.parametrize(
    ("body", "cf", "fmt", "message"),
    [
        (b"", None, "text", "empty payload"),
        (b"\xff\xfe", None, "text", "not UTF-8"),
        (b"\x9f", pl.CF_CBOR, "auto", "malformed CBOR"),
        (bytes.fromhex("820102"), pl.CF_CBOR, "auto", "is an array"),
        (bytes.fromhex("a1016474"), pl.CF_CBOR, "cbor", "malformed CBOR"),
        (bytes.fromhex("a10102"), pl.CF_CBOR, "cbor", "map key 1 is not text"),
        (b"[1]", pl.CF_JSON, "auto", "is an array"),
        (b"{", pl.CF_JSON, "json", "malformed JSON"),
        (b"[]", pl.CF_SENML_JSON, "auto", "SenML pack is empty"),
    ],
)
def test_bad_payloads_are_named(body: bytes, cf: int | None, fmt: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        pl.decode(body, cf, fmt, NOW).value_for("p", None)


def test_unknown_content_format_needs_an_explicit_format() -> None:
    with pytest.raises(UnsupportedFormatError, match="content-format 11542"):
        pl.decode(b"x", 11542, "auto", NOW)
    assert pl.decode(b"7", 11542, "text", NOW).value_for("p", None)[0] == 7


def test_a_single_value_has_no_records() -> None:
    with pytest.raises(PayloadError, match="single value"):
        pl.decode(b"1", None, "text", NOW).value_for("p", "temp")


@pytest.mark.parametrize(
    ("value", "fmt", "body", "cf"),
    [
        (21.5, "text", b"21.5", 0),
        (7, "text", b"7", 0),
        (True, "text", b"true", 0),
        ("on", "text", b"on", 0),
        (b"\x01", "text", b"\x01", 42),
        (21.5, "cbor", bytes.fromhex("fb4035800000000000"), 60),
        (True, "cbor", b"\xf5", 60),
        (1, "json", b"1", 50),
        (21.5, "senml", bytes.fromhex("81a2006474656d7002fb4035800000000000"), 112),
        (True, "senml+json", b'[{"n":"temp","vb":true}]', 110),
    ],
)
def test_encode_writes(value: object, fmt: str, body: bytes, cf: int) -> None:
    assert pl.encode(value, fmt, "temp") == (body, cf)


@pytest.mark.parametrize("value", [float("nan"), [1], {"a": 1}])
def test_encode_refuses_what_it_cannot_write(value: object) -> None:
    with pytest.raises(PayloadError):
        pl.encode(value, "cbor", "temp")


@pytest.mark.slow  # hundreds of generated cases
@settings(max_examples=1000, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda v: __import__("cbor2").dumps(v),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers()
                | st.floats()
                | st.text(max_size=8)
                | st.binary(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=4)
                    | st.dictionaries(st.integers(-8, 8) | st.text(max_size=4), inner, max_size=4)
                ),
                max_leaves=12,
            ),
        ),
    ),
    cf=st.sampled_from([None, 0, 42, 50, 60, 110, 112, 11542]),
    fmt=st.sampled_from(["auto", "senml", "cbor", "json", "text"]),
    record=st.sampled_from([None, "temp", "n"]),
)
def test_any_payload_decodes_or_is_refused_by_name(
    body: bytes, cf: int | None, fmt: str, record: str | None
) -> None:
    # A device can send anything: the driver gets a value or a PayloadError, never a crash.
    try:
        value, ts = pl.decode(body, cf, fmt, NOW).value_for("temp", record)
    except (PayloadError, UnsupportedFormatError):
        return
    assert value is None or isinstance(value, bool | int | float | str | bytes)
    assert ts is None or isinstance(ts, float)
