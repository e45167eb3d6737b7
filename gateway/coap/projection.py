"""The CoAP front door's own table: `coap_rd`, live Resource Directory registrations.

Registered with the store by `register()`, called (through `gateway.parts`) before a store
is opened for a config with a `[coap]` section.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway import events as ev
from gateway.events import Event
from gateway.store.projections import register_projection
from gateway.store.schema import register_schema

SCHEMA = [
    # v1
    """
    CREATE TABLE coap_rd (
        ep       TEXT PRIMARY KEY,
        sector   TEXT,
        href     TEXT NOT NULL,
        base     TEXT NOT NULL,
        lt       INTEGER NOT NULL,
        links    TEXT NOT NULL,
        updated  REAL NOT NULL
    ) WITHOUT ROWID;
    """,
]


class RdProjection:
    """`coap_rd`: the live registrations, from device.registered/unregistered events."""

    tables: tuple[str, ...] = ("coap_rd",)

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM coap_rd")

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        for e in events:
            ep = ev.stream_device(e.stream)
            if ep is None:
                continue
            if e.type == ev.DEVICE_REGISTERED and e.data.get("source") == "rd":
                d = e.data
                conn.execute(
                    "INSERT OR REPLACE INTO coap_rd (ep, sector, href, base, lt, links, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        ep,
                        d.get("d"),
                        str(d.get("href", "")),
                        str(d.get("base", "")),
                        int(d.get("lt", 0)),
                        str(d.get("links", "")),
                        e.wall_time,
                    ),
                )
            elif e.type in (ev.DEVICE_UNREGISTERED, ev.DEVICE_FORGOTTEN):
                conn.execute("DELETE FROM coap_rd WHERE ep = ?", (ep,))

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        ep = ev.stream_device(stream)
        if ep is None:
            return None
        row = conn.execute(
            "SELECT sector, href, base, lt, links, updated FROM coap_rd WHERE ep = ?", (ep,)
        ).fetchone()
        return list(row) if row else None

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        ep = ev.stream_device(stream)
        if ep is None or not isinstance(state, list):
            return
        conn.execute(
            "INSERT OR REPLACE INTO coap_rd (ep, sector, href, base, lt, links, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ep, *state),
        )


def register() -> None:
    """Declare the `coap` schema and the RD projection to the store (before it opens)."""
    register_schema("coap", SCHEMA)
    register_projection(RdProjection())
