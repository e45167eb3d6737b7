"""RuuviTag data format 5 ("RAWv2"): manufacturer data of company 0x0499, big-endian.

Pure: bytes (after the company id) in, `Decoded` out. The format's "not available"
sentinels (0x8000 signed, all ones unsigned and MAC) become None, never numbers.
Source: ruuvi-sensor-protocols, dataformat_05.md.
"""

from __future__ import annotations

import struct
from typing import Final

from drivers.ble.common import AdvertisementError, Decoded, Value, check_size, mac_str

COMPANY_ID: Final = 0x0499
FORMAT: Final = 5
LENGTH: Final = 24

NAMES: Final = (
    "temperature", "humidity", "pressure", "acceleration_x", "acceleration_y",
    "acceleration_z", "battery", "tx_power", "movement_counter", "measurement_sequence", "mac",
)  # fmt: skip
UNITS: Final = {
    "temperature": "°C", "humidity": "%", "pressure": "Pa", "acceleration_x": "g",
    "acceleration_y": "g", "acceleration_z": "g", "battery": "V", "tx_power": "dBm",
}  # fmt: skip

_LAYOUT: Final = struct.Struct(">BhHHhhhHBH6s")


def parse(data: bytes) -> Decoded:
    """Decode format 5 manufacturer data (the 24 bytes after the company id)."""
    check_size(data, "Ruuvi", 1)
    if data[0] != FORMAT:
        raise AdvertisementError(
            "version", f"Ruuvi: data format {data[0]} is not supported (only format 5)"
        )
    if len(data) != LENGTH:
        reason = "truncated" if len(data) < LENGTH else "oversized"
        raise AdvertisementError(
            reason, f"Ruuvi: format 5 is {LENGTH} bytes, got {len(data)} ({reason})"
        )
    _, t, h, p, ax, ay, az, power, move, seq, mac = _LAYOUT.unpack(data)
    volts = power >> 5
    tx = power & 0x1F
    mac_s = None if mac == b"\xff" * 6 else mac_str(mac)
    values: dict[str, Value] = {
        "temperature": None if t == -0x8000 else round(t * 0.005, 3),
        "humidity": None if h == 0xFFFF else round(h * 0.0025, 4),
        "pressure": None if p == 0xFFFF else p + 50000,
        "acceleration_x": None if ax == -0x8000 else ax / 1000,
        "acceleration_y": None if ay == -0x8000 else ay / 1000,
        "acceleration_z": None if az == -0x8000 else az / 1000,
        "battery": None if volts == 0x7FF else (volts + 1600) / 1000,
        "tx_power": None if tx == 0x1F else -40 + 2 * tx,
        "movement_counter": None if move == 0xFF else move,
        "measurement_sequence": None if seq == 0xFFFF else seq,
        "mac": mac_s,
    }
    return Decoded(
        format="ruuvi-5",
        values=values,
        units=UNITS,
        packet_id=None if seq == 0xFFFF else seq,
        mac=mac_s,
    )
