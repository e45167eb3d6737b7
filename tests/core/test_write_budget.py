"""The write budget (issue 15, item 1): polled readings wait up to `commit_interval` for
company, so an SD card sees a few large commits instead of one per reading; an append
somebody waits for still commits before it is acknowledged, and takes them along; a stop
commits whatever was held back."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import cbor2

from tests.support.daemon import Daemon, run_cli, start_daemon, write_config

CONFIG = """
[gateway]
id = "gw-test"
state_dir = "{state}"
runtime_dir = "{run}"
stop_timeout = {stop_timeout}

[store]
commit_interval = 60        # longer than the test: only a waited append or a stop commits

[devices.meter-1]
driver = "virtual"
interval = 0.02

[devices.meter-1.points.energy]
signal = "counter"
"""


def counter_values(db: Path) -> list[tuple[int, float]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT seq, data FROM events WHERE stream = 'device:meter-1' AND type = 'readings' "
            "ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [(seq, r["v"]) for seq, blob in rows for r in cbor2.loads(blob)["r"]]


def test_held_readings_commit_with_a_waited_append_and_at_stop(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, CONFIG)
    db = tmp_path / "state" / "gateway.db"
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    # `note` is acknowledged after its commit; the readings queued before it ride along.
    seqs = []
    for _ in range(3):
        r = run_cli(config, "note", "checked the meter")
        assert r.returncode == 0, r.stderr
        seqs.append(int(r.stdout.split()[-1]))
        if any(seq < seqs[-1] for seq, _ in counter_values(db)):
            break
    taken_along = counter_values(db)
    # (Readings queued after the note may ride with its audit event, appended just after.)
    assert any(seq < seqs[-1] for seq, _ in taken_along)
    status = json.loads(run_cli(config, "--json", "status").stdout)
    assert status["store"]["written_bytes"] > 0 and status["store"]["written_per_day"] > 0
    assert "/day" in run_cli(config, "status").stdout
    assert d.stop() == 0
    # Stopped: everything held back is committed, and nothing was lost on the way.
    values = [v for _, v in counter_values(db)]
    assert len(values) > len(taken_along)
    assert values == [float(i) for i in range(len(values))]


def test_a_waited_append_is_durable_when_acknowledged_under_the_interval(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    """SIGKILL right after an acknowledgement: the note is there (readings held back may
    not be: nobody was told they were stored)."""
    config = write_config(tmp_path, CONFIG)
    db = tmp_path / "state" / "gateway.db"
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    r = run_cli(config, "note", "before the power cut")
    assert r.returncode == 0, r.stderr
    seq = int(r.stdout.split()[-1])
    d.kill()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT data FROM events WHERE seq = ?", (seq,)).fetchone()
    finally:
        conn.close()
    assert row is not None and cbor2.loads(row[0])["text"] == "before the power cut"
