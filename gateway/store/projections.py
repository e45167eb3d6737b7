"""Projections: tables derived from events, updated in the same transaction as the events.

Each projection can be reset and rebuilt from the log; per-stream snapshots (taken by the
store) bound replay time and survive retention.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import cbor2

from gateway import events as ev
from gateway.events import Event


def encode_value(value: Any) -> Any:
    """A reading's value as stored in `latest.value`: numbers and text natively (no encoding
    cost on the hot path), anything else (bool, None, bytes, arrays, maps) as CBOR."""
    t = type(value)
    if t is float or t is int or t is str:
        return value
    return cbor2.dumps(value)


def decode_value(stored: Any) -> Any:
    return cbor2.loads(stored) if type(stored) is bytes else stored


class Projection(Protocol):
    #: Tables this projection owns (emptied by `reset`).
    tables: tuple[str, ...]

    def reset(self, conn: sqlite3.Connection) -> None: ...

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None: ...

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        """This stream's rows as a CBOR-able value (None: nothing to keep)."""

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None: ...


class DeviceProjection:
    """`devices` (availability, registrations) and `latest` (value per point, and when it
    arrived: a device's last-seen time is the newest of its points')."""

    tables: tuple[str, ...] = ("devices", "latest")

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM latest")
        conn.execute("DELETE FROM devices")

    def apply(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        # Hot path (runs for every committed batch): readings inlined, other types below.
        latest: dict[tuple[str, str], tuple[Any, str | None, float, int, float]] = {}
        encode = encode_value
        for e in events:
            stream = e.stream
            if not stream.startswith("device:"):
                continue
            device = stream[7:]
            if e.type == ev.READINGS:
                recs = e.data.get("r")
                if type(recs) is not list:
                    continue
                wall = e.wall_time
                seq = e.seq
                for rec in recs:
                    name = rec.get("n") if type(rec) is dict else None
                    if type(name) is not str:
                        continue
                    t = rec.get("t")
                    unit = rec.get("u")
                    latest[(device, name)] = (
                        encode(rec.get("v")),
                        unit if type(unit) is str else None,
                        float(t) if type(t) is float or type(t) is int else wall,
                        seq,
                        wall,
                    )
            else:
                # Keep the order of effects independent of how events are batched, so a
                # rebuild (other batch boundaries) gives the same rows.
                self._flush(conn, latest)
                latest.clear()
                self._apply_other(conn, device, e)
        self._flush(conn, latest)

    def _flush(
        self,
        conn: sqlite3.Connection,
        latest: dict[tuple[str, str], tuple[Any, str | None, float, int, float]],
    ) -> None:
        # A device's "last seen" is the newest `seen` of its points: no per-device row to
        # update on every reading (one upsert per event fewer on the hot path).
        if latest:
            conn.executemany(
                "INSERT INTO latest (device, point, value, unit, ts, seq, seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(device, point) DO UPDATE SET value = excluded.value,"
                " unit = excluded.unit, ts = excluded.ts, seq = excluded.seq,"
                " seen = excluded.seen",
                [(d, p, *rest) for (d, p), rest in latest.items()],
            )

    def _apply_other(self, conn: sqlite3.Connection, device: str, e: Event) -> None:
        if e.type in (ev.DEVICE_AVAILABLE, ev.DEVICE_UNAVAILABLE):
            reason = e.data.get("reason")
            conn.execute(
                "INSERT INTO devices (id, driver, available, reason) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET available = excluded.available, "
                "reason = excluded.reason, driver = coalesce(excluded.driver, driver)",
                (
                    device,
                    e.data.get("driver"),
                    int(e.type == ev.DEVICE_AVAILABLE),
                    reason if isinstance(reason, str) else None,
                ),
            )
        elif e.type == ev.DEVICE_REGISTERED:
            meta = {k: v for k, v in e.data.items() if k not in ("source", "driver")}
            conn.execute(
                "INSERT INTO devices (id, driver, source, meta) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET driver = excluded.driver, "
                "source = excluded.source, meta = excluded.meta",
                (device, e.data.get("driver"), str(e.data.get("source", "config")),
                 cbor2.dumps(meta)),
            )  # fmt: skip
        elif e.type == ev.DEVICE_UNREGISTERED:
            conn.execute("DELETE FROM devices WHERE id = ?", (device,))
        elif e.type == ev.DEVICE_FORGOTTEN:
            conn.execute("DELETE FROM devices WHERE id = ?", (device,))
            conn.execute("DELETE FROM latest WHERE device = ?", (device,))

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        device = ev.stream_device(stream)
        if device is None:
            return None
        row = conn.execute(
            "SELECT driver, source, available, reason, meta FROM devices WHERE id = ?",
            (device,),
        ).fetchone()
        points = conn.execute(
            "SELECT point, value, unit, ts, seq, seen FROM latest WHERE device = ?", (device,)
        ).fetchall()
        return {"device": list(row) if row else None, "latest": [list(p) for p in points]}

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        device = ev.stream_device(stream)
        if device is None or not isinstance(state, dict):
            return
        row = state.get("device")
        if row:
            conn.execute(
                "INSERT OR REPLACE INTO devices (id, driver, source, available, reason, meta) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (device, *row),
            )
        conn.executemany(
            "INSERT OR REPLACE INTO latest (device, point, value, unit, ts, seq, seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(device, *p) for p in state.get("latest", [])],
        )


_REGISTRY: list[Projection] = [DeviceProjection()]


def register_projection(projection: Projection) -> None:
    """Add a projection (once per class); it is applied from the next batch on."""
    if not any(type(p) is type(projection) for p in _REGISTRY):
        _REGISTRY.append(projection)


def projections() -> list[Projection]:
    return list(_REGISTRY)


def active_projections(conn: sqlite3.Connection) -> list[Projection]:
    """The registered projections whose tables exist in this database. A component imported
    after a store opened (its migration not applied there) must not break that store."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [p for p in _REGISTRY if all(t in have for t in p.tables)]
