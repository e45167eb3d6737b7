"""BLE advertisement decoders against the specifications' vectors (../shared/vectors/ble.md)."""

from __future__ import annotations

import struct

import pytest

from drivers.ble import bthome, custom, ruuvi
from drivers.ble.common import AdvertisementError

KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
MAC = "54:48:E6:8F:80:A5"
ENCRYPTED = bytes.fromhex("41a47266c95f730011223378237214")


def _encrypt(plain: bytes, counter: int, info: int = 0x41, key: bytes = KEY) -> bytes:
    """Build an encrypted BTHome packet the way a device does (to test counters)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    ctr = struct.pack("<I", counter)
    nonce = bytes.fromhex(MAC.replace(":", "")) + b"\xd2\xfc" + bytes([info]) + ctr
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, plain, None)
    return bytes([info]) + sealed[:-4] + ctr + sealed[-4:]


# -- BTHome ---------------------------------------------------------------------------------


def test_bthome_spec_vector() -> None:
    d = bthome.parse(bytes.fromhex("4002ca0903bf13"))
    assert d.values == {"temperature": 25.06, "humidity": 50.55}
    assert d.units == {"temperature": "°C", "humidity": "%"}
    assert d.packet_id is None and not d.encrypted


def test_bthome_encrypted_spec_vector() -> None:
    d = bthome.parse(ENCRYPTED, mac=MAC, key=KEY)
    assert d.values == {"temperature": 25.06, "humidity": 50.55}
    assert d.encrypted and d.counter == 0x33221100


def test_our_encryption_matches_the_spec_vector() -> None:
    assert _encrypt(bytes.fromhex("02ca0903bf13"), 0x33221100) == ENCRYPTED


def test_bthome_wrong_key_is_a_mic_error() -> None:
    with pytest.raises(AdvertisementError) as exc:
        bthome.parse(ENCRYPTED, mac=MAC, key=b"\x00" * 16)
    assert exc.value.reason == "mic"


def test_bthome_encrypted_without_key() -> None:
    with pytest.raises(AdvertisementError, match="no bindkey") as exc:
        bthome.parse(ENCRYPTED, mac=MAC)
    assert exc.value.reason == "encrypted"


def test_bthome_multiple_objects_of_one_type_and_signedness() -> None:
    # packet id 9, two temperatures (-5.00 and 21.5 via 0x45), battery 97, count uint32
    data = bytes.fromhex("400009020cfe45d70001613e01020304")
    d = bthome.parse(data)
    assert d.packet_id == 9
    assert d.values == {
        "temperature": -5.0,
        "temperature_2": 21.5,
        "battery": 97,
        "count": 0x04030201,
    }


@pytest.mark.parametrize(
    ("hexdata", "name", "value"),
    [
        ("04138a01", "pressure", 1008.83),
        ("05138a14", "illuminance", 13460.67),
        ("0c020c", "voltage", 3.074),
        ("0b021b00", "power", 69.14),
        ("1001", "power_on", True),
        ("2d00", "window", False),
        ("3f020c", "rotation", 307.4),
        ("4602", "uv_index", 0.2),
        ("57ea", "temperature", -22),
        ("5867", "temperature", 36.05),  # 103 * 0.35
        ("5b1adaffff", "count", -9702),
        ("5d02ff", "current", -0.254),
        ("62e8030000", "speed", 0.001),
        ("530454657374", "text", "Test"),
        ("5402a1b2", "raw", b"\xa1\xb2"),
        ("f001b2", "device_type_id", 0xB201),
        ("f100010204", "firmware_version", "4.2.1.0"),
        ("f2000106", "firmware_version", "6.1.0"),
        ("505d396164", "timestamp", 0x6461395D),
    ],
)
def test_bthome_object_ids(hexdata: str, name: str, value: object) -> None:
    assert bthome.parse(bytes.fromhex("40" + hexdata)).values == {name: value}


def test_every_object_id_parses() -> None:
    for oid, obj in bthome.OBJECTS.items():
        body = bytes([1, 0x41]) if obj.length == 0 else bytes(range(1, obj.length + 1))
        d = bthome.parse(bytes([0x40, oid]) + body)
        assert (d.packet_id is not None) if oid == 0 else bool(d.values), hex(oid)


def test_bthome_button_and_dimmer_events() -> None:
    d = bthome.parse(bytes.fromhex("4400013a003a043c0103"))
    # first button: no event (not reported); second: long press; dimmer: 3 steps left
    assert d.values == {"button_2": "long_press", "dimmer": "rotate_left", "dimmer_steps": 3}
    assert set(d.events) == {"button_2", "dimmer", "dimmer_steps"}


def test_bthome_mac_included() -> None:
    d = bthome.parse(bytes.fromhex("42a5808fe6485402ca09"))
    assert d.mac == MAC and d.values == {"temperature": 25.06}


@pytest.mark.parametrize(
    ("hexdata", "reason"),
    [
        ("", "truncated"),
        ("4002ca", "truncated"),  # temperature needs 2 bytes
        ("4053", "truncated"),  # text without its length byte
        ("40530541", "truncated"),
        ("42a5808f", "truncated"),  # MAC flag with 3 bytes of MAC
        ("41a4726611", "truncated"),  # encrypted, shorter than counter + MIC
        ("2002ca09", "version"),  # version 1
        ("40ffca09", "format"),  # unknown object id
        ("40" + "01" * 300, "oversized"),
    ],
)
def test_bthome_bad_packets_are_rejected_clearly(hexdata: str, reason: str) -> None:
    with pytest.raises(AdvertisementError) as exc:
        bthome.parse(bytes.fromhex(hexdata), mac=MAC, key=KEY)
    assert exc.value.reason == reason
    assert str(exc.value).startswith("BTHome: ")


def test_guard_rejects_replayed_counter() -> None:
    guard = bthome.Guard(KEY)
    first = _encrypt(bytes.fromhex("02ca09"), 10)
    second = _encrypt(bytes.fromhex("02cb09"), 11)
    assert guard.accept(first, MAC).values == {"temperature": 25.06}
    assert guard.accept(second, MAC).values == {"temperature": 25.07}
    with pytest.raises(AdvertisementError) as exc:
        guard.accept(first, MAC)  # an old packet played back
    assert exc.value.reason == "replay"
    with pytest.raises(AdvertisementError) as exc:
        guard.accept(_encrypt(bytes.fromhex("02cc09"), 11), MAC)  # same counter, new data
    assert exc.value.reason == "replay"
    assert guard.accept(_encrypt(bytes.fromhex("02cd09"), 12), MAC).counter == 12


def test_guard_reports_exact_repeat_as_duplicate() -> None:
    guard = bthome.Guard(KEY)
    guard.accept(ENCRYPTED, MAC)
    with pytest.raises(AdvertisementError) as exc:
        guard.accept(ENCRYPTED, MAC)
    assert exc.value.reason == "duplicate"


def test_guard_rejects_downgrade() -> None:
    guard = bthome.Guard(KEY)
    with pytest.raises(AdvertisementError, match="unencrypted") as exc:
        guard.accept(bytes.fromhex("4002ca0903bf13"), MAC)
    assert exc.value.reason == "downgrade"


def test_guard_without_key_accepts_plain() -> None:
    assert bthome.Guard(None).accept(bytes.fromhex("4002ca09"), MAC).values == {
        "temperature": 25.06
    }


def test_known_names() -> None:
    assert bthome.is_known_name("temperature")
    assert bthome.is_known_name("temperature_2")
    assert bthome.is_known_name("pm2_5")
    assert not bthome.is_known_name("temprature")
    assert not bthome.is_known_name("temperature_1")


# -- Ruuvi ----------------------------------------------------------------------------------

RUUVI = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")


def test_ruuvi_spec_vector() -> None:
    d = ruuvi.parse(RUUVI)
    assert d.values == {
        "temperature": 24.3,
        "humidity": 53.49,
        "pressure": 100044,
        "acceleration_x": 0.004,
        "acceleration_y": -0.004,
        "acceleration_z": 1.036,
        "battery": 2.977,
        "tx_power": 4,
        "movement_counter": 66,
        "measurement_sequence": 205,
        "mac": "CB:B8:33:4C:88:4F",
    }
    assert d.packet_id == 205 and d.units["pressure"] == "Pa"


def test_ruuvi_not_available_sentinels_are_missing() -> None:
    data = bytes.fromhex("058000FFFFFFFF800080008000FFFFFFFFFF")
    d = ruuvi.parse(data + b"\xff" * 6)
    assert all(v is None for v in d.values.values()), d.values
    assert d.packet_id is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [(RUUVI[:10], "truncated"), (RUUVI + b"\x00", "oversized"), (b"\x03" + RUUVI[1:], "version"),
     (b"", "truncated")],
)  # fmt: skip
def test_ruuvi_bad_packets(data: bytes, reason: str) -> None:
    with pytest.raises(AdvertisementError) as exc:
        ruuvi.parse(data)
    assert exc.value.reason == reason


# -- custom ---------------------------------------------------------------------------------


def test_custom_fields() -> None:
    fmt = custom.CustomFormat(
        fields=(
            custom.FieldSpec("temp", 1, "int16", "little", 0.1),
            custom.FieldSpec("level", 3, "uint24", "big"),
            custom.FieldSpec("flag", 6, "bool"),
            custom.FieldSpec("ratio", 7, "float32", "big"),
        ),
        manufacturer_id=0xFFFF,
        prefix=b"\x01",
    )
    data = b"\x01" + struct.pack("<h", -123) + b"\x01\x02\x03" + b"\x01" + struct.pack(">f", 0.5)
    assert fmt.select({0xFFFF: data}, {}) == data
    assert fmt.select({0xFFFF: b"\x02" + data[1:]}, {}) is None
    assert fmt.select({0x0499: data}, {}) is None
    d = custom.parse(fmt, data)
    assert d.values["temp"] == pytest.approx(-12.3)
    assert d.values == {"temp": d.values["temp"], "level": 0x010203, "flag": True, "ratio": 0.5}


def test_custom_truncated() -> None:
    fmt = custom.CustomFormat(fields=(custom.FieldSpec("x", 4, "uint32"),), service_uuid="x")
    with pytest.raises(AdvertisementError) as exc:
        custom.parse(fmt, b"\x00" * 7)
    assert exc.value.reason == "truncated"
