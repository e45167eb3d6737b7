"""Reload and stop cannot hang: gatewayd polls Modbus devices every few milliseconds against a
pymodbus server and is reloaded 50 times by SIGHUP, each time removing some devices and adding
others. A poll cancelled just as its read completes must still stop (Python 3.11's
`asyncio.wait_for` could swallow that cancellation and leave the poller running, so the reload
waited for it forever); every reload must end with READY=1 and the final stop must end with
exit 0 within the daemon's own `stop_timeout`."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from tests.drivers_modbus.support import ModbusServer
from tests.support.daemon import start_daemon, write_config

HEAD = """
[gateway]
id = "gw-churn"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "warning"
stop_timeout = {stop_timeout}

[store]
check_interval = 3600
"""

UNITS = 16
RELOADS = 50


def device(unit: int, port: int) -> str:
    return (
        f'[devices.m{unit}]\ndriver = "modbus"\nhost = "127.0.0.1"\nport = {port}\n'
        f"unit = {unit}\ninterval = 0.002\njitter = 0.0\ntimeout = 1.0\n"
        f"[devices.m{unit}.points.v]\naddress = 0\n"
    )


def config_text(units: list[int], port: int) -> str:
    return HEAD + "\n".join(device(u, port) for u in units)


def test_fifty_reloads_of_fast_pollers_all_finish_and_stop_exits_0(tmp_path: Path) -> None:
    srv = ModbusServer(
        tmp_path, {u: {"hr": [u * 10]} for u in range(1, UNITS + 1)}, name="churn"
    ).start()
    all_units = list(range(1, UNITS + 1))
    config = write_config(tmp_path, config_text(all_units, srv.port), stop_timeout=5)
    daemon = start_daemon(config, tmp_path)
    try:
        for i in range(RELOADS):
            # Every reload removes half of the running devices and adds the other half back.
            keep = [u for u in all_units if (u + i) % 2 == 0]
            text = config_text(keep, srv.port).format(
                state=tmp_path / "state", run=tmp_path / "run", stop_timeout=5
            )
            config.write_text(text)
            daemon.peer.signal(signal.SIGHUP)
            daemon.messages("RELOADING=1")
            daemon.messages("READY=1")  # bounded by the notify socket's time-out
        daemon.peer.signal(signal.SIGTERM)
        # The daemon's own bound: past stop_timeout it dumps its tasks and exits 1.
        rc = daemon.peer.proc.wait(60)
        assert rc == 0, daemon.log.read_text()[-4000:]
        conn = sqlite3.connect(f"file:{tmp_path / 'state' / 'gateway.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT DISTINCT stream FROM events WHERE type = 'readings'")
            polled = {row[0] for row in rows}
        finally:
            conn.close()
        assert polled == {f"device:m{u}" for u in all_units}  # every device was really polled
    finally:
        daemon.stop()
        daemon.notify.close()
        srv.stop()
