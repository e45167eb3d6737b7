"""The driver's rules for sharing a bus: one setting per bus, one device per unit id (the
breaker itself is tested in tests/core/test_breaker.py)."""

from __future__ import annotations

import pytest

from drivers.modbus import ModbusDriver
from drivers.testing import RecordingContext
from gateway.config import loads
from gateway.errors import ConfigError
from tests.drivers_modbus.support import device_toml


async def test_bus_sharing_rules() -> None:
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

    await main()
