"""What every BLE advertisement decoder returns, and the one error they raise.

Decoders (`bthome`, `ruuvi`, `custom`) are pure: bytes in, a `Decoded` out, or an
`AdvertisementError` naming what is wrong and where. Nothing else may escape them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import PayloadError

#: A decoded value; None = the device reports "not available" for this field.
Value = float | int | bool | str | bytes | None

#: An AD structure's length is one byte (type included): no advertisement field is longer,
#: even with extended advertising. Anything above is not an advertisement we received.
MAX_AD_PAYLOAD: Final = 254


class AdvertisementError(PayloadError):
    """An advertisement that cannot be accepted. `reason` is a short machine word
    (truncated, oversized, version, encrypted, mic, replay, downgrade, format, mismatch)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Decoded:
    """Values decoded from one advertisement."""

    format: str  # "bthome", "ruuvi-5", "custom"
    values: Mapping[str, Value]
    units: Mapping[str, str] = field(default_factory=dict)
    #: Changes when the device takes a new measurement (BTHome packet id, Ruuvi sequence);
    #: None when the format has none (then only a change of values counts as new).
    packet_id: int | None = None
    #: Names of values that are events (button presses): they are never deduplicated away.
    events: tuple[str, ...] = ()
    encrypted: bool = False
    counter: int | None = None  # BTHome encryption counter
    mac: str | None = None  # a MAC the payload itself carries


def check_size(data: bytes, what: str, minimum: int, maximum: int = MAX_AD_PAYLOAD) -> None:
    if len(data) < minimum:
        raise AdvertisementError(
            "truncated", f"{what}: truncated: {len(data)} bytes, at least {minimum} needed"
        )
    if len(data) > maximum:
        raise AdvertisementError(
            "oversized", f"{what}: oversized: {len(data)} bytes, at most {maximum} allowed"
        )


def mac_bytes(address: str) -> bytes:
    """'54:48:E6:8F:80:A5' -> b'\\x54\\x48...'; ValueError for anything else."""
    parts = address.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {address!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02X}" for b in raw)
