"""A pymodbus server (TCP or RTU) for the Modbus driver's tests and benchmark; run as a process.

Usage: python modbus_server.py SPEC.json
SPEC: {"tcp": port} or {"rtu": path}, "units": {"1": {"hr": [...], "ir": [...], "co": [...],
"di": [...]}}, "silent": [unit, ...], "ready": path, "asked": path (optional: one line per
request to a silent unit, its unit id, so a test can count how often it was asked), "writes":
path (optional: one line per write request received, its function code).

Units not in "units" get pymodbus' own answer (exception 4, SERVER DEVICE FAILURE). Units in
"silent" get no answer at all, like an absent unit on a real RS-485 line: pymodbus 3.16's
`ignore_missing_devices` does not work for a dict of device contexts (the lookup raises
KeyError, answered with exception 4), so a `trace_packet` hook drops the response bytes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSimulatorContext,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer


def _block(values: list[Any], default: Any) -> ModbusSequentialDataBlock:
    # Data block address 1 is protocol address 0 (pymodbus 3.16).
    return ModbusSequentialDataBlock(1, list(values) or [default] * 10)  # type: ignore[no-untyped-call]


async def main(spec: dict[str, Any]) -> None:
    devices: dict[int, ModbusDeviceContext | ModbusSimulatorContext] = {}
    for unit, tables in spec["units"].items():
        devices[int(unit)] = ModbusDeviceContext(
            hr=_block(tables.get("hr", []), 0),
            ir=_block(tables.get("ir", []), 0),
            co=_block([bool(v) for v in tables.get("co", [])], False),
            di=_block([bool(v) for v in tables.get("di", [])], False),
        )
    context = ModbusServerContext(devices=devices, single=False)
    silent = {int(u) for u in spec.get("silent", [])}
    rtu = "rtu" in spec
    asked = spec.get("asked")

    writes = spec.get("writes")

    def trace_packet(sending: bool, data: bytes) -> bytes:
        if writes and not sending and data:
            fc = data[1] if rtu else (data[7] if len(data) > 7 else -1)
            if fc in (5, 6, 15, 16):  # write coil(s) / register(s): one line per request
                with open(writes, "a") as f:
                    f.write(f"{fc}\n")
        if sending and data:
            unit = data[0] if rtu else (data[6] if len(data) > 6 else -1)
            if unit in silent:
                if asked:
                    with open(asked, "a") as f:
                        f.write(f"{unit}\n")
                return b""
        return data

    server: ModbusTcpServer | ModbusSerialServer
    if rtu:
        server = ModbusSerialServer(
            context, port=spec["rtu"], baudrate=19200, parity="N", trace_packet=trace_packet
        )
    else:
        server = ModbusTcpServer(
            context, address=("127.0.0.1", int(spec["tcp"])), trace_packet=trace_packet
        )
    await server.serve_forever(background=True)
    if spec.get("ready"):
        with open(spec["ready"], "w") as f:  # noqa: ASYNC230 - once, before serving anyone
            f.write("ready")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
