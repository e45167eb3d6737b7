"""The event store against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest

from gateway import events as ev
from gateway.clock import SystemClock
from gateway.config import StoreConfig
from gateway.errors import ConcurrencyError, StoreClosedError, StoreError, StoreFullError
from gateway.events import NewEvent
from gateway.store import EventStore, maintenance, queries
from gateway.store.schema import CORE, migrate, register_schema, schemas


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    s = await EventStore.open(tmp_path / "g.db", StoreConfig(snapshot_every=10))
    yield s
    await s.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_append_is_committed_when_it_returns(store: EventStore) -> None:
    e = await store.append("device:a", ev.READINGS, {"r": [{"n": "t", "v": 1.5}]})
    # Another connection (another process would do the same) sees it at once.
    got = rows(store.path, "SELECT seq, stream, version, type, data FROM events")
    assert got == [(e.seq, "device:a", 1, "readings", cbor2.dumps({"r": [{"n": "t", "v": 1.5}]}))]
    assert rows(store.path, "SELECT seq, stream FROM outbox") == [(e.seq, "device:a")]
    assert e.boot_id and e.mono_time > 0 and e.wall_time > 0


async def test_group_commit_batches_concurrent_appends(store: EventStore) -> None:
    events = await asyncio.gather(
        *(store.append(f"device:d{i % 7}", ev.READINGS, {"r": [{"n": "x", "v": i}]})
          for i in range(500))
    )  # fmt: skip
    assert sorted(e.seq for e in events) == list(range(1, 501))
    assert store.batches < 500  # shared transactions
    per_stream: dict[str, list[int]] = {}
    for e in sorted(events, key=lambda e: e.seq):
        per_stream.setdefault(e.stream, []).append(e.version)
    for versions in per_stream.values():
        assert versions == list(range(1, len(versions) + 1))


async def test_optimistic_concurrency(store: EventStore) -> None:
    await store.append("command:1", ev.COMMAND_REQUESTED, {"x": 1}, expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await store.append("command:1", ev.COMMAND_REQUESTED, {"x": 2}, expected_version=0)
    assert "expected version 0, but it is at version 1" in str(info.value)
    e = await store.append("command:1", ev.COMMAND_ACCEPTED, {}, expected_version=1)
    assert e.version == 2


async def test_conflict_fails_only_its_own_append(store: EventStore) -> None:
    ok, bad, ok2 = await asyncio.gather(
        store.append("s:1", "t", {}),
        store.append("s:2", "t", {}, expected_version=5),
        store.append("s:3", "t", {}),
        return_exceptions=True,
    )
    assert isinstance(bad, ConcurrencyError)
    assert not isinstance(ok, BaseException) and not isinstance(ok2, BaseException)
    assert rows(store.path, "SELECT stream FROM events ORDER BY seq") == [("s:1",), ("s:3",)]


async def test_unencodable_data_is_refused_and_others_commit(store: EventStore) -> None:
    good, bad = await asyncio.gather(
        store.append("s:1", "t", {"v": 1}),
        store.append("s:2", "t", {"v": object()}),
        return_exceptions=True,
    )
    assert isinstance(bad, StoreError) and "CBOR" in str(bad)
    assert not isinstance(good, BaseException)
    assert rows(store.path, "SELECT count(*) FROM events") == [(1,)]


async def test_append_many_is_atomic(store: EventStore) -> None:
    await store.append("s:1", "t", {})
    with pytest.raises(ConcurrencyError):
        await store.append_many(
            [NewEvent("s:2", "t", {}), NewEvent("s:1", "t", {}, expected_version=0)]
        )
    assert rows(store.path, "SELECT stream FROM events") == [("s:1",)]


async def test_local_events_skip_the_outbox(store: EventStore) -> None:
    await store.append("discovered", ev.DEVICE_DISCOVERED, {"address": "x"}, outbox=False)
    assert rows(store.path, "SELECT count(*) FROM outbox") == [(0,)]


async def test_projections_follow_events_and_match_a_rebuild(store: EventStore) -> None:
    for i in range(25):
        recs = [{"n": "t", "v": i, "u": "Cel"}, {"n": "p", "v": -i}]
        await store.append(ev.device_stream("b"), ev.READINGS, {"r": recs})
    await store.append(ev.device_stream("b"), ev.DEVICE_UNAVAILABLE, {"reason": "timeout"})
    latest = await store.read(lambda c: queries.latest(c, "b"))
    assert [(r["point"], r["value"], r["unit"]) for r in latest] == [
        ("p", -24, None), ("t", 24, "Cel")
    ]  # fmt: skip
    devs = await store.read(queries.devices)
    assert devs[0]["available"] is False and devs[0]["reason"] == "timeout"
    before = await store.read(queries.projection_dump)
    await store.rebuild()
    assert await store.read(queries.projection_dump) == before


async def test_retention_keeps_projections_rebuildable(store: EventStore) -> None:
    for i in range(15):
        await store.append(ev.device_stream("b"), ev.READINGS, {"r": [{"n": "t", "v": i}]})
    # Deliver everything (the relay deletes outbox rows on the broker's ack).
    await store.write(lambda c: c.execute("DELETE FROM outbox"))
    await store.append(ev.device_stream("b"), ev.READINGS, {"r": [{"n": "u", "v": 99}]})
    before = await store.read(queries.projection_dump)
    pruned = await store.prune(older_than=-1)  # everything delivered is "old"
    assert pruned == 15  # the undelivered event stays
    assert rows(store.path, "SELECT count(*) FROM events") == [(1,)]
    await store.rebuild()
    assert await store.read(queries.projection_dump) == before


async def test_quota_reject_new_then_retention_frees(tmp_path: Path) -> None:
    s = await EventStore.open(tmp_path / "q.db", StoreConfig(quota_mb=0.25))
    try:
        blob = "x" * 4000
        with pytest.raises(StoreFullError) as info:
            for i in range(200):
                await s.append("s:1", "t", {"i": i, "pad": blob})
        assert "policy reject_new" in str(info.value)
        assert s.rejected >= 1
        count_before = rows(s.path, "SELECT count(*) FROM events")[0][0]
        # The daemon keeps running: reads still work, nothing stored was lost.
        assert len(await s.events(0, 10_000)) == count_before
        await s.write(lambda c: c.execute("DELETE FROM outbox"))  # delivered
        assert await s.prune(older_than=-1) == count_before
        e = await s.append("s:1", "t", {"i": "after"})
        assert e.seq == count_before + 1
    finally:
        await s.close()


async def test_quota_drop_oldest_counts_and_events(tmp_path: Path) -> None:
    s = await EventStore.open(tmp_path / "d.db", StoreConfig(quota_mb=0.25, overflow="drop_oldest"))
    try:
        for i in range(300):
            await s.append("device:x", "readings", {"r": [{"n": "t", "v": i}], "pad": "y" * 2000})
        assert s.dropped > 0
        dropped = await s.read(lambda c: queries.events(c, 0, 100, ev.GATEWAY_STREAM))
        assert any(e.type == ev.STORE_DROPPED for e in dropped)
        assert sum(e.data["count"] for e in dropped if e.type == ev.STORE_DROPPED) == s.dropped
        # The newest value survives in the projection, and a rebuild agrees.
        latest = await s.read(lambda c: queries.latest(c, "x"))
        assert latest[0]["value"] == 299
        before = await s.read(queries.projection_dump)
        await s.rebuild()
        assert await s.read(queries.projection_dump) == before
    finally:
        await s.close()


async def test_corrupt_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    garbage = b"this is not a database" * 100
    db.write_bytes(garbage)
    s = await EventStore.open(db, StoreConfig())
    try:
        assert s.quarantined is not None and s.quarantined.read_bytes() == garbage
        assert s.quarantined.name.startswith("g.db.corrupt-")
        evs = await s.events()
        assert [e.type for e in evs] == ["store.quarantined"]
        assert evs[0].data["moved_to"] == str(s.quarantined)
        await s.append("s", "t", {})
    finally:
        await s.close()


async def test_truncated_database_is_quarantined(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    s = await EventStore.open(db, StoreConfig())
    for i in range(200):
        await s.append("s", "t", {"i": i, "pad": "z" * 500})
    await s.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] + b"\xff" * 4096 + data[len(data) // 2 + 4096 :])
    s = await EventStore.open(db, StoreConfig())
    try:
        assert s.quarantined is not None
        assert (await s.events())[0].type == "store.quarantined"
    finally:
        await s.close()


async def test_close_commits_what_was_queued_and_refuses_more(tmp_path: Path) -> None:
    s = await EventStore.open(tmp_path / "c.db", StoreConfig())
    futures = [s.append_many([NewEvent("s", "t", {"i": i})]) for i in range(100)]
    await s.close()
    assert all(f.done() and not f.exception() for f in futures)
    assert rows(s.path, "SELECT count(*) FROM events") == [(100,)]
    with pytest.raises(StoreClosedError):
        await s.append("s", "t", {})


async def test_reopen_continues_seq_and_versions(tmp_path: Path) -> None:
    s = await EventStore.open(tmp_path / "r.db", StoreConfig())
    await s.append("s", "t", {})
    await s.append("s", "t", {})
    await s.close()
    s = await EventStore.open(tmp_path / "r.db", StoreConfig())
    try:
        e = await s.append("s", "t", {}, expected_version=2)
        assert (e.seq, e.version) == (3, 3)
    finally:
        await s.close()


def test_component_migrations_apply_once_in_order(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    saved = schemas()
    try:
        register_schema("testpart", ["CREATE TABLE tp (a INTEGER)"])
        assert migrate(conn) == {**{k: len(v) for k, v in saved.items()}, "testpart": 1}
        register_schema("testpart", ["CREATE TABLE tp (a INTEGER)", "ALTER TABLE tp ADD b TEXT"])
        assert migrate(conn)["testpart"] == 2
        assert migrate(conn)["testpart"] == 2  # idempotent
        cols = [r[1] for r in conn.execute("PRAGMA table_info(tp)")]
        assert cols == ["a", "b"]
        versions = dict(conn.execute("SELECT component, version FROM schema_versions"))
        assert versions["core"] == len(CORE)
    finally:
        register_schema("testpart", [])
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "n.db", isolation_level=None)
    try:
        migrate(conn)
        conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'core'")
        with pytest.raises(sqlite3.DatabaseError, match="newer than this gatewayd knows"):
            migrate(conn)
    finally:
        conn.close()


async def test_backup_is_consistent_while_writing(store: EventStore, tmp_path: Path) -> None:
    writer = asyncio.gather(*(store.append("s", "t", {"i": i}) for i in range(300)))
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        result = maintenance.backup(conn, tmp_path / "b.db")
    finally:
        conn.close()
    await writer
    assert result["check"] == "ok"
    copy = sqlite3.connect(tmp_path / "b.db")
    try:
        n = copy.execute("SELECT count(*), coalesce(max(seq), 0) FROM events").fetchone()
    finally:
        copy.close()
    assert n[0] == n[1] == result["last_seq"]  # a prefix of the log, no holes
    assert maintenance.projections_match_rebuild(tmp_path / "b.db")


async def test_stream_versions_survive_a_crash_before_the_streams_table_is_written(
    tmp_path: Path,
) -> None:
    # A process that appends and dies without closing (os._exit: no flush, no checkpoint).
    import subprocess
    import sys

    db = tmp_path / "crash.db"
    code = f"""
import asyncio, os
from gateway.store import EventStore
async def main():
    s = await EventStore.open({str(db)!r})
    for i in range(7):
        await s.append("command:abc", "command.requested", {{"i": i}})
    for i in range(3):
        await s.append("device:x", "readings", {{"r": []}})
    os._exit(0)
asyncio.run(main())
"""
    r = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert rows(db, "SELECT count(*) FROM streams") == [(0,)]  # nothing flushed yet
    s = await EventStore.open(db, StoreConfig())
    try:
        with pytest.raises(ConcurrencyError):
            await s.append("command:abc", "x", {}, expected_version=6)
        e = await s.append("command:abc", "x", {}, expected_version=7)
        assert e.version == 8
        assert (await s.append("device:x", "readings", {"r": []})).version == 4
    finally:
        await s.close()
    # A clean close writes the table.
    assert dict(rows(db, "SELECT stream, version FROM streams")) == {
        "command:abc": 8, "device:x": 4
    }  # fmt: skip


async def test_retention_writes_stream_versions_before_deleting_their_events(
    tmp_path: Path,
) -> None:
    s = await EventStore.open(tmp_path / "p.db", StoreConfig())
    try:
        for _ in range(5):
            await s.append("s:1", "t", {})
        await s.write(lambda c: c.execute("DELETE FROM outbox"))
        assert await s.prune(older_than=-1) == 5
        assert rows(s.path, "SELECT stream, version FROM streams") == [("s:1", 5)]
    finally:
        await s.close()


async def test_a_crashed_writer_fails_waiters_instead_of_hanging_them(tmp_path: Path) -> None:
    from collections import deque

    class Poisoned(deque):  # type: ignore[type-arg]
        armed = True

        def popleft(self) -> object:
            if self.armed:
                self.armed = False
                raise RuntimeError("injected bug in the writer loop")
            return super().popleft()

    s = await EventStore.open(tmp_path / "w.db", StoreConfig())
    s._queue = Poisoned()
    with pytest.raises(StoreError, match="store writer failed: injected bug"):
        await s.append("s", "t", {})
    assert not s.healthy()
    with pytest.raises(StoreError, match="store writer failed"):
        await s.append("s", "t", {})
    await s.close()


def test_seq_at_bisects_the_log_by_wall_time(tmp_path: Path) -> None:
    """No index on wall_time (it cost a third of the WAL per commit): times are found by
    bisection over seq, which holds with gaps in seq (pruned, dropped events)."""
    conn = sqlite3.connect(tmp_path / "g.db")
    migrate(conn)
    seqs = [s for s in range(1, 400) if s % 7 and not 100 <= s < 180]  # gaps, one large
    conn.executemany(
        "INSERT INTO events (seq, stream, version, type, wall_time, mono_time, boot_id, synced,"
        " data) VALUES (?, 's', ?, 't', ?, 0, 'b', 1, x'a0')",
        [(s, s, 1000.0 + s / 2) for s in seqs],
    )
    for t in [0.0, 1000.0, 1000.5, 1001.0, 1049.9, 1050.0, 1120.0, 1199.5, 1200.0, 5000.0]:
        bound = queries.seq_at(conn, t)
        assert [s for s in seqs if s >= bound] == [s for s in seqs if 1000.0 + s / 2 >= t], t
    conn.close()
    empty = sqlite3.connect(tmp_path / "empty.db")
    migrate(empty)
    assert queries.seq_at(empty, 1.0) == 1
    empty.close()


async def test_lazy_appends_wait_for_the_interval_or_for_an_awaited_append(
    tmp_path: Path,
) -> None:
    s = await EventStore.open(tmp_path / "g.db", StoreConfig(commit_interval=60))
    try:
        held = s.append("device:a", ev.READINGS, {"r": [{"n": "t", "v": 1}]}, lazy=True)
        await asyncio.sleep(0)  # let the writer look at its queue: it holds the reading
        assert not held.done()
        assert rows(s.path, "SELECT count(*) FROM events") == [(0,)]
        # Somebody waits for this one: it commits at once, and takes the held one along.
        note = await s.append(ev.OPERATOR_STREAM, ev.OPERATOR_NOTE, {"text": "x"})
        assert held.done() and held.result().seq < note.seq
        # flush() commits what is held without an awaited append.
        more = s.append_many(
            [NewEvent("device:a", ev.READINGS, {"r": [{"n": "t", "v": 2}]})], lazy=True
        )
        await s.flush()
        assert more.done() and rows(s.path, "SELECT count(*) FROM events") == [(3,)]
        # And close() commits whatever is still held.
        last = s.append("device:a", ev.READINGS, {"r": [{"n": "t", "v": 3}]}, lazy=True)
    finally:
        await s.close()
    assert last.done() and last.result().seq == 4


async def test_page_size_applies_to_new_databases_only(tmp_path: Path) -> None:
    s = await EventStore.open(tmp_path / "new.db", StoreConfig(page_size=1024))
    await s.close()
    assert rows(tmp_path / "new.db", "PRAGMA page_size") == [(1024,)]
    s = await EventStore.open(tmp_path / "new.db", StoreConfig(page_size=4096))
    await s.append("device:a", ev.READINGS, {"r": []})
    await s.close()
    assert rows(tmp_path / "new.db", "PRAGMA page_size") == [(1024,)]  # kept its own


class _SteppedClock(SystemClock):
    """A clock the test moves by hand (wall and monotonic together)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_700_000_000.0
        self.mono = 100.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def step(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


async def test_a_held_back_append_keeps_the_time_it_was_made(tmp_path: Path) -> None:
    """Polled readings carry the time they were polled, not the time of the commit that
    took them along (which may come `commit_interval` later)."""
    clock = _SteppedClock()
    s = await EventStore.open(tmp_path / "g.db", StoreConfig(commit_interval=60), clock=clock)
    try:
        held = s.append("device:a", ev.READINGS, {"r": [{"n": "t", "v": 1}]}, lazy=True)
        many = s.append_many(
            [NewEvent("device:b", ev.READINGS, {"r": [{"n": "t", "v": 2}]})], lazy=True
        )
        clock.step(2.5)
        note = await s.append(ev.OPERATOR_STREAM, ev.OPERATOR_NOTE, {"text": "x"})
    finally:
        await s.close()
    assert held.result().wall_time == 1_700_000_000.0 and held.result().mono_time == 100.0
    assert many.result()[0].wall_time == 1_700_000_000.0
    assert note.wall_time == 1_700_000_002.5
    got = rows(tmp_path / "g.db", "SELECT wall_time FROM events ORDER BY seq")
    assert got == [(1_700_000_000.0,), (1_700_000_000.0,), (1_700_000_002.5,)]
