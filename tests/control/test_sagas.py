"""Sagas against a pymodbus slave: completed, or compensated in reverse when a step fails;
and a SIGKILL at every step and every compensation boundary in turn (a loop over all kill
points, `GATEWAY_FAULT_KILL_AT`): after each restart the saga ends completed or fully
compensated, the slave's registers match the log, and `gatewayctl saga show` says which."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest

from services.control.sagas import show
from tests.control.support import cli, control_config
from tests.drivers_modbus.support import ModbusServer, mbpoll
from tests.support.daemon import Daemon, start_daemon
from tests.support.peers import require_binary, wait_until

SAGAS = """
[devices.plc.points.valve]
address = 2
writable = true

[devices.plc.points.pump]
address = 3
writable = true

[sagas.start-pump]
steps = [
  { write = "plc/valve", value = 1, undo = 0 },
  { wait = "plc/valve >= 1", timeout = 10 },
  { write = "plc/pump", value = 1, undo = 0 },
]

[sagas.start-broken]
steps = [
  { write = "plc/valve", value = 1, undo = 0 },
  { wait = "plc/valve >= 1", timeout = 10 },
  { write = "mute/setpoint", value = 1 },
]
"""


def saga(db: Path, sid: str) -> dict[str, Any] | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return show(conn, sid)
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def registers(server: ModbusServer) -> list[int]:
    args = ["-m", "tcp", "-p", str(server.port), "-a", "1", "-t", "4", "-r", "2", "-c", "2"]
    return [int(v) for v in mbpoll("127.0.0.1", *args)]


def reset(server: ModbusServer) -> None:
    """valve and pump back to 0, written by mbpoll (host first, then the values)."""
    subprocess.run(
        [require_binary("mbpoll"), "-1", "-0", "-m", "tcp", "-p", str(server.port), "-a", "1",
         "-t", "4", "-r", "2", "127.0.0.1", "0", "0"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    assert registers(server) == [0, 0]


def logged(db: Path) -> dict[str, int]:
    """What the log says each register holds: the last succeeded write to it (else 0)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT point, value FROM commands WHERE device = 'plc' AND status = 'succeeded' "
            "ORDER BY updated"
        ).fetchall()
    finally:
        conn.close()
    out = {"valve": 0, "pump": 0}
    for point, value in rows:
        out[point] = int(cbor2.loads(value))
    return out


def finished(db: Path, sid: str) -> dict[str, Any]:
    def ended() -> bool:
        s = saga(db, sid)
        return s is not None and s["status"] in ("completed", "compensated", "failed")

    wait_until(ended, f"saga {sid} ends", attempts=600)
    row = saga(db, sid)
    assert row is not None
    return row


def bus_idle(d: Daemon) -> None:
    """The first poll of the silent unit (`mute`, 0.9 s time-out) holds the shared bus at
    start: a saga started meanwhile has its first write wait behind it, and on a busy
    machine run out of time (a real outcome, but not the path these tests replay)."""
    wait_until(lambda: "modbus mute: no answer" in d.log.read_text(), "mute's first poll")


def run_once(tmp: Path, server: ModbusServer, name: str, sid: str) -> list[str]:
    """A run without faults; returns its kill points in order."""
    tmp.mkdir()
    config = control_config(tmp, server.port, extra=SAGAS)
    d = start_daemon(config, tmp)
    try:
        bus_idle(d)
        out = cli(config, "saga", "run", name, "--id", sid, "--wait")
        db = tmp / "state" / "gateway.db"
        row = finished(db, sid)
        assert out.returncode == (0 if row["status"] == "completed" else 1), out.stderr
        assert f"saga {sid} ({name}): {row['status']}" in out.stdout
        points = [f"saga.started:{sid}"]
        for e in row["events"][1:]:
            points.append(f"{e['type']}:{e.get('step', '')}")
        for cid in {e["command"] for e in row["events"] if "command" in e}:
            points.append(f"command.sent:{cid}")
        return points
    finally:
        d.stop()
        d.notify.close()


@pytest.mark.parametrize(("name", "end", "final"), [
    ("start-pump", "completed", [1, 1]),
    ("start-broken", "compensated", [0, 0]),
])  # fmt: skip
def test_saga_resumes_after_a_sigkill_at_every_boundary(
    tmp_path: Path, server: ModbusServer, monkeypatch: pytest.MonkeyPatch,
    name: str, end: str, final: list[int],
) -> None:  # fmt: skip
    points = run_once(tmp_path / "clean", server, name, "s0")
    assert registers(server) == final
    assert len(points) >= 8
    for n, point in enumerate(points):
        point = point.replace(":s0.", f":k{n}.").replace(":s0", f":k{n}")
        sid = f"k{n}"
        reset(server)
        tmp = tmp_path / sid
        tmp.mkdir()
        config = control_config(tmp, server.port, extra=SAGAS)
        db = tmp / "state" / "gateway.db"
        monkeypatch.setenv("GATEWAY_FAULT_KILL_AT", point)
        d = start_daemon(config, tmp)
        monkeypatch.delenv("GATEWAY_FAULT_KILL_AT")
        d2: Daemon | None = None
        try:
            bus_idle(d)
            cli(config, "saga", "run", name, "--id", sid)  # the daemon may die answering
            assert d.peer.proc.wait(60) == -9, f"{point}: the daemon did not die there"
            d.stop()
            d2 = start_daemon(config, tmp, name="gatewayd-2")
            row = finished(db, sid)
            assert row["status"] in ("completed", "compensated"), (point, row)
            if point.startswith(("saga.completed", "saga.compensated")) or "undo" in point:
                assert row["status"] == end, (point, row)
            got = registers(server)
            want = logged(db)
            assert got == [want["valve"], want["pump"]], (point, got, want, row)
            if row["status"] == "compensated":
                assert got == [0, 0], (point, row)
            else:
                assert got == [1, 1], (point, row)
            out = cli(config, "saga", "show", sid)
            assert f"saga {sid} ({name}): {row['status']}" in out.stdout, out.stdout
        finally:
            d.stop()
            d.notify.close()
            if d2 is not None:
                d2.stop()
                d2.notify.close()
