"""Acknowledged means durable: every request answered 2.04 survives a SIGKILL of the server
sent the moment the answer arrives (no graceful shutdown, no WAL checkpoint)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import cbor2


async def _flood(uri: str, count: int, kill_after: int, pid: int) -> set[int]:
    from aiocoap import POST, Context, Message

    ctx = await Context.create_client_context(transports=["udp6"])
    acked: set[int] = set()
    killed = asyncio.Event()

    async def one(i: int) -> None:
        payload = cbor2.dumps([{-2: "dev-k/", 0: "seq", 2: i}])
        msg = Message(code=POST, uri=uri, payload=payload, content_format=112)
        try:
            response = await asyncio.wait_for(ctx.request(msg).response, 5)
        except Exception:
            return  # unanswered (the server is gone): nothing was promised
        if response.code.is_successful() and not killed.is_set():
            acked.add(i)
            if len(acked) >= kill_after:
                os.kill(pid, signal.SIGKILL)  # right after the answer, before anything else
                killed.set()

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await ctx.shutdown()
    return acked


def test_every_2_04_survives_sigkill(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    assert gw.peer is not None
    acked = asyncio.run(_flood(gw.uri("/telemetry"), 200, 60, gw.peer.pid))
    gw.peer.proc.wait(10)
    assert gw.peer.proc.returncode == -signal.SIGKILL
    assert len(acked) >= 60
    conn = sqlite3.connect(gw.db)  # recovers from the WAL, as the next start would
    try:
        stored = {
            rec["v"]
            for (data,) in conn.execute("SELECT data FROM events WHERE type = 'readings'")
            for rec in cbor2.loads(data)["r"]
        }
        outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        conn.close()
    missing = acked - stored
    assert not missing, f"acknowledged but lost: {sorted(missing)}"
    # Each acknowledged event is also in the outbox (same transaction), waiting for the relay.
    assert outbox >= len(acked)
