"""SenML codec against the examples of RFC 8428 (sections 5 and 6) and its resolution rules."""

from __future__ import annotations

import json
import math
import random

import cbor2
import pytest

from gateway.coap import senml
from gateway.coap.senml import Record
from gateway.errors import PayloadError, UnsupportedFormatError

NOW = 1_700_000_000.0

# RFC 8428 section 6: the CBOR representation of the "multiple datapoints" example.
RFC_CBOR = bytes.fromhex(
    "82a421781b75726e3a6465763a6f773a3130653230373361303130383030363a"
    "0067766f6c7461676501615602fb405e066666666666"
    "a3006763757272656e74016141"
    "02fb3ff3333333333333"
)


def test_rfc8428_section6_cbor_example() -> None:
    records = senml.decode_cbor(RFC_CBOR, NOW)
    assert records == [
        Record(
            "urn:dev:ow:10e2073a0108006:voltage",
            120.1,
            "V",
            None,
            None,
            None,
            "urn:dev:ow:10e2073a0108006:",
        ),
        Record(
            "urn:dev:ow:10e2073a0108006:current",
            1.2,
            "A",
            None,
            None,
            None,
            "urn:dev:ow:10e2073a0108006:",
        ),
    ]
    assert senml.split_name(records[0].name, records[0].base_name) == (
        "urn:dev:ow:10e2073a0108006",
        "voltage",
    )


def test_rfc8428_single_datapoint() -> None:
    (r,) = senml.decode_json(b'[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]', NOW)
    assert (r.name, r.unit, r.value, r.time) == ("urn:dev:ow:10e2073a01080063", "Cel", 23.1, None)
    assert senml.split_name(r.name) == ("urn:dev:ow", "10e2073a01080063")


def test_rfc8428_multiple_measurements_resolve_base_time_and_unit() -> None:
    pack = (
        b'[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,"bu":"A","bver":5,'
        b'"n":"voltage","u":"V","v":120.1},'
        b'{"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3},'
        b'{"n":"current","t":-3,"v":1.4},{"n":"current","t":-2,"v":1.5},'
        b'{"n":"current","t":-1,"v":1.6},{"n":"current","v":1.7}]'
    )
    records = senml.decode_json(pack, NOW)
    # RFC 8428 section 5.1.4 ("resolved data"): the same pack with every base applied.
    assert [(r.name.rsplit(":", 1)[1], r.unit, r.value) for r in records] == [
        ("voltage", "V", 120.1),
        ("current", "A", 1.2),
        ("current", "A", 1.3),
        ("current", "A", 1.4),
        ("current", "A", 1.5),
        ("current", "A", 1.6),
        ("current", "A", 1.7),
    ]
    times = [r.time for r in records]
    assert times[0] == pytest.approx(1.276020076001e9)
    assert times[1] == pytest.approx(1.276020071001e9)
    assert times[6] == pytest.approx(1.276020076001e9)


def test_rfc8428_multiple_data_types() -> None:
    pack = (
        b'[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},'
        b'{"n":"label","vs":"Machine Room"},{"n":"open","vb":false},'
        b'{"n":"nfc-reader","vd":"aGkgCg"}]'
    )
    values = [r.value for r in senml.decode_json(pack, NOW)]
    assert values == [23.1, "Machine Room", False, b"hi \n"]


def test_relative_times_are_relative_to_now() -> None:
    (a, b) = senml.decode_json(b'[{"bn":"d/","n":"x","v":1,"t":-10},{"n":"y","v":2,"t":5}]', NOW)
    assert a.time == NOW - 10 and b.time == NOW + 5


def test_base_value_and_sum() -> None:
    (r,) = senml.decode_json(b'[{"bn":"d/","bv":100,"bs":10,"n":"e","v":5,"s":2}]', NOW)
    assert r.value == 105 and r.sum == 12


def test_cbor_vd_is_a_byte_string_and_roundtrip() -> None:
    recs = [
        Record("dev/a", 1.5, "Cel", NOW),
        Record("dev/b", b"\x00\x01"),
        Record("dev/c", "on"),
        Record("dev/d", True),
    ]
    for cf in (senml.CF_SENML_CBOR, senml.CF_SENML_JSON):
        back = senml.decode(senml.encode(recs, cf, "dev/"), cf, NOW)
        assert [(r.name, r.value, r.unit, r.time) for r in back] == [
            (r.name, r.value, r.unit, r.time) for r in recs
        ]


def test_plain_cbor_map() -> None:
    records = senml.decode_plain_cbor(cbor2.dumps({"temp": 21.5, "on": True, "mode": "eco"}), NOW)
    assert [(r.name, r.value) for r in records] == [("temp", 21.5), ("on", True), ("mode", "eco")]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{}", "must be an array"),
        (b"[]", "is empty"),
        (b"[1]", "record 0: must be a map"),
        (b'[{"v":1}]', "record 0: has no name"),
        (b'[{"n":"a","v":1,"vs":"x"}]', "more than one value"),
        (b'[{"n":"a"}]', "has no value"),
        (b'[{"n":"a","v":"1"}]', "'v' must be a number"),
        (b'[{"n":"a","vb":1}]', "'vb' must be a boolean"),
        (b'[{"n":"-a","v":1}]', "must start with a letter or digit"),
        (b'[{"n":"a b","v":1}]', "must start with a letter or digit"),
        (b'[{"n":"a","v":1,"bver":11}]', "newer than 10"),
        (b'[{"n":"a","v":1,"foo_":1}]', "must-understand label 'foo_'"),
        (b'[{"n":"a","v":1e999}]', "must be finite"),
        (b'[{"n":"a","v":NaN}]', "malformed JSON"),
        (b'[{"n":"a","vd":"***"}]', "not valid base64url"),
        (b"\xff", "malformed JSON"),
    ],
)
def test_bad_json_packs_name_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message.replace("(", r"\(")):
        senml.decode_json(payload, NOW)


def test_unknown_content_format() -> None:
    with pytest.raises(UnsupportedFormatError):
        senml.decode(b"1", 0, NOW)


def test_cbor_negative_unknown_label_is_refused_positive_ignored() -> None:
    with pytest.raises(PayloadError, match="unknown SenML CBOR label -20"):
        senml.decode_cbor(cbor2.dumps([{0: "d/a", 2: 1, -20: 1}]), NOW)
    (r,) = senml.decode_cbor(cbor2.dumps([{0: "d/a", 2: 1, 20: 1}]), NOW)
    assert r.value == 1


def test_values_stay_finite() -> None:
    with pytest.raises(PayloadError):
        senml.decode_cbor(cbor2.dumps([{0: "d/a", 2: math.inf}]), NOW)
    with pytest.raises(PayloadError):
        senml.decode_cbor(cbor2.dumps([{-5: 1.7e308, 0: "d/a", 2: 1.7e308}]), NOW)


def test_float_values_and_integer_labels_in_short_same_as_the_general_rules() -> None:
    """The common case (float `v`, known integer labels) is resolved in short: the same
    records and the same refusals as through the general rules."""
    short = senml.decode_cbor(cbor2.dumps([{-2: "d/", -5: 1.0, 0: "a", 2: 2.5, 6: 3.0}]), NOW)
    general = senml.decode_json(b'[{"bn":"d/","bv":1,"n":"a","v":2.5,"t":3}]', NOW)
    assert short == general == [Record("d/a", 3.5, None, NOW + 3.0, None, None, "d/")]
    cases = [
        ([{0: "d/a", 2: 1.5, 3: "x"}], "has more than one value \\(v, vs\\)"),
        ([{0: "d/a", 2: math.inf}], "'v' must be finite, got inf"),
        ([{0: "d/a", 2: math.nan}], "'v' must be finite, got nan"),
        ([{-5: 1.7e308, 0: "d/a", 2: 1.7e308}], "'bv' \\+ 'v' is out of range"),
        ([{True: "d/a", 2: 1.5}], "label True is not a SenML label"),
        ([{0: 7, 2: 1.5}], "'n' must be a string, got number"),
    ]
    for pack, message in cases:
        with pytest.raises(PayloadError, match=f"record 0: {message}"):
            senml.decode_cbor(cbor2.dumps(pack), NOW)


def test_cbor_packs_resolve_as_the_general_rules_say() -> None:
    """SenML CBOR packs of the usual labels are resolved in one pass from the integer labels
    (the fast ingest path's decoder); JSON always goes through the general rules. For 3,000
    packs, seeded, valid and not (wrong types, bad names, huge numbers, relative and
    absolute times, base fields, labels the one-pass decoder leaves to the general rules),
    CBOR and JSON give the same records or the same refusal."""
    rng = random.Random(8428)
    labels = {"bn": -2, "bt": -3, "bu": -4, "bv": -5, "n": 0, "u": 1, "v": 2, "vs": 3,
              "s": 5, "t": 6, "ut": 7}  # fmt: skip
    values: dict[str, list[object]] = {
        "bn": ["d/", "dev-1:", "x", "", 5, "bad name/"],
        "bt": [0, 1.5, 1.7e9, 2**28, -10, "1", 2**70],
        "bu": ["Cel", "%RH", 3],
        "bv": [1.0, 2],
        "n": ["a", "temp", "d/b", "", "ü", 7, "a" * 300],
        "u": ["Cel", "V", None, 1.0],
        "v": [21.5, -3.25, 0, 7, 2**53, 2**60, -(2**54), 2**1100, True, "1.0", None, 1e300],
        "vs": ["on"],
        "s": [1.0],
        "t": [0, -5.5, 1.7e9 + 0.25, 2**28 - 1, "now", 2**70],
        "ut": [60],
    }
    common = ["n", "v", "u", "t", "bn", "bt", "bu"]
    for _ in range(3000):
        pack = []
        for _ in range(rng.randint(1, 5)):
            keys = rng.sample(common, rng.randint(1, 4))
            if rng.random() < 0.1:
                keys.append(rng.choice(["bv", "vs", "s", "ut"]))
            pack.append({k: rng.choice(values[k]) for k in keys})
        as_json = json.dumps(pack).encode()
        as_cbor = cbor2.dumps([{labels[k]: v for k, v in rec.items()} for rec in pack])
        try:
            expected: object = senml.decode_json(as_json, NOW)
        except PayloadError as exc:
            expected = str(exc)
        try:
            got: object = senml.decode_cbor(as_cbor, NOW)
        except PayloadError as exc:
            got = str(exc)
        assert got == expected, pack
