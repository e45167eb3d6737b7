"""A silent unit on a shared Modbus link ends each request with its *own* time-out, its breaker
hears of every one, and its neighbour on the same link loses no poll.

gatewayd runs against a pymodbus server on which unit 7 never answers (like an absent unit on
RS-485). The neighbour (unit 1, a 3 s time-out) opens the link; the silent unit (0.3 s) is
either configured at start or added by SIGHUP to the open link. pymodbus works from its own
copy of the time-out of whoever opened the link, so the silent unit's requests used to run
into the poll's deadline instead: the driver saw a cancellation, its breaker never counted it,
and the silent unit was asked on every poll, taking the bus from its neighbour.

Counted, not timed: with `breaker_threshold = 3` and a long cool-down the server must see
exactly 3 requests for unit 7, its `device.unavailable` event must come from the breaker
(`offline_after` is out of reach), and the neighbour (`offline_after = 1`: one failed poll
would be an event) keeps producing a reading every poll, no cycle skipped.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

from tests.drivers_modbus.support import ModbusServer
from tests.support.daemon import Daemon, run_cli, start_daemon, write_config
from tests.support.peers import wait_until

HEAD = """
[gateway]
id = "gw-shared"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"
stop_timeout = {stop_timeout}

[store]
check_interval = 3600
"""

NEAR = """
[devices.near]
driver = "modbus"
host = "127.0.0.1"
port = PORT
unit = 1
interval = 0.8
jitter = 0.0
timeout = 3.0
offline_after = 1
[devices.near.points.v]
address = 0
"""

SILENT = """
[devices.silent]
driver = "modbus"
host = "127.0.0.1"
port = PORT
unit = 7
interval = 0.6
jitter = 0.0
timeout = 0.3
offline_after = 1000
breaker_threshold = 3
breaker_cooldown = 3600
[devices.silent.points.v]
address = 0
"""

SILENT_UNIT = 7
THRESHOLD = 3


def count(db: Path, device: str, kind: str) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE stream = ? AND type = ?", (f"device:{device}", kind)
        ).fetchone()
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        conn.close()
    return int(row[0])


def check_silent_unit_is_fenced_off(srv: ModbusServer, daemon: Daemon, db: Path) -> None:
    # Its own time-outs reach the breaker: unavailable after THRESHOLD unanswered requests.
    wait_until(
        lambda: count(db, "silent", "device.unavailable") >= 1,
        "the silent unit's breaker to open",
    )
    # The neighbour polls on; the silent unit, fenced off by its breaker, is not asked again.
    seen = count(db, "near", "readings")
    wait_until(lambda: count(db, "near", "readings") >= seen + 5, "five more neighbour readings")
    assert srv.asked(SILENT_UNIT) == THRESHOLD
    assert count(db, "near", "device.unavailable") == 0  # not one failed poll
    status = run_cli(daemon.config, "status", "--json")
    assert status.returncode == 0, status.stderr
    collection = json.loads(status.stdout)["services"]["collection"]
    assert collection["skipped_cycles"] == 0  # and not one cycle lost to an overrun


def test_silent_unit_configured_at_start(tmp_path: Path) -> None:
    srv = ModbusServer(tmp_path, {1: {"hr": [11]}}, silent=[SILENT_UNIT], name="link").start()
    text = HEAD + (NEAR + SILENT).replace("PORT", str(srv.port))
    daemon = start_daemon(write_config(tmp_path, text, stop_timeout=5), tmp_path)
    try:
        check_silent_unit_is_fenced_off(srv, daemon, tmp_path / "state" / "gateway.db")
    finally:
        daemon.stop()
        daemon.notify.close()
        srv.stop()


def test_silent_unit_added_by_sighup_to_an_open_link(tmp_path: Path) -> None:
    srv = ModbusServer(tmp_path, {1: {"hr": [11]}}, silent=[SILENT_UNIT], name="link").start()
    config = write_config(tmp_path, HEAD + NEAR.replace("PORT", str(srv.port)), stop_timeout=5)
    daemon = start_daemon(config, tmp_path)
    db = tmp_path / "state" / "gateway.db"
    try:
        wait_until(lambda: count(db, "near", "readings") >= 2, "the neighbour opens the link")
        text = HEAD + (NEAR + SILENT).replace("PORT", str(srv.port))
        write_config(tmp_path, text, stop_timeout=5)
        daemon.peer.signal(signal.SIGHUP)
        daemon.messages("RELOADING=1")
        daemon.messages("READY=1")
        check_silent_unit_is_fenced_off(srv, daemon, db)
    finally:
        daemon.stop()
        daemon.notify.close()
        srv.stop()
