"""`gatewayctl probe modbus`: read a range of a table as a type, or write one value, over
Modbus TCP or RTU, without touching the config. Goes through the driver itself (same codec,
same errors), so what the probe shows is what the gateway would read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from drivers.base import Clock, DiscoveredDevice, RawReading
from gateway.clock import SystemClock
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import ConfigError, ConfigIssue, PayloadError

from .registers import TABLES, TYPES, apply_scale, remove_scale


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "modbus",
        help="read or write registers of a Modbus TCP or RTU device",
        description="Read COUNT values of TYPE from a table, or write one value (--write).",
    )
    link = p.add_mutually_exclusive_group(required=True)
    link.add_argument("--host", help="Modbus TCP host")
    link.add_argument("--serial", metavar="PATH", help="serial port for Modbus RTU")
    p.add_argument("--port", type=int, default=502, help="TCP port (default 502)")
    p.add_argument("--baudrate", type=int, default=19200)
    p.add_argument("--parity", choices=["N", "E", "O"], default="E")
    p.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    p.add_argument("--bytesize", type=int, choices=[7, 8], default=8)
    p.add_argument("--unit", type=int, default=1, help="unit (device) id, default 1")
    p.add_argument("--table", choices=TABLES, default="holding")
    p.add_argument("--address", type=int, required=True, help="first address (0-based)")
    p.add_argument("--count", type=int, default=1, help="how many values of TYPE to read")
    p.add_argument("--type", dest="type_", choices=TYPES, default=None)
    p.add_argument("--word-order", choices=["big", "little"], default=None)
    p.add_argument("--byte-order", choices=["big", "little"], default=None)
    p.add_argument("--bit", type=int, default=None, help="a bit of each register (0-15)")
    p.add_argument("--length", type=int, default=None, help="registers per string")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--write", metavar="VALUE", default=None, help="write this value")
    p.add_argument("--verify", action="store_true", help="read back after --write")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per answer")
    p.set_defaults(func=run)


class _Context:
    def __init__(self) -> None:
        self.logger = logging.getLogger("gatewayctl.probe.modbus")
        if not self.logger.handlers:
            # The probe prints the error itself; without a handler, logging's last resort
            # would print the driver's WARNING a second time.
            self.logger.addHandler(logging.NullHandler())
        pymodbus = logging.getLogger("pymodbus")
        if not pymodbus.handlers:  # the same for pymodbus' own lines (a failed connect)
            pymodbus.addHandler(logging.NullHandler())
        self.clock: Clock = SystemClock()

    def emit(self, device_id: str, readings: Any) -> None:
        pass

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        pass

    def discovered(self, device: DiscoveredDevice) -> None:
        pass


def _spec(args: argparse.Namespace) -> DeviceSpec:
    try:
        return _build_spec(args)
    except ConfigError as exc:
        # Name the command-line option, not the TOML path of the throw-away device.
        raise ConfigError(ConfigIssue(_option(i.path), i.message) for i in exc.issues) from None


def _option(path: str) -> str:
    key = path.rsplit(".", 1)[-1]
    if key in ("", "probe"):
        return "arguments"
    if key == "port":
        return "--port/--serial"
    return "--" + key.replace("_", "-")


def _build_spec(args: argparse.Namespace) -> DeviceSpec:
    if args.count < 1 or args.count > 2000:
        raise PayloadError(f"--count must be 1..2000, got {args.count}")
    options: dict[str, Any] = {"unit": args.unit, "breaker": {"threshold": 1000}}
    if args.host:
        options.update(host=args.host, port=args.port)
    else:
        options.update(
            port=args.serial, baudrate=args.baudrate, parity=args.parity,
            stopbits=args.stopbits, bytesize=args.bytesize,
        )  # fmt: skip
    bits = args.table in ("coil", "discrete_input")
    type_ = args.type_ or ("bool" if bits else "uint16")
    point: dict[str, Any] = {"table": args.table, "type": type_}
    for key, value in (
        ("word_order", args.word_order), ("byte_order", args.byte_order),
        ("bit", args.bit), ("length", args.length),
    ):  # fmt: skip
        if value is not None:
            point[key] = value
    from .config import parse_device

    def make(i: int, address: int) -> PointSpec:
        return PointSpec(
            name=f"v{i}", scale=args.scale, offset=args.offset,
            writable=args.write is not None, options=dict(point, address=address),
        )  # fmt: skip

    # One value's size in registers comes from its validated layout (a ConfigError names any
    # bad combination, e.g. --bit with a 32-bit --type).
    first = parse_device(
        DeviceSpec("probe", "modbus", options=options, points=(make(0, args.address),))
    )
    size = 1 if bits or args.bit is not None else first.points[0].layout.registers
    count = 1 if args.write is not None else args.count
    points = [make(i, args.address + i * size) for i in range(count)]
    opts_v = dict(options, verify_writes=bool(args.verify))
    spec = DeviceSpec("probe", "modbus", timeout=args.timeout, options=opts_v, points=tuple(points))
    parse_device(spec)  # every problem at once, as a ConfigError
    return spec


def _parse_value(text: str, type_: str) -> object:
    if type_ == "string":
        return text
    if type_ == "bool":
        low = text.lower()
        if low in ("1", "true", "on", "yes"):
            return True
        if low in ("0", "false", "off", "no"):
            return False
        raise PayloadError(f"--write: {text!r} is not a boolean (1/0, true/false, on/off)")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise PayloadError(f"--write: {text!r} is not a number") from None


async def _probe(args: argparse.Namespace, spec: DeviceSpec) -> list[RawReading]:
    from . import ModbusDriver

    drv = ModbusDriver(_Context())
    await drv.start()
    try:
        await drv.add_device(spec)
        if args.write is not None:
            p = spec.points[0]
            flag = args.table in ("coil", "discrete_input") or args.bit is not None
            type_ = "bool" if flag else str(p.options["type"])
            value = _parse_value(args.write, type_)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and (args.scale != 1.0 or args.offset != 0.0):
                # Drivers take raw values: the probe undoes its own --scale/--offset.
                value = remove_scale(float(value), args.scale, args.offset)  # type: ignore[arg-type]
            await drv.write("probe", p, value)
        return await drv.read("probe", spec.points)
    finally:
        await drv.stop()


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    readings = asyncio.run(_probe(args, spec))
    addresses = {p.name: int(p.options["address"]) for p in spec.points}
    # The driver reads raw values (the collection service scales them in the daemon); the
    # probe shows what the gateway would store, so it scales here the same way.
    rows = [
        {
            "table": args.table,
            "address": addresses[r.point],
            "value": apply_scale(r.value, args.scale, args.offset)
            if isinstance(r.value, int | float)
            else r.value,
        }
        for r in readings
    ]
    rows.sort(key=lambda row: int(str(row["address"])))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.write is not None:
        print(f"wrote {args.write} to {args.table} {args.address} (unit {args.unit})")
    for row in rows:
        value = row["value"]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{row['table']:<15} {row['address']:>5}  {shown}")
    return 0
