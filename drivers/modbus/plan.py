"""Read plans: a validated register map compiled into as few Modbus requests as allowed.

Points of one table whose addresses are near each other (at most `max_gap` unused registers,
or `16 * max_gap` unused bits, between them) share one request, up to 125 registers or
2000 bits per request; a response is split back into the points' values. Pure.

Values are raw (decoded by type, not scaled): the collection service applies a point's
scale and offset to every driver's readings.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import RawReading
from drivers.modbus.registers import (
    BIT_TABLES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    NUMERIC,
    Layout,
    decode,
)


@dataclass(frozen=True, slots=True)
class ModbusPoint:
    """One point of a register map, resolved once at load time."""

    name: str
    table: str
    address: int
    layout: Layout
    scale: float = 1.0
    offset: float = 0.0
    min: float | None = None
    max: float | None = None
    writable: bool = False
    verify: bool = False

    @property
    def is_bit_table(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def size(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the point occupies."""
        return 1 if self.is_bit_table else self.layout.registers

    @property
    def end(self) -> int:
        """Last address occupied (inclusive)."""
        return self.address + self.size - 1


class ReadRequest:
    """One Modbus read: `count` registers or bits of `table` from `address`.

    Built once per plan. Points whose bytes are the registers' bytes as sent (big-endian
    words and bytes, the Modbus convention) are decoded together by one precompiled `struct`
    format for the whole block, the per-poll hot path; the others go through `decode`."""

    __slots__ = (
        "_bits", "_block", "_fast", "_others", "address", "count", "points", "table",
    )  # fmt: skip

    def __init__(
        self, table: str, address: int, count: int, points: tuple[ModbusPoint, ...]
    ) -> None:
        self.table = table
        self.address = address
        self.count = count
        self.points = points
        self._bits = table in BIT_TABLES
        fmt, pos = ">", 0
        self._fast: list[str] = []
        self._others: list[ModbusPoint] = []
        for p in sorted(points, key=lambda q: q.address):
            index = p.address - address
            if self._bits or not _is_plain(p) or index < pos:
                self._others.append(p)
                continue
            fmt += "x" * (2 * (index - pos)) + NUMERIC[p.layout.type][0]
            pos = index + p.layout.registers
            self._fast.append(p.name)
        self._block = struct.Struct(fmt)

    def __repr__(self) -> str:
        return f"ReadRequest({self.table} {self.address}+{self.count}, {len(self.points)} points)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadRequest):
            return NotImplemented
        return (self.table, self.address, self.count, self.points) == (
            other.table, other.address, other.count, other.points,
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def split(self, values: Sequence[int] | Sequence[bool]) -> list[tuple[str, object]]:
        """The points' raw values (decoded, not scaled) from the response's registers or bits."""
        names, decoded = self._decode(values)
        return list(zip(names, decoded, strict=True))

    def readings(self, values: Sequence[int] | Sequence[bool]) -> list[RawReading]:
        """`split`, as the driver returns it (the hot path of every poll)."""
        names, decoded = self._decode(values)
        return list(map(RawReading, names, decoded))

    def _decode(self, values: Sequence[int] | Sequence[bool]) -> tuple[list[str], list[Any]]:
        if len(values) < self.count:
            raise ValueError(f"response has {len(values)} values, {self.count} were requested")
        if self._bits:
            base = self.address
            bits = [bool(values[p.address - base]) for p in self.points]
            return [p.name for p in self.points], bits
        names: list[str] = []
        decoded: list[Any] = []
        if self._fast:
            n = self._block.size // 2
            decoded = list(self._block.unpack(struct.pack(f">{n}H", *values[:n])))
            names = list(self._fast)
        for p in self._others:
            i = p.address - self.address
            regs = [int(v) for v in values[i : i + p.layout.registers]]
            names.append(p.name)
            decoded.append(decode(regs, p.layout))
        return names, decoded


def _is_plain(p: ModbusPoint) -> bool:
    layout = p.layout
    return (
        layout.type in NUMERIC
        and layout.bit is None
        and (layout.word_order == "big" or layout.registers == 1)
        and layout.byte_order == "big"
    )


def compile_plan(
    points: Iterable[ModbusPoint],
    *,
    max_gap: int = 10,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
) -> list[ReadRequest]:
    """Coalesce points into read requests, per table, in address order."""
    by_table: dict[str, list[ModbusPoint]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    plan: list[ReadRequest] = []
    for table in sorted(by_table):
        bits = table in BIT_TABLES
        limit = max_bits if bits else max_registers
        gap = max_gap * 16 if bits else max_gap
        group: list[ModbusPoint] = []
        start = end = 0
        for p in sorted(by_table[table], key=lambda q: (q.address, q.end)):
            if group and p.address - end - 1 <= gap and max(end, p.end) - start + 1 <= limit:
                group.append(p)
                end = max(end, p.end)
                continue
            if group:
                plan.append(ReadRequest(table, start, end - start + 1, tuple(group)))
            group, start, end = [p], p.address, p.end
        if group:
            plan.append(ReadRequest(table, start, end - start + 1, tuple(group)))
    return plan
