"""The Modbus driver over RTU: a pymodbus serial server on one end of a socat PTY pair, the
driver (and afterwards mbpoll, with `-P none`) on the other. PTYs ignore baud and parity, so
these tests check framing and behaviour, not RS-485 timing.

Unit 5 is made silent by the server's `trace_packet` hook (modbus_server.py), like an absent
slave on a real line; unit 9 is unknown to pymodbus, which answers exception 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.modbus import ModbusDriver
from gateway.config import loads
from gateway.errors import DeviceProtocolError, DeviceTimeoutError, DeviceUnavailableError
from tests.drivers_modbus.support import (
    ModbusServer,
    PtyPair,
    RecordingContext,
    device_toml,
    mbpoll,
    type_matrix,
)

TABLES, POINTS, EXPECTED = type_matrix()


@pytest.fixture()
def line(tmp_path: Path) -> Iterator[tuple[PtyPair, ModbusServer]]:
    pty = PtyPair(tmp_path)
    srv = ModbusServer(
        tmp_path, {1: TABLES, 2: {"hr": [0] * 20, "co": [False] * 8}}, silent=[5], rtu=pty.a
    )
    try:
        srv.start()
        yield pty, srv
    finally:
        srv.stop()
        pty.stop()


def rtu(path: str) -> str:
    return f'port = "{path}"\nbaudrate = 19200\nparity = "N"'


def test_rtu_types_silent_unit_and_exception_4(line: tuple[PtyPair, ModbusServer]) -> None:
    pty, _ = line
    text = (
        device_toml("all", rtu(pty.b), POINTS, unit=1)
        + device_toml(
            "gone", rtu(pty.b), "[devices.gone.points.v]\naddress = 0\n", unit=5, timeout=0.3
        )
        + device_toml("ghost", rtu(pty.b), "[devices.ghost.points.v]\naddress = 0\n", unit=9)
    )
    s = loads(text).devices
    ctx = RecordingContext()

    async def main() -> dict[str, object]:
        drv = ModbusDriver(ctx)
        for spec in s.values():
            await drv.add_device(spec)
        try:
            assert len(drv._buses) == 1  # three units, one serial line, one lock
            with pytest.raises(DeviceTimeoutError):
                await drv.read("gone", s["gone"].points)
            with pytest.raises(DeviceProtocolError, match="SERVER DEVICE FAILURE"):
                await drv.read("ghost", s["ghost"].points)
            readings = await drv.read("all", s["all"].points)
        finally:
            await drv.stop()
        return {r.point: r.value for r in readings}

    got = asyncio.run(main())
    for name, want in EXPECTED.items():
        if isinstance(want, float):
            assert got[name] == pytest.approx(want), name
        else:
            assert got[name] == want, name


def test_rtu_write_is_read_back_by_mbpoll(line: tuple[PtyPair, ModbusServer]) -> None:
    pty, _ = line
    pts = """
[devices.w.points.level]
address = 3
type = "int32"
writable = true
verify = true
[devices.w.points.valve]
table = "coil"
address = 2
writable = true
"""
    spec = loads(device_toml("w", rtu(pty.b), pts, unit=2)).devices["w"]
    p = {pt.name: pt for pt in spec.points}

    async def main() -> None:
        drv = ModbusDriver(RecordingContext())
        await drv.add_device(spec)
        try:
            await drv.write("w", p["level"], -70000)
            await drv.write("w", p["valve"], True)
        finally:
            await drv.stop()  # closes the port: mbpoll opens the same PTY end next

    asyncio.run(main())
    base = ["-m", "rtu", "-b", "19200", "-P", "none", "-a", "2"]
    assert mbpoll(pty.b, *base, "-t", "4:int", "-B", "-r", "3", "-c", "1") == ["-70000"]
    assert mbpoll(pty.b, *base, "-t", "0", "-r", "2", "-c", "1") == ["1"]


def test_rtu_line_that_vanishes_and_returns(tmp_path: Path) -> None:
    # Like a USB RS-485 adapter unplugged and plugged back: the PTY pair and the server go
    # away (same paths afterwards); the breaker opens, then the driver reopens the port.
    pty = PtyPair(tmp_path)
    srv = ModbusServer(tmp_path, {1: {"hr": [42]}}, rtu=pty.a)
    text = device_toml(
        "m", rtu(pty.b), "[devices.m.points.v]\naddress = 0\n", timeout=0.3,
        breaker_threshold=2, breaker_cooldown=0.2, reconnect_delay=0.05,
        reconnect_delay_max=0.2,
    )  # fmt: skip
    spec = loads(text).devices["m"]
    ctx = RecordingContext()
    state = {"pty": pty}

    async def poll_until(drv: ModbusDriver, want: list[bool]) -> None:
        for _ in range(400):
            with contextlib.suppress(DeviceUnavailableError, DeviceTimeoutError):
                await drv.read("m", spec.points)
            if ctx.changes("m") == want:
                return
            await asyncio.sleep(0.02)  # the polling interval
        raise AssertionError(f"availability {ctx.changes('m')}, wanted {want}")

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(spec)
        try:
            assert [r.value for r in await drv.read("m", spec.points)] == [42]
            srv.stop()
            state["pty"].stop()
            await poll_until(drv, [True, False])
            state["pty"] = PtyPair(tmp_path)
            srv.start()
            await poll_until(drv, [True, False, True])
            assert [r.value for r in await drv.read("m", spec.points)] == [42]
        finally:
            await drv.stop()

    try:
        srv.start()
        asyncio.run(main())
    finally:
        srv.stop()
        state["pty"].stop()


def test_probe_over_rtu(
    line: tuple[PtyPair, ModbusServer], capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import main

    pty, _ = line
    base = ["probe", "modbus", "--serial", pty.b, "--parity", "N", "--unit", "2", "--json"]
    assert main([*base, "--address", "6", "--type", "uint32", "--write", "123456"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["value"] == 123456
    assert main([*base, "--address", "6", "--count", "2"]) == 0
    assert [r["value"] for r in json.loads(capsys.readouterr().out)] == [1, 57920]
