"""Alerts as a projection of their events (stream `alert:<rule>`): one row per rule with its
current episode, and per delivery channel the seq of the last alert event it is done with.
Both commit with the events that change them, so a restart knows what is active and what
was delivered."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Final

import cbor2

from gateway import events as ev
from gateway.events import Event

ALERT_ACKED: Final = "alert.acked"  # data: {"episode": n, "by": str}
ALERT_DELIVERED: Final = "alert.delivered"  # data: {"channel", "of": seq, "attempts"}
ALERT_DELIVERY_FAILED: Final = "alert.delivery_failed"  # + "error", "final": bool

SCHEMA = [
    """
    CREATE TABLE alerts (
        id         TEXT PRIMARY KEY,
        severity   TEXT NOT NULL,
        active     INTEGER NOT NULL,
        episode    INTEGER NOT NULL,
        raised_at  REAL,
        cleared_at REAL,
        value      BLOB,
        message    TEXT,
        acked_by   TEXT,
        acked_at   REAL,
        raise_seq  INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE alert_channels (
        channel TEXT PRIMARY KEY,
        seq     INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
]

_COLS = (
    "id", "severity", "active", "episode", "raised_at", "cleared_at", "value", "message",
    "acked_by", "acked_at", "raise_seq",
)  # fmt: skip


def alert_stream(rule: str) -> str:
    return f"alert:{rule}"


class AlertProjection:
    tables: tuple[str, ...] = ("alerts", "alert_channels")

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM alerts")
        conn.execute("DELETE FROM alert_channels")

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        for e in events:
            if e.stream.startswith("alert:"):
                self._apply(conn, e.stream[6:], e)

    def _apply(self, conn: sqlite3.Connection, rule: str, e: Event) -> None:
        d = e.data
        if e.type == ev.ALERT_RAISED:
            conn.execute(
                "INSERT OR REPLACE INTO alerts VALUES (?, ?, 1, ?, ?, NULL, ?, ?, NULL, NULL, ?)",
                (rule, str(d.get("severity", "warning")), int(d.get("episode", 1)), e.wall_time,
                 cbor2.dumps(d.get("value")), str(d.get("message", "")), e.seq),
            )  # fmt: skip
        elif e.type == ev.ALERT_CLEARED:
            conn.execute(
                "UPDATE alerts SET active = 0, cleared_at = ?, value = ? WHERE id = ?",
                (e.wall_time, cbor2.dumps(d.get("value")), rule),
            )
        elif e.type == ALERT_ACKED:
            conn.execute(
                "UPDATE alerts SET acked_by = ?, acked_at = ? WHERE id = ? AND episode = ?",
                (str(d.get("by", "")), e.wall_time, rule, int(d.get("episode", 0))),
            )
        elif e.type == ALERT_DELIVERED or (e.type == ALERT_DELIVERY_FAILED and d.get("final")):
            conn.execute(
                "INSERT INTO alert_channels VALUES (?, ?) ON CONFLICT(channel) "
                "DO UPDATE SET seq = max(seq, excluded.seq)",
                (str(d.get("channel")), int(d.get("of", 0))),
            )

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        if not stream.startswith("alert:"):
            return None
        row = conn.execute("SELECT * FROM alerts WHERE id = ?", (stream[6:],)).fetchone()
        channels = conn.execute("SELECT channel, seq FROM alert_channels").fetchall()
        return {"alert": list(row) if row else None, "channels": [list(c) for c in channels]}

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        if not isinstance(state, dict):
            return
        if state.get("alert"):
            conn.execute(
                f"INSERT OR REPLACE INTO alerts VALUES ({','.join('?' * len(_COLS))})",
                state["alert"],
            )
        conn.executemany(
            "INSERT INTO alert_channels VALUES (?, ?) ON CONFLICT(channel) "
            "DO UPDATE SET seq = max(seq, excluded.seq)",
            [tuple(c) for c in state.get("channels", [])],
        )


def alerts(conn: sqlite3.Connection, include_cleared: bool = True) -> list[dict[str, Any]]:
    """Alerts, active first (newest first within each group), for `gatewayctl alerts`."""
    have = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "alerts" not in have:
        return []
    sql = "SELECT * FROM alerts"
    if not include_cleared:
        sql += " WHERE active = 1"
    sql += " ORDER BY active DESC, raised_at DESC"
    now = time.time()
    out = []
    for row in conn.execute(sql):
        a = dict(zip(_COLS, row, strict=True))
        a["active"] = bool(a["active"])
        a["value"] = cbor2.loads(a["value"]) if a["value"] is not None else None
        end = now if a["active"] else a["cleared_at"]
        a["duration"] = None if a["raised_at"] is None or end is None else end - a["raised_at"]
        out.append(a)
    return out


def channel_cursors(conn: sqlite3.Connection) -> dict[str, int]:
    return {c: int(s) for c, s in conn.execute("SELECT channel, seq FROM alert_channels")}
