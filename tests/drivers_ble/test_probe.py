"""`gatewayctl probe ble scan|read` against the dbusmock BlueZ on a private D-Bus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drivers_ble.bluez import BluezBus
from tests.support.peers import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUUVI = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[BluezBus]:
    b = BluezBus(tmp_path)
    try:
        b.add_adapter()
        yield b
    finally:
        b.stop()


def gatewayctl(bus: BluezBus, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "probe", "ble", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def discovering(bus: BluezBus) -> bool:
    import dbus

    props = dbus.Interface(
        bus._bus().get_object("org.bluez", "/org/bluez/hci0"), "org.freedesktop.DBus.Properties"
    )
    return bool(props.Get("org.bluez.Adapter1", "Discovering"))


def test_scan_lists_devices_with_rssi_and_values(bus: BluezBus) -> None:
    # --seconds bounds the scan; --count ends it as soon as both devices are decoded
    proc = gatewayctl(bus, "scan", "--seconds", "50", "--count", "2", "--json")
    try:
        wait_until(lambda: discovering(bus) or proc.poll() is not None, "the probe scanning")
        bus.add_device("CB:B8:33:4C:88:4F", rssi=-71, manufacturer_data={0x0499: RUUVI})
        bus.add_device(
            "A4:C1:38:00:00:01", name="ATC", rssi=-48,
            service_data={BTHOME_UUID: bytes.fromhex("4002ca0903bf13")},
        )  # fmt: skip
    finally:
        status, out, err = finish(proc)
    assert status == 0, err
    rows = json.loads(out)
    assert [(r["address"], r["rssi"], r["format"]) for r in rows] == [
        ("A4:C1:38:00:00:01", -48, "bthome"),
        ("CB:B8:33:4C:88:4F", -71, "ruuvi-5"),
    ]
    assert rows[0]["values"] == {"temperature": 25.06, "humidity": 50.55}
    assert rows[1]["values"]["pressure"] == 100044


def test_read_a_characteristic(bus: BluezBus) -> None:
    mac = "C0:FF:EE:00:00:01"
    bus.add_device(mac)
    bus.add_characteristic(mac, "00002a6e-0000-1000-8000-00805f9b34fb", b"\x66\x08")
    status, out, err = finish(gatewayctl(bus, "read", mac, "2A6E", "--json"))
    assert status == 0, err
    got = json.loads(out)
    assert got["hex"] == "6608" and got["as"]["int16 (little)"] == 2150
    status, out, err = finish(gatewayctl(bus, "read", mac, "2a6e"))
    assert status == 0 and "6608" in out and "2150" in out


def test_read_exit_statuses_follow_the_readme(bus: BluezBus) -> None:
    mac = "C0:FF:EE:00:00:02"
    bus.add_device(mac)
    bus.add_characteristic(mac, "00002a6e-0000-1000-8000-00805f9b34fb", b"\x66\x08",
                           read_error="NotPermitted")  # fmt: skip
    # Connected, and the device refused the read: a failure (1), not "unreachable".
    status, _, err = finish(gatewayctl(bus, "read", mac, "2a6e"))
    assert status == 1, err
    assert "NotPermitted" in err or "not permitted" in err.lower()
    # A characteristic the device does not have: a bad argument (2).
    status, _, err = finish(gatewayctl(bus, "read", mac, "2a6f"))
    assert status == 2, err
    assert "no characteristic" in err
    # A device that refuses the connection: unreachable (4).
    bus.set_blocked(mac, True)
    status, _, err = finish(gatewayctl(bus, "read", mac, "2a6e"))
    assert status == 4, err


def test_probe_without_adapter_names_cause_and_fix(tmp_path: Path) -> None:
    b = BluezBus(tmp_path)  # BlueZ without an adapter
    try:
        status, _, err = finish(gatewayctl(b, "scan", "--seconds", "1"))
    finally:
        b.stop()
    assert status == 4
    assert "no Bluetooth adapter" in err and "Fix:" in err


def test_bad_arguments() -> None:
    env = dict(os.environ)
    cases = [
        (["read", "nope", "2a6e"], "not a MAC"),
        (["read", "C0:FF:EE:00:00:01", "xyz"], "not a characteristic UUID"),
    ]
    for args, msg in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "probe", "ble", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2 and msg in proc.stderr
