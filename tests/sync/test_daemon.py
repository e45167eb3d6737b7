"""The relay inside the real `gatewayd` process: SIGKILL during a drain, again and again,
loses nothing; `gatewayctl outbox` shows the figures, dead letters, and requeues them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.store import EventStore
from tests.peers import Peer, wait_until
from tests.sync.conftest import Mosquitto, Subscriber
from tests.sync.helpers import check_order

pytestmark = pytest.mark.peer("mosquitto")

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, port: int, **sync: Any) -> Path:
    lines = [
        "[gateway]", 'id = "gw"', f'state_dir = "{tmp / "state"}"',
        f'runtime_dir = "{tmp / "run"}"', "watchdog = false",
        "[sync]", "retry.initial = 0.05", "retry.cap = 0.5", "breaker.cooldown = 0.5",
    ]  # fmt: skip
    lines += [f"{k} = {json.dumps(v)}" for k, v in sync.items()]
    lines += ["[[sync.endpoints]]", f'url = "mqtt://127.0.0.1:{port}"']
    path = tmp / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fill(db: Path, streams: dict[str, int]) -> None:
    async def go() -> None:
        store = await EventStore.open(db, gateway_id="gw")
        try:
            for stream, n in streams.items():
                for i in range(n):
                    await store.append_many([_ne(stream, {"r": [{"n": "t", "v": i}]})])
        finally:
            await store.close()

    asyncio.run(go())


def _ne(stream: str, data: dict[str, Any]) -> Any:
    from gateway.events import NewEvent

    return NewEvent(stream, "readings", data)


def gatewayd(config: Path, log: Path) -> Peer:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return Peer([sys.executable, "-m", "gateway.daemon", "--config", str(config)],
                env=env, log=log, cwd=ROOT)  # fmt: skip


def db_query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def ctl(config: Path, *args: str) -> tuple[int, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "--config", str(config), "--json", *args],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else p.stderr
    except ValueError:
        return p.returncode, p.stdout + p.stderr


def test_sigkill_during_drain_repeatedly_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    config = write_config(tmp_path, mosquitto.port, batch_size=2, inflight=1)
    db = tmp_path / "state" / "gateway.db"
    fill(db, {f"device:d{i}": 800 for i in range(5)})
    kills = 0
    try:
        for threshold in (150, 600, 1200):  # messages of 2 events, of 2000
            daemon = gatewayd(config, tmp_path / f"gatewayd.{kills}.log")
            try:
                wait_until(lambda t=threshold: len(sub.raw()) >= t, "a drain in progress", 600)
                assert db_query(db, "SELECT count(*) FROM outbox")[0][0] > 0, "still draining"
            finally:
                daemon.signal(signal.SIGKILL)
                daemon.stop()
            kills += 1
        daemon = gatewayd(config, tmp_path / "gatewayd.final.log")
        try:
            wait_until(lambda: db_query(db, "SELECT count(*) FROM outbox")[0][0] == 0,
                       "outbox drained after the last restart", 1200)  # fmt: skip
            want = {f"gw:{s}" for (s,) in db_query(db, "SELECT seq FROM events")}
            wait_until(lambda: want <= {e["key"] for e in sub.events()}, "all at subscriber", 600)
        finally:
            daemon.stop()
        events = sub.events()
        per_stream = check_order(events)
        for i in range(5):
            stream = f"device:d{i}"
            versions = db_query(db, f"SELECT version FROM events WHERE stream = '{stream}' "
                                    "ORDER BY seq")  # fmt: skip
            assert per_stream[stream] == [v for (v,) in versions]
            assert per_stream[stream][:800] == list(range(1, 801))
        duplicates = len(events) - len({e["key"] for e in events})
        # Only what was in flight or acked-but-not-yet-recorded at each kill comes twice.
        assert duplicates <= kills * 200, duplicates
    finally:
        sub.stop()


def test_gatewayctl_outbox_dead_letters_and_requeue(tmp_path: Path) -> None:
    broker = Mosquitto()
    acl = broker.file("acl", "topic deny gateways/gw/events/device:poison\ntopic readwrite #\n")
    broker.extra = f"acl_file {acl}\n"
    broker.start()
    sub = Subscriber(broker.port, tmp_path)
    config = write_config(tmp_path, broker.port)
    db = tmp_path / "state" / "gateway.db"
    fill(db, {"device:a": 20, "device:poison": 3})
    daemon = gatewayd(config, tmp_path / "gatewayd.log")
    try:
        wait_until(lambda: db_query(db, "SELECT count(*) FROM outbox")[0][0] == 0,
                   "outbox settled", 600)  # fmt: skip
        # Every event of the denied stream (ours, and the devices service's own) is dead.
        poison = db_query(db, "SELECT count(*) FROM events WHERE stream = 'device:poison'")[0][0]
        assert poison >= 3
        rc, fig = ctl(config, "outbox")
        assert rc == 0 and fig["live"] is True
        assert fig["backlog"] == 0 and fig["link"] == "connected"
        assert fig["endpoint"] == f"mqtt://127.0.0.1:{broker.port}"
        assert fig["breaker"] == "closed" and fig["delivered"] >= 20
        rc, dead = ctl(config, "outbox", "dead-letters")
        assert rc == 0 and [d["stream"] for d in dead] == ["device:poison"] * poison
        assert all(d["reason"].startswith("0x87 Not authorized") for d in dead)
        # Fix the broker's ACL; requeue through the daemon.
        acl.write_text("topic readwrite #\n")
        broker.stop()
        broker.start()
        wait_until(lambda: broker.log().count("as test-sub-") >= 2, "subscriber back")
        assert ctl(config, "outbox", "retry")[0] == 0
        rc, res = ctl(config, "outbox", "requeue", "--all")
        assert rc == 0 and len(res["requeued"]) == poison
        wait_until(lambda: db_query(db, "SELECT count(*) FROM outbox")[0][0] == 0
                   and db_query(db, "SELECT count(*) FROM dead_letters")[0][0] == 0,
                   "requeued and delivered", 600)  # fmt: skip
        wait_until(lambda: any(e["stream"] == "device:poison" for e in sub.events()),
                   "poison stream delivered", 600)  # fmt: skip
    finally:
        daemon.stop()
        sub.stop()
        broker.remove()
    # Daemon down: the figures still come, read-only from the file.
    rc, fig = ctl(config, "outbox")
    assert rc == 0 and fig["live"] is False and fig["dead_letters"] == 0
    rc, _ = ctl(config, "outbox", "requeue", "--all")
    assert rc == 4  # needs the daemon: "unavailable"
