"""The writer's transaction: a batch of appends numbered, encoded and committed at once -
events, their outbox rows, stream versions, projections and snapshots - and, over quota with
`drop_oldest`, the oldest events dropped in the same transaction. Runs in the writer thread
on the store's writer-thread state."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cbor2

from gateway import events as ev
from gateway.errors import ConcurrencyError, StoreError, StoreFullError
from gateway.events import Event, NewEvent
from gateway.store import outbox
from gateway.store.errors import rollback
from gateway.store.files import BUSY_TIMEOUT_MS
from gateway.store.streams import (
    flush_due,
    flush_streams,
    flushed,
    maybe_snapshot,
    reload_versions,
    snapshot,
    version_of,
)

if TYPE_CHECKING:
    from gateway.store import EventStore, _Pending

log = logging.getLogger("gateway.store")

#: A COMMIT (the fsync) runs in the event loop's own thread while commits take less than
#: this (moving average), else in the writer thread. Handing a commit to the thread and
#: back costs ~30 us of CPU per request on a busy 2-core machine (thread switches, and two
#: threads touching the same objects): more than a fast disk's fsync keeps the loop waiting.
#: An SD card's fsync (milliseconds) goes to the thread, where the loop does not wait for it.
INLINE_COMMIT_LIMIT = 0.002
#: The WAL is checkpointed by the writer thread (never inside a COMMIT, which may be the
#: loop's) when it holds about this many pages: SQLite's own default. Python cannot see
#: SQLite's count as pages are written, so it is estimated (a few pages per commit, plus
#: the events' bytes), and each checkpoint, which says how many there were, corrects the
#: estimate. (A WAL left to grow costs the SD card more: a longer file means new blocks.)
CHECKPOINT_PAGES = 1000
#: Pages a commit writes besides its events' bytes (tables' and indexes' pages touched).
PAGES_PER_COMMIT = 4


class Staged:
    """A batch's transaction, written but not committed (see `stage`)."""

    __slots__ = ("committed", "conn", "fresh", "out", "seq", "size", "versions", "victims")

    def __init__(
        self,
        out: list[Any],
        committed: list[Event],
        victims: list[tuple[int, str]],
        conn: sqlite3.Connection | None,
        versions: dict[str, int],
        fresh: dict[str, int],
        seq: int,
        size: int = 0,
    ) -> None:
        self.out = out  # per append: its Event(s) or its error
        self.committed = committed
        self.victims = victims  # events dropped over quota (drop_oldest)
        self.conn = conn  # None: no transaction (nothing to commit)
        self.versions = versions
        self.fresh = fresh
        self.seq = seq
        self.size = size  # bytes of event data (what the WAL grows by, roughly)


async def run(store: EventStore, batch: Sequence[_Pending]) -> tuple[list[Any], list[Event]]:
    """The event loop's side of a batch: its statements here; its COMMIT here too while
    commits are fast, else in the writer thread; all of it in the writer thread when the
    write lock is held elsewhere (the thread waits for it, the loop does not)."""
    loop = asyncio.get_running_loop()
    staged = stage(store, batch, wait=False)
    if staged is None:
        return await loop.run_in_executor(store._wx, commit, store, batch)
    if staged.conn is None:
        return staged.out, []
    if store._commit_time < INLINE_COMMIT_LIMIT:
        return finish(store, staged)
    return await loop.run_in_executor(store._wx, finish, store, staged)


async def checkpoint_due(store: EventStore) -> None:
    """After a batch: a checkpoint by the writer thread, when the WAL has grown enough."""
    if store._wal_pages * store._wal_scale < CHECKPOINT_PAGES:
        return
    try:
        await asyncio.get_running_loop().run_in_executor(store._wx, checkpoint, store)
    except Exception as exc:  # the next commit tells if the store is unwell
        store._repeats.error("checkpoint", "store: WAL checkpoint failed: %s", exc)


def commit(store: EventStore, batch: Sequence[_Pending]) -> tuple[list[Any], list[Event]]:
    """Writer thread: one transaction for the whole batch. Returns, per append, what its
    future resolves to (its Event, its list of Events, or its error), and every event
    committed (the store's own store.dropped included) for the listeners."""
    staged = stage(store, batch, wait=True)
    assert staged is not None
    return finish(store, staged)


def stage(store: EventStore, batch: Sequence[_Pending], wait: bool) -> Staged | None:
    """Everything of a batch's transaction but its COMMIT: numbering, encoding, the
    statements (SQLite's page cache only: no fsync, no wait). Run by the event loop's
    thread (`wait=False`: None if another connection holds the write lock, then the writer
    thread does it all) or by the writer thread (`commit`). On error the transaction is
    rolled back and the error raised."""
    conn = store._w
    assert conn is not None
    over = store._used_bytes >= store._quota_bytes()
    if over and store.config.overflow == "reject_new":
        store.rejected += sum(len(p.events) for p in batch)
        full = quota_full(store)
        return Staged([full for _ in batch], [], [], None, {}, {}, 0)
    victims: list[tuple[int, str]] = []
    if over and store.config.overflow == "drop_oldest":
        # Single writer: what we select now is still there when we delete it below.
        victims = conn.execute(
            "SELECT seq, stream FROM events WHERE stream != ? ORDER BY seq LIMIT ?",
            (ev.GATEWAY_STREAM, max(100, store.appended // 100)),
        ).fetchall()
        if victims:
            store.dropped += len(victims)
            note = {"count": len(victims), "up_to_seq": victims[-1][0], "total": store.dropped}
            dropped = NewEvent(ev.GATEWAY_STREAM, ev.STORE_DROPPED, note)
            from gateway.store import _Pending  # (rare: no import cycle at load)

            batch = [*batch, _Pending([dropped], None)]
    now = store.clock.time()
    mono = store.clock.monotonic()
    boot = store.clock.boot_id
    is_synced = store.clock.synced()
    synced = int(is_synced)
    seq = store._last_seq
    versions: dict[str, int] = {}
    out: list[Any] = []
    rows: list[tuple[Any, ...]] = []
    boxed_at: list[int] = []  # indexes in `rows` of the events for the outbox
    committed: list[Event] = []
    dumps = cbor2.dumps
    cached = store._versions
    kept_local = store.local_types
    for p in batch:
        if p.single and p.events[0].expected_version is None:
            # The common case, one event with no version check: straight through.
            ne = p.events[0]
            try:
                blob = dumps(ne.data)
            except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
                out.append(StoreError(f"event data cannot be encoded as CBOR: {exc}"))
                continue
            stream = ne.stream
            version = versions.get(stream)
            if version is None:
                version = cached.get(stream)
                if version is None:
                    version = version_of(store, conn, stream)
            version += 1
            versions[stream] = version
            seq += 1
            if ne.outbox and ne.type not in kept_local:
                boxed_at.append(len(rows))
            # A held-back append keeps the time it was made, not the commit's.
            w, m = (now - (mono - p.lazy), p.lazy) if p.lazy else (now, mono)
            rows.append((seq, stream, version, ne.type, w, m, boot, synced, blob))
            e = Event(seq, stream, version, ne.type, w, m, boot, is_synced, ne.data)
            committed.append(e)
            out.append(e)
            continue
        # First check versions (no allocation for a conflict), then number and encode.
        local: dict[str, int] = {}
        failed: BaseException | None = None
        for ne in p.events:
            cur = local.get(ne.stream)
            if cur is None:
                cur = versions.get(ne.stream)
                if cur is None:
                    cur = version_of(store, conn, ne.stream)
            if ne.expected_version is not None and ne.expected_version != cur:
                failed = ConcurrencyError(ne.stream, ne.expected_version, cur)
                break
            local[ne.stream] = cur + 1
        if failed is not None:
            out.append(failed)
            continue
        try:
            blobs = [dumps(ne.data) for ne in p.events]
        except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            out.append(StoreError(f"event data cannot be encoded as CBOR: {exc}"))
            continue
        numbered: list[Event] = []
        w, m = (now - (mono - p.lazy), p.lazy) if p.lazy else (now, mono)
        for ne, blob in zip(p.events, blobs, strict=True):
            seq += 1
            version = versions.get(ne.stream)
            if version is None:
                version = version_of(store, conn, ne.stream)
            version += 1
            versions[ne.stream] = version
            if ne.outbox and ne.type not in kept_local:
                boxed_at.append(len(rows))
            rows.append((seq, ne.stream, version, ne.type, w, m, boot, synced, blob))
            numbered.append(Event(seq, ne.stream, version, ne.type, w, m, boot, is_synced, ne.data))
        committed.extend(numbered)
        out.append(numbered[0] if p.single else numbered)
    if not rows:
        return Staged(out, [], [], None, {}, {}, seq)
    boxed = outbox_rows(store, rows, boxed_at) if boxed_at and store.sink else None
    fresh: dict[str, int] = {}
    if wait:
        conn.execute("BEGIN IMMEDIATE")
    else:
        # Not in the event loop's thread: waiting for another connection's write lock
        # (busy_timeout) would stop every other task. Busy: the writer thread does it.
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                raise
            return None
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if boxed:
            if any(r[4] is None and r[3] is not None for r in boxed):
                boxed = outbox.resolve_sids(conn, boxed, fresh)
            outbox.insert_rows(conn, boxed)
        if victims or flush_due(store, versions, seq):
            flush_streams(store, conn, versions, seq)
        for proj in store._projections:
            proj.apply(conn, committed)
        maybe_snapshot(store, conn, versions, seq)
        if victims:
            drop(store, conn, victims, versions, seq)
    except BaseException:
        rollback(conn)
        reload_versions(store)
        if victims:
            store.dropped -= len(victims)
        raise
    if victims:
        out.pop()  # the store.dropped event's slot: nobody awaits it
    size = sum(len(r[8]) for r in rows)
    return Staged(out, committed, victims, conn, versions, fresh, seq, size)


def finish(store: EventStore, staged: Staged) -> tuple[list[Any], list[Event]]:
    """COMMIT what `stage` wrote (the fsync; in the writer thread the GIL is free meanwhile),
    then take its numbering as the store's. On error: rolled back, error raised."""
    conn = staged.conn
    if conn is None:  # nothing to commit (all refused, or all failed their checks)
        return staged.out, []
    started = time.perf_counter()
    try:
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        reload_versions(store)
        if staged.victims:
            store.dropped -= len(staged.victims)
        raise
    store._commit_time += (time.perf_counter() - started - store._commit_time) * 0.2
    store._wal_pages += PAGES_PER_COMMIT + staged.size / store._page_size
    victims = staged.victims
    if victims:
        log.warning(
            "store over quota: dropped the %d oldest events (up to seq %d)",
            len(victims), victims[-1][0],
        )  # fmt: skip
    store._last_seq = staged.seq
    if staged.fresh:
        if len(store._sids) > 50_000:
            store._sids.clear()
        store._sids.update(staged.fresh)
    store._versions.update(staged.versions)
    store._dirty.update(staged.versions)
    flushed(store)
    store.batches += 1
    store.appended += len(staged.committed)
    store._measure()
    return staged.out, staged.committed


def checkpoint(store: EventStore) -> None:
    """Writer thread: copy the WAL into the database (PASSIVE: never waits for readers;
    what they still use is copied next time), and correct the estimate of its pages."""
    assert store._w is not None
    estimate, store._wal_pages = store._wal_pages, 0.0
    pages = store._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    if pages > 0 and estimate > 0:
        store._wal_scale = min(max(pages / estimate, 0.1), 10.0)


def outbox_rows(
    store: EventStore, rows: list[tuple[Any, ...]], which: list[int]
) -> list[tuple[Any, ...]]:
    """(seq, stream, version, body, sid) for the events that go to the outbox. A row
    with a body gets its stream's id (schema v3); ids not known yet are left None:
    `_resolve_sids` finds them inside the transaction."""
    picked = rows if len(which) == len(rows) else [rows[i] for i in which]
    codec = store.outbox_codec
    if codec is None:
        return [(r[0], r[1], r[2], None, None) for r in picked]
    try:
        bodies = codec.bodies(picked)
    except Exception:  # a codec bug must not cost the append: the relay encodes later
        log.exception("outbox codec failed; these events are encoded when sent")
        return [(r[0], r[1], r[2], None, None) for r in picked]
    sids = store._sids
    return [
        (r[0], r[1], r[2], b, None if b is None else sids.get(r[1]))
        for r, b in zip(picked, bodies, strict=True)
    ]


def drop(
    store: EventStore,
    conn: sqlite3.Connection,
    victims: list[tuple[int, str]],
    versions: dict[str, int],
    seq: int,
) -> None:
    """Over quota with drop_oldest: delete the oldest events, after snapshotting their
    streams so the projections can still be rebuilt, and keep the count."""
    for stream in {v[1] for v in victims}:
        version = versions.get(stream)
        if version is None:
            version = version_of(store, conn, stream)
        snapshot(store, conn, stream, version, seq)
    upto = victims[-1][0]
    outbox.drop_upto(conn, upto, ev.GATEWAY_STREAM)
    conn.execute("DELETE FROM events WHERE seq <= ? AND stream != ?", (upto, ev.GATEWAY_STREAM))
    conn.execute(
        "INSERT INTO counters VALUES ('dropped', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (store.dropped,),
    )


def quota_full(store: EventStore) -> StoreFullError:
    """Why appends are refused: the disk quota is reached (policy reject_new)."""
    return StoreFullError(
        f"disk quota reached ({store._used_bytes // 1024} KiB used of "
        f"{store._quota_bytes() // 1024} KiB, policy reject_new)"
    )
