"""A configurable advertisement decoder for devices without a built-in format.

A `CustomFormat` matches manufacturer data (by company id) or service data (by service
UUID), optionally only when the data starts with a given prefix, and reads fields as
(byte offset, type, endianness, scale). Pure: bytes in, `Decoded` out.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from drivers.ble.common import Decoded, Value, check_size

#: type name -> (struct code, size in bytes); 24-bit integers are read by hand.
TYPES: Final[dict[str, tuple[str, int]]] = {
    "uint8": ("B", 1), "int8": ("b", 1), "uint16": ("H", 2), "int16": ("h", 2),
    "uint24": ("", 3), "int24": ("", 3), "uint32": ("I", 4), "int32": ("i", 4),
    "uint64": ("Q", 8), "int64": ("q", 8), "float32": ("f", 4), "float64": ("d", 8),
    "bool": ("?", 1),
}  # fmt: skip
ENDIANS: Final = ("little", "big")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    offset: int
    type: str
    endian: str = "little"
    scale: float = 1.0

    @property
    def size(self) -> int:
        return TYPES[self.type][1]


@dataclass(frozen=True, slots=True)
class CustomFormat:
    """Where to find a device's data and how to read it."""

    fields: tuple[FieldSpec, ...]
    manufacturer_id: int | None = None
    service_uuid: str | None = None  # full 128-bit form, lower case
    prefix: bytes = b""

    def select(
        self, manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]
    ) -> bytes | None:
        """The bytes this format decodes from an advertisement, or None if it does not match."""
        if self.manufacturer_id is not None:
            data = manufacturer_data.get(self.manufacturer_id)
        elif self.service_uuid is not None:
            data = service_data.get(self.service_uuid)
        else:
            return None
        if data is None or not data.startswith(self.prefix):
            return None
        return data

    @property
    def needed(self) -> int:
        return max((f.offset + f.size for f in self.fields), default=0)


def read_field(data: bytes, f: FieldSpec) -> Value:
    code, size = TYPES[f.type]
    raw = data[f.offset : f.offset + size]
    if code:
        (n,) = struct.unpack(("<" if f.endian == "little" else ">") + code, raw)
    else:
        n = int.from_bytes(raw, f.endian, signed=f.type == "int24")  # type: ignore[arg-type]
    if isinstance(n, bool) or f.scale == 1.0:
        return n  # type: ignore[no-any-return]
    return float(n) * f.scale


def parse(fmt: CustomFormat, data: bytes) -> Decoded:
    """Read every field of `fmt` from `data`; a packet too short for them is rejected."""
    check_size(data, "custom format", fmt.needed)
    values = {f.name: read_field(data, f) for f in fmt.fields}
    return Decoded(format="custom", values=values)
