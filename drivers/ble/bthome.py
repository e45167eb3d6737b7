"""BTHome v2 advertisements (service data of UUID 0xFCD2): parse, decrypt, guard.

`parse()` is pure: bytes in, `Decoded` out. `Guard` is the small per-device state on top of
it: replay protection (the encryption counter must increase) and downgrade rejection (a
device with a bindkey is never accepted unencrypted). Object table from bthome.io/format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from drivers.ble.common import AdvertisementError, Decoded, Value, check_size, mac_bytes, mac_str

UUID: Final = "0000fcd2-0000-1000-8000-00805f9b34fb"
UUID16: Final = 0xFCD2

_ENCRYPTED: Final = 0x01
_MAC_INCLUDED: Final = 0x02
_TRIGGER: Final = 0x04
_VERSION_SHIFT: Final = 5


@dataclass(frozen=True, slots=True)
class ObjectType:
    """One BTHome object id: how many bytes follow, how to read them, what it means."""

    name: str
    length: int  # bytes of value; 0 = variable (first byte is the length)
    kind: str = "num"  # num | bool | button | dimmer | text | raw | fw
    signed: bool = False
    factor: float = 1.0
    unit: str | None = None


def _n(name: str, length: int, factor: float = 1.0, unit: str | None = None) -> ObjectType:
    return ObjectType(name, length, "num", False, factor, unit)


def _s(name: str, length: int, factor: float = 1.0, unit: str | None = None) -> ObjectType:
    return ObjectType(name, length, "num", True, factor, unit)


def _b(name: str) -> ObjectType:
    return ObjectType(name, 1, "bool")


#: Every object id of the BTHome v2 format specification (bthome.io/format).
OBJECTS: Final[dict[int, ObjectType]] = {
    0x00: _n("packet_id", 1),
    0x01: _n("battery", 1, unit="%"),
    0x02: _s("temperature", 2, 0.01, "°C"),
    0x03: _n("humidity", 2, 0.01, "%"),
    0x04: _n("pressure", 3, 0.01, "hPa"),
    0x05: _n("illuminance", 3, 0.01, "lx"),
    0x06: _n("mass_kg", 2, 0.01, "kg"),
    0x07: _n("mass_lb", 2, 0.01, "lb"),
    0x08: _s("dewpoint", 2, 0.01, "°C"),
    0x09: _n("count", 1),
    0x0A: _n("energy", 3, 0.001, "kWh"),
    0x0B: _n("power", 3, 0.01, "W"),
    0x0C: _n("voltage", 2, 0.001, "V"),
    0x0D: _n("pm2_5", 2, unit="µg/m³"),
    0x0E: _n("pm10", 2, unit="µg/m³"),
    0x0F: _b("generic_boolean"),
    0x10: _b("power_on"),
    0x11: _b("opening"),
    0x12: _n("co2", 2, unit="ppm"),
    0x13: _n("tvoc", 2, unit="µg/m³"),
    0x14: _n("moisture", 2, 0.01, "%"),
    0x15: _b("battery_low"),
    0x16: _b("battery_charging"),
    0x17: _b("carbon_monoxide"),
    0x18: _b("cold"),
    0x19: _b("connectivity"),
    0x1A: _b("door"),
    0x1B: _b("garage_door"),
    0x1C: _b("gas_detected"),
    0x1D: _b("heat"),
    0x1E: _b("light"),
    0x1F: _b("lock"),
    0x20: _b("moisture_detected"),
    0x21: _b("motion"),
    0x22: _b("moving"),
    0x23: _b("occupancy"),
    0x24: _b("plug"),
    0x25: _b("presence"),
    0x26: _b("problem"),
    0x27: _b("running"),
    0x28: _b("safety"),
    0x29: _b("smoke"),
    0x2A: _b("sound"),
    0x2B: _b("tamper"),
    0x2C: _b("vibration"),
    0x2D: _b("window"),
    0x2E: _n("humidity", 1, unit="%"),
    0x2F: _n("moisture", 1, unit="%"),
    0x3A: ObjectType("button", 1, "button"),
    0x3C: ObjectType("dimmer", 2, "dimmer"),
    0x3D: _n("count", 2),
    0x3E: _n("count", 4),
    0x3F: _s("rotation", 2, 0.1, "°"),
    0x40: _n("distance_mm", 2, unit="mm"),
    0x41: _n("distance_m", 2, 0.1, "m"),
    0x42: _n("duration", 3, 0.001, "s"),
    0x43: _n("current", 2, 0.001, "A"),
    0x44: _n("speed", 2, 0.01, "m/s"),
    0x45: _s("temperature", 2, 0.1, "°C"),
    0x46: _n("uv_index", 1, 0.1),
    0x47: _n("volume", 2, 0.1, "L"),
    0x48: _n("volume_ml", 2, unit="mL"),
    0x49: _n("volume_flow_rate", 2, 0.001, "m³/h"),
    0x4A: _n("voltage", 2, 0.1, "V"),
    0x4B: _n("gas", 3, 0.001, "m³"),
    0x4C: _n("gas", 4, 0.001, "m³"),
    0x4D: _n("energy", 4, 0.001, "kWh"),
    0x4E: _n("volume", 4, 0.001, "L"),
    0x4F: _n("water", 4, 0.001, "L"),
    0x50: _n("timestamp", 4, unit="s"),
    0x51: _n("acceleration", 2, 0.001, "m/s²"),
    0x52: _n("gyroscope", 2, 0.001, "°/s"),
    0x53: ObjectType("text", 0, "text"),
    0x54: ObjectType("raw", 0, "raw"),
    0x55: _n("volume_storage", 4, 0.001, "L"),
    0x56: _n("conductivity", 2, unit="µS/cm"),
    0x57: _s("temperature", 1, unit="°C"),
    0x58: _s("temperature", 1, 0.35, "°C"),
    0x59: _s("count", 1),
    0x5A: _s("count", 2),
    0x5B: _s("count", 4),
    0x5C: _s("power", 4, 0.01, "W"),
    0x5D: _s("current", 2, 0.001, "A"),
    0x5E: _n("direction", 2, 0.01, "°"),
    0x5F: _n("precipitation", 2, 0.1, "mm"),
    0x60: _n("channel", 1),
    0x61: _n("rotational_speed", 2, unit="rpm"),
    0x62: _s("speed", 4, 0.000001, "m/s"),
    0x63: _s("acceleration", 4, 0.000001, "m/s²"),
    0x64: _n("light_level", 1),
    0xF0: _n("device_type_id", 2),
    0xF1: ObjectType("firmware_version", 4, "fw"),
    0xF2: ObjectType("firmware_version", 3, "fw"),
}

#: Every value name a BTHome packet can carry (multiple objects of one type add _2, _3...).
NAMES: Final = frozenset(t.name for i, t in OBJECTS.items() if i != 0x00) | {"dimmer_steps"}

BUTTON_EVENTS: Final = {
    0x00: None,  # "no event": nothing happened, nothing is reported
    0x01: "press",
    0x02: "double_press",
    0x03: "triple_press",
    0x04: "long_press",
    0x05: "long_double_press",
    0x06: "long_triple_press",
    0x80: "hold_press",
}
DIMMER_EVENTS: Final = {0x00: None, 0x01: "rotate_left", 0x02: "rotate_right"}

# Decimal places per factor, so that 2506 * 0.01 is 25.06 and not 25.060000000000002.
_DECIMALS: Final = {1.0: 0, 0.1: 1, 0.01: 2, 0.001: 3, 0.35: 2, 0.000001: 6}


def split_name(name: str) -> tuple[str, int]:
    """'temperature_2' -> ('temperature', 2); 'temperature' -> ('temperature', 1)."""
    base, sep, idx = name.rpartition("_")
    if sep and idx.isdigit() and base in NAMES and int(idx) >= 2:
        return base, int(idx)
    return name, 1


def is_known_name(name: str) -> bool:
    return split_name(name)[0] in NAMES


def _decrypt(info: int, payload: bytes, mac: bytes, key: bytes) -> tuple[bytes, int]:
    """AES-CCM with a 4-byte MIC; nonce = MAC + UUID (LE) + device info + counter."""
    # Imported here: only devices with a bindkey pay for the cryptography import.
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    if len(payload) < 8:
        raise AdvertisementError(
            "truncated",
            f"BTHome: encrypted packet truncated: {len(payload)} bytes after the device "
            "information, at least 8 needed (counter and MIC)",
        )
    ciphertext, counter_raw, mic = payload[:-8], payload[-8:-4], payload[-4:]
    nonce = mac + struct.pack("<H", UUID16) + bytes([info]) + counter_raw
    try:
        plain = AESCCM(key, tag_length=4).decrypt(nonce, ciphertext + mic, None)
    except InvalidTag:
        raise AdvertisementError(
            "mic",
            "BTHome: decryption failed (MIC mismatch): wrong bindkey, wrong MAC, or a forged "
            "packet",
        ) from None
    return plain, struct.unpack("<I", counter_raw)[0]


def parse(data: bytes, *, mac: str | None = None, key: bytes | None = None) -> Decoded:
    """Decode BTHome v2 service data. `mac` (the advertiser's address) and `key` (16-byte
    bindkey) are needed for encrypted packets. Raises AdvertisementError, nothing else."""
    check_size(data, "BTHome", 1)
    info = data[0]
    version = info >> _VERSION_SHIFT
    if version != 2:
        raise AdvertisementError(
            "version", f"BTHome: version {version} in device information byte, expected 2"
        )
    pos = 1
    carried_mac: str | None = None
    mac_raw: bytes | None = None
    if info & _MAC_INCLUDED:
        if len(data) < 7:
            raise AdvertisementError(
                "truncated", f"BTHome: truncated: MAC flag set but only {len(data)} bytes"
            )
        mac_raw = data[1:7][::-1]  # sent least significant byte first
        carried_mac = mac_str(mac_raw)
        pos = 7
    payload = data[pos:]
    counter: int | None = None
    encrypted = bool(info & _ENCRYPTED)
    if encrypted:
        if key is None:
            raise AdvertisementError(
                "encrypted", "BTHome: packet is encrypted but no bindkey is configured"
            )
        if mac_raw is None:
            if mac is None:
                raise AdvertisementError(
                    "encrypted", "BTHome: cannot decrypt: the advertiser's MAC is unknown"
                )
            try:
                mac_raw = mac_bytes(mac)
            except ValueError as exc:
                raise AdvertisementError("encrypted", f"BTHome: {exc}") from None
        payload, counter = _decrypt(info, payload, mac_raw, key)
    values, units, packet_id, events = _objects(payload, pos)
    return Decoded(
        format="bthome", values=values, units=units, packet_id=packet_id, events=events,
        encrypted=encrypted, counter=counter, mac=carried_mac,
    )  # fmt: skip


def _objects(
    payload: bytes, base: int
) -> tuple[dict[str, Value], dict[str, str], int | None, tuple[str, ...]]:
    values: dict[str, Value] = {}
    units: dict[str, str] = {}
    events: list[str] = []
    seen: dict[str, int] = {}
    packet_id: int | None = None
    pos = 0
    end = len(payload)

    def name_for(base_name: str) -> str:
        n = seen.get(base_name, 0) + 1
        seen[base_name] = n
        return base_name if n == 1 else f"{base_name}_{n}"

    while pos < end:
        oid = payload[pos]
        obj = OBJECTS.get(oid)
        if obj is None:
            # Lengths are implied by ids: past an unknown id nothing can be located.
            raise AdvertisementError(
                "format", f"BTHome: unknown object id 0x{oid:02X} at byte {base + pos}"
            )
        pos += 1
        length = obj.length
        if length == 0:
            if pos >= end:
                raise AdvertisementError(
                    "truncated", f"BTHome: {obj.name} (0x{oid:02X}) has no length byte"
                )
            length = payload[pos]
            pos += 1
        if pos + length > end:
            raise AdvertisementError(
                "truncated",
                f"BTHome: {obj.name} (0x{oid:02X}) at byte {base + pos - 1} needs {length} "
                f"bytes, only {end - pos} left",
            )
        raw = payload[pos : pos + length]
        pos += length
        if oid == 0x00:
            packet_id = raw[0]
            continue
        if obj.kind == "num":
            n = int.from_bytes(raw, "little", signed=obj.signed)
            value: Value = n if obj.factor == 1.0 else round(n * obj.factor, _DECIMALS[obj.factor])
        elif obj.kind == "bool":
            value = raw[0] != 0
        elif obj.kind == "button":
            value = BUTTON_EVENTS.get(raw[0], f"unknown_0x{raw[0]:02X}")
            name = name_for("button")
            if value is not None:
                values[name] = value
                events.append(name)
            continue
        elif obj.kind == "dimmer":
            event = DIMMER_EVENTS.get(raw[0], f"unknown_0x{raw[0]:02X}")
            name = name_for("dimmer")
            if event is not None:
                values[name] = event
                steps = name.replace("dimmer", "dimmer_steps", 1)
                values[steps] = raw[1]
                events.extend((name, steps))
            continue
        elif obj.kind == "text":
            value = raw.decode("utf-8", errors="replace")
        elif obj.kind == "raw":
            value = bytes(raw)
        else:  # fw: least significant byte first, printed most significant first
            value = ".".join(str(b) for b in reversed(raw))
        name = name_for(obj.name)
        values[name] = value
        if obj.unit:
            units[name] = obj.unit
    return values, units, packet_id, tuple(events)


class Guard:
    """One device's acceptance state: downgrade rejection and replay protection.

    Devices repeat an advertisement many times until they measure again; an exact repeat of
    the last accepted packet is reported as reason "duplicate" (it carries nothing new, so
    replaying it is harmless). The counter is not persisted: after a restart the first valid
    packet is accepted.
    """

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.last_counter: int | None = None
        self._last_raw: bytes | None = None

    def accept(self, data: bytes, mac: str) -> Decoded:
        if self._last_raw is not None and data == self._last_raw:
            raise AdvertisementError("duplicate", "BTHome: repeat of the last accepted packet")
        decoded = parse(data, mac=mac, key=self.key)
        if self.key is not None and not decoded.encrypted:
            raise AdvertisementError(
                "downgrade",
                f"BTHome: unencrypted packet from {mac}, which has a bindkey: rejected "
                "(a downgrade attempt, or the device lost its key)",
            )
        if decoded.counter is not None:
            if self.last_counter is not None and decoded.counter <= self.last_counter:
                raise AdvertisementError(
                    "replay",
                    f"BTHome: counter {decoded.counter} from {mac} does not increase "
                    f"(last accepted {self.last_counter}): replayed packet rejected",
                )
            self.last_counter = decoded.counter
        self._last_raw = bytes(data)
        return decoded
