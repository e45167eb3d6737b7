"""Helpers for the processing and notification tests: a config header and event-log readers."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from gateway import config as cfg

HEADER = """
[gateway]
id = "gw-test"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"
stop_timeout = {stop_timeout}

[store]
synchronous = "full"
check_interval = 3600
"""


def db_path(config: Path) -> Path:
    return cfg.load(config).db_path


def socket_path(config: Path) -> Path:
    return cfg.load(config).socket_path


def events(config: Path, type_: str | None = None, stream: str | None = None) -> list[Any]:
    """(seq, stream, type, wall_time, data) of the log's events, oldest first."""
    db = db_path(config)
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        sql = "SELECT seq, stream, type, wall_time, data FROM events WHERE 1"
        args: list[Any] = []
        if type_ is not None:
            sql += " AND type = ?"
            args.append(type_)
        if stream is not None:
            sql += " AND stream = ?"
            args.append(stream)
        try:
            rows = conn.execute(sql + " ORDER BY seq", args).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
        return [(s, st, t, w, cbor2.loads(d)) for s, st, t, w, d in rows]
    finally:
        conn.close()


def readings(config: Path, device: str, point: str) -> list[tuple[int, dict[str, Any]]]:
    """(seq, record) of every reading of one point, oldest first."""
    out = []
    for seq, _s, _t, _w, data in events(config, "readings", f"device:{device}"):
        for rec in data.get("r", ()):
            if rec.get("n") == point:
                out.append((seq, rec))
    return out


def alert_events(config: Path, rule: str) -> list[tuple[int, str, float, dict[str, Any]]]:
    """(seq, type, wall_time, data) of one rule's raises and clears."""
    return [
        (seq, t, wall, data)
        for seq, _s, t, wall, data in events(config, stream=f"alert:{rule}")
        if t in ("alert.raised", "alert.cleared")
    ]
