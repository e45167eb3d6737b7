"""A full store is not a dead end: the shipped config (no [sync]) never fills up with an
undeliverable backlog, a daemon on a store at its quota starts degraded and recovers by
itself, and refusals are logged once per kind per interval, not once each."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
from pathlib import Path

from gateway import config as cfg
from gateway.control import call
from gateway.store import EventStore
from tests.core.conftest import Daemon, run_cli, start_daemon
from tests.peers import free_port, wait_until

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


def test_shipped_config_without_sync_keeps_taking_events_past_the_quota(
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
    accepted, refused = asyncio.run(_post_until(port, 4000, refusals_in_a_row=200))
    assert accepted == 4000
    assert count(db, "SELECT count(*) FROM outbox") == 0
    assert count(db, "SELECT count(*) FROM events WHERE stream = 'device:probe-1'") < 4000
    st = status(config)
    store = st["store"]
    assert isinstance(store, dict) and store["used_bytes"] <= store["quota_bytes"] * 1.5
    assert "retention: pruned" in d.log.read_text()
    assert d.stop() == 0
