"""Per-stream state kept by the writer: stream versions (the optimistic-concurrency
authority), written behind to the `streams` table, and projection snapshots. Functions of
the store's writer-thread state (`EventStore`), run in the writer thread."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

import cbor2

if TYPE_CHECKING:
    from gateway.store import EventStore

# The `streams` table is written behind: at most this many streams, events or seconds.
STREAMS_FLUSH_COUNT = 4096
STREAMS_FLUSH_EVENTS = 20_000
STREAMS_FLUSH_SECONDS = 2.0


def version_of(store: EventStore, conn: sqlite3.Connection, stream: str) -> int:
    v = store._versions.get(stream)
    if v is None:
        v = store._dirty.get(stream)
        if v is None:
            row = conn.execute("SELECT version FROM streams WHERE stream = ?", (stream,)).fetchone()
            v = int(row[0]) if row else 0
        if len(store._versions) > 50_000:
            store._versions.clear()
        store._versions[stream] = v
    return v


def flush_due(store: EventStore, versions: dict[str, int], seq: int) -> bool:
    return (
        len(store._dirty) + len(versions) >= STREAMS_FLUSH_COUNT
        or seq - store._streams_seq >= STREAMS_FLUSH_EVENTS
        or time.monotonic() - store._streams_flushed_at >= STREAMS_FLUSH_SECONDS
    )


def flush_streams(
    store: EventStore, conn: sqlite3.Connection, versions: dict[str, int], seq: int
) -> None:
    """Inside a transaction: bring the `streams` table up to `seq`.

    Stream versions are the optimistic-concurrency authority. Writing each stream's row
    on every commit cost as much as the events themselves, so the table is written
    behind: every few thousand events or seconds, before retention or the quota deletes
    events (the log is then the only other record of a version), and at close. At open,
    versions of events after the last flush are read back from the log's tail."""
    pending = {**store._dirty, **versions}
    if pending:
        conn.executemany(
            "INSERT INTO streams VALUES (?, ?) "
            "ON CONFLICT(stream) DO UPDATE SET version = excluded.version",
            list(pending.items()),
        )
    conn.execute(
        "INSERT INTO counters VALUES ('streams_seq', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (seq,),
    )
    store._flushing = (pending, seq)


def flushed(store: EventStore) -> None:
    """After a COMMIT: what `_flush_streams` wrote is no longer dirty."""
    if store._flushing is None:
        return
    pending, seq = store._flushing
    store._flushing = None
    for stream, version in pending.items():
        if store._dirty.get(stream) == version:
            del store._dirty[stream]
    store._streams_seq = seq
    store._streams_flushed_at = time.monotonic()


def reload_versions(store: EventStore) -> None:
    """After a rollback: forget cached versions (unflushed ones stay in `_dirty`)."""
    store._versions.clear()
    store._flushing = None


def maybe_snapshot(
    store: EventStore, conn: sqlite3.Connection, versions: dict[str, int], seq: int
) -> None:
    """Snapshot a stream every `snapshot_every` events (counted since the last one)."""
    every = store.config.snapshot_every
    for stream, version in versions.items():
        n = store._since_snapshot.get(stream, 0) + version - version_of(store, conn, stream)
        if n >= every:
            snapshot(store, conn, stream, version, seq)
            n = 0
        store._since_snapshot[stream] = n


def snapshot(
    store: EventStore, conn: sqlite3.Connection, stream: str, version: int, at: int
) -> None:
    """Record the stream's projection state as of seq `at` (taken inside the transaction
    that brought the projections to `at`, so rebuild replays only events after it)."""
    state = {}
    for proj in store._projections:
        s = proj.snapshot(conn, stream)
        if s is not None:
            state[type(proj).__name__] = s
    conn.execute(
        "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
        (stream, version, at, cbor2.dumps(state)),
    )
