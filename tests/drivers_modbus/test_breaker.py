"""The per-device circuit breaker (pure, driven by an explicit clock) and the driver's rules
for sharing a bus: one setting per bus, one device per unit id."""

from __future__ import annotations

import asyncio

import pytest

from drivers.modbus import ModbusDriver
from drivers.testing import RecordingContext
from gateway.breaker import Breaker, State
from gateway.config import loads
from gateway.errors import ConfigError
from tests.drivers_modbus.support import device_toml


def test_breaker_cycle() -> None:
    b = Breaker(threshold=3, cooldown=10.0)
    assert b.allow(0.0)
    assert not b.failure(0.0).opened and not b.failure(1.0).opened
    assert b.success().closed is False  # closed stays closed; the count restarts
    assert not b.failure(2.0).opened and not b.failure(2.5).opened
    assert b.failure(3.0).opened  # third in a row: open
    assert b.state is State.OPEN and not b.allow(12.9)
    assert b.wait(5.0) == pytest.approx(8.0)
    assert b.allow(13.0) and b.state is State.HALF_OPEN  # one probe after the cool-down...
    assert not b.allow(13.1)  # ...and only one
    t = b.failure(13.2)
    assert not t.opened and b.state is State.OPEN  # failed probe: open again, no new event
    assert not b.allow(20.0) and b.allow(23.2)
    assert b.success().closed is True and b.state is State.CLOSED


def test_released_probe_may_be_retried() -> None:
    b = Breaker(threshold=1, cooldown=1.0)
    b.failure(0.0)
    assert b.allow(1.0)
    b.abandon()  # e.g. the bus was busy: the probe said nothing about the device
    assert b.allow(1.0)


def test_bus_sharing_rules() -> None:
    conn = 'host = "127.0.0.1"\nport = 1502'
    text = (
        device_toml("a", conn, unit=1, queue_size=4)
        + device_toml("b", conn, unit=2, queue_size=8)
        + device_toml("c", conn, unit=1, queue_size=4)
    )
    s = loads(text).devices

    async def main() -> None:
        drv = ModbusDriver(RecordingContext("test.modbus"))
        await drv.add_device(s["a"])
        with pytest.raises(ConfigError, match="other settings") as info:
            await drv.add_device(s["b"])
        assert info.value.path == "devices.b"
        with pytest.raises(ConfigError, match=r"unit 1 .* already device 'a'"):
            await drv.add_device(s["c"])
        await drv.remove_device("a")
        assert drv._buses == {}  # the last device closes its bus
        await drv.stop()

    asyncio.run(main())
