"""The contract every driver keeps, run over all registered drivers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drivers import DRIVERS, driver_class
from drivers.base import Driver
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import ConfigError
from tests.drivers_ble import test_config as ble_samples
from tests.drivers_coap import test_options as coap_samples
from tests.drivers_modbus import test_config as modbus_samples
from tests.drivers_serial import test_options as serial_samples

ROOT = Path(__file__).resolve().parents[2]
#: What each driver must not import until a device starts (its protocol library and helpers).
LIBRARIES = {
    "modbus": ("pymodbus",),
    "serial": ("serial",),
    "ble": ("bleak", "dbus_fast", "cryptography"),
    "coap": ("aiocoap",),
}
#: A valid config per driver: each driver's own tests' sample, so this follows them.
CONFIGS = {
    "modbus": modbus_samples.GOOD,
    "serial": serial_samples.GPS,
    "ble": (
        '[devices.k]\ndriver = "ble"\naddress = "54:48:E6:8F:80:A5"\nformat = "bthome"\n'
        f'bindkey = "{ble_samples.KEY}"\n[devices.k.points.temperature]\n'
    ),
    "coap": coap_samples.GOOD,
}


@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_registered_class_is_a_driver_of_that_kind(kind: str) -> None:
    cls = driver_class(kind)
    assert issubclass(cls, Driver)
    assert cls.kind == kind
    assert not getattr(cls, "__abstractmethods__", None)


@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_unknown_device_key_is_a_config_error_with_its_path(kind: str) -> None:
    spec = DeviceSpec(id="dev-1", driver=kind, points=(PointSpec("p"),), options={"no_such_key": 1})
    with pytest.raises(ConfigError) as info:
        driver_class(kind).validate_device(spec)
    paths = [i.path for i in info.value.issues]
    assert "devices.dev-1.no_such_key" in paths
    assert all(p.startswith("devices.dev-1") for p in paths)


@pytest.mark.parametrize("kind", sorted(LIBRARIES))
def test_loading_and_validating_imports_no_protocol_library(kind: str) -> None:
    """Importing a driver and its probe, and checking a config that uses it, stays cheap:
    the protocol library (and its heavy helpers) is imported only when a device starts."""
    code = (
        "import sys, importlib\n"
        "from drivers import driver_class\n"
        "from gateway.config import DeviceSpec, PointSpec, loads\n"
        "from gateway.errors import ConfigError\n"
        f"importlib.import_module('drivers.{kind}')\n"
        f"importlib.import_module('drivers.{kind}.probe')\n"
        f"cls = driver_class({kind!r})\n"
        f"assert cls.kind == {kind!r}\n"
        "try:\n"
        f"    cls.validate_device(DeviceSpec('d', {kind!r}, points=(PointSpec('p'),)))\n"
        "except ConfigError:\n"
        "    pass\n"
        "loads(sys.stdin.read())\n"
        f"heavy = {LIBRARIES[kind]!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        input=CONFIGS[kind], capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
