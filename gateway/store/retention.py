"""Retention: delivered events older than the configured age deleted, their streams
snapshotted first so projections can still be rebuilt. Runs as a writer job."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from gateway.store import outbox, queries
from gateway.store.streams import flush_streams, snapshot, version_of

if TYPE_CHECKING:
    from gateway.store import EventStore


def prune_events(store: EventStore, conn: sqlite3.Connection, cutoff: float, batch: int) -> int:
    # The events deleted here may be the only record of unflushed stream versions.
    flush_streams(store, conn, {}, store._last_seq)
    outbox.prune_delivered(conn, batch)
    # No index on wall_time: bisection over seq bounds the scan to the old events.
    victims = outbox.prunable_events(conn, queries.seq_at(conn, cutoff), cutoff, batch, store.sink)
    if not victims:
        return 0
    for stream in {v[1] for v in victims}:
        snapshot(store, conn, stream, version_of(store, conn, stream), store._last_seq)
    gone = [(v[0],) for v in victims]
    if not store.sink:
        outbox.delete_rows(conn, gone)
    conn.executemany("DELETE FROM events WHERE seq = ?", gone)
    return len(victims)


async def prune(store: EventStore, older_than: float | None, batch: int) -> int:
    """Delete delivered events older than `older_than` seconds (the configured retention
    when None), `batch` per transaction. Returns how many."""
    cutoff = store.clock.time() - (
        older_than if older_than is not None else store.config.retention_days * 86400
    )
    total = 0
    while True:
        n = await store.write(lambda conn: prune_events(store, conn, cutoff, batch))
        total += n
        if n < batch:
            return total


async def prune_outbox(store: EventStore, batch: int) -> int:
    """Delete delivered outbox rows (at or below the delivery watermark), `batch` rows per
    transaction so appends go on in between. Returns how many."""
    total = 0
    while True:
        n = await store.write(lambda conn: outbox.prune_delivered(conn, batch))
        total += n
        if n < batch:
            return total
