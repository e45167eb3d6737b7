"""The BLE driver with bleak's real BlueZ backend, against BlueZ's D-Bus API served by
python-dbusmock on a private dbus-daemon (no Bluetooth hardware or kernel support here).

Every test starts its own bus and mock and stops them by PID; the driver is stopped and
bleak's D-Bus connection closed before the event loop ends.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from drivers.ble import BleDriver
from gateway.config import loads
from gateway.errors import DriverError
from tests.drivers_ble.bluez import DENY_BLUEZ, BluezBus
from tests.drivers_ble.context import RecordingContext

BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"
KITCHEN = "54:48:E6:8F:80:A5"
RUUVI_MAC = "CB:B8:33:4C:88:4F"
STRANGER = "A4:C1:38:00:00:01"
RUUVI = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
ENCRYPTED = bytes.fromhex("41a47266c95f730011223378237214")
TEMP_CHAR = "00002a6e-0000-1000-8000-00805f9b34fb"
LED_CHAR = "0000ff01-0000-1000-8000-00805f9b34fb"
BUTTON_CHAR = "0000ff02-0000-1000-8000-00805f9b34fb"
GATT_MAC = "C0:FF:EE:00:00:01"

FAST = """
[drivers.ble]
retry = { initial = 0.05, cap = 0.2 }
"""

ADVERT_DEVICES = f"""
[devices.kitchen]
driver = "ble"
address = "{KITCHEN}"
format = "bthome"
bindkey = "{KEY_HEX}"
[devices.kitchen.points.temperature]
unit = "°C"
[devices.kitchen.points.humidity]

[devices.shed]
driver = "ble"
address = "{RUUVI_MAC}"
format = "ruuvi"
[devices.shed.points.temperature]
[devices.shed.points.pressure]
[devices.shed.points.battery]
"""


def encrypt(plain: bytes, counter: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    ctr = struct.pack("<I", counter)
    nonce = bytes.fromhex(KITCHEN.replace(":", "")) + b"\xd2\xfc\x41" + ctr
    sealed = AESCCM(bytes.fromhex(KEY_HEX), tag_length=4).encrypt(nonce, plain, None)
    return b"\x41" + sealed[:-4] + ctr + sealed[-4:]


@pytest.fixture
def bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BluezBus]:
    b = BluezBus(tmp_path)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", b.address)
    try:
        yield b
    finally:
        b.stop()


async def close_bleak() -> None:
    """bleak keeps one D-Bus connection per event loop; close it before the loop ends
    (else its socket is reported unclosed)."""
    from drivers.ble import bleak_compat

    assert bleak_compat.check()  # the patched path: the tests' bleak is the one pinned
    await bleak_compat.close_manager(wait=True)


def run_driver(
    toml: str,
    scenario: Callable[[BleDriver, RecordingContext], Awaitable[None]],
    *,
    add_first: bool = False,
) -> RecordingContext:
    cfg = loads(toml)
    ctx = RecordingContext()

    async def main() -> None:
        driver = BleDriver(ctx, cfg.drivers.get("ble", {}))
        # The collection service's order is start, then add; both must work.
        if not add_first:
            await driver.start()
        for spec in cfg.devices.values():
            await driver.add_device(spec)
        if add_first:
            await driver.start()
        try:
            await scenario(driver, ctx)
        finally:
            await driver.stop()
            await close_bleak()

    asyncio.run(main())
    return ctx


async def scanning(driver: BleDriver) -> None:
    assert driver._scanner is not None
    await asyncio.wait_for(driver._scanner.running.wait(), 20)


def test_scan_decodes_bthome_and_ruuvi_into_readings(bus: BluezBus) -> None:
    bus.add_adapter()

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await scanning(driver)
        bus.add_device(KITCHEN, service_data={BTHOME_UUID: ENCRYPTED})
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        bus.add_device(STRANGER, name="ATC", service_data={BTHOME_UUID: bytes.fromhex("4002ca09")})
        await ctx.wait_for(lambda: len(ctx.values("kitchen")) == 2, "kitchen readings")
        await ctx.wait_for(lambda: len(ctx.values("shed")) == 3, "shed readings")
        await ctx.wait_for(lambda: bool(ctx.found), "discovery of the stranger")

        # The same packet again (a device repeats itself): no new reading.
        bus.advertise(KITCHEN, rssi=-55)
        # A replayed old counter, then a downgrade attempt: rejected, never raised.
        bus.advertise(KITCHEN, rssi=-54, service_data={BTHOME_UUID: encrypt(b"\x02\x00\x10", 5)})
        bus.advertise(KITCHEN, rssi=-53, service_data={BTHOME_UUID: bytes.fromhex("4002ff7f")})
        # A fresh measurement: one new reading.
        fresh = encrypt(bytes.fromhex("02cb0903bf13"), 0x33221101)
        bus.advertise(KITCHEN, rssi=-52, service_data={BTHOME_UUID: fresh})
        await ctx.wait_for(lambda: len(ctx.emitted("kitchen")) == 2, "the fresh packet")
        status = driver.status()["devices"]["kitchen"]
        assert status["rejected"] == {"replay": 1, "downgrade": 1}

        points = [p for p in loads(ADVERT_DEVICES).devices["shed"].points]
        got = {r.point: r.value for r in await driver.read("shed", points)}
        assert got == {"temperature": 24.3, "pressure": 100044, "battery": 2.977}

    ctx = run_driver(FAST + ADVERT_DEVICES, scenario)
    assert [[(r.point, r.value) for r in e] for e in ctx.emitted("kitchen")] == [
        [("temperature", 25.06), ("humidity", 50.55)],
        [("temperature", 25.07), ("humidity", 50.55)],
    ]
    assert ctx.values("shed") == {"temperature": 24.3, "pressure": 100044, "battery": 2.977}
    assert ctx.last_availability("kitchen") == (True, "advertising")
    (found,) = ctx.found
    assert (found.address, found.kind, found.name) == (STRANGER, "bthome", "ATC")
    assert found.values == {"temperature": 25.06}
    assert "stranger" not in {d for d, _, _ in ctx.readings}  # not ingested


GATT_DEVICE = f"""
[devices.thermostat]
driver = "ble"
address = "{GATT_MAC}"
format = "gatt"
interval = 3600
[devices.thermostat.points.temperature]
char = "2a6e"
type = "int16"
scale = 0.01
[devices.thermostat.points.led]
char = "{LED_CHAR}"
type = "uint8"
writable = true
[devices.thermostat.points.button]
char = "{BUTTON_CHAR}"
type = "uint8"
notify = true
"""


def test_gatt_read_notify_write(bus: BluezBus) -> None:
    bus.add_adapter()
    bus.add_device(GATT_MAC, name="thermostat")
    bus.add_characteristic(GATT_MAC, TEMP_CHAR, struct.pack("<h", 2150), handle=0x0B)
    led = bus.add_characteristic(GATT_MAC, LED_CHAR, b"\x00", handle=0x0E)
    button = bus.add_characteristic(GATT_MAC, BUTTON_CHAR, b"\x00", handle=0x11)

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        # Scheduled read on connect (interval is long: exactly one)
        await ctx.wait_for(lambda: "temperature" in ctx.values("thermostat"), "scheduled read")
        assert ctx.values("thermostat") == {"temperature": 2150, "led": 0}
        await ctx.wait_for(
            lambda: _notifying(bus, button), "StartNotify on the button characteristic"
        )
        bus.notify(button, b"\x02")
        await ctx.wait_for(lambda: ctx.values("thermostat").get("button") == 2, "notification")

        spec = loads(GATT_DEVICE).devices["thermostat"]
        led_point = spec.point("led")
        assert led_point is not None
        await driver.write("thermostat", led_point, 1)
        assert bus.char_value(led) == b"\x01"
        got = await driver.read("thermostat", [led_point])
        assert [(r.point, r.value) for r in got] == [("led", 1)]

    ctx = run_driver(FAST + GATT_DEVICE, scenario, add_first=True)
    assert ctx.last_availability("thermostat") is not None
    assert ctx.availability[0] == ("thermostat", True, "connected")


def _notifying(bus: BluezBus, char_path: str) -> bool:
    import dbus

    props = dbus.Interface(
        bus._bus().get_object("org.bluez", char_path), "org.freedesktop.DBus.Properties"
    )
    return bool(props.Get("org.bluez.GattCharacteristic1", "Notifying"))


def test_adapter_disappearing_is_survived(bus: BluezBus) -> None:
    bus.add_adapter()

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await scanning(driver)
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 1, "first reading")

        bus.remove_adapter()
        await ctx.wait_for(
            lambda: (
                ctx.last_availability("shed") is not None
                and ctx.last_availability("shed")[0] is False
            ),  # type: ignore[index]
            "shed unavailable after the adapter went away",
        )
        avail = ctx.last_availability("shed")
        assert avail is not None and "adapter hci0 was removed" in avail[1]
        assert "Fix:" in avail[1]

        bus.add_adapter()
        await scanning(driver)
        later = bytearray(RUUVI)
        later[16:18] = (206).to_bytes(2, "big")  # next measurement sequence
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: bytes(later)})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 2, "reading after recovery")
        assert ctx.last_availability("shed") == (True, "advertising")

    run_driver(FAST + ADVERT_DEVICES, scenario, add_first=True)


def _fault_of(ctx: RecordingContext, device: str) -> str:
    avail = ctx.last_availability(device)
    assert avail is not None and avail[0] is False
    return avail[1]


def test_no_adapter_is_reported_with_its_fix_and_retried(bus: BluezBus) -> None:
    # BlueZ runs, but has no adapter (a Pi whose dongle is unplugged)
    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await ctx.wait_for(lambda: bool(ctx.availability), "a fault report")
        reason = _fault_of(ctx, "shed")
        assert "no Bluetooth adapter" in reason and "bluetoothctl list" in reason
        bus.add_adapter()  # plugged in: the driver finds it by itself
        await scanning(driver)
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 1, "reading after plug-in")

    run_driver(FAST + ADVERT_DEVICES, scenario)


def test_bluez_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = BluezBus(tmp_path, bluez=False)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", b.address)
    try:

        async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
            await ctx.wait_for(lambda: bool(ctx.availability), "a fault report")
            reason = _fault_of(ctx, "kitchen")
            assert "BlueZ is not running" in reason
            assert "systemctl enable --now bluetooth" in reason
            assert driver.status()["fault"] == reason
            b.start_bluez()
            b.add_adapter()
            await scanning(driver)

        run_driver(FAST + ADVERT_DEVICES, scenario)
    finally:
        b.stop()


def test_dbus_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = BluezBus(tmp_path, extra_policy=DENY_BLUEZ)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", b.address)
    try:
        b.add_adapter()

        async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
            await ctx.wait_for(lambda: bool(ctx.availability), "a fault report")
            reason = _fault_of(ctx, "kitchen")
            assert "permission denied" in reason
            assert "SupplementaryGroups=bluetooth" in reason

        run_driver(FAST + ADVERT_DEVICES, scenario)
    finally:
        b.stop()


def test_no_system_bus_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none.sock")

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await ctx.wait_for(lambda: bool(ctx.availability), "a fault report")
        assert "D-Bus system bus is not reachable" in _fault_of(ctx, "kitchen")

    run_driver(FAST + ADVERT_DEVICES, scenario)


def test_passive_scan(bus: BluezBus) -> None:
    bus.add_adapter()

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await scanning(driver)
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 1, "a reading, passively")

    run_driver(FAST + 'scan_mode = "passive"\n' + ADVERT_DEVICES, scenario)


def test_passive_scan_unsupported_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = BluezBus(tmp_path, parameters={"enable_monitor_api": False})
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", b.address)
    try:
        b.add_adapter()

        async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
            await ctx.wait_for(lambda: bool(ctx.availability), "a fault report")
            reason = _fault_of(ctx, "shed")
            assert "passive scanning is not supported" in reason
            assert 'scan_mode = "active"' in reason

        run_driver(FAST + 'scan_mode = "passive"\n' + ADVERT_DEVICES, scenario)
    finally:
        b.stop()


async def poll_until(check: Callable[[], bool], what: str, attempts: int = 500) -> None:
    """Bounded readiness poll, for state that no report announces (a breaker's state)."""
    for _ in range(attempts):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def test_gatt_breaker_opens_and_device_recovers(bus: BluezBus) -> None:
    bus.add_adapter()
    bus.add_device(GATT_MAC, name="thermostat")
    bus.add_characteristic(GATT_MAC, TEMP_CHAR, struct.pack("<h", 2150), handle=0x0B)
    bus.set_blocked(GATT_MAC, True)
    toml = (
        FAST
        + "breaker = { threshold = 2, cooldown = 0.3 }\n"
        + f"""
[devices.thermostat]
driver = "ble"
address = "{GATT_MAC}"
format = "gatt"
interval = 3600
[devices.thermostat.points.temperature]
char = "2a6e"
type = "int16"
"""
    )

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await ctx.wait_for(lambda: bool(ctx.availability), "the failure reported")
        assert ctx.availability[0][:2] == ("thermostat", False)
        assert "Page Timeout" in ctx.availability[0][2]
        link = driver.links["thermostat"]
        await poll_until(lambda: link.breaker.state == "open", "breaker open")
        assert driver.status()["devices"]["thermostat"]["breaker"] == "open"
        bus.set_blocked(GATT_MAC, False)  # back in range
        await ctx.wait_for(lambda: "temperature" in ctx.values("thermostat"), "a reading")
        assert link.breaker.state == "closed"
        assert ctx.last_availability("thermostat") == (True, "connected")

    run_driver(toml, scenario)


def test_gatt_link_drop_reconnects_and_resubscribes(bus: BluezBus) -> None:
    bus.add_adapter()
    bus.add_device(GATT_MAC, name="thermostat")
    bus.add_characteristic(GATT_MAC, TEMP_CHAR, struct.pack("<h", 2150), handle=0x0B)
    bus.add_characteristic(GATT_MAC, LED_CHAR, b"\x00", handle=0x0E)
    button = bus.add_characteristic(GATT_MAC, BUTTON_CHAR, b"\x00", handle=0x11)

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await ctx.wait_for(lambda: "temperature" in ctx.values("thermostat"), "first reading")
        await poll_until(lambda: _notifying(bus, button), "subscribed")
        bus.disconnect(GATT_MAC)
        await ctx.wait_for(
            lambda: [a for _, a, _ in ctx.availability] == [True, False, True], "reconnected"
        )
        assert ctx.availability[1][2] == "thermostat: disconnected"
        await poll_until(lambda: _notifying(bus, button), "subscribed again")
        bus.notify(button, b"\x07")
        await ctx.wait_for(lambda: ctx.values("thermostat").get("button") == 7, "notification")

    run_driver(FAST + GATT_DEVICE, scenario)


def test_connection_limit_queues_devices(bus: BluezBus) -> None:
    bus.add_adapter()
    macs = ["C0:FF:EE:00:00:0A", "C0:FF:EE:00:00:0B", "C0:FF:EE:00:00:0C"]
    toml = FAST + "max_connections = 1\n"
    for i, mac in enumerate(macs):
        bus.add_device(mac)
        bus.add_characteristic(mac, TEMP_CHAR, struct.pack("<h", 100 * i), handle=0x0B)
        toml += f"""
[devices.t{i}]
driver = "ble"
address = "{mac}"
format = "gatt"
interval = 3600
[devices.t{i}.points.temperature]
char = "2a6e"
type = "int16"
"""

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        peak = 0

        def watch() -> bool:
            nonlocal peak
            peak = max(peak, driver.pool.in_use)
            return all("temperature" in ctx.values(f"t{i}") for i in range(3))

        await ctx.wait_for(watch, "all three read, one at a time")
        assert peak <= 1
        assert [ctx.values(f"t{i}")["temperature"] for i in range(3)] == [0, 100, 200]

        # On demand, between scheduled reads: a short connection of its own
        spec = loads(toml).devices["t2"]
        got = await driver.read("t2", spec.points)
        assert [(r.point, r.value) for r in got] == [("temperature", 200)]
        with pytest.raises(DriverError, match="not writable"):
            await driver.write("t2", spec.points[0], 5)

    run_driver(toml, scenario)


def test_bluez_restart_while_scanning_is_survived(bus: BluezBus) -> None:
    bus.add_adapter()

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await scanning(driver)
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 1, "first reading")

        bus.stop_bluez()  # bluetoothd stops (crash, package upgrade)
        await ctx.wait_for(lambda: ctx.last_availability("shed") is not None
                           and ctx.last_availability("shed")[0] is False,  # type: ignore[index]
                           "unavailable")  # fmt: skip
        reason = _fault_of(ctx, "shed")
        assert "BlueZ is not running" in reason and "systemctl enable --now bluetooth" in reason

        bus.start_bluez()
        bus.add_adapter()
        await scanning(driver)
        later = bytearray(RUUVI)
        later[16:18] = (206).to_bytes(2, "big")
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: bytes(later)})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 2, "reading after restart")

    run_driver(FAST + ADVERT_DEVICES, scenario)


def test_adapter_powered_off_and_on(bus: BluezBus) -> None:
    bus.add_adapter()

    async def scenario(driver: BleDriver, ctx: RecordingContext) -> None:
        await scanning(driver)
        bus.add_device(RUUVI_MAC, manufacturer_data={0x0499: RUUVI})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 1, "first reading")
        bus.power(False)  # rfkill, or someone ran 'bluetoothctl power off'
        await ctx.wait_for(lambda: ctx.last_availability("shed") is not None
                           and ctx.last_availability("shed")[0] is False,  # type: ignore[index]
                           "unavailable")  # fmt: skip
        reason = _fault_of(ctx, "shed")
        assert "adapter hci0 was powered off" in reason and "bluetoothctl power on" in reason
        await poll_until(lambda: driver._scanner is not None and driver._scanner.fault is not None
                         and "is powered off" in driver._scanner.fault.cause,
                         "start refused while off")  # fmt: skip
        bus.power(True)
        await scanning(driver)
        later = bytearray(RUUVI)
        later[16:18] = (206).to_bytes(2, "big")
        bus.advertise(RUUVI_MAC, rssi=-40, manufacturer_data={0x0499: bytes(later)})
        await ctx.wait_for(lambda: len(ctx.emitted("shed")) == 2, "reading after power on")

    run_driver(FAST + 'adapter = "hci0"\n' + ADVERT_DEVICES, scenario)
