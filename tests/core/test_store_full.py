"""A full store is not a dead end: the shipped config (no [sync]) never fills up with an
undeliverable backlog, a daemon on a store at its quota starts degraded and recovers by
itself, and refusals are logged once per kind per interval, not once each."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import sys
import time
from pathlib import Path

from gateway import config as cfg
from gateway.config import StoreConfig
from gateway.control import call
from gateway.errors import StoreError, StoreFullError
from gateway.logs import REPEAT_INTERVAL
from gateway.store import EventStore
from tests.support.daemon import Daemon, run_cli, start_daemon
from tests.support.peers import Peer, free_port, wait_until
from tests.support.store import fill_store

ROOT = Path(__file__).resolve().parents[2]


def shipped_config(tmp: Path, store: dict[str, str], extra: str = "") -> Path:
    """The shipped config.toml with its state in `tmp` and the [store] keys replaced/added."""
    text = (ROOT / "config.toml").read_text()
    text = text.replace('state_dir = "var/lib"', f'state_dir = "{tmp / "state"}"')
    text = text.replace('runtime_dir = "var/run"', f'runtime_dir = "{tmp / "run"}"')
    for key, value in store.items():
        line = re.compile(rf"^{key} = .*$", re.M)
        if line.search(text):
            text = line.sub(f"{key} = {value}", text, count=1)
        else:
            text = text.replace("[store]\n", f"[store]\n{key} = {value}\n", 1)
    # A table given in `extra` replaces the shipped one (TOML cannot declare it twice).
    for name in re.findall(r"^\[([\w.-]+)\]$", extra, flags=re.M):
        text = re.sub(rf"^\[{re.escape(name)}\]\n(?:(?!\[).*\n?)*", "", text, flags=re.M)
    path = tmp / "config.toml"
    path.write_text(text + "\n" + extra)
    return path


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def status(config: Path) -> dict[str, object]:
    r = run_cli(config, "--json", "status")
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def coap_section(port: int) -> str:
    return (
        f'[coap]\nbind = ["127.0.0.1"]\nport = {port}\n'
        "allow_unauthenticated = true\naccept_unknown_devices = true\n"
    )


async def _post_until(port: int, target: int, refusals_in_a_row: int) -> tuple[int, int]:
    """POST one SenML reading at a time as an unknown device until `target` were accepted
    (2.04); a refusal (5.03, the store is full) is retried (a bounded number of times in a
    row) until the next retention prune makes room. Returns (accepted, refused)."""
    from aiocoap import POST, Context, Message

    ctx = await Context.create_client_context()
    accepted = refused = in_a_row = 0
    try:
        i = 0
        while accepted < target:
            i += 1
            body = json.dumps([{"bn": "probe-1/", "n": "level", "v": i}]).encode()
            msg = Message(code=POST, uri=f"coap://127.0.0.1:{port}/telemetry",
                          content_format=110, payload=body)  # fmt: skip
            resp = await ctx.request(msg).response
            if str(resp.code).startswith("2.04"):
                accepted += 1
                in_a_row = 0
                continue
            assert str(resp.code).startswith("5.03"), (resp.code, resp.payload)
            refused += 1
            in_a_row += 1
            assert in_a_row <= refusals_in_a_row, f"refused for good: {resp.payload!r}"
            await asyncio.sleep(0.05)  # polling for the prune (every 0.2 s), no event to await
    finally:
        await ctx.shutdown()
    return accepted, refused


async def test_shipped_config_without_sync_keeps_taking_events_past_the_quota(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    """Issue 11 item 8: with no [sync], events were kept as undelivered forever, so a store
    at its quota refused every reading for good. Now no outbox rows are written and
    retention prunes by age: thousands of readings past the quota are all taken."""
    port = free_port(socket.SOCK_DGRAM)
    config = shipped_config(
        tmp_path,
        {"quota_mb": "0.2", "retention_days": "0.00001", "check_interval": "0.2"},
        coap_section(port),
    )
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    db = cfg.load(config).db_path
    # About 1,000 such events fit in 0.2 MB: 4,000 are four times past where main refused.
    accepted, _refused = await _post_until(port, 4000, refusals_in_a_row=200)
    assert accepted == 4000
    assert count(db, "SELECT count(*) FROM outbox") == 0
    assert count(db, "SELECT count(*) FROM events WHERE stream = 'device:probe-1'") < 4000
    st = status(config)
    store = st["store"]
    assert isinstance(store, dict) and store["used_bytes"] <= store["quota_bytes"] * 1.5
    assert "retention: pruned" in d.log.read_text()
    assert d.stop() == 0


FULL_CONFIG = """
[gateway]
id = "gw-full"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"

[store]
quota_mb = 0.2
overflow = "reject_new"
check_interval = 0.2

[devices.boiler-1]
driver = "virtual"
interval = {interval}

[devices.boiler-1.points.temperature]
signal = "sine"
base = 60.0
{more}
"""


async def full_store(tmp: Path, interval: float = 0.5, devices: int = 1) -> Path:
    more = "".join(
        f'[devices.fast-{i}]\ndriver = "virtual"\ninterval = {interval}\n'
        f'[devices.fast-{i}.points.level]\nsignal = "counter"\n'
        for i in range(devices - 1)
    )
    config = tmp / "config.toml"
    config.write_text(FULL_CONFIG.format(state=tmp / "state", run=tmp / "run",
                                         interval=interval, more=more))  # fmt: skip
    await fill_store(cfg.load(config).db_path, 300 * 1024, "gw-full")
    return config


def start_notified(config: Path, tmp: Path) -> tuple[Daemon, list[str]]:
    """start_daemon, keeping the notify messages up to READY=1."""
    notify_path = tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    env["NOTIFY_SOCKET"] = str(notify_path)
    log = tmp / "gatewayd.log"
    peer = Peer([sys.executable, "-m", "gateway.daemon", "--config", str(config)], env=env, log=log)
    d = Daemon(peer, config, sock, log)
    try:
        ready = d.messages("READY=1")
    except AssertionError:
        d.stop()
        sock.close()
        raise
    return d, ready


async def test_daemon_starts_degraded_on_a_full_store_and_resumes_when_space_comes_back(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    """Issue 11 item 10: `gateway.started` and the devices service's registrations were
    refused on a store at its quota, and gatewayd exited 5. Now it comes up degraded, says
    so (READY's STATUS=, gatewayctl status, the log), and once a prune makes room it takes
    events again by itself: the postponed ones and new readings."""
    config = await full_store(tmp_path)
    db = cfg.load(config).db_path
    d, ready = start_notified(config, tmp_path)
    daemon_factory.append(d)
    status_line = next(m for m in ready if "READY=1" in m)
    assert "DEGRADED, new events refused: disk quota reached" in status_line, ready
    st = status(config)
    assert "DEGRADED" in str(st["status"])
    store = st["store"]
    assert isinstance(store, dict) and "disk quota reached" in str(store["full"])
    services = st["services"]
    assert isinstance(services, dict) and services["devices"]["state"] == "degraded"
    r = run_cli(config, "status")
    assert r.returncode == 0 and "DEGRADED, new events refused" in r.stdout
    assert "starting degraded: disk quota reached" in d.log.read_text()
    assert count(db, "SELECT count(*) FROM events WHERE type = 'gateway.started'") == 0

    # Room comes back (an operator's prune here; retention or delivery in the field).
    sock = cfg.load(config).socket_path
    pruned = call(sock, "db.prune", {"older_than": 0})["pruned"]
    assert pruned > 0
    wait_until(lambda: status(config)["store"]["full"] is None, "appends resumed")  # type: ignore[index]
    wait_until(
        lambda: (
            count(db, "SELECT count(*) FROM events WHERE type = 'gateway.started'") == 1
            and count(db, "SELECT count(*) FROM events WHERE type = 'device.registered'") == 1
            and count(db, "SELECT count(*) FROM latest WHERE device = 'boiler-1'") == 1
        ),
        "postponed events and new readings recorded",
    )
    st = status(config)
    assert "DEGRADED" not in str(st["status"])
    services = st["services"]
    assert isinstance(services, dict) and services["devices"]["state"] == "ok"
    assert "store takes new events again" in d.log.read_text()
    assert d.stop() == 0
    d.notify.close()


async def test_a_flood_of_refused_readings_is_one_log_line_per_interval(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    """Issue 11 item 12: one warning per refused reading (~1,600 lines/s with fast devices).
    Now the first refusal is logged, the rest are counted into one line per interval."""
    config = await full_store(tmp_path, interval=0.005, devices=8)
    began = time.monotonic()
    d, _ = start_notified(config, tmp_path)
    daemon_factory.append(d)
    wait_until(
        lambda: status(config)["store"]["rejected"] >= 500,  # type: ignore[index]
        "500 readings refused", attempts=600,
    )  # fmt: skip
    assert d.stop() == 0
    intervals = int((time.monotonic() - began) // REPEAT_INTERVAL) + 1
    d.notify.close()
    lines = [ln for ln in d.log.read_text().splitlines() if "readings not stored" in ln]
    # The first, then one line with the count per interval (the last one at stop).
    assert 2 <= len(lines) <= 1 + intervals, lines[:5]
    counted = [int(m.group(1)) for ln in lines[1:]
               if (m := re.search(r"repeated (\d+) times in the last \d+ s", ln))]  # fmt: skip
    assert len(counted) == len(lines) - 1 and sum(counted) >= 100, lines


async def _sqlite_full(tmp: Path) -> None:
    store = await EventStore.open(tmp / "s.db", StoreConfig(linger_ms=0))
    try:
        # A page limit makes SQLite answer SQLITE_FULL exactly as a full disk does.
        pages = await store.write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await store.write(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}"))
        err: BaseException | None = None
        for i in range(2000):
            try:
                await store.append("device:x", "device.readings", {"r": [i, "y" * 500]})
            except Exception as exc:
                err = exc
                break
        assert isinstance(err, StoreFullError), repr(err)
        assert err.cause == "disk" and "disk full" in str(err) and "SQLITE_FULL" in str(err)
        assert store.full is not None and store.healthy()
        # A raw sqlite3 error never leaves the store's API, from a write or a read.
        for call_store in (store.write, store.read):
            try:
                await call_store(lambda c: c.execute("SELECT * FROM no_such_table"))
            except Exception as exc:
                assert isinstance(exc, StoreError) and not isinstance(exc, sqlite3.Error), exc
                assert "no such table: no_such_table" in str(exc)
            else:
                raise AssertionError("no error")
        # Room again: appends go on by themselves.
        await store.write(lambda c: c.execute("PRAGMA max_page_count = 1000000"))
        await store.append("device:x", "device.readings", {"r": [1]})
        assert store.full is None
    finally:
        await store.close()


async def test_sqlite_full_is_storefull_with_its_cause_and_no_raw_sqlite_error_escapes(
    tmp_path: Path,
) -> None:
    """Issue 11 item 11, in the store's API: SQLITE_FULL was replaced by "cannot rollback -
    no transaction is active" (SQLite had rolled back itself), and raw sqlite3 errors came
    out of `write`/`read`."""
    await _sqlite_full(tmp_path)
