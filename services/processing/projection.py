"""Window watermarks: per aggregate stream, the end of the last window emitted. A projection
of the `aggregate` events, so it commits with them: after a crash, the windows after the
watermark are rebuilt from the log and none is emitted twice."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from gateway.events import Event

AGGREGATE: Final = "aggregate"
ANOMALY: Final = "anomaly"

SCHEMA = [
    """
    CREATE TABLE windows (
        stream TEXT PRIMARY KEY,
        end    REAL NOT NULL
    ) WITHOUT ROWID;
    -- Detector state (a cache: rebuilt from the log after `seq` when it is missing or old).
    CREATE TABLE processing_state (
        key   TEXT PRIMARY KEY,
        seq   INTEGER NOT NULL,
        state BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
]


def aggregate_stream(device: str, point: str) -> str:
    return f"aggregate:{device}:{point}"


class WindowProjection:
    tables: tuple[str, ...] = ("windows",)

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM windows")

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        rows = [
            (e.stream, e.data.get("end"))
            for e in events
            if e.type == AGGREGATE and isinstance(e.data.get("end"), int | float)
        ]
        if rows:
            conn.executemany(
                "INSERT INTO windows VALUES (?, ?) ON CONFLICT(stream) "
                "DO UPDATE SET end = max(end, excluded.end)",
                rows,
            )

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        if not stream.startswith("aggregate:"):
            return None
        row = conn.execute("SELECT end FROM windows WHERE stream = ?", (stream,)).fetchone()
        if row is None:
            return None
        (end,) = row
        return {"end": end}

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("end"), int | float):
            conn.execute("INSERT OR REPLACE INTO windows VALUES (?, ?)", (stream, state["end"]))


def watermarks(conn: sqlite3.Connection) -> dict[str, float]:
    return {s: float(e) for s, e in conn.execute("SELECT stream, end FROM windows")}
