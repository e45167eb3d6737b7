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
LIBRARIES = {
    "modbus": "pymodbus",
    "serial": "serial",
    "ble": "bleak",
    "coap": "aiocoap",
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
    code = (
        "import sys\n"
        "from drivers import driver_class\n"
        "from gateway.config import DeviceSpec, PointSpec\n"
        "from gateway.errors import ConfigError\n"
        f"cls = driver_class({kind!r})\n"
        "try:\n"
        f"    cls.validate_device(DeviceSpec('d', {kind!r}, points=(PointSpec('p'),)))\n"
        "except ConfigError:\n"
        "    pass\n"
        f"print({LIBRARIES[kind]!r} in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
