"""Helpers for the Modbus driver's tests: the pymodbus server process, a socat PTY pair and
mbpoll (the recording DriverContext is `drivers.testing.RecordingContext`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tests.support.peers import Peer, free_port, require_binary, wait_until

SERVER = Path(__file__).with_name("modbus_server.py")


class ModbusServer:
    """A pymodbus server in its own process (so a test can kill and restart it)."""

    def __init__(
        self,
        tmp: Path,
        units: dict[int, dict[str, list[Any]]],
        *,
        silent: Sequence[int] = (),
        rtu: str | None = None,
        port: int | None = None,
        name: str = "server",
    ) -> None:
        self.tmp = tmp
        self.name = name
        self.rtu = rtu
        self.port = port if port is not None else (0 if rtu else free_port())
        self.ready = tmp / f"{name}.ready"
        self.asked_log = tmp / f"{name}.asked"
        spec: dict[str, Any] = {
            "units": {str(u): t for u, t in units.items()},
            "silent": list(silent),
            "ready": str(self.ready),
            "asked": str(self.asked_log),
            "writes": str(tmp / f"{name}.writes"),
        }
        spec.update({"rtu": rtu} if rtu else {"tcp": self.port})
        self.spec_path = tmp / f"{name}.json"
        self.spec_path.write_text(json.dumps(spec))
        self.peer: Peer | None = None
        self.starts = 0

    def start(self) -> ModbusServer:
        self.ready.unlink(missing_ok=True)
        self.starts += 1
        log = self.tmp / f"{self.name}.{self.starts}.log"
        self.peer = Peer([sys.executable, str(SERVER), str(self.spec_path)], log=log)
        peer = self.peer

        def up() -> bool:
            if not peer.alive():
                raise AssertionError(f"modbus server exited: {log.read_text()[-2000:]}")
            return self.ready.exists()

        wait_until(up, f"pymodbus server {self.name}")
        return self

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None

    def writes(self) -> int:
        """How many write requests the server has received (any unit)."""
        path = self.tmp / f"{self.name}.writes"
        return len(path.read_text().split()) if path.exists() else 0

    def asked(self, unit: int) -> int:
        """How many requests a silent unit has received (and left unanswered)."""
        if not self.asked_log.exists():
            return 0
        return self.asked_log.read_text().split().count(str(unit))


class PtyPair:
    """Two linked pseudo-terminals from socat: `a` for the server, `b` for the master."""

    def __init__(self, tmp: Path) -> None:
        socat = require_binary("socat")
        self.a = str(tmp / "ttyA")
        self.b = str(tmp / "ttyB")
        self.peer = Peer(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            log=tmp / "socat.log",
        )
        wait_until(lambda: Path(self.a).exists() and Path(self.b).exists(), "socat PTY pair")

    def stop(self) -> None:
        self.peer.stop()


def mbpoll(target: str, *args: str) -> list[str]:
    """Run mbpoll once against `target` (host or serial device, zero-based references) and
    return the values it printed, in order (its "[ref]: value" lines)."""
    exe = require_binary("mbpoll")
    out = subprocess.run(
        [exe, "-1", "-0", "-o", "2", *args, target], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise AssertionError(f"mbpoll {args} failed ({out.returncode}): {out.stdout}{out.stderr}")
    values = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("[") and "]:" in line:
            values.append(line.split("]:", 1)[1].strip())
    return values


# --------------------------------------------------------------------------------------------
# A register map holding every raw type in every word/byte order. The server's registers are
# laid out with pymodbus' own encoder (`convert_to_registers`, word order only) plus a byte
# swap per register done here, so the driver's codec is checked against another implementation.
# --------------------------------------------------------------------------------------------

SAMPLES: dict[str, Any] = {
    "int16": -1234,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -1_234_567_890_123,
    "uint64": 12_345_678_901_234_567_890,
    "float32": 3.5,
    "float64": -1234.5678,
}
Order = Literal["big", "little"]
ORDERS: list[tuple[Order, Order]] = [
    ("big", "big"),
    ("little", "big"),
    ("big", "little"),
    ("little", "little"),
]


def _swap(regs: list[int]) -> list[int]:
    return [((r & 0xFF) << 8) | (r >> 8) for r in regs]


def type_matrix() -> tuple[dict[str, list[Any]], str, dict[str, Any]]:
    """(server tables, TOML points, expected values) for a map of every type and order."""
    from pymodbus.client import ModbusTcpClient

    dt = ModbusTcpClient.DATATYPE
    hr: list[int] = []
    toml: list[str] = []
    expected: dict[str, Any] = {}
    for type_, value in SAMPLES.items():
        for word, byte in ORDERS:
            if type_.endswith("16") and word == "little":
                continue  # one register: no word order
            regs = ModbusTcpClient.convert_to_registers(value, dt[type_.upper()], word_order=word)
            if byte == "little":
                regs = _swap(regs)
            name = f"{type_}_{word[0]}{byte[0]}"
            toml.append(
                f'[devices.DEV.points.{name}]\naddress = {len(hr)}\ntype = "{type_}"\n'
                + (f'word_order = "{word}"\n' if not type_.endswith("16") else "")
                + f'byte_order = "{byte}"\n'
            )
            expected[name] = value
            hr += regs
    for byte in ("big", "little"):
        regs = [*ModbusTcpClient.convert_to_registers("Hello", dt.STRING), 0]
        if byte == "little":
            regs = _swap(regs)
        name = f"text_{byte[0]}"
        toml.append(
            f'[devices.DEV.points.{name}]\naddress = {len(hr)}\ntype = "string"\n'
            f'length = {len(regs)}\nbyte_order = "{byte}"\n'
        )
        expected[name] = "Hello"
        hr += regs
    # flags in one register, and a scaled value
    toml.append(f"[devices.DEV.points.flag3]\naddress = {len(hr)}\nbit = 3\n")
    toml.append(f"[devices.DEV.points.flag4]\naddress = {len(hr)}\nbit = 4\n")
    expected["flag3"], expected["flag4"] = True, False
    hr.append(0b1000)
    toml.append(
        f'[devices.DEV.points.temp]\naddress = {len(hr)}\ntype = "int16"\n'
        "scale = 0.1\noffset = -40.0\n"
    )
    expected["temp"] = 215  # raw: scale and offset are the collection service's job
    hr.append(215)
    # the other tables
    toml.append('[devices.DEV.points.ir]\ntable = "input"\naddress = 2\ntype = "uint32"\n')
    expected["ir"] = 0x0001_0002
    toml.append('[devices.DEV.points.coil5]\ntable = "coil"\naddress = 5\n')
    toml.append('[devices.DEV.points.coil6]\ntable = "coil"\naddress = 6\n')
    expected["coil5"], expected["coil6"] = True, False
    toml.append('[devices.DEV.points.di9]\ntable = "discrete_input"\naddress = 9\n')
    expected["di9"] = True
    tables: dict[str, list[Any]] = {
        "hr": hr + [0] * 50,
        "ir": [0, 0, 1, 2, 0, 0],
        "co": [i == 5 for i in range(16)],
        "di": [i == 9 for i in range(16)],
    }
    return tables, "\n".join(toml), expected


def device_toml(dev: str, connection: str, points: str = "", **options: Any) -> str:
    """A `[devices.<dev>]` table for the driver (options as TOML literals)."""
    lines = [f"[devices.{dev}]", 'driver = "modbus"', connection]
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n\n" + points.replace("DEV", dev) + "\n"
