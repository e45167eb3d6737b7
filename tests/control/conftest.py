"""A gatewayd with Modbus devices on a pymodbus server, for the control service's tests."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.core.conftest import Daemon, run_cli, start_daemon, write_config
from tests.drivers_modbus.support import ModbusServer

CONFIG = """
[gateway]
id = "gw-control"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"
stop_timeout = {stop_timeout}

[store]
check_interval = 3600

[control]
deadline = 30.0
retries = 50
EXTRA_CONTROL

[devices.plc]
driver = "modbus"
host = "127.0.0.1"
port = PORT
unit = 1
interval = 3600
timeout = TIMEOUT
breaker_threshold = 1000
reconnect_delay = 0.05
reconnect_delay_max = 0.2

[devices.plc.points.setpoint]
address = 0
type = "int16"
scale = 0.1
min = 0.0
max = 100.0
writable = true

[devices.plc.points.status]
address = 1

[devices.plc.points.run]
table = "coil"
address = 0
writable = true
remote_write = true

[devices.mute]
driver = "modbus"
host = "127.0.0.1"
port = PORT
unit = 9
interval = 3600
timeout = TIMEOUT
breaker_threshold = 1000
reconnect_delay = 0.05
reconnect_delay_max = 0.2

[devices.mute.points.setpoint]
address = 0
writable = true

[devices.off]
driver = "virtual"
enabled = false

[devices.off.points.level]
signal = "constant"
writable = true
EXTRA
"""


def control_config(
    tmp: Path, port: int, *, timeout: float = 1.0, extra: str = "", extra_control: str = ""
) -> Path:
    def lit(text: str) -> str:  # TOML's inline tables survive write_config's str.format
        return text.replace("{", "{{").replace("}", "}}")

    text = (
        CONFIG.replace("PORT", str(port)).replace("TIMEOUT", str(timeout))
        .replace("EXTRA_CONTROL", lit(extra_control)).replace("EXTRA", lit(extra))
    )  # fmt: skip
    return write_config(tmp, text)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ModbusServer]:
    s = ModbusServer(tmp_path, {1: {"hr": [0] * 10, "co": [0] * 10}}, silent=[9]).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def gatewayd(tmp_path: Path, server: ModbusServer) -> Iterator[Daemon]:
    d = start_daemon(control_config(tmp_path, server.port), tmp_path)
    try:
        yield d
    finally:
        d.stop()
        d.notify.close()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(config, *args)


def cli_json(config: Path, *args: str) -> tuple[int, Any]:
    out = run_cli(config, "--json", *args)
    try:
        return out.returncode, json.loads(out.stdout) if out.stdout.strip() else None
    except ValueError:
        raise AssertionError(f"not JSON: {out.stdout!r} {out.stderr!r}") from None


def command_events(db: Path, cid: str) -> list[tuple[str, dict[str, Any]]]:
    import cbor2

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT type, data FROM events WHERE stream = ? ORDER BY seq", (f"command:{cid}",)
        ).fetchall()
    finally:
        conn.close()
    return [(t, cbor2.loads(d)) for t, d in rows]
