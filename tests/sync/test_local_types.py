"""`[sync] local_types`: event types that stay in the local log (e.g. raw readings, when the
cloud takes the processing windows' aggregates instead), through a real Mosquitto."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.core.conftest import Daemon, daemon_factory, run_cli, start_daemon
from tests.peers import wait_until
from tests.sync.conftest import Mosquitto, Subscriber

pytestmark = pytest.mark.peer("mosquitto")
__all__ = ["daemon_factory"]  # the fixture, from the core suite

CONFIG = """
[gateway]
id = "gw"
state_dir = "{state}"
runtime_dir = "{run}"
watchdog = false

[devices.meter-1]
driver = "virtual"
interval = 0.05
[devices.meter-1.points.energy]
signal = "counter"

[processing.meter-1.energy]
window = "1s"

[sync]
local_types = ["readings"]
retry.initial = 0.05
[[sync.endpoints]]
url = "mqtt://127.0.0.1:{port}"
"""


def test_local_types_stay_in_the_log_and_the_rest_is_delivered(
    tmp_path: Path, mosquitto: Mosquitto, daemon_factory: list[Daemon]
) -> None:
    config = tmp_path / "config.toml"
    state = tmp_path / "state"
    config.write_text(CONFIG.format(state=state, run=tmp_path / "run", port=mosquitto.port))
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        d = start_daemon(config, tmp_path)
        daemon_factory.append(d)
        wait_until(
            lambda: sum(e["type"] == "aggregate" for e in sub.events()) >= 2,
            "two window aggregates delivered", attempts=600,
        )  # fmt: skip
        assert d.stop() == 0
        got = sub.events()
        conn = sqlite3.connect(f"file:{state / 'gateway.db'}?mode=ro", uri=True)
        try:
            readings = conn.execute("SELECT count(*) FROM events WHERE type = 'readings'")
            assert readings.fetchone()[0] > 20  # recorded locally...
            in_outbox = conn.execute(
                "SELECT count(*) FROM outbox o JOIN events e ON e.seq = o.seq "
                "WHERE e.type = 'readings'"
            )
            assert in_outbox.fetchone()[0] == 0
        finally:
            conn.close()
        assert not [e for e in got if e["type"] == "readings"]  # ...never sent
        assert {"aggregate", "gateway.started"} <= {e["type"] for e in got}
        r = run_cli(config, "readings", "meter-1")
        assert r.returncode == 0 and "energy" in r.stdout
    finally:
        sub.stop()


def test_local_types_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    body = CONFIG.format(state=tmp_path, run=tmp_path, port=1883)
    config.write_text(body.replace('local_types = ["readings"]', 'local_types = ["Readings!"]'))
    r = run_cli(config, "config", "check")
    assert r.returncode == 3
    assert "sync.local_types[0]: must be an event type such as 'readings'" in r.stderr
