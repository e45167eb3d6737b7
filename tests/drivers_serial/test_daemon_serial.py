"""End to end: gatewayd with a serial NMEA device on a socat PTY. Sentences become stored
readings; the port vanishing and coming back shows in the devices table and readings resume.
The GPS is a thread writing at its output rate (bytes sent to a PTY nobody has open are lost,
so a talker that repeats is what a real receiver is, and what makes the test deterministic)."""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.projections import decode_value
from tests.drivers_serial.ptys import PtyPair
from tests.peers import Peer, wait_until

CONFIG = """
[gateway]
id = "gw-serial"
state_dir = "{state}"
runtime_dir = "{run}"

[store]
check_interval = 3600

[devices.gps]
driver = "serial"
port = "{port}"
interval = 0.2
retry = {{ initial = 0.05, cap = 0.2 }}
framing = {{ delimiter = "\\r\\n" }}
parser = {{ type = "nmea", sentences = ["GGA", "RMC"] }}

[devices.gps.points.lat]
field = "gga.lat"
unit = "deg"

[devices.gps.points.speed]
field = "rmc.speed_knots"
unit = "kn"
"""

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC_1 = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
RMC_2 = b"$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191104,020.3,E*61\r\n"


class Gps(threading.Thread):
    """Writes `sentences` every `period` to ttyB, reopening it when socat comes back."""

    def __init__(self, pty: PtyPair, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pty = pty
        self.period = period
        self.sentences = GGA + RMC_1
        self.stopping = threading.Event()

    def run(self) -> None:
        fd = -1
        for _ in range(20_000):  # bounded
            if self.stopping.wait(self.period):
                break
            try:
                if fd < 0:
                    fd = self.pty.open_device_end()
                os.write(fd, self.sentences)
            except OSError:  # unplugged: try again next period
                if fd >= 0:
                    os.close(fd)
                fd = -1
        if fd >= 0:
            os.close(fd)


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()


def test_gps_readings_stored_and_port_loss_seen(tmp_path: Path, pty: PtyPair) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(state=tmp_path / "state", run=tmp_path / "run", port=pty.a))
    db = tmp_path / "state" / "gateway.db"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    env.pop("STATE_DIRECTORY", None)
    env.pop("RUNTIME_DIRECTORY", None)
    gps = Gps(pty)
    daemon = Peer([sys.executable, "-m", "gateway.daemon", "--config", str(config)], env=env,
                  log=tmp_path / "gatewayd.log")  # fmt: skip
    try:
        for _ in range(100):
            if "READY=1" in notify.recv(4096).decode():
                break
        gps.start()

        def latest() -> dict[object, object]:
            rows = query(db, "SELECT point, value FROM latest WHERE device = 'gps'")
            return {p: decode_value(v) for p, v in rows}

        wait_until(lambda: len(latest()) == 2, "both GPS points stored", attempts=400)
        assert latest() == {"lat": pytest.approx(48.1173), "speed": 22.4}

        def available() -> object:
            rows = query(db, "SELECT available FROM devices WHERE id = 'gps'")
            return rows[0][0] if rows else None

        wait_until(lambda: available() == 1, "gps available")
        pty.stop()  # unplugged
        wait_until(lambda: available() == 0, "gps unavailable", attempts=400)
        gps.sentences = GGA + RMC_2
        pty.start()  # plugged back in
        wait_until(lambda: available() == 1, "gps available again", attempts=400)
        # The receiver now reports another fix: readings resume with its values.
        wait_until(lambda: latest().get("speed") == 0.5, "readings resume", attempts=400)
    finally:
        gps.stopping.set()
        gps.join(10)
        daemon.stop(timeout=30)
        notify.close()
    log = (tmp_path / "gatewayd.log").read_text()
    assert "reopened" in log, log
    assert "Traceback" not in log, log
