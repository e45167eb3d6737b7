"""End to end: gatewayd with a coap device served by libcoap; polled and observed readings
reach the store, and a dead device is reported unavailable."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from gateway import config as cfg
from gateway.store.projections import decode_value
from tests.core.conftest import Daemon, run_cli, start_daemon, write_config
from tests.drivers_coap.conftest import LibcoapServer
from tests.drivers_coap.test_libcoap import put
from tests.peers import wait_until

CONFIG = """
[gateway]
id = "gw-coap"
state_dir = "{state}"
runtime_dir = "{run}"
stop_timeout = {stop_timeout}

[store]
check_interval = 3600

[devices.panel]
driver = "coap"
uri = "coap://127.0.0.1:PORT"
interval = 0.2
timeout = 5
retry = {{ initial = 0.2, cap = 0.5 }}
observe_margin = 0.5

[devices.panel.points.temp]
path = "/temp"
unit = "Cel"

[devices.panel.points.ticks]
path = "/time?ticks"
mode = "observe"
"""


def latest(db: Path) -> dict[str, object]:

    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return {}
    try:
        rows = conn.execute("SELECT point, value FROM latest WHERE device='panel'").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    return {p: decode_value(v) for p, v in rows}


def test_gatewayd_collects_polled_and_observed_coap_points(
    tmp_path: Path, libcoap: LibcoapServer
) -> None:
    put(libcoap, "/temp", "21.5")
    config = write_config(tmp_path, CONFIG.replace("PORT", str(libcoap.port)))
    d = start_daemon(config, tmp_path)
    try:
        run(d, config, libcoap)
    finally:
        d.peer.stop(timeout=30)
        d.notify.close()


def run(d: Daemon, config: Path, libcoap: LibcoapServer) -> None:
    db = cfg.load(config).db_path
    wait_until(
        lambda: set(latest(db)) == {"temp", "ticks"}, "temp and ticks in the store", attempts=600
    )
    assert latest(db)["temp"] == 21.5
    put(libcoap, "/temp", "22")
    wait_until(lambda: latest(db).get("temp") == 22, "the new polled value", attempts=600)
    r = run_cli(config, "--json", "devices")
    assert r.returncode == 0, r.stderr
    assert "panel" in r.stdout
    libcoap.kill()
    wait_until(
        lambda: any(
            dev.get("id") == "panel" and not dev.get("available")
            for dev in json.loads(run_cli(config, "--json", "devices").stdout or "[]")
        ),
        "panel to be reported unavailable",
        attempts=600,
    )
    assert d.stop() == 0
