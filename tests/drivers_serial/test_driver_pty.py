"""SerialDriver over a real PTY pair from socat: the driver opens ttyA, the test is the device
on ttyB. Readings are awaited as they are emitted (no sleeps as synchronisation)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.serial import SerialDriver
from gateway import config
from gateway.config import DeviceSpec
from gateway.errors import DeviceTimeoutError, DeviceUnavailableError
from tests.drivers_serial.ptys import PtyPair, RecordingContext

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
GGA_BAD = b"$GPGGA,123519,4807.038,N,01131.000,E,1,09,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


def device(port: Path, body: str, dev_id: str = "dev") -> DeviceSpec:
    text = f'[devices.{dev_id}]\ndriver = "serial"\nport = "{port}"\n' + body
    return config.loads(text).devices[dev_id]


async def started(ctx: RecordingContext, spec: DeviceSpec) -> SerialDriver:
    drv = SerialDriver(ctx)
    await drv.start()
    await drv.add_device(spec)
    assert await ctx.next_state() == (True, "")
    return drv


LINES = """
retry = { initial = 0.05, cap = 0.2 }
framing = { type = "delimiter", delimiter = "\\r\\n" }
parser = { type = "regex", pattern = 'T=(?P<temp>-?[0-9.]+) H=(?P<hum>[0-9]+)' }
[devices.dev.points.temperature]
field = "temp"
unit = "Cel"
[devices.dev.points.humidity]
field = "hum"
type = "float"
"""


def test_delimited_lines_are_emitted_and_read(pty: PtyPair) -> None:
    async def main() -> None:
        ctx = RecordingContext()
        drv = await started(ctx, device(pty.a, LINES))
        fd = pty.open_device_end()
        try:
            spec = drv.devices["dev"].spec
            assert await drv.read("dev", spec.points) == []  # nothing heard yet
            # One line split over two writes, then two lines in one write.
            os.write(fd, b"T=21.5 ")
            os.write(fd, b"H=40\r\n")
            assert await ctx.next_readings() == {"temperature": 21.5, "humidity": 40.0}
            os.write(fd, b"T=-3 H=41\r\nT=22.0 H=42\r\n")
            assert await ctx.next_readings() == {"temperature": -3, "humidity": 41.0}
            assert await ctx.next_readings() == {"temperature": 22.0, "humidity": 42.0}
            latest = await drv.read("dev", spec.points)
            assert {r.point: r.value for r in latest} == {"temperature": 22.0, "humidity": 42.0}
            assert all(r.ts is not None for r in latest)
            assert drv.stats("dev").frames == 4 - 1
            assert drv.stats("dev").malformed == 0
        finally:
            os.close(fd)
            await drv.stop()

    asyncio.run(main())


NMEA = """
framing = { delimiter = "\\r\\n", max_frame = 128 }
parser = { type = "nmea" }
[devices.dev.points.lat]
field = "gga.lat"
[devices.dev.points.sats]
field = "gga.satellites"
[devices.dev.points.speed]
field = "rmc.speed_knots"
"""


def test_nmea_good_bad_checksums_and_garbage(
    pty: PtyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.driver.serial.test")

    async def main() -> None:
        ctx = RecordingContext()
        drv = await started(ctx, device(pty.a, NMEA))
        fd = pty.open_device_end()
        try:
            os.write(fd, GGA)
            got = await ctx.next_readings()
            assert got == {"lat": pytest.approx(48.1173), "sats": 8}
            # A corrupted sentence (one digit changed, checksum no longer matches), line
            # noise, binary garbage longer than any frame, then a good sentence.
            os.write(fd, GGA_BAD)
            os.write(fd, b"\x00\xff\xfe garbage \x81\r\n")
            os.write(fd, bytes(range(256)).replace(b"\n", b"") * 2)
            os.write(fd, b"\r\n" + RMC)
            # The bad frames were skipped: the next emission is the RMC's.
            assert await ctx.next_readings() == {"speed": 22.4}
            st = drv.stats("dev")
            assert st.frames == 2
            assert st.malformed == 3
            assert ctx.readings.empty()
        finally:
            os.close(fd)
            await drv.stop()

    asyncio.run(main())
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("checksum mismatch" in m for m in debug)
    assert any("longer than 128 bytes" in m for m in debug)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def ubx(cls: int, msg_id: int, payload: bytes) -> bytes:
    """A u-blox UBX frame: sync chars 0xB5 0x62, class, id, length (LE), payload, Fletcher-8."""
    body = bytes([cls, msg_id]) + len(payload).to_bytes(2, "little") + payload
    a = b = 0
    for byte in body:
        a = (a + byte) & 0xFF
        b = (b + a) & 0xFF
    return b"\xb5\x62" + body + bytes([a, b])


# NAV-PVT-like payloads holding '$' and '!' (0x24, 0x21), CR and LF bytes and non-ASCII.
UBX_1 = ubx(0x01, 0x07, bytes([0x24, 0x00, 0xFF, 0x21, 0x0D, 0x80, 0x0A, 0x24, 0x47]) * 10)
UBX_2 = ubx(0x01, 0x35, bytes([0x21, 0x24, 0xB5, 0x62, 0x2A, 0x30, 0x0A, 0x0D]) * 6)


def test_nmea_right_after_binary_ubx_frames_is_read(pty: PtyPair) -> None:
    async def main() -> None:
        ctx = RecordingContext()
        drv = await started(ctx, device(pty.a, NMEA))
        fd = pty.open_device_end()
        try:
            # A u-blox receiver: binary UBX, then a sentence, no line break between them.
            os.write(fd, UBX_1 + GGA + UBX_2 + RMC)
            assert await ctx.next_readings() == {"lat": pytest.approx(48.1173), "sats": 8}
            assert await ctx.next_readings() == {"speed": 22.4}
            st = drv.stats("dev")
            assert st.frames == 2
            assert st.malformed == 2  # the two binary runs, counted, not silently dropped
        finally:
            os.close(fd)
            await drv.stop()

    asyncio.run(main())


def test_port_vanishes_and_comes_back(pty: PtyPair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.driver.serial.test")

    async def main() -> None:
        ctx = RecordingContext()
        drv = await started(ctx, device(pty.a, LINES))
        spec = drv.devices["dev"].spec
        fd = pty.open_device_end()
        os.write(fd, b"T=20.0 H=50\r\n")
        assert await ctx.next_readings() == {"temperature": 20.0, "humidity": 50.0}
        os.close(fd)
        try:
            # Unplugged: socat exits and its PTYs and links are gone.
            await asyncio.to_thread(pty.stop)
            up, why = await ctx.next_state()
            assert (not up and "disconnected" in why) or "failed" in why
            with pytest.raises(DeviceUnavailableError):
                await drv.read("dev", spec.points)
            # Plugged back in on the same path: the driver reopens it by itself.
            await asyncio.to_thread(pty.start)
            assert await ctx.next_state() == (True, "")
            fd = pty.open_device_end()
            os.write(fd, b"T=20.5 H=51\r\n")
            assert await ctx.next_readings() == {"temperature": 20.5, "humidity": 51.0}
            os.close(fd)
            assert ctx.states.empty()  # one change each way, however many attempts
        finally:
            await drv.stop()

    asyncio.run(main())
    ours = [r for r in caplog.records if r.name == "gateway.driver.serial.test"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lost" in warnings[0].getMessage()
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert "reopened" in infos[-1]
    assert not [r for r in ours if r.levelno >= logging.ERROR]


def test_port_missing_at_start_is_opened_when_it_appears(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path)

    async def main() -> None:
        ctx = RecordingContext()
        drv = SerialDriver(ctx)
        await drv.add_device(device(pair.a, LINES))
        try:
            up, why = await ctx.next_state()
            assert not up and "No such file" in why
            await asyncio.to_thread(pair.start)
            assert await ctx.next_state() == (True, "")
        finally:
            await drv.stop()

    try:
        asyncio.run(main())
    finally:
        pair.stop()


REQUEST = """
mode = "request"
request = "READ?\\r\\n"
timeout = 5.0
response_timeout = 0.5
framing = { delimiter = "\\n" }
parser = { type = "csv", columns = ["id", "temp", "", "state"] }
[devices.dev.points.temperature]
field = "temp"
[devices.dev.points.state]
field = "state"
type = "bool"
[devices.dev.points.setpoint]
writable = true
field = "id"
type = "str"
command = "SP {value}\\r\\n"
"""


class Responder:
    """The device on ttyB: answers each query line from a script of replies."""

    def __init__(self, fd: int, replies: dict[bytes, list[bytes]]) -> None:
        self.fd = fd
        self.replies = replies
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self._buf = b""
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        self._buf += os.read(self.fd, 1024)
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            line += b"\n"
            self.received.put_nowait(line)
            script = self.replies.get(line)
            if script:
                os.write(self.fd, script.pop(0))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


def test_request_response(pty: PtyPair) -> None:
    async def main() -> None:
        ctx = RecordingContext()
        drv = await started(ctx, device(pty.a, REQUEST))
        spec = drv.devices["dev"].spec
        dev = Responder(
            pty.open_device_end(),
            {b"READ?\r\n": [
                b"A7,21.5,x,on\n" + b"A7,99,x,on\n",  # the answer, then chatter
                b"not,csv\n" + b"A7,21.75,x,off\n",  # a malformed line, then the answer
                b"",  # silence
                b"A7,22.0,x,1\n",
            ]},
        )  # fmt: skip
        try:
            got = await drv.read("dev", spec.points)
            assert {r.point: r.value for r in got} == {
                "temperature": 21.5, "state": True, "setpoint": "A7",
            }  # fmt: skip
            # The chatter after the first answer is not taken for the second answer.
            got = await drv.read("dev", [spec.points[0]])
            assert [(r.point, r.value) for r in got] == [("temperature", 21.75)]
            with pytest.raises(DeviceTimeoutError, match="no answer"):
                await drv.read("dev", spec.points)
            got = await drv.read("dev", spec.points)
            assert {r.point: r.value for r in got}["temperature"] == 22.0
            await drv.write("dev", spec.points[2], 42)
            queries = [dev.received.get_nowait() for _ in range(dev.received.qsize())]
            assert queries[:4] == [b"READ?\r\n"] * 4
            assert await asyncio.wait_for(dev.received.get(), 20) == b"SP 42\r\n"
            st = drv.stats("dev")
            assert st.malformed == 1
            assert ctx.readings.empty()
        finally:
            dev.close()
            await drv.stop()

    asyncio.run(main())
