"""gatewayd with Modbus devices against a pymodbus TCP server, end to end: the collection
service polls through the driver, readings land in the store scaled once, and a killed and
restarted server shows up as device.unavailable / device.available events."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from gateway.store.projections import decode_value
from tests.drivers_modbus.support import ModbusServer
from tests.support.daemon import start_daemon, write_config
from tests.support.peers import wait_until

CONFIG = """
[gateway]
id = "gw-modbus"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"
stop_timeout = {stop_timeout}

[store]
check_interval = 3600

[devices.boiler]
driver = "modbus"
host = "127.0.0.1"
port = PORT
unit = 1
interval = 0.05
timeout = 0.5
breaker_threshold = 2
breaker_cooldown = 0.2
reconnect_delay = 0.05
reconnect_delay_max = 0.2

[devices.boiler.points.temperature]
address = 0
type = "int16"
scale = 0.1
unit = "Cel"

[devices.boiler.points.burner]
address = 1
bit = 2
"""


def latest(db: Path) -> dict[str, Any]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT point, value FROM latest WHERE device = 'boiler'").fetchall()
    except sqlite3.OperationalError:
        return {}  # not created yet
    finally:
        conn.close()
    return {p: decode_value(v) for p, v in rows}


def events(db: Path, kind: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM events WHERE stream = 'device:boiler' AND type = ?", (kind,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


def test_gatewayd_polls_modbus_and_sees_the_outage(tmp_path: Path) -> None:
    srv = ModbusServer(tmp_path, {1: {"hr": [215, 0b100]}}, name="boiler").start()
    config = write_config(tmp_path, CONFIG.replace("PORT", str(srv.port)), stop_timeout=10)
    daemon = start_daemon(config, tmp_path)
    db = tmp_path / "state" / "gateway.db"
    try:
        wait_until(lambda: len(latest(db)) == 2, "readings in the store")
        values = latest(db)
        assert values["temperature"] == 21.5  # 215 * 0.1: scaled once, not twice
        assert values["burner"] is True
        srv.stop()
        wait_until(lambda: events(db, "device.unavailable") >= 1, "device.unavailable")
        srv.start()
        wait_until(lambda: events(db, "device.available") >= 2, "device.available again")
    finally:
        daemon.stop()
        daemon.notify.close()
        srv.stop()
