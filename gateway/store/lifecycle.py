"""Opening and closing a store's database: the corrupt file quarantined, the schema
migrated, the writer's state read back from the file; at close, stream versions flushed and
the WAL checkpointed. And the store's figures (`StoreStats`)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.store import outbox, queries
from gateway.store.commit import quota_full
from gateway.store.errors import is_corruption
from gateway.store.files import check, connect, file_bytes, make_private, quarantine
from gateway.store.projections import active_projections
from gateway.store.schema import migrate
from gateway.store.streams import flush_streams

if TYPE_CHECKING:
    from gateway.store import EventStore

log = logging.getLogger("gateway.store")


@dataclass(frozen=True, slots=True)
class StoreStats:
    path: str
    file_bytes: int
    used_bytes: int
    quota_bytes: int
    last_seq: int
    events: int
    outbox_depth: int
    outbox_bytes: int
    oldest_undelivered: float | None  # wall time
    dead_letters: int
    dropped: int
    rejected: int
    batches: int
    appended: int


def open_sync(store: EventStore) -> None:
    """Writer thread, at open: the file checked (quarantined if corrupt), migrated, both
    connections made, and the writer's state read back (counters, stream versions not yet
    flushed, codec signature, space used)."""
    store.path.parent.mkdir(parents=True, exist_ok=True)
    problem = check(store.path)
    if problem is not None:
        store.quarantined = quarantine(store.path, problem)
    try:
        make_private(store.path)
        store._w = connect(store.path, store.config.synchronous, page_size=store.config.page_size)
        migrate(store._w)
    except sqlite3.DatabaseError as exc:
        # quick_check passed but the file still cannot be used: quarantine, start fresh.
        if store._w is not None:
            store._w.close()
            store._w = None
        if not is_corruption(exc):
            raise
        store.quarantined = quarantine(store.path, str(exc))
        make_private(store.path)
        store._w = connect(store.path, store.config.synchronous, page_size=store.config.page_size)
        migrate(store._w)
    store._projections = active_projections(store._w)
    store._r = connect(store.path, store.config.synchronous, readonly=True)
    store._last_seq = store._w.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    # Counters survive restarts in the `counters` table (dropped events...).
    for name, value in store._w.execute("SELECT name, value FROM counters"):
        if name == "dropped":
            store.dropped = int(value)
        elif name == "streams_seq":
            store._streams_seq = int(value)
    # The `streams` table is written behind (see `streams.flush_streams`): versions of events
    # committed after its last flush are recovered from the tail of the log.
    for stream, version in store._w.execute(
        "SELECT stream, max(version) FROM events WHERE seq > ? GROUP BY stream",
        (store._streams_seq,),
    ):
        store._dirty[stream] = int(version)
    store._page_size = store._w.execute("PRAGMA page_size").fetchone()[0]
    outbox.check_codec(store._w, store.outbox_codec)
    store._measure()
    if store._used_bytes >= store._quota_bytes() and store.config.overflow == "reject_new":
        store.full = quota_full(store)
        log.warning("store full at start, new events are refused until space comes back "
                    "(delivery and retention go on): %s", store.full)  # fmt: skip


def close_sync(store: EventStore) -> None:
    """Writer thread, at close: stream versions flushed, the WAL checkpointed, both
    connections closed."""
    if store._w is not None:
        with contextlib.suppress(sqlite3.Error):
            store._run_job(lambda conn: flush_streams(store, conn, {}, store._last_seq))
        with contextlib.suppress(sqlite3.Error):
            store._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store._w.close()
        store._w = None
    if store._r is not None:
        store._r.close()
        store._r = None


def stats(store: EventStore, c: sqlite3.Connection) -> StoreStats:
    """Reader thread: the store's figures."""
    base = queries.stats(c)
    return StoreStats(
        path=str(store.path),
        file_bytes=file_bytes(store.path),
        used_bytes=store._used_bytes,
        quota_bytes=store._quota_bytes(),
        last_seq=store._last_seq,
        events=base["events"],
        outbox_depth=base["outbox_depth"],
        outbox_bytes=base["outbox_bytes"],
        oldest_undelivered=base["oldest_undelivered"],
        dead_letters=base["dead_letters"],
        dropped=store.dropped,
        rejected=store.rejected,
        batches=store.batches,
        appended=store.appended,
    )
