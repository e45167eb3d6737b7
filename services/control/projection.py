"""Commands as a projection of their events (stream `command:<id>`): one row per command with
its current status, committed with the event that changes it. A restart finds what was
accepted or sent without reading the log; `gatewayctl devices ID` shows a device's commands."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import cbor2

from gateway import events as ev
from gateway.events import Event

COMMAND_REJECTED: Final = ev.COMMAND_REJECTED
COMMAND_SENT: Final = ev.COMMAND_SENT
COMMAND_SUCCEEDED: Final = ev.COMMAND_SUCCEEDED
COMMAND_EXPIRED: Final = ev.COMMAND_EXPIRED

#: status after each event type
STATUS: Final = {
    ev.COMMAND_REQUESTED: "requested",
    ev.COMMAND_ACCEPTED: "accepted",
    COMMAND_REJECTED: "rejected",
    COMMAND_SENT: "sent",
    COMMAND_SUCCEEDED: "succeeded",
    ev.COMMAND_FAILED: "failed",
    COMMAND_EXPIRED: "expired",
}
TERMINAL: Final = frozenset({"rejected", "succeeded", "failed", "expired"})

SCHEMA = [
    """
    CREATE TABLE commands (
        id         TEXT PRIMARY KEY,
        device     TEXT,
        point      TEXT,
        value      BLOB,
        source     TEXT,
        by         TEXT,
        status     TEXT NOT NULL,
        reason     TEXT,
        error      TEXT,
        result     BLOB,
        deadline   REAL,
        requested  REAL,
        updated    REAL,
        saga       TEXT
    ) WITHOUT ROWID;
    CREATE INDEX commands_device ON commands (device, requested);
    CREATE INDEX commands_status ON commands (status);
    CREATE TABLE sagas (
        id       TEXT PRIMARY KEY,
        name     TEXT,
        status   TEXT NOT NULL,
        started  REAL,
        updated  REAL
    ) WITHOUT ROWID;
    """,
]

COLS: Final = (
    "id", "device", "point", "value", "source", "by", "status", "reason", "error", "result",
    "deadline", "requested", "updated", "saga",
)  # fmt: skip


def command_stream(cid: str) -> str:
    return f"command:{cid}"


#: a saga's status after its last event of these types (any other: "running")
SAGA_ENDS: Final = {"saga.completed": "completed", "saga.compensated": "compensated",
                    "saga.failed": "failed"}  # fmt: skip


class CommandProjection:
    """`commands` (one row per command) and `sagas` (one row per saga: name and status)."""

    tables: tuple[str, ...] = ("commands", "sagas")

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM commands")
        conn.execute("DELETE FROM sagas")

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        for e in events:
            if e.stream.startswith("command:") and e.type in STATUS:
                self._apply(conn, e.stream[8:], e)
            elif e.stream.startswith("saga:"):
                if e.type == "saga.started":
                    conn.execute(
                        "INSERT OR IGNORE INTO sagas VALUES (?, ?, 'running', ?, ?)",
                        (e.stream[5:], _s(e.data.get("name")), e.wall_time, e.wall_time),
                    )
                else:
                    conn.execute(
                        "UPDATE sagas SET status = ?, updated = ? WHERE id = ?",
                        (SAGA_ENDS.get(e.type, "running"), e.wall_time, e.stream[5:]),
                    )

    def _apply(self, conn: sqlite3.Connection, cid: str, e: Event) -> None:
        d = e.data
        status = STATUS[e.type]
        if e.type == ev.COMMAND_REQUESTED:
            by = d.get("by")
            conn.execute(
                "INSERT OR IGNORE INTO commands (id, device, point, value, source, by, status, "
                "deadline, requested, updated, saga) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, _s(d.get("device")), _s(d.get("point")), cbor2.dumps(d.get("value")),
                 _s(d.get("source")), None if by is None else str(by), status,
                 _f(d.get("deadline")), e.wall_time, e.wall_time, _s(d.get("saga"))),
            )  # fmt: skip
            return
        conn.execute(
            "UPDATE commands SET status = ?, reason = coalesce(?, reason), "
            "error = coalesce(?, error), result = coalesce(?, result), "
            "deadline = coalesce(?, deadline), updated = ? WHERE id = ?",
            (status, _s(d.get("reason")), _s(d.get("error")),
             cbor2.dumps(d["value"]) if "value" in d else None, _f(d.get("deadline")),
             e.wall_time, cid),
        )  # fmt: skip

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        if stream.startswith("saga:"):
            row = conn.execute("SELECT * FROM sagas WHERE id = ?", (stream[5:],)).fetchone()
            return list(row) if row else None
        if not stream.startswith("command:"):
            return None
        row = conn.execute("SELECT * FROM commands WHERE id = ?", (stream[8:],)).fetchone()
        return list(row) if row else None

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        if stream.startswith("saga:") and isinstance(state, list) and len(state) == 5:
            conn.execute("INSERT OR REPLACE INTO sagas VALUES (?, ?, ?, ?, ?)", state)
        elif isinstance(state, list) and len(state) == len(COLS):
            conn.execute(f"INSERT OR REPLACE INTO commands VALUES ({','.join('?' * len(COLS))})",
                         state)  # fmt: skip


def _s(v: Any) -> str | None:
    return None if v is None else str(v)


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def row_dict(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(COLS, row, strict=True))
    for k in ("value", "result"):
        out[k] = cbor2.loads(out[k]) if isinstance(out[k], bytes) else out[k]
    return out


def _have(conn: sqlite3.Connection) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'commands'"
        ).fetchone()
    )


def command(conn: sqlite3.Connection, cid: str) -> dict[str, Any] | None:
    if not _have(conn):
        return None
    row = conn.execute("SELECT * FROM commands WHERE id = ?", (cid,)).fetchone()
    return row_dict(row) if row else None


def commands(
    conn: sqlite3.Connection, device: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """Newest first."""
    if not _have(conn):
        return []
    if device is None:
        rows = conn.execute(
            "SELECT * FROM commands ORDER BY requested DESC LIMIT ?", (limit,)
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM commands WHERE device = ? ORDER BY requested DESC LIMIT ?",
            (device, limit),
        ).fetchall()
    return [row_dict(r) for r in rows]


def unfinished(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Commands without an outcome, oldest first (for restart recovery)."""
    if not _have(conn):
        return []
    rows = conn.execute(
        "SELECT * FROM commands WHERE status IN ('requested', 'accepted', 'sent') "
        "ORDER BY requested"
    ).fetchall()
    return [row_dict(r) for r in rows]
