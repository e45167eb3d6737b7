"""pymodbus' own log lines go through the daemon's logging setup at DEBUG (a filter on its
handler), not through a level set on pymodbus' logger for the whole process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import free_port

ROOT = Path(__file__).resolve().parents[2]

# A Modbus failure (nobody listens on the port: pymodbus logs "Failed to connect" at
# WARNING), under gatewayd's own logging setup, beside another library's warning.
SCRIPT = """
import asyncio, logging, sys
from drivers.modbus import ModbusDriver
from gateway.config import loads
from gateway.daemon import setup_logging
from gateway.errors import GatewayError
from drivers.testing import RecordingContext
from tests.drivers_modbus.support import device_toml

setup_logging(sys.argv[1])
port = int(sys.argv[2])
pts = "[devices.x.points.v]\\naddress = 0\\n"
spec = loads(device_toml("x", f'host = "127.0.0.1"\\nport = {port}', pts)).devices["x"]

async def main():
    drv = ModbusDriver(RecordingContext("gateway.drivers.modbus"))
    await drv.add_device(spec)
    try:
        await drv.read("x", spec.points)
    except GatewayError as exc:
        print("read failed:", exc)
    finally:
        await drv.stop()

asyncio.run(main())
logging.getLogger("other.library").warning("unaffected")
logging.getLogger("pymodbusx").warning("not pymodbus")
"""


def _run(level: str) -> list[str]:
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, level, str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "read failed:" in p.stdout
    return [line.split(" ", 2)[2] for line in p.stderr.splitlines() if line[:2] == "20"]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_pymodbus_lines_show_at_debug_and_other_loggers_keep_their_levels(level: str) -> None:
    lines = _run(level)
    ours = [x for x in lines if x.startswith(("WARNING other.", "WARNING pymodbusx"))]
    assert ours == ["WARNING other.library: unaffected", "WARNING pymodbusx: not pymodbus"]
    assert any(x.startswith("WARNING gateway.drivers.modbus:") for x in lines), lines
    pymodbus = [x for x in lines if x.split(" ", 2)[1].startswith("pymodbus.")]
    if level == "info":
        assert pymodbus == []
    else:
        assert any("Failed to connect" in x for x in pymodbus), lines
        assert all(x.startswith("DEBUG ") for x in pymodbus), pymodbus


def test_no_level_is_set_on_pymodbus_loggers() -> None:
    import drivers.modbus.bus  # noqa: F401  (the module that used to mute pymodbus)

    assert logging.getLogger("pymodbus.logging").level == logging.NOTSET
    assert logging.getLogger("pymodbus").level == logging.NOTSET
