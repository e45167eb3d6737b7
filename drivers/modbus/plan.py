"""Read plans: a validated register map compiled into as few Modbus requests as allowed.

Points of one table whose addresses are near each other (at most `max_gap` unused registers,
or `16 * max_gap` unused bits, between them) share one request, up to 125 registers or
2000 bits per request; a response is split back into the points' values. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.modbus.registers import (
    BIT_TABLES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    Layout,
    apply_scale,
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


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: `count` registers or bits of `table` from `address`."""

    table: str
    address: int
    count: int
    points: tuple[ModbusPoint, ...]

    def split(self, values: Sequence[int] | Sequence[bool]) -> list[tuple[str, object]]:
        """The points' engineering values from the response's registers or bits."""
        if len(values) < self.count:
            raise ValueError(f"response has {len(values)} values, {self.count} were requested")
        out: list[tuple[str, object]] = []
        for p in self.points:
            i = p.address - self.address
            if p.is_bit_table:
                out.append((p.name, bool(values[i])))
                continue
            regs = [int(v) for v in values[i : i + p.size]]
            raw = decode(regs, p.layout)
            out.append((p.name, apply_scale(raw, p.scale, p.offset)))
        return out


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
