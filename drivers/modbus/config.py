"""A Modbus device's options and register map, read from its `[devices.<id>]` table. Pure.

Every problem is reported with its TOML path, all at once: unknown keys, a table or type that
does not exist, addresses out of range, overlapping points, a bit on a 32-bit type, a string
without a length, a write to a read-only table, a min/max the raw type cannot reach.

Device keys (besides the generic driver/interval/timeout/...):
  host, port (int, 502)              Modbus TCP; or
  port (path), baudrate (19200), parity ("E"), stopbits (1), bytesize (8)   Modbus RTU
  unit | device_id (1)               RTU 1..247, TCP 0..255
  frame_gap (s; RTU 3.5 chars, TCP 0), queue_size (16)      per bus: same for all its units
  retry = { initial = 0.5, cap = 30 } (s, full jitter)      per bus: reconnecting the link
  max_gap (10 registers; 16x for bits), max_registers (125), max_bits (2000)
  breaker = { threshold = 3, cooldown = 30 } (s), verify_writes (false)
  (before the shared tables: reconnect_delay, reconnect_delay_max, breaker_threshold,
  breaker_cooldown; still read, with a warning)
Point keys (besides unit/scale/offset/min/max/writable/...):
  table ("holding" | "input" | "coil" | "discrete_input"), address (0-based, required),
  type ("uint16"; bool, int16, uint16, int32, uint32, int64, uint64, float32, float64,
  string), word_order / byte_order ("big" | "little"), bit (0..15 of a 16-bit register),
  length (registers, strings only), verify (read back after a write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.base import device_options, point_options
from gateway.config import DeviceSpec, Issues, Section
from gateway.errors import ConfigError, ConfigIssue
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

from .plan import ModbusPoint
from .registers import (
    BIT_TABLES,
    INTEGER_TYPES,
    MAX_ADDRESS,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    NUMERIC,
    TABLES,
    TYPES,
    WRITABLE_TABLES,
    Layout,
    int_range,
)

PARITIES = ("N", "E", "O")

#: A bus reconnects after 0.5 s, doubling up to 30 s; a device's breaker opens after 3
#: failures in a row and rests 30 s.
RETRY = RetrySettings(initial=0.5, cap=30.0)
BREAKER = BreakerSettings(threshold=3, cooldown=30.0)
RETRY_OLD_KEYS = {"initial": "reconnect_delay", "cap": "reconnect_delay_max"}
BREAKER_OLD_KEYS = {"threshold": "breaker_threshold", "cooldown": "breaker_cooldown"}


@dataclass(frozen=True, slots=True)
class BusSettings:
    """The physical bus a device sits on; devices with the same `key` share one connection."""

    transport: str  # "tcp" | "rtu"
    host: str = ""
    port: int = 502
    serial_port: str = ""
    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    frame_gap: float = 0.0  # seconds of silence between frames on this bus
    queue_size: int = 16  # requests that may wait for the bus; more fail at once
    retry: RetrySettings = RETRY  # reconnecting the link

    @property
    def key(self) -> tuple[str, str]:
        if self.transport == "tcp":
            return ("tcp", f"{self.host}:{self.port}")
        return ("rtu", self.serial_port)

    @property
    def label(self) -> str:
        return self.key[1] if self.transport == "tcp" else f"rtu:{self.serial_port}"


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    unit: int
    timeout: float
    bus: BusSettings
    points: tuple[ModbusPoint, ...]
    max_gap: int = 10
    max_registers: int = MAX_READ_REGISTERS
    max_bits: int = MAX_READ_BITS
    breaker: BreakerSettings = BREAKER
    verify_writes: bool = False
    #: What the config check found worth a look (deprecated keys), not errors.
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False, repr=False)


def rtu_frame_gap(baudrate: int) -> float:
    """3.5 character times (11 bits each); fixed 1.75 ms above 19200 baud (Serial Line 2.5.1.1)."""
    return 0.00175 if baudrate > 19200 else 3.5 * 11 / baudrate


def parse_device(spec: DeviceSpec) -> DeviceConfig:
    """Read and check a Modbus device; raises ConfigError with every issue found."""
    sec, issues = device_options(spec)
    bus = _parse_bus(sec)
    unit = _parse_unit(sec, bus.transport)
    max_gap = sec.int("max_gap", 10, min=0, max=MAX_READ_REGISTERS)
    max_registers = sec.int("max_registers", MAX_READ_REGISTERS, min=1, max=MAX_READ_REGISTERS)
    max_bits = sec.int("max_bits", MAX_READ_BITS, min=1, max=MAX_READ_BITS)
    breaker = read_breaker(sec, BREAKER, old=BREAKER_OLD_KEYS)
    verify_writes = sec.bool("verify_writes", False)
    sec.done()

    points: list[ModbusPoint] = []
    for p in spec.points:
        psec = point_options(spec, p, issues)
        mp = _parse_point(spec, p.name, psec, verify_writes, max_registers)
        psec.done()
        if mp is not None:
            mp = ModbusPoint(
                name=mp.name, table=mp.table, address=mp.address, layout=mp.layout,
                scale=p.scale, offset=p.offset, min=p.min, max=p.max, writable=p.writable,
                verify=mp.verify,
            )  # fmt: skip
            _check_value_block(spec, p.name, mp, issues)
            points.append(mp)
    _check_overlaps(spec, points, issues)
    if issues:
        raise ConfigError(issues.items)
    return DeviceConfig(
        id=spec.id, unit=unit, timeout=spec.timeout, bus=bus, points=tuple(points),
        max_gap=max_gap, max_registers=max_registers, max_bits=max_bits,
        breaker=breaker, verify_writes=verify_writes, warnings=tuple(issues.warnings),
    )  # fmt: skip


def _parse_unit(sec: Section, transport: str) -> int:
    # `device_id` is pymodbus' word for it; accept either, not both.
    if sec.has("unit") and sec.has("device_id"):
        sec.error("device_id", "give the unit id once: `unit` or `device_id`, not both")
    key = "device_id" if sec.has("device_id") and not sec.has("unit") else "unit"
    sec.mark("unit", "device_id")
    # On a serial line 0 is broadcast (nobody answers) and 248..255 are reserved; behind
    # TCP, 0 and 255 commonly address the device itself.
    lo, hi = (1, 247) if transport == "rtu" else (0, 255)
    value: int = sec.int(key, 1, min=lo, max=hi)
    return value


def _parse_bus(sec: Section) -> BusSettings:
    queue_size = sec.int("queue_size", 16, min=1, max=10_000)
    retry = read_retry(sec, RETRY, old=RETRY_OLD_KEYS)
    if sec.has("host"):
        host = sec.str("host")
        port = sec.int("port", 502, min=1, max=65535)
        for key in ("baudrate", "parity", "stopbits", "bytesize"):
            if sec.has(key):
                sec.mark(key)
                sec.error(key, "is a serial (RTU) setting; this device uses Modbus TCP (`host`)")
        frame_gap = sec.float("frame_gap", 0.0, min=0, max=10)
        return BusSettings(
            transport="tcp", host=host, port=port, frame_gap=frame_gap, queue_size=queue_size,
            retry=retry,
        )  # fmt: skip
    # On a connection error, the other link keys are not judged (no "unknown key" noise).
    link_keys = ("port", "baudrate", "parity", "stopbits", "bytesize", "frame_gap")
    if not sec.has("port"):
        sec.mark(*link_keys)
        sec.error(
            "", "missing connection: set `host` (and `port`) for Modbus TCP, or `port` "
            "= a serial device path (e.g. /dev/serial/by-id/...) for Modbus RTU",
        )  # fmt: skip
        return BusSettings(transport="tcp")
    if not isinstance(sec.data["port"], str):
        sec.mark(*link_keys)
        sec.error("port", "without `host` this is Modbus RTU: `port` must be a serial device path")
        return BusSettings(transport="rtu")
    serial_port = sec.str("port")
    baudrate = sec.int("baudrate", 19200, min=50, max=4_000_000)
    parity = sec.str("parity", "E", choices=PARITIES)
    stopbits = sec.int("stopbits", 1, min=1, max=2)
    bytesize = sec.int("bytesize", 8, min=7, max=8)
    frame_gap = sec.float("frame_gap", rtu_frame_gap(baudrate), min=0, max=10)
    return BusSettings(
        transport="rtu", serial_port=serial_port, baudrate=baudrate, parity=parity,
        stopbits=stopbits, bytesize=bytesize, frame_gap=frame_gap, queue_size=queue_size,
        retry=retry,
    )  # fmt: skip


def _parse_point(
    spec: DeviceSpec, name: str, sec: Section, verify_default: bool, max_registers: int
) -> ModbusPoint | None:
    ok = True
    table = sec.str("table", "holding", choices=TABLES)
    address = sec.int("address", min=0, max=MAX_ADDRESS)
    bits = table in BIT_TABLES
    type_ = sec.str("type", "bool" if bits else "uint16", choices=TYPES)
    if table not in TABLES or type_ not in TYPES or not isinstance(address, int):
        ok = False
    if bits and type_ != "bool":
        sec.error("type", f"a {table} holds one bit: type must be 'bool', got {type_!r}")
        ok = False
    word_order = sec.str("word_order", "big", choices=["big", "little"])
    byte_order = sec.str("byte_order", "big", choices=["big", "little"])
    bit = sec.int("bit", None, min=0, max=15)
    length = sec.int("length", None, min=1, max=max_registers)
    verify = sec.bool("verify", verify_default)
    if bits:
        for key in ("word_order", "byte_order", "bit", "length"):
            if sec.has(key):
                sec.error(key, f"does not apply to a {table} (a single bit)")
                ok = False
    else:
        if type_ == "string" and length is None:
            sec.error("length", "a string needs its length in registers (`length = N`)")
            ok = False
        if type_ != "string" and sec.has("length"):
            sec.error("length", f"only a string has a length; {type_} has a fixed size")
            ok = False
        if bit is not None and type_ == "string":
            sec.error("bit", "a string has no bit index")
            ok = False
        elif bit is not None and type_ in NUMERIC and NUMERIC[type_][1] != 1:
            sec.error("bit", f"a bit index needs a 16-bit register; {type_} spans "
                             f"{NUMERIC[type_][1]} registers")  # fmt: skip
            ok = False
        if type_ == "string" and sec.has("word_order"):
            sec.error("word_order", "a string is text in register order; use byte_order")
            ok = False
        elif type_ in ("bool", "int16", "uint16") and sec.has("word_order"):
            sec.error("word_order", f"{type_} is a single register: it has no word order")
            ok = False
    if not ok or not 0 <= address <= MAX_ADDRESS:  # a bad address is reported already
        return None
    layout = Layout(
        type=type_, word_order=word_order, byte_order=byte_order, bit=bit,
        length=length if type_ == "string" else None,
    )  # fmt: skip
    end = address + (1 if bits else layout.registers) - 1
    if end > MAX_ADDRESS:
        sec.error("address", f"{type_} at {address} ends at {end}, past the last address 65535")
        return None
    return ModbusPoint(name=name, table=table, address=address, layout=layout, verify=verify)


def _check_value_block(spec: DeviceSpec, name: str, p: ModbusPoint, issues: Issues) -> None:
    path = spec.point_path(name)
    t = p.layout.type
    is_flag = p.is_bit_table or t == "bool" or p.layout.bit is not None
    if (is_flag or t == "string") and (p.scale != 1.0 or p.offset != 0.0):
        key = "scale" if p.scale != 1.0 else "offset"
        issues.add(f"{path}.{key}", f"a {'bit' if is_flag else 'string'} cannot be scaled")
    if (is_flag or t == "string") and (p.min is not None or p.max is not None):
        key = "min" if p.min is not None else "max"
        issues.add(f"{path}.{key}", f"a {'bit' if is_flag else 'string'} has no numeric range")
    if t in INTEGER_TYPES and not is_flag:
        # A limit the raw type cannot reach is a mistake in the map (wrong type or scale).
        lo, hi = int_range(t)
        ends = sorted((lo * p.scale + p.offset, hi * p.scale + p.offset))
        for key, limit in (("min", p.min), ("max", p.max)):
            if limit is not None and not ends[0] <= limit <= ends[1]:
                issues.add(
                    f"{path}.{key}",
                    f"{limit:g} is outside what {t} can hold here ({ends[0]:g}..{ends[1]:g}"
                    + (" after scale and offset)" if p.scale != 1 or p.offset != 0 else ")"),
                )
    if p.writable and p.table not in WRITABLE_TABLES:
        issues.add(f"{path}.writable", f"the {p.table} table is read-only in Modbus")


def _check_overlaps(spec: DeviceSpec, points: list[ModbusPoint], issues: Issues) -> None:
    # Bits of one register may be shared by flag points; anything else may not overlap.
    by_table: dict[str, list[ModbusPoint]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    for group in by_table.values():
        group.sort(key=lambda q: (q.address, q.end))
        for i, p in enumerate(group):
            for q in group[:i]:
                if q.end < p.address:
                    continue
                if (
                    p.layout.bit is not None
                    and q.layout.bit is not None
                    and p.address == q.address
                    and p.layout.bit != q.layout.bit
                ):
                    continue
                what = f"bit {p.layout.bit} of " if p.layout.bit is not None else ""
                issues.add(
                    f"{spec.point_path(p.name)}.address",
                    f"{what}{p.table} {p.address}..{p.end} overlaps point {q.name!r} "
                    f"({q.address}..{q.end})",
                )
                break
