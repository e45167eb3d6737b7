"""Helpers of the control service's tests: a gatewayd config with Modbus devices on a pymodbus
server, the CLI, a command's events."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tests.support.daemon import run_cli, write_config

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
