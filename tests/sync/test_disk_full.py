"""A real full file system under a running gatewayd (a small tmpfs in a mount namespace,
with a real Mosquitto): the store says "disk full", and the relay loses no delivery and no
dead letter while it cannot record them; it records them, in order, once there is room."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.control import call
from tests.support.mqtt import Mosquitto, Subscriber
from tests.support.peers import IN_CI, Peer, require_binary, wait_until
from tests.support.store import fill_store
from tests.sync.test_daemon import ROOT, ctl, db_query, gatewayd

pytestmark = pytest.mark.peer("mosquitto")


def _need_root() -> None:
    if os.geteuid() != 0 and not IN_CI:
        pytest.skip("mounting a tmpfs in a mount namespace needs root")


def write_config(tmp: Path, port: int) -> Path:
    text = f"""
[gateway]
id = "gw"
state_dir = "{tmp / "state"}"
runtime_dir = "{tmp / "run"}"
watchdog = false

[store]
check_interval = 0.5

[devices.boiler-1]
driver = "virtual"
interval = 0.02

[devices.boiler-1.points.temperature]
signal = "sine"
base = 60.0

[sync]
retry.initial = 0.05
retry.cap = 0.5
breaker.cooldown = 0.5

[[sync.endpoints]]
url = "mqtt://127.0.0.1:{port}"
"""
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


def fill_up(directory: Path) -> Path:
    """Append to a file until the file system says ENOSPC (again: SQLite may free a little)."""
    filler = directory / "filler"
    for size in (65536, 512):  # then the last partial page
        with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * size)
    return filler


def outbox(config: Path) -> dict[str, Any]:
    rc, fig = ctl(config, "outbox")
    assert rc == 0, fig
    out: dict[str, Any] = fig
    return out


def test_disk_full_keeps_acks_and_dead_letters_and_says_disk_full(tmp_path: Path) -> None:
    """Issue 11 item 11: on SQLITE_FULL the explicit ROLLBACK raised "cannot rollback - no
    transaction is active" (the real error never logged), the raw sqlite3 error killed the
    relay's record task ("Task exception was never retrieved"), and the dead letters it had
    taken out of memory were gone: a later watermark passed them, neither delivered nor
    dead-lettered."""
    _need_root()
    require_binary("unshare")
    state = tmp_path / "state"
    state.mkdir()
    broker = Mosquitto()
    # The broker refuses the operator's stream: each of its events becomes a dead letter.
    acl = broker.file("acl", "topic deny gateways/gw/events/operator\ntopic readwrite #\n")
    broker.extra = f"acl_file {acl}\n"
    config = write_config(tmp_path, broker.port)
    log = tmp_path / "gatewayd.log"
    script = (
        f"mount -t tmpfs -o size=6m tmpfs {state} && "
        f"exec {sys.executable} -m gateway.daemon --config {config}"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    daemon = Peer(["unshare", "-m", "sh", "-c", script], env=env, log=log, cwd=ROOT)
    sub: Subscriber | None = None
    try:
        sock = tmp_path / "run" / "gatewayd.sock"
        wait_until(lambda: sock.exists() or not daemon.alive(), "gatewayd up", 600)
        assert daemon.alive(), log.read_text()
        # The daemon's view of its state dir (its mount namespace), seen from here.
        inside = Path(f"/proc/{daemon.pid}/root") / str(state).lstrip("/")
        assert (inside / "gateway.db").exists()
        notes = [call(sock, "note", {"text": f"note {i}"})["seq"] for i in range(5)]
        # Each note is also audited as a control.verb event on the same (refused) stream.
        refused = 2 * len(notes)
        filler = fill_up(inside)
        wait_until(lambda: "disk full" in log.read_text(), "appends refused: disk full", 600)
        # The broker comes: acks and refusals arrive while nothing can be written.
        broker.start()
        sub = Subscriber(broker.port, tmp_path)
        # The disk stays full (SQLite may free a little now and then: taken again).
        wait_until(lambda: fill_up(inside) is not None
                   and outbox(config).get("unrecorded_dead_letters", 0) >= refused,
                   "dead letters waiting to be recorded", 600)  # fmt: skip
        failures = outbox(config)["record_failures"]
        assert failures >= 1
        # A write holding them fails again: they are kept, not dropped.
        wait_until(
            lambda: fill_up(inside) is not None and outbox(config)["record_failures"] > failures,
            "a failed record", 600,
        )  # fmt: skip
        fig = outbox(config)
        assert fig["unrecorded_dead_letters"] == refused and fig["unrecorded"] > refused
        assert not {d["seq"] for d in ctl(config, "outbox", "dead-letters")[1]} & set(notes)
        text = log.read_text()
        assert "could not record deliveries and dead letters" in text
        assert "disk full: " in text and "SQLITE_FULL" in text, text[-3000:]
        assert "cannot rollback" not in text and "no transaction is active" not in text
        # Room comes back: what was kept is recorded, in order.
        filler.unlink()
        wait_until(
            lambda: {d["seq"] for d in ctl(config, "outbox", "dead-letters")[1]} >= set(notes),
            "dead letters recorded", 600,
        )  # fmt: skip
        wait_until(lambda: ctl(config, "outbox")[1]["backlog"] == 0, "outbox drained", 600)
        dead = ctl(config, "outbox", "dead-letters")[1]
        operator = {d["seq"] for d in dead if d["stream"] == "operator"}
        assert operator >= set(notes) and len(operator) == refused
        assert all(d["reason"].startswith("0x87") for d in dead)
        assert "recorded again after" in log.read_text()
        # (mosquitto_sub writes its file in blocks: wait for what it has received)
        wait_until(lambda: sub.events() != [], "events at the subscriber", 600)
        delivered = {e["seq"] for e in sub.events()}
        assert delivered and not delivered & set(notes)
    finally:
        daemon.stop(timeout=30)
        if sub is not None:
            sub.stop()
        broker.remove()
    text = log.read_text()
    assert daemon.proc.returncode == 0, text[-3000:]
    assert "Task exception was never retrieved" not in text
    assert "Traceback" not in text, text[-3000:]


async def test_full_store_at_start_delivers_and_prunes_its_way_back(tmp_path: Path) -> None:
    """Issue 11 item 10 with a real broker: a store at its quota (reject_new) used to stop
    gatewayd at start (exit 5), so the relay that could free space never ran. Now it starts
    degraded, delivers the backlog to Mosquitto, retention prunes what was delivered, and
    appends resume with nobody's help."""
    broker = Mosquitto().start()
    sub = Subscriber(broker.port, tmp_path)
    config = tmp_path / "gateway.toml"
    config.write_text(
        write_config(tmp_path, broker.port)
        .read_text()
        .replace(
            "[store]\n",
            '[store]\nquota_mb = 0.2\noverflow = "reject_new"\nretention_days = 0.00001\n',
        )
    )
    db = tmp_path / "state" / "gateway.db"
    await fill_store(db, 300 * 1024)
    backlog = db_query(db, "SELECT count(*) FROM outbox")[0][0]
    log = tmp_path / "gatewayd.log"
    daemon = gatewayd(config, log)
    try:
        wait_until(lambda: "starting degraded: disk quota reached" in log.read_text()
                   or not daemon.alive(), "degraded start", 600)  # fmt: skip
        assert daemon.alive(), log.read_text()
        wait_until(lambda: len(sub.events()) >= backlog, "backlog delivered", 600)
        wait_until(lambda: "store takes new events again" in log.read_text(), "resumed", 600)
        wait_until(
            lambda: db_query(db, "SELECT count(*) FROM events WHERE type = 'gateway.started'")
            == [(1,)], "gateway.started recorded", 600,
        )  # fmt: skip
        rc, st = ctl(config, "status")
        assert rc == 0 and st["store"]["full"] is None and "DEGRADED" not in st["status"]
    finally:
        daemon.stop(timeout=30)
        sub.stop()
        broker.remove()
    assert daemon.proc.returncode == 0, log.read_text()[-3000:]


MAKE_DB = """
import asyncio, os, sys
from gateway.store import EventStore

async def main(path, how):
    store = await EventStore.open(path)
    await store.append("device:x", "device.readings", {"r": [1]})
    if how == "crashed":
        os._exit(0)  # -wal and -shm left behind, as after a power cut
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _notified(sock: socket.socket, until: tuple[str, ...], got: list[str], log: Path) -> str:
    """The next notify message holding one of `until` (bounded: a socket time-out or 400
    messages without it fail the test)."""
    for _ in range(400):
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(u in got[-1] for u in until):
            return got[-1]
    raise AssertionError(f"none of {until}: {got[-5:]}\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("how", ["clean", "crashed"])
def test_daemon_on_a_full_disk_starts_or_waits_and_resumes_when_space_comes_back(
    tmp_path: Path, how: str
) -> None:
    """Issue 11 item 10 on a real full file system. After a clean stop gatewayd starts
    degraded (READY=1 with a STATUS= saying why) and takes events again once there is room.
    After a crash SQLite cannot even open the file (no room for its -shm index): gatewayd
    neither exits nor moves the database aside as "corrupt" (it did both): it says why in
    STATUS=, waits for room, and starts then."""
    _need_root()
    require_binary("unshare")
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "gateway.toml"
    config.write_text(
        write_config(tmp_path, 1).read_text().split("[sync]")[0]  # no cloud: not needed here
    )
    maker = tmp_path / "make_db.py"
    maker.write_text(MAKE_DB)
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    filler = state / "filler"
    script = (
        f"mount -t tmpfs -o size=6m tmpfs {state} && "
        f"{sys.executable} {maker} {state / 'gateway.db'} {how} || exit 9; "
        f"cat /dev/zero > {filler} 2>/dev/null; "
        f"exec {sys.executable} -m gateway.daemon --config {config}"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(notify_path))
    log = tmp_path / "gatewayd.log"
    daemon = Peer(["unshare", "-m", "sh", "-c", script], env=env, log=log, cwd=ROOT)
    got: list[str] = []
    try:
        inside = Path(f"/proc/{daemon.pid}/root") / str(filler).lstrip("/")
        # Which of the two happens depends on whether SQLite finds room for its -shm index.
        first = _notified(sock, ("READY=1", "waiting for room to open the database"), got, log)
        if "READY=1" in first:
            assert "STATUS=DEGRADED, new events refused: disk full" in first, first
            rc, st = ctl(config, "status")
            assert rc == 0 and "SQLITE_FULL" in str(st["store"]["full"])
            inside.unlink()
        else:
            assert "disk full" in first and daemon.alive(), first
            inside.unlink()
            _notified(sock, ("READY=1",), got, log)
        wait_until(lambda: ctl(config, "status")[1]["store"]["full"] is None, "resumed", 600)
        rc, st = ctl(config, "status")
        assert st["store"]["last_seq"] > 1 and "DEGRADED" not in st["status"]
        assert "corrupt" not in log.read_text()
    finally:
        daemon.stop(timeout=30)
        sock.close()
    assert daemon.proc.returncode == 0, log.read_text()[-3000:]
