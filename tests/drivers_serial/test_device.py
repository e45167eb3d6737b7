"""SerialDevice's frame handling fed directly with bytes (no port): mapping fields to points,
type conversion, timestamps, max_age, request/response bookkeeping. The port itself is
exercised over socat PTYs in test_driver_pty.py; here a stand-in link only says "open"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drivers.serial import SerialDevice
from drivers.serial.options import parse_options
from gateway import config
from gateway.errors import DeviceTimeoutError, DeviceUnavailableError, PointNotFoundError


class ManualClock:
    boot_id = "test-boot"

    def __init__(self) -> None:
        self.now = 1_000.0

    def synced(self) -> bool:
        return True

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now


class Ctx:
    def __init__(self) -> None:
        import logging

        self.logger = logging.getLogger("test.serial.device")
        self.clock = ManualClock()
        self.emitted: list[dict[str, Any]] = []
        self.states: list[tuple[bool, str]] = []

    def emit(self, device_id: str, readings: Any) -> None:
        self.emitted.append({r.point: (r.value, r.ts) for r in readings})

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        self.states.append((available, reason))

    def discovered(self, device: Any) -> None:
        raise AssertionError


class OpenLink:
    """Stands in for SerialLink where no bytes need to go out."""

    is_open = True
    reason = ""
    sent: list[bytes]

    def __init__(self) -> None:
        self.sent = []

    def discard_input(self) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.sent.append(data)


def make(body: str) -> tuple[SerialDevice, Ctx]:
    text = '[devices.d]\ndriver = "serial"\nport = "/dev/ttyS0"\n' + body
    spec = config.loads(text).devices["d"]
    ctx = Ctx()
    dev = SerialDevice(spec, parse_options(spec), ctx)
    dev.link = OpenLink()  # type: ignore[assignment]
    return dev, ctx


JSON = """
max_age = 30
parser = { type = "json" }
[devices.d.points.temp]
field = "env.t"
[devices.d.points.count]
field = "n"
type = "int"
[devices.d.points.label]
field = "n"
type = "str"
"""


def test_json_fields_map_to_points_with_conversion() -> None:
    dev, ctx = make(JSON)
    dev.on_data(b'{"env": {"t": 21.5}, "n": "0012"}\n{"env": {"t": 22}, "n": "x"}\n')
    received = 1_700_001_000.0
    assert ctx.emitted == [
        {"temp": (21.5, None), "count": (12, None), "label": ("0012", None)},
        {"temp": (22, None), "label": ("x", None)},  # "x" is no int: only that point is skipped
    ]
    assert dev.stats.conversion_errors == 1
    latest = dev.latest_readings(dev.spec.points)
    assert [(r.point, r.value, r.ts) for r in latest] == [
        ("temp", 22, received), ("count", 12, received), ("label", "x", received),
    ]  # fmt: skip


def test_max_age_drops_stale_values_and_times_out() -> None:
    dev, ctx = make(JSON)
    dev.on_data(b'{"env": {"t": 21.5}, "n": 1}\n')
    ctx.clock.now += 20
    dev.on_data(b'{"env": {"t": 21.6}}\n')
    ctx.clock.now += 20  # count is 40 s old, temp 20 s
    assert [r.point for r in dev.latest_readings(dev.spec.points)] == ["temp"]
    ctx.clock.now += 20
    with pytest.raises(DeviceTimeoutError, match=r"no frame for 40\.0 s"):
        dev.latest_readings(dev.spec.points)


def test_unknown_point_and_closed_port() -> None:
    dev, _ = make(JSON)
    from gateway.config import PointSpec

    with pytest.raises(PointNotFoundError):
        dev.latest_readings([PointSpec("nope")])
    dev.link.is_open = False  # type: ignore[misc,union-attr]
    with pytest.raises(DeviceUnavailableError, match="/dev/ttyS0 is not open"):
        dev.latest_readings(dev.spec.points)


def test_nmea_rmc_time_becomes_reading_timestamp() -> None:
    dev, ctx = make(
        'parser = { type = "nmea" }\n[devices.d.points.speed]\nfield = "rmc.speed_knots"\n'
        '[devices.d.points.valid]\nfield = "rmc.valid"\n'
    )
    dev.on_data(b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n")
    assert ctx.emitted == [{"speed": (22.4, 764426119.0), "valid": (True, 764426119.0)}]


def test_length_prefixed_cbor_stream_with_noise() -> None:
    dev, ctx = make(
        'framing = { type = "length", start = "\\u00aa" }\nparser = { type = "cbor" }\n'
        '[devices.d.points.a]\n[devices.d.points.b1]\nfield = "b.1"\n'
    )
    payload = bytes.fromhex("a26161016162820203")  # {"a": 1, "b": [2, 3]}
    frame = b"\xaa" + bytes([len(payload)]) + payload
    dev.on_data(b"\x00\x13" + frame[:4])
    dev.on_data(frame[4:] + b"\xaa\x02\xff\xff" + frame)
    assert ctx.emitted == [{"a": (1, None), "b1": (3, None)}] * 2
    assert dev.stats.malformed == 2  # the noise before the marker, the bad CBOR frame


def test_request_answers_and_unsolicited_frames() -> None:
    dev, ctx = make(
        'mode = "request"\nrequest = "R\\r"\nresponse_frames = 2\n'
        'parser = { type = "regex", pattern = "(?P<k>[a-z]+)=(?P<v>[0-9]+)" }\n'
        "[devices.d.points.v]\n[devices.d.points.k]\n"
    )

    async def main() -> None:
        dev.on_data(b"a=1\n")  # nobody asked
        task = asyncio.create_task(dev.request(dev.spec.points))
        for _ in range(100):  # let the request go out (yields only, no time passes)
            if dev.link.sent:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0)
        dev.on_data(b"b=2\nzzz\nc=3\nd=4\n")
        got = await task
        assert [(r.point, r.value) for r in got] == [("k", "b"), ("v", 2), ("k", "c"), ("v", 3)]
        assert dev.link.sent == [b"R\r"]  # type: ignore[union-attr]

    asyncio.run(main())
    assert dev.stats.unsolicited == 2  # "a=1" before, "d=4" after the answer
    assert dev.stats.malformed == 1
    assert ctx.emitted == []


def test_port_loss_fails_a_waiting_request() -> None:
    dev, ctx = make('mode = "request"\nrequest = "R"\nparser = { type = "json" }\n'
                    '[devices.d.points.v]\n')  # fmt: skip

    async def main() -> None:
        task = asyncio.create_task(dev.request(dev.spec.points))
        for _ in range(100):
            if dev.link.sent:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0)
        dev.on_state(False, "device disconnected")
        with pytest.raises(DeviceUnavailableError, match="device disconnected"):
            await task

    asyncio.run(main())
    assert ctx.states == [(False, "device disconnected")]
