"""The Modbus driver against a pymodbus TCP server (a separate process) and mbpoll (libmodbus).

The "silent unit" server is pymodbus with a `trace_packet` hook that drops the answers to
one unit id (see modbus_server.py): a real RS-485 slave that is absent stays silent, while
pymodbus itself answers an unknown unit with exception 4.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.modbus import ModbusDriver
from gateway.config import DeviceSpec, loads
from gateway.errors import (
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    PayloadError,
)
from tests.drivers_modbus.support import (
    ModbusServer,
    RecordingContext,
    device_toml,
    mbpoll,
    type_matrix,
)

TABLES, POINTS, EXPECTED = type_matrix()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModbusServer]:
    tmp = tmp_path_factory.mktemp("mbtcp")
    writable = {"hr": [0] * 40, "co": [False] * 16}
    srv = ModbusServer(
        tmp, {1: TABLES, 2: writable, 3: {"hr": [7, 8, 9]}}, silent=[5], name="tcp"
    ).start()
    yield srv
    srv.stop()


def specs(text: str) -> dict[str, DeviceSpec]:
    return dict(loads(text).devices)


def tcp(port: int) -> str:
    return f'host = "127.0.0.1"\nport = {port}'


def test_every_type_and_order_decodes(server: ModbusServer) -> None:
    spec = specs(device_toml("all", tcp(server.port), POINTS, unit=1))["all"]

    async def main() -> dict[str, object]:
        drv = ModbusDriver(RecordingContext())
        await drv.start()
        try:
            await drv.add_device(spec)
            # The whole map (holding, input, coil and discrete input) coalesces into 4 reads.
            assert len(drv.plan("all")) == 4
            readings = await drv.read("all", spec.points)
            assert next(iter(drv._buses.values())).requests == 4  # on the wire, too
        finally:
            await drv.stop()
        return {r.point: r.value for r in readings}

    got = asyncio.run(main())
    assert set(got) == set(EXPECTED)
    for name, want in EXPECTED.items():
        if isinstance(want, float):
            assert got[name] == pytest.approx(want), name
        else:
            assert got[name] == want, name


WRITE_POINTS = """
[devices.w.points.setpoint]
address = 0
type = "int16"
scale = 0.1
min = -50.0
max = 120.0
writable = true
verify = true

[devices.w.points.ratio]
address = 2
type = "float32"
writable = true

[devices.w.points.total]
address = 4
type = "uint32"
word_order = "little"
writable = true

[devices.w.points.enable]
address = 10
bit = 2
writable = true
verify = true

[devices.w.points.relay]
table = "coil"
address = 3
writable = true
verify = true

[devices.w.points.label]
address = 12
type = "string"
length = 3
writable = true

[devices.w.points.status]
address = 20

[devices.w.points.mode]
address = 22
type = "bool"
writable = true
verify = true
"""


def test_writes_are_read_back_by_mbpoll(server: ModbusServer) -> None:
    spec = specs(device_toml("w", tcp(server.port), WRITE_POINTS, unit=2))["w"]
    p = {pt.name: pt for pt in spec.points}

    async def main() -> None:
        drv = ModbusDriver(RecordingContext())
        await drv.start()
        try:
            await drv.add_device(spec)
            # Drivers take raw values: 21.5 with scale 0.1 is 215 (services.points undoes
            # scale and offset, once, and judges min/max before any driver)
            await drv.write("w", p["setpoint"], 215)
            await drv.write("w", p["ratio"], -0.75)
            await drv.write("w", p["total"], 100_000)
            await drv.write("w", p["enable"], True)
            await drv.write("w", p["relay"], True)
            await drv.write("w", p["label"], "AB")
            await drv.write("w", p["mode"], True)
            with pytest.raises(PayloadError, match="not writable"):
                await drv.write("w", p["status"], 1)
            with pytest.raises(PayloadError, match="number"):
                await drv.write("w", p["ratio"], "fast")
            got = {r.point: r.value for r in await drv.read("w", spec.points)}
            assert got["setpoint"] == 215 and got["enable"] is True
        finally:
            await drv.stop()

    asyncio.run(main())
    base = ["-m", "tcp", "-p", str(server.port), "-a", "2"]
    assert mbpoll("127.0.0.1", *base, "-t", "4", "-r", "0", "-c", "1") == ["215"]
    assert (
        float(mbpoll("127.0.0.1", *base, "-t", "4:float", "-B", "-r", "2", "-c", "1")[0]) == -0.75
    )
    # word_order little is mbpoll's default for 32-bit values (no -B)
    assert mbpoll("127.0.0.1", *base, "-t", "4:int", "-r", "4", "-c", "1") == ["100000"]
    assert mbpoll("127.0.0.1", *base, "-t", "4", "-r", "10", "-c", "1") == ["4"]
    assert mbpoll("127.0.0.1", *base, "-t", "0", "-r", "3", "-c", "1") == ["1"]
    assert mbpoll("127.0.0.1", *base, "-t", "4:hex", "-r", "12", "-c", "2") == ["0x4142", "0x0000"]
    assert mbpoll("127.0.0.1", *base, "-t", "4", "-r", "22", "-c", "1") == ["1"]


def test_exception_response_is_a_protocol_error(
    server: ModbusServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Unit 3 holds 3 registers: reading register 100 is ILLEGAL DATA ADDRESS. The unit is
    # alive, so its breaker stays closed and it stays available.
    pts = "[devices.x.points.far]\naddress = 100\n"
    spec = specs(device_toml("x", tcp(server.port), pts, unit=3, breaker_threshold=2))["x"]
    ctx = RecordingContext("test.modbus.exc")

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(spec)
        try:
            for _ in range(3):
                with pytest.raises(DeviceProtocolError, match="ILLEGAL DATA ADDRESS") as info:
                    await drv.read("x", spec.points)
                assert info.value.code == 2
        finally:
            await drv.stop()

    with caplog.at_level(logging.DEBUG, logger="test.modbus.exc"):
        asyncio.run(main())
    records = [r for r in caplog.records if r.name == "test.modbus.exc"]
    levels = [r.levelno for r in records if "ILLEGAL DATA ADDRESS" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert ctx.changes("x") == []


def test_unknown_unit_exception_4_opens_the_breaker(server: ModbusServer) -> None:
    # pymodbus answers a unit it does not serve with exception 4 (SERVER DEVICE FAILURE).
    pts = "[devices.ghost.points.v]\naddress = 0\n"
    spec = specs(
        device_toml(
            "ghost", tcp(server.port), pts, unit=9, breaker_threshold=2, breaker_cooldown=3600.0
        )
    )["ghost"]
    ctx = RecordingContext()

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(spec)
        try:
            for _ in range(2):
                with pytest.raises(DeviceProtocolError, match="SERVER DEVICE FAILURE") as info:
                    await drv.read("ghost", spec.points)
                assert info.value.code == 4
            bus = next(iter(drv._buses.values()))
            sent = bus.requests
            with pytest.raises(DeviceUnavailableError, match="circuit open"):
                await drv.read("ghost", spec.points)
            assert bus.requests == sent  # an open breaker costs the bus nothing
        finally:
            await drv.stop()

    asyncio.run(main())
    assert ctx.changes("ghost") == [False]


def test_silent_unit_times_out_and_its_neighbour_keeps_working(server: ModbusServer) -> None:
    text = device_toml(
        "silent",
        tcp(server.port),
        "[devices.silent.points.v]\naddress = 0\n",
        unit=5,
        timeout=1.0,
        breaker_threshold=2,
        breaker_cooldown=3600.0,
    ) + device_toml("alive", tcp(server.port), "[devices.alive.points.v]\naddress = 0\n", unit=3)
    s = specs(text)
    ctx = RecordingContext()

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(s["silent"])
        await drv.add_device(s["alive"])
        try:
            assert len(drv._buses) == 1  # one host:port, one connection, one lock
            for _ in range(2):
                # bounded like the collection service bounds a read: by the device's timeout;
                # the driver's own DeviceTimeoutError comes first, so the breaker counts it
                with pytest.raises(DeviceTimeoutError, match="no answer"):
                    await asyncio.wait_for(drv.read("silent", s["silent"].points), 1.0)
                # the shared connection survives the other unit's silence
                assert [r.value for r in await drv.read("alive", s["alive"].points)] == [7]
            with pytest.raises(DeviceUnavailableError, match="circuit open"):
                await drv.read("silent", s["silent"].points)
            assert [r.value for r in await drv.read("alive", s["alive"].points)] == [7]
        finally:
            await drv.stop()

    asyncio.run(main())
    assert ctx.changes("silent") == [False]
    assert ctx.changes("alive") == [True]


def _short_and_long(port: int) -> dict[str, DeviceSpec]:
    # "long" (3 s) opens the link; "short" (0.3 s) is the silent unit 5 on the same link.
    return specs(
        device_toml("long", tcp(port), "[devices.long.points.v]\naddress = 0\n", unit=3,
                    timeout=3.0)
        + device_toml("short", tcp(port), "[devices.short.points.v]\naddress = 0\n", unit=5,
                      timeout=0.3, breaker_threshold=2, breaker_cooldown=3600.0)
    )  # fmt: skip


def test_each_request_waits_for_its_own_devices_timeout(server: ModbusServer) -> None:
    s = _short_and_long(server.port)
    ctx = RecordingContext()

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(s["long"])
        await drv.add_device(s["short"])
        try:
            assert [r.value for r in await drv.read("long", s["long"].points)] == [7]
            for _ in range(2):
                # Bounded like the collection service bounds a poll: the driver's DeviceTimeoutError
                # (its own 0.3 s, not the 3 s of the device that opened the link) comes first.
                with pytest.raises(DeviceTimeoutError, match=r"no answer to read .*unit 5"):
                    async with asyncio.timeout(s["short"].timeout):
                        await drv.read("short", s["short"].points)
            with pytest.raises(DeviceUnavailableError, match="circuit open"):
                await drv.read("short", s["short"].points)
            assert [r.value for r in await drv.read("long", s["long"].points)] == [7]
        finally:
            await drv.stop()

    asyncio.run(main())
    assert ctx.changes("short") == [False]


def test_a_timeout_cut_short_by_the_poll_deadline_counts_for_the_breaker(
    server: ModbusServer,
) -> None:
    s = _short_and_long(server.port)
    ctx = RecordingContext()

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(s["long"])
        await drv.add_device(s["short"])
        loop = asyncio.get_running_loop()
        try:
            await drv.read("long", s["long"].points)
            for _ in range(2):
                # A stalled loop (a blocking call elsewhere) wakes up past both the driver's
                # deadline and the poll's: the poll's cancellation may win. The unit still did
                # not answer in time, and the breaker must count it.
                loop.call_soon(time.sleep, s["short"].timeout * 2)
                with pytest.raises((TimeoutError, DeviceTimeoutError)):
                    async with asyncio.timeout(s["short"].timeout):
                        await drv.read("short", s["short"].points)
            with pytest.raises(DeviceUnavailableError, match="circuit open"):
                await drv.read("short", s["short"].points)
        finally:
            await drv.stop()

    asyncio.run(main())
    assert ctx.changes("short") == [False]


def test_bounded_queue_fails_fast(server: ModbusServer) -> None:
    text = device_toml(
        "q", tcp(server.port), "[devices.q.points.v]\naddress = 0\n", unit=3, queue_size=1
    )
    spec = specs(text)["q"]

    ctx = RecordingContext()

    async def main() -> list[object]:
        drv = ModbusDriver(ctx)
        await drv.add_device(spec)
        try:
            return await asyncio.gather(
                *(drv.read("q", spec.points) for _ in range(5)), return_exceptions=True
            )
        finally:
            await drv.stop()

    results = asyncio.run(main())
    busy = [r for r in results if isinstance(r, DeviceUnavailableError)]
    ok = [r for r in results if isinstance(r, list)]
    assert busy and all("bus busy" in str(r) for r in busy)
    assert len(ok) == 2  # the one holding the bus and the one waiting
    assert len(busy) + len(ok) == 5
    assert ctx.changes("q") == [True]  # a full queue says nothing about the device


def test_killed_server_opens_the_breaker_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = ModbusServer(tmp_path, {1: {"hr": [11, 12]}}, name="a").start()
    b = ModbusServer(tmp_path, {1: {"hr": [21, 22]}}, name="b").start()
    text = device_toml(
        "a", tcp(a.port), "[devices.a.points.v]\naddress = 0\n", timeout=0.5,
        breaker_threshold=2, breaker_cooldown=0.2, reconnect_delay=0.05,
        reconnect_delay_max=0.2,
    ) + device_toml("b", tcp(b.port), "[devices.b.points.v]\naddress = 1\n")  # fmt: skip
    s = specs(text)
    ctx = RecordingContext("test.modbus.kill")

    async def poll_until(drv: ModbusDriver, done: object, what: str) -> tuple[int, int]:
        """Poll both devices like the collection service would, until `done()`."""
        a_fails = 0
        for b_reads in range(1, 401):
            try:
                await drv.read("a", s["a"].points)
            except (DeviceUnavailableError, DeviceTimeoutError):
                a_fails += 1
            assert [r.value for r in await drv.read("b", s["b"].points)] == [22]
            if done():  # type: ignore[operator]
                return b_reads, a_fails
            await asyncio.sleep(0.02)  # the polling interval
        raise AssertionError(f"timed out waiting for {what}")

    async def main() -> None:
        drv = ModbusDriver(ctx)
        await drv.add_device(s["a"])
        await drv.add_device(s["b"])
        try:
            assert [r.value for r in await drv.read("a", s["a"].points)] == [11]
            a.stop()
            await poll_until(drv, lambda: ctx.changes("a") == [True, False], "breaker open")
            a.start()  # same port
            await poll_until(drv, lambda: ctx.changes("a") == [True, False, True], "recovery")
            assert [r.value for r in await drv.read("a", s["a"].points)] == [11]
        finally:
            await drv.stop()

    try:
        with caplog.at_level(logging.DEBUG, logger="test.modbus.kill"):
            asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    assert ctx.changes("b") == [True]
    records = [r for r in caplog.records if r.name == "test.modbus.kill"]
    assert [r.levelno for r in records if r.levelno >= logging.INFO] == [
        logging.WARNING, logging.INFO,
    ]  # fmt: skip
    assert "recovered" in records[-1].getMessage()


def test_tcp_link_where_nobody_answers_is_reopened(server: ModbusServer) -> None:
    pts = "[devices.mute.points.v]\naddress = 0\n"
    spec = specs(
        device_toml("mute", tcp(server.port), pts, unit=5, timeout=0.2, breaker_threshold=10)
    )["mute"]

    async def main() -> None:
        drv = ModbusDriver(RecordingContext())
        await drv.add_device(spec)
        try:
            bus = next(iter(drv._buses.values()))
            for _ in range(2):
                with pytest.raises(DeviceTimeoutError):
                    await drv.read("mute", spec.points)
            assert bus._client is not None and bus._client.connected
            with pytest.raises(DeviceTimeoutError):
                await drv.read("mute", spec.points)
            assert not bus._client.connected  # third time-out in a row: dropped
            with pytest.raises(DeviceTimeoutError):  # reopened, and still silent
                await drv.read("mute", spec.points)
        finally:
            await drv.stop()

    asyncio.run(main())
