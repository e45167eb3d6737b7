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

ROOT = Path(__file__).resolve().parents[2]
#: What each driver must not import until a device starts (its protocol library and helpers).
LIBRARIES = {
    "modbus": ("pymodbus",),
    "serial": ("serial",),
    "ble": ("bleak", "dbus_fast", "cryptography"),
    "coap": ("aiocoap",),
}
#: A valid config per driver, with the options that pull in most of its config code.
CONFIGS = {
    "modbus": """
[devices.boiler]
driver = "modbus"
host = "127.0.0.1"
port = 1502
unit = 3
max_gap = 4
breaker_threshold = 2
breaker_cooldown = 5.0
[devices.boiler.points.temp]
address = 0
type = "int16"
scale = 0.1
[devices.boiler.points.energy]
table = "input"
address = 10
type = "uint32"
word_order = "little"
[devices.boiler.points.pump]
table = "coil"
address = 3
writable = true
[devices.boiler.points.alarm]
address = 20
bit = 4
""",
    "serial": """
[devices.gps]
driver = "serial"
port = "/dev/ttyUSB0"
baudrate = 38400
framing = { type = "delimiter", delimiter = "\\r\\n" }
parser = { type = "nmea", sentences = ["GGA", "RMC"] }
[devices.gps.points.lat]
field = "gga.lat"
[devices.gps.points.speed]
field = "rmc.speed_knots"
""",
    "ble": """
[devices.k]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey = "231d39c1d7cc1ab1aee224cd096db932"
[devices.k.points.temperature]
""",
    "coap": """
[devices.thermo]
driver = "coap"
uri = "coaps://127.0.0.1:5684/"
psk_identity = "thermo"
psk_key_file = "/etc/gateway/keys/thermo.psk"
observe_margin = 2
[devices.thermo.points.temp]
path = "/sensors"
mode = "observe"
format = "senml"
record = "temp"
[devices.thermo.points.setpoint]
path = "/setpoint?unit=C"
writable = true
write_method = "post"
""",
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
