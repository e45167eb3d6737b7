"""Modbus register codec: raw types <-> 16-bit registers (the PDU and RTU framing are pymodbus's).

Pure: values and register lists in, values and register lists out; no asyncio, no pymodbus.
A value's bytes are laid out most significant first ("big"); `word_order` says whether the
device sends the most significant *register* first, `byte_order` whether each register holds
its most significant *byte* first. Big/big is the Modbus convention (ABCD), word little is
CDAB, byte little is BADC, both little is DCBA.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

Order = Literal["big", "little"]
Table = Literal["coil", "discrete_input", "holding", "input"]

TABLES: Final[tuple[str, ...]] = ("coil", "discrete_input", "holding", "input")
BIT_TABLES: Final = frozenset({"coil", "discrete_input"})
WRITABLE_TABLES: Final = frozenset({"coil", "holding"})

#: raw type -> (struct format, registers). "bool" is one bit (a coil, an input or a register bit);
#: "string" takes `length` registers.
NUMERIC: Final[dict[str, tuple[str, int]]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
TYPES: Final[tuple[str, ...]] = ("bool", *NUMERIC, "string")
INTEGER_TYPES: Final = frozenset(t for t in NUMERIC if not t.startswith("float"))

#: Largest request sizes the protocol allows (Modbus Application Protocol 1.1b3, 6.1-6.4).
MAX_READ_REGISTERS: Final = 125
MAX_READ_BITS: Final = 2000
MAX_WRITE_REGISTERS: Final = 123
MAX_ADDRESS: Final = 0xFFFF

#: Exception codes (Modbus Application Protocol 1.1b3, section 7).
EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "ILLEGAL FUNCTION",
    0x02: "ILLEGAL DATA ADDRESS",
    0x03: "ILLEGAL DATA VALUE",
    0x04: "SERVER DEVICE FAILURE",
    0x05: "ACKNOWLEDGE",
    0x06: "SERVER DEVICE BUSY",
    0x08: "MEMORY PARITY ERROR",
    0x0A: "GATEWAY PATH UNAVAILABLE",
    0x0B: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}

#: Exception codes that say the unit itself is gone (they count toward its breaker); the others
#: (illegal function/address/value...) are answers from a live unit about a bad request.
DEAD_UNIT_CODES: Final = frozenset({0x04, 0x0A, 0x0B})


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"UNKNOWN EXCEPTION 0x{code:02X}")


class CodecError(ValueError):
    """A value cannot be encoded as the raw type (out of range, wrong kind, too long)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """How one point's value sits in its registers (or bit)."""

    type: str = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    bit: int | None = None  # a bit of a 16-bit register (0 = least significant)
    length: int | None = None  # registers, for "string"

    @property
    def registers(self) -> int:
        """Registers the value occupies (1 for a register bit; bit tables do not use this)."""
        if self.type == "string":
            return self.length or 0
        if self.type == "bool":
            return 1
        return NUMERIC[self.type][1]


def registers_to_bytes(regs: Sequence[int], word_order: Order, byte_order: Order) -> bytes:
    """The value's bytes, most significant first, from registers as the device sends them."""
    words = list(regs)
    if word_order == "little":
        words.reverse()
    out = bytearray()
    for w in words:
        hi, lo = (w >> 8) & 0xFF, w & 0xFF
        out += bytes((lo, hi)) if byte_order == "little" else bytes((hi, lo))
    return bytes(out)


def bytes_to_registers(data: bytes, word_order: Order, byte_order: Order) -> list[int]:
    """Inverse of `registers_to_bytes` (len(data) must be even)."""
    words = []
    for i in range(0, len(data), 2):
        a, b = data[i], data[i + 1]
        words.append((b << 8) | a if byte_order == "little" else (a << 8) | b)
    if word_order == "little":
        words.reverse()
    return words


def decode(regs: Sequence[int], layout: Layout) -> int | float | bool | str:
    """Decode a point's registers (exactly `layout.registers` of them) to its raw value."""
    if len(regs) != layout.registers:
        raise CodecError(f"{layout.type} needs {layout.registers} registers, got {len(regs)}")
    t = layout.type
    if t == "bool":
        word = registers_to_bytes(regs, "big", layout.byte_order)
        value = int.from_bytes(word, "big")
        return bool((value >> layout.bit) & 1) if layout.bit is not None else value != 0
    if t == "string":
        # Strings are byte sequences: register order is the text order, only bytes may swap.
        raw = registers_to_bytes(regs, "big", layout.byte_order)
        return raw.rstrip(b"\x00").decode("utf-8", errors="replace")
    data = registers_to_bytes(regs, layout.word_order, layout.byte_order)
    if layout.bit is not None:  # a bit of a 16-bit integer register
        return bool((int.from_bytes(data, "big") >> layout.bit) & 1)
    number: int | float = struct.unpack(">" + NUMERIC[t][0], data)[0]
    return number


def encode(value: object, layout: Layout) -> list[int]:
    """Encode a raw value into the registers to write. Raises CodecError when it does not fit."""
    t = layout.type
    if t == "string":
        if not isinstance(value, str):
            raise CodecError(f"a string point needs a string, got {type(value).__name__}")
        data = value.encode("utf-8")
        size = 2 * (layout.length or 0)
        if len(data) > size:
            raise CodecError(f"{len(data)} bytes do not fit in {layout.length} registers")
        return bytes_to_registers(data.ljust(size, b"\x00"), "big", layout.byte_order)
    if t == "bool" or layout.bit is not None:
        raise CodecError("a bit is written with `encode_bit`, not as a register")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"a {t} point needs a number, got {type(value).__name__}")
    fmt = NUMERIC[t][0]
    if t in INTEGER_TYPES:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise CodecError(f"{value!r} is not a finite number")
            value = round(value)
        lo, hi = int_range(t)
        if not lo <= value <= hi:
            raise CodecError(f"{value} is out of range for {t} ({lo}..{hi})")
    try:
        data = struct.pack(">" + fmt, value)
    except (OverflowError, struct.error) as exc:
        raise CodecError(f"{value!r} is out of range for {t}") from exc
    return bytes_to_registers(data, layout.word_order, layout.byte_order)


def encode_bit(register: int, layout: Layout, value: bool) -> int:
    """The register with `layout.bit` set to `value` (for a read-modify-write of a flag)."""
    assert layout.bit is not None
    word = int.from_bytes(registers_to_bytes([register], "big", layout.byte_order), "big")
    word = word | (1 << layout.bit) if value else word & ~(1 << layout.bit)
    return bytes_to_registers(word.to_bytes(2, "big"), "big", layout.byte_order)[0]


def int_range(t: str) -> tuple[int, int]:
    bits = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}[t]
    if t.startswith("u"):
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def apply_scale(raw: int | float | bool | str, scale: float, offset: float) -> object:
    """Engineering value of a raw number: raw * scale + offset (identity keeps ints exact)."""
    if isinstance(raw, bool | str) or (scale == 1.0 and offset == 0.0):
        return raw
    return raw * scale + offset


def remove_scale(value: float, scale: float, offset: float) -> float:
    return (value - offset) / scale
