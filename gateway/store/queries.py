"""Read queries over the store's tables, shared by the daemon (reader thread) and the CLI
(read-only file when the daemon is down). Plain functions on a sqlite3 connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import cbor2

from gateway.events import Event
from gateway.store import outbox
from gateway.store.projections import active_projections, decode_value

_EVENT_COLS = "seq, stream, version, type, wall_time, mono_time, boot_id, synced, data"


def row_to_event(row: tuple[Any, ...]) -> Event:
    seq, stream, version, type_, wall, mono, boot, synced, blob = row
    return Event(seq, stream, version, type_, wall, mono, boot, bool(synced), cbor2.loads(blob))


def events(
    conn: sqlite3.Connection,
    after_seq: int = 0,
    limit: int = 1000,
    stream: str | None = None,
    types: tuple[str, ...] | None = None,
) -> list[Event]:
    sql = f"SELECT {_EVENT_COLS} FROM events WHERE seq > ?"
    args: list[Any] = [after_seq]
    if stream is not None:
        if stream.endswith("*"):
            sql += " AND stream GLOB ?"
        else:
            sql += " AND stream = ?"
        args.append(stream)
    if types:
        sql += f" AND type IN ({','.join('?' * len(types))})"
        args.extend(types)
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return [row_to_event(r) for r in conn.execute(sql, args)]


def last_events(conn: sqlite3.Connection, n: int, stream: str | None = None) -> list[Event]:
    sql = f"SELECT {_EVENT_COLS} FROM events"
    args: list[Any] = []
    if stream is not None:
        sql += " WHERE stream GLOB ?" if stream.endswith("*") else " WHERE stream = ?"
        args.append(stream)
    sql += " ORDER BY seq DESC LIMIT ?"
    args.append(n)
    return [row_to_event(r) for r in reversed(conn.execute(sql, args).fetchall())]


def latest(
    conn: sqlite3.Connection, device: str | None = None, point: str | None = None
) -> list[dict[str, Any]]:
    sql = "SELECT device, point, value, unit, ts, seq FROM latest"
    args: list[Any] = []
    conds = []
    if device is not None:
        conds.append("device = ?")
        args.append(device)
    if point is not None:
        conds.append("point = ?")
        args.append(point)
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    sql += " ORDER BY device, point"
    return [
        {"device": d, "point": p, "value": decode_value(v),
         "unit": u, "ts": ts, "seq": seq}
        for d, p, v, u, ts, seq in conn.execute(sql, args)
    ]  # fmt: skip


# Devices with a row of their own (configured, registered, availability known) and those
# only known from their readings (CoAP telemetry from an accepted unknown device).
_DEVICES_SQL = """
SELECT d.id, d.driver, d.source, d.available, d.reason,
       (SELECT max(l.seen) FROM latest l WHERE l.device = d.id), d.meta
  FROM devices d {where_d}
UNION ALL
SELECT l.device, NULL, 'telemetry', NULL, NULL, max(l.seen), NULL
  FROM latest l WHERE l.device NOT IN (SELECT id FROM devices) {and_l}
 GROUP BY l.device
 ORDER BY 1
"""


def _device_row(row: tuple[Any, ...]) -> dict[str, Any]:
    id_, driver, source, available, reason, last_seen, meta = row
    return {
        "id": id_,
        "driver": driver,
        "source": source,
        "available": None if available is None else bool(available),
        "reason": reason,
        "last_seen": last_seen,
        "meta": cbor2.loads(meta) if meta else {},
    }


def devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(_DEVICES_SQL.format(where_d="", and_l=""))
    return [_device_row(r) for r in rows]


def device(conn: sqlite3.Connection, device_id: str) -> dict[str, Any] | None:
    sql = _DEVICES_SQL.format(where_d="WHERE d.id = ?", and_l="AND l.device = ?")
    row = conn.execute(sql, (device_id, device_id)).fetchone()
    return _device_row(row) if row else None


def seq_at(conn: sqlite3.Connection, t: float) -> int:
    """A seq bound for wall time `t`: the events with seq >= it are those appended at `t`
    or later (max seq + 1 if none). By bisection over seq: O(log n) primary-key lookups,
    no index on wall_time.

    Events are appended in wall-clock order; where the clock stepped back (NTP at boot),
    the answer is exact on either side of the step, and callers still filter on wall_time
    within the range it gives."""
    lo, hi = conn.execute("SELECT min(seq), max(seq) FROM events").fetchone()
    if lo is None:
        return 1
    hi += 1  # the answer lies in [lo, hi]
    step = "SELECT seq, wall_time FROM events WHERE seq >= ? ORDER BY seq LIMIT 1"
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(step, (mid,)).fetchone()
        if row is None or row[1] >= t:
            hi = mid
        else:
            lo = row[0] + 1  # seqs may have gaps (pruned, dropped): skip to the next one
    return int(lo)


def history(
    conn: sqlite3.Connection, device: str, point: str, since: float, limit: int = 2000
) -> list[tuple[float, Any]]:
    """Recent values of one point, oldest first, from the log (for sparklines)."""
    out: list[tuple[float, Any]] = []
    rows = conn.execute(
        "SELECT wall_time, data FROM events WHERE seq >= ? AND stream = ? "
        "AND type = 'readings' AND wall_time >= ? ORDER BY seq DESC LIMIT ?",
        (seq_at(conn, since), f"device:{device}", since, limit),
    ).fetchall()
    for wall, blob in reversed(rows):
        for rec in cbor2.loads(blob).get("r", ()):
            if rec.get("n") == point:
                t = rec.get("t")
                out.append((float(t) if isinstance(t, int | float) else wall, rec.get("v")))
    return out


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    n_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    box = outbox.stats(conn)
    last = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    return {
        "events": n_events,
        "outbox_depth": box["outbox_depth"],
        "outbox_bytes": box["outbox_bytes"],
        "oldest_undelivered": box["oldest_undelivered"],
        "dead_letters": box["dead_letters"],
        "last_seq": last,
    }


def _iter_all(conn: sqlite3.Connection, batch: int = 5000) -> Iterator[list[Event]]:
    after = 0
    while True:
        chunk = events(conn, after, batch)
        if not chunk:
            return
        yield chunk
        after = chunk[-1].seq


def projection_dump(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection table's rows, sorted: to compare live projections with a rebuild."""
    out = {}
    for proj in active_projections(conn):
        for table in proj.tables:
            out[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    return out


def rebuild(conn: sqlite3.Connection) -> int:
    """Inside a transaction: reset projections, restore snapshots, replay the log after them."""
    projs = active_projections(conn)
    for p in projs:
        p.reset(conn)
    snap_at: dict[str, int] = {}
    for stream, _version, seq, blob in conn.execute(
        "SELECT stream, version, seq, state FROM snapshots"
    ).fetchall():
        state = cbor2.loads(blob)
        for p in projs:
            s = state.get(type(p).__name__)
            if s is not None:
                p.restore(conn, stream, s)
        snap_at[stream] = seq
    replayed = 0
    for chunk in _iter_all(conn):
        todo = [e for e in chunk if e.seq > snap_at.get(e.stream, 0)]
        for p in projs:
            p.apply(conn, todo)
        replayed += len(todo)
    return replayed
