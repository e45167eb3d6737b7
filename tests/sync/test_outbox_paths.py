"""The outbox's two ways to the wire - batches cut by SQLite from bodies encoded at append
time, and events encoded one by one by the relay - give the same bytes; and what delivery
leaves in the store: the watermark, ranges acked by an earlier session, pruned rows,
requeued dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import random
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.clock import SystemClock
from gateway.errors import StoreError
from gateway.events import NewEvent
from gateway.store import EventStore, OutboxCodec, outbox, queries
from gateway.store.projections import register_projection
from gateway.sync.batch import Batch
from gateway.sync.codec import Encoder, decode_batch, item_format, joined_payload, outbox_encoder
from gateway.sync.config import SyncConfig
from gateway.sync.filesink import FileSink
from gateway.sync.link import ACCEPTED, Ack
from gateway.sync.reader import NO_UPPER, read_ahead, read_chunk
from gateway.sync.relay import Relay
from tests.peers import require_binary
from tests.sync.conftest import Mosquitto, Subscriber
from tests.sync.helpers import aio, check_order, mqtt_config, running_relay, sync_config, until

_ROWS = (
    "SELECT seq, stream, version, type, wall_time, mono_time, boot_id, synced, data "
    "FROM events WHERE seq IN ({}) ORDER BY seq"
)


class _FixedClock(SystemClock):
    """The same times and boot id in every store: two stores given the same appends hold
    the same rows, byte for byte."""

    def __init__(self) -> None:
        super().__init__()
        self.boot_id = "boot-test"

    def time(self) -> float:
        return 1_700_000_000.25

    def monotonic(self) -> float:
        return 4321.5

    def synced(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def _store(
    path: Path, codec: OutboxCodec | None, clock: SystemClock | None = None
) -> AsyncIterator[EventStore]:
    store = await EventStore.open(path, gateway_id="gw", clock=clock, outbox_codec=codec)
    try:
        yield store
    finally:
        await store.close()


def _events(n: int, streams: int, seed: int, prefix: str = "device:d") -> list[NewEvent]:
    """`n` events over `streams` streams, unevenly interleaved; non-ASCII text in them (a
    TEXT length in SQLite counts characters, not bytes)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        data = {"r": [{"n": "t", "v": i * 0.5, "u": "°C"}], "i": i, "s": "é✓🌡" * (i % 4)}
        kind = "alert.raised" if i % 11 == 0 else "readings"
        out.append(NewEvent(f"{prefix}{rnd.randrange(streams)}", kind, data))
    return out


async def _append(store: EventStore, events: list[NewEvent], per: int = 97) -> None:
    for i in range(0, len(events), per):
        await store.append_many(events[i : i + per])


def _rows(c: sqlite3.Connection, seqs: list[int]) -> list[tuple[Any, ...]]:
    return c.execute(_ROWS.format(",".join("?" * len(seqs))), seqs).fetchall()


async def _count(store: EventStore, sql: str) -> int:
    n: int = await store.read(lambda c: c.execute(sql).fetchone()[0])
    return n


async def _outbox_rows(store: EventStore) -> int:
    """Every row in the outbox, delivered or not: 0 once delivered rows are pruned."""
    return await _count(store, "SELECT count(*) FROM outbox")


async def _watermark(store: EventStore) -> int:
    return await store.read(outbox.delivered_upto)


def _decode(fmt: str, sep: bytes, blob: bytes) -> list[dict[str, Any]]:
    """Events joined by `sep` (CBOR: end to end; JSON: by commas or newlines)."""
    out: list[dict[str, Any]]
    if fmt == "json" and sep == b"\n":
        out = [json.loads(line) for line in blob.split(sep)]
        return out
    if fmt == "json":
        out = json.loads(b"[" + blob + b"]")
        return out
    buf, items = io.BytesIO(blob), []
    while buf.tell() < len(blob):
        items.append(cbor2.load(buf))
    return items


# -- SQLite's batches = the per-event path's batches ------------------------------------------
def _read_all(
    c: sqlite3.Connection, limit: int, size: int, sep: bytes, fmt: str, grouped: bool
) -> tuple[list[list[Batch]], list[tuple[int, str, str]]]:
    """The outbox read chunk after chunk, as a lane reads it: (batches per chunk, dead)."""
    enc = Encoder(fmt, "gw")
    chunks: list[list[Batch]] = []
    dead: list[tuple[int, str, str]] = []
    after = 0
    names: dict[int, str | None] = {}
    while True:
        batches, gone, _n, last, short = read_chunk(
            c, after, NO_UPPER, limit, size, sep, enc, grouped, False, False, names
        )
        chunks.append(batches)
        dead += gone
        after = last
        if short:
            return chunks, dead


def _merged(chunks: list[list[Batch]]) -> tuple[dict[str, list[Batch]], int]:
    """Per stream, neighbours with the same key merged (as `Lane.take` does with batches
    cut at a chunk edge); and how many merges that took."""
    out: dict[str, list[Batch]] = {}
    merges = 0
    for b in (b for chunk in chunks for b in chunk):
        q = out.setdefault(b.stream, [])
        if q and q[-1].key == b.key:
            q[-1].merge(b)
            merges += 1
        else:
            q.append(b)
    return out, merges


def _shape(per_stream: dict[str, list[Batch]]) -> dict[str, list[tuple[int, int, int, bytes]]]:
    return {s: [(b.n, b.first, b.last, b.blob) for b in q] for s, q in per_stream.items()}


@pytest.mark.parametrize(
    ("fmt", "sep"), [("cbor", b""), ("json", b","), ("json", b"\n")], ids=["cbor", "json", "ndjson"]
)
@aio
async def test_batches_cut_by_sqlite_are_byte_for_byte_those_of_the_per_event_path(
    tmp_path: Path, fmt: str, sep: bytes
) -> None:
    size, limit = 7, 45  # chunk edges fall inside version buckets
    events = _events(400, 9, seed=3, prefix="device:ü€-")
    bad_at = 200  # JSON: an event with no JSON form (bytes): its chunk goes the per-event way
    if fmt == "json":
        events.insert(bad_at, NewEvent("device:ü€-1", "readings", {"raw": b"\x00\xff"}))
    async with (
        _store(tmp_path / "codec.db", Encoder(fmt, "gw"), _FixedClock()) as coded,
        _store(tmp_path / "plain.db", None, _FixedClock()) as plain,
    ):
        await _append(coded, events)
        await _append(plain, events)

        fast, fast_dead = await coded.read(lambda c: _read_all(c, limit, size, sep, fmt, True))
        slow, slow_dead = await coded.read(lambda c: _read_all(c, limit, size, sep, fmt, False))
        bare, bare_dead = await plain.read(lambda c: _read_all(c, limit, size, sep, fmt, True))

        # The fast path was taken (batches know only first/last seq), except for the chunk
        # holding the event without a body; the store without bodies never takes it.
        bad_seq = bad_at + 1
        for chunk in fast:
            per_event = any(b.first <= bad_seq <= b.last for b in chunk) and fmt == "json"
            assert all((b.seqs is not None) == per_event for b in chunk)
        assert all(b.seqs is not None for chunk in bare for b in chunk)
        want_dead = []
        if fmt == "json":
            (dead,) = fast_dead
            assert dead[:2] == (bad_seq, "device:ü€-1")
            assert dead[2].startswith("not representable as json")
            want_dead = [dead]
        assert fast_dead == slow_dead == bare_dead == want_dead

        fast_m, merges = _merged(fast)
        slow_m, _ = _merged(slow)
        bare_m, _ = _merged(bare)
        assert merges > 0, "no batch was cut at a chunk edge: the test proves nothing"
        assert _shape(fast_m) == _shape(slow_m) == _shape(bare_m)
        assert sum(b.n for q in fast_m.values() for b in q) == len(events) - len(want_dead)

        # The reference itself: per stream, version buckets of `size`, each blob exactly
        # the encoder's bodies of those rows joined by the separator.
        enc = Encoder(fmt, "gw")
        for stream, q in slow_m.items():
            for b in q:
                rows = await coded.read(functools.partial(_rows, seqs=b.seq_list()))
                assert {r[1] for r in rows} == {stream}
                assert len({(r[2] - 1) // size for r in rows}) == 1
                assert b.blob == sep.join(enc.many(rows))

        # Halves of a batch cut by SQLite (seqs decoded from the blob) hold the right events.
        for stream, q in fast_m.items():
            for b, ref in zip(q, slow_m[stream], strict=True):
                if b.n < 2:
                    continue
                seqs = ref.seq_list()
                want = _decode(fmt, sep, ref.blob)
                h1, h2 = b.halves()
                h = b.n // 2
                assert (h1.n, h1.first, h1.last) == (h, seqs[0], seqs[h - 1])
                assert (h2.n, h2.first, h2.last) == (b.n - h, seqs[h], seqs[-1])
                assert h1.blob + sep + h2.blob == b.blob
                got1, got2 = _decode(fmt, sep, h1.blob), _decode(fmt, sep, h2.blob)
                assert [e["seq"] for e in got1 + got2] == seqs
                assert got1 == want[:h] and got2 == want[h:]
                assert all(e["stream"] == stream for e in got1 + got2)


# -- delivery, against a real Mosquitto (and to files) ---------------------------------------
async def _fenced(sub: Subscriber, port: int) -> None:
    """Mosquitto forwards messages to a subscriber in the order it took them: once a
    marker published after the relay's last PUBACK has reached the subscriber, so has
    every batch (rather than waiting for a count that an extra message would meet too)."""
    marker = f"fence-{time.monotonic_ns()}"
    await asyncio.to_thread(
        subprocess.run,
        [require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", "gateways/probe", "-m", marker],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    await until(lambda: marker.encode().hex() in sub.out.read_text(), "the fence marker")


async def _batches(
    store: EventStore, sub: Subscriber, fmt: str, known: dict[int, tuple[Any, ...]] | None = None
) -> list[list[tuple[Any, ...]]]:
    """Every event batch the subscriber got, checked byte for byte against `Encoder.many`
    of its rows (and its topic against its stream); returns the rows of each batch.
    `known`: the rows as read before the log was pruned."""
    enc = Encoder(fmt, "gw")
    sep = b"," if fmt == "json" else b""
    out = []
    for topic, payload in sub.raw():
        if "/events/" not in topic and "/backfill/" not in topic:
            continue
        if fmt == "json":
            assert payload[:1] == b"[" and isinstance(json.loads(payload), list), payload[:40]
        seqs = [e["seq"] for e in decode_batch(payload)]
        if known is None:
            rows = await store.read(functools.partial(_rows, seqs=seqs))
        else:
            rows = [known[s] for s in seqs if s in known]
        assert [r[0] for r in rows] == seqs, topic  # in seq order, every one in the log
        assert payload == joined_payload(fmt, len(rows), sep.join(enc.many(rows))), topic
        assert {r[1] for r in rows} == {topic.split("/")[3]}, topic
        out.append(rows)
    return out


def _buckets(batches: list[list[tuple[Any, ...]]], size: int) -> set[tuple[str, int]]:
    """(stream, version bucket) of each batch: each batch is one bucket, and no bucket went
    out in pieces (pieces cut at a chunk edge are merged before sending); a batch sent
    again is the same batch."""
    cuts: dict[tuple[str, int], set[tuple[int, ...]]] = {}
    for rows in batches:
        (bucket,) = {(r[1], (r[2] - 1) // size) for r in rows}
        cuts.setdefault(bucket, set()).add(tuple(r[0] for r in rows))
    pieces = {b: sorted(c) for b, c in cuts.items() if len(c) > 1}
    assert not pieces, f"buckets sent in pieces: {pieces}"
    return set(cuts)


def _once_in_order(sub: Subscriber, want: set[int]) -> None:
    events = sub.events()
    keys = [e["key"] for e in events]
    assert len(keys) == len(set(keys)), "an event was sent twice"
    assert set(keys) == {f"gw:{s}" for s in want}
    check_order(events)


async def _drained(store: EventStore, last: int) -> None:
    """Delivered up to `last` and pruned: nothing left in the outbox table."""
    await until(lambda: _watermark_is(store, last), f"watermark at {last}")
    await until(lambda: _pruned(store), "delivered rows pruned")


async def _watermark_is(store: EventStore, seq: int) -> bool:
    return await _watermark(store) == seq


async def _pruned(store: EventStore) -> bool:
    return await _outbox_rows(store) == 0


@pytest.mark.peer("mosquitto")
@aio
async def test_pre_encoded_outbox_end_to_end_each_bucket_once_then_pruned(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    size, n = 7, 1300
    cfg = mqtt_config(mosquitto.port, batch_size=size)
    chunk = read_ahead(cfg)[1]
    events = _events(n, 13, seed=5)
    # The data must put some bucket across a chunk edge, else no merge is needed.
    where: dict[tuple[str, int], list[int]] = {}
    versions: dict[str, int] = {}
    for seq, e in enumerate(events, 1):
        versions[e.stream] = versions.get(e.stream, 0) + 1
        where.setdefault((e.stream, (versions[e.stream] - 1) // size), []).append(seq)
    edges = range(chunk, n, chunk)
    assert any(min(s) <= x < max(s) for s in where.values() for x in edges)

    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(tmp_path / "gw.db", Encoder("cbor", "gw")) as store:
            await _append(store, events)
            assert await _count(store, "SELECT count(*) FROM outbox WHERE body IS NULL") == 0
            async with running_relay(store, cfg) as relay:
                await _drained(store, n)
                assert relay.delivered == n
                await _fenced(sub, mosquitto.port)
            assert await _count(store, "SELECT count(*) FROM outbox_acked") == 0
            batches = await _batches(store, sub, "cbor")
        _once_in_order(sub, set(range(1, n + 1)))
        assert _buckets(batches, size) == set(where)
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@aio
async def test_after_a_reconnect_mid_drain_only_the_batches_in_flight_are_sent_again(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size, n, inflight = 7, 1300, 16
    cfg = mqtt_config(mosquitto.port, batch_size=size, inflight=inflight)
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(tmp_path / "gw.db", Encoder("cbor", "gw")) as store:
            await _append(store, _events(n, 13, seed=15))
            async with running_relay(store, cfg) as relay:
                # The first session is dropped after its 40th batch (as if the link went);
                # the second starts from what the first recorded.
                link, connect = relay.sink, relay.sink.connect
                sessions: list[int] = []
                recorded: list[tuple[Any, ...]] = []

                async def connect_once_dropped() -> Any:
                    ch = await connect()
                    sessions.append(len(sessions) + 1)
                    if len(sessions) == 1:
                        send, sent = ch.send, [0]

                        def send_then_drop(*args: Any) -> asyncio.Future[Ack]:
                            sent[0] += 1
                            if sent[0] == 40:
                                relay.retry()
                            return send(*args)

                        monkeypatch.setattr(ch, "send", send_then_drop)
                    else:  # what the first session left: ranges acked above the watermark
                        recorded.extend(
                            await store.read(
                                lambda c: c.execute("SELECT * FROM outbox_acked").fetchall()
                            )
                        )
                    return ch

                monkeypatch.setattr(link, "connect", connect_once_dropped)
                await _drained(store, n)
                await _fenced(sub, mosquitto.port)
            assert len(sessions) == 2 and recorded, "no range acked above the watermark"
            _buckets(await _batches(store, sub, "cbor"), size)
        events = sub.events()
        check_order(events)
        keys = [e["key"] for e in events]
        assert set(keys) == {f"gw:{s}" for s in range(1, n + 1)}
        # Sent twice: only what the first session had in flight (its acks not taken in).
        again = {k for k in keys if keys.count(k) > 1}
        assert len(again) <= inflight * size
        skipped = {f"gw:{e['seq']}" for e in events for stream, lo, hi in recorded
                   if e["stream"] == stream and lo <= e["seq"] <= hi}  # fmt: skip
        assert skipped and not skipped & again
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@aio
async def test_rows_written_without_a_body_are_delivered_with_the_rest(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Before [sync] was configured (no codec), then with it: the first chunk mixes rows
    # with and without a body (per-event path), the next ones are cut by SQLite; batches
    # of the two kinds meet at the chunk edges.
    old, new = _events(150, 5, seed=7), _events(1000, 5, seed=8)
    path = tmp_path / "gw.db"
    async with _store(path, None) as store:
        await _append(store, old)
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(path, Encoder("cbor", "gw")) as store:
            await _append(store, new)
            nulls = await store.read(
                lambda c: c.execute("SELECT seq FROM outbox WHERE body IS NULL").fetchall()
            )
            assert [r[0] for r in nulls] == list(range(1, 151))
            async with running_relay(store, mqtt_config(mosquitto.port, batch_size=7)) as relay:
                await _drained(store, 1150)
                assert relay.delivered == 1150
                await _fenced(sub, mosquitto.port)
            # Also where a per-event batch and one cut by SQLite meet at the chunk edge.
            _buckets(await _batches(store, sub, "cbor"), 7)
        _once_in_order(sub, set(range(1, 1151)))
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@aio
async def test_a_codec_change_drops_the_old_bodies_and_everything_goes_out_as_json(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = tmp_path / "gw.db"
    async with _store(path, Encoder("cbor", "gw")) as store:
        await _append(store, _events(100, 4, seed=9))
        bodies = await store.read(lambda c: c.execute("SELECT body FROM outbox").fetchall())
        assert len(bodies) == 100 and all(cbor2.loads(b[0])["key"] for b in bodies)
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        # The site switches the MQTT format to JSON: gatewayd opens with a JSON codec.
        async with _store(path, Encoder("json", "gw")) as store:
            assert await _count(store, "SELECT count(*) FROM outbox WHERE body IS NULL") == 100
            assert await _count(store, "SELECT count(*) FROM outbox WHERE sid IS NULL") == 100
            await _append(store, _events(600, 4, seed=10))  # more than one chunk of its own
            assert await store.read(_sids_consistent) == []
            bodies = await store.read(
                lambda c: c.execute("SELECT seq, body FROM outbox WHERE seq > 100").fetchall()
            )
            assert len(bodies) == 600
            assert all(json.loads(b)["seq"] == s for s, b in bodies)
            cfg = mqtt_config(mosquitto.port, batch_size=7, format="json")
            async with running_relay(store, cfg) as relay:
                await _drained(store, 700)
                assert relay.delivered == 700 and relay.dead_lettered == 0
                await _fenced(sub, mosquitto.port)
            batches = await _batches(store, sub, "json")
            assert sum(len(b) for b in batches) == 700
        _once_in_order(sub, set(range(1, 701)))
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@pytest.mark.parametrize("codec", [True, False], ids=["bodies", "no-bodies"])
@aio
async def test_ranges_acked_by_a_previous_session_are_not_sent_again(
    mosquitto: Mosquitto, tmp_path: Path, codec: bool
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(tmp_path / "gw.db", Encoder("cbor", "gw") if codec else None) as store:
            streams = ["device:a", "device:b", "device:c"]
            await _append(store, [NewEvent(streams[i % 3], "readings", {"i": i})
                                  for i in range(90)])  # fmt: skip

            # What a crashed session left: the watermark at 12 (rows up to it pruned), and
            # batches of b and c acked above it.
            def previous_session(c: sqlite3.Connection) -> None:
                outbox.set_delivered_upto(c, 12)
                outbox.prune_delivered(c, None)
                c.executemany(
                    "INSERT INTO outbox_acked VALUES (?, ?, ?)",
                    [("device:b", 20, 50), ("device:c", 60, 63)],
                )

            await store.write(previous_session)
            skipped = {s for s in range(20, 51) if s % 3 == 2} | {s for s in (60, 63)}
            want = set(range(13, 91)) - skipped
            async with running_relay(store, mqtt_config(mosquitto.port, batch_size=7)) as relay:
                await _drained(store, 90)
                assert relay.delivered == len(want)
                await _fenced(sub, mosquitto.port)
            assert await _count(store, "SELECT count(*) FROM outbox_acked") == 0
            await _batches(store, sub, "cbor")
        _once_in_order(sub, want)
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@pytest.mark.parametrize("codec", [True, False], ids=["bodies", "no-bodies"])
@aio
async def test_ranges_acked_at_the_tail_of_the_outbox_still_move_the_watermark_to_the_end(
    mosquitto: Mosquitto, tmp_path: Path, codec: bool
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(tmp_path / "gw.db", Encoder("cbor", "gw") if codec else None) as store:
            streams = ["device:a", "device:b", "device:c"]
            await _append(store, [NewEvent(streams[i % 3], "readings", {"i": i})
                                  for i in range(90)])  # fmt: skip
            # The previous session had c's last batches acked (the newest rows of the
            # outbox), not yet the older batches of a and b.
            await store.write(
                lambda c: c.execute("INSERT INTO outbox_acked VALUES ('device:c', 60, 90)")
            )
            want = set(range(1, 91)) - set(range(60, 91, 3))
            async with running_relay(store, mqtt_config(mosquitto.port, batch_size=7)) as relay:
                await until(lambda: relay.delivered == len(want), "the rest delivered")
                await _fenced(sub, mosquitto.port)
            # Stopping the relay records every ack it had: all 90 rows are delivered.
            _once_in_order(sub, want)
            st = await store.read(queries.stats)
            assert (await _watermark(store), st["outbox_depth"]) == (90, 0)
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
@aio
async def test_a_requeued_dead_letter_below_the_watermark_is_delivered_and_never_pruned(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with _store(tmp_path / "gw.db", Encoder("cbor", "gw")) as store:
            await _append(store, [NewEvent(f"device:{'ab'[i % 2]}", "readings", {"i": i})
                                  for i in range(30)])  # fmt: skip

            # Event 5 was refused for good earlier (as the relay records a dead letter).
            def refused(c: sqlite3.Connection) -> None:
                c.execute("DELETE FROM outbox WHERE seq = 5")
                c.execute(
                    "INSERT INTO dead_letters (seq, stream, reason, at) VALUES (?, ?, ?, ?)",
                    (5, "device:a", "0x87 Not authorized (test)", time.time()),
                )

            await store.write(refused)
            cfg = mqtt_config(mosquitto.port, batch_size=7)
            async with running_relay(store, cfg) as relay:
                await _drained(store, 30)
                assert relay.delivered == 29

                assert await store.write(lambda c: outbox.requeue(c, [5])) == [5]
                row = await store.read(
                    lambda c: c.execute("SELECT seq, attempts, body FROM outbox").fetchall()
                )
                assert row == [(5, -1, None)]  # below the watermark (30), yet undelivered
                assert (await store.read(queries.stats))["outbox_depth"] == 1
                # Pruning (by SQL, by the store, in slices or not) leaves it alone.
                assert await store.write(lambda c: outbox.prune_delivered(c, None)) == 0
                assert await store.write(lambda c: outbox.prune_delivered(c, 10)) == 0
                assert await store.prune_outbox() == 0
                assert await _outbox_rows(store) == 1
                # Nor does retention: the delivered events go, the requeued one stays.
                every = await store.read(functools.partial(_rows, seqs=list(range(1, 31))))
                known = {r[0]: r for r in every}
                assert await store.prune(older_than=0) == 29
                left = await store.read(lambda c: c.execute("SELECT seq FROM events").fetchall())
                assert left == [(5,)]

                relay.requeued([5])
                await until(lambda: _pruned(store), "the requeued row deleted on its PUBACK")
                assert relay.delivered == 30
                assert await _watermark(store) == 30
                await _fenced(sub, mosquitto.port)
            assert await _count(store, "SELECT count(*) FROM dead_letters") == 0
            batches = await _batches(store, sub, "cbor", known)
        assert [r[0] for r in batches[-1]] == [5]
        keys = [e["key"] for e in sub.events()]
        assert sorted(keys) == sorted(f"gw:{s}" for s in range(1, 31))
    finally:
        sub.stop()


def _records(fmt: str, data: bytes) -> list[bytes]:
    """The records of a sink file, each as written."""
    if fmt == "ndjson":
        assert data.endswith(b"\n")
        return data.split(b"\n")[:-1]
    buf, out = io.BytesIO(data), []
    while buf.tell() < len(data):
        at = buf.tell()
        cbor2.load(buf)
        out.append(data[at : buf.tell()])
    return out


@pytest.mark.parametrize("fmt", ["ndjson", "cbor-seq"])
@aio
async def test_the_file_sink_writes_the_bodies_encoded_at_append_time(
    tmp_path: Path, fmt: str
) -> None:
    spool = tmp_path / "spool"
    cfg = sync_config({"file": {"directory": str(spool), "format": fmt}, "batch_size": 7})
    assert cfg.file is not None
    n = 700  # more than one chunk: SQLite's batches meet at a chunk edge
    async with _store(tmp_path / "gw.db", outbox_encoder(cfg, "gw")) as store:  # as gatewayd
        await _append(store, _events(n, 6, seed=14))
        assert await _count(store, "SELECT count(*) FROM outbox WHERE body IS NULL") == 0
        sink = FileSink(cfg.file, logging.getLogger("test.sync"))
        relay = Relay(store, sink, cfg, "gw", logging.getLogger("test.sync"))
        task = asyncio.create_task(relay.run(), name="relay")
        try:
            await _drained(store, n)
            assert relay.delivered == n
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sink.close()
        rows = await store.read(functools.partial(_rows, seqs=list(range(1, n + 1))))
    want = dict(zip(range(1, n + 1), Encoder(item_format(fmt), "gw").many(rows), strict=True))
    records = _records(fmt, b"".join(f.read_bytes() for f in sorted(spool.glob("events-*"))))
    events = [json.loads(r) if fmt == "ndjson" else cbor2.loads(r) for r in records]
    assert sorted(e["seq"] for e in events) == list(range(1, n + 1))
    assert all(r == want[e["seq"]] for r, e in zip(records, events, strict=True))
    check_order(events)


# -- scheduling: chained reads, watermark records and prunes ---------------------------------
class _InstantChannel:
    """Acks every batch at once. A fake on purpose: these tests are about the relay's own
    scheduling (chained reads, watermark records racing prunes), where a real broker would
    add nothing but time; delivery to a real one is covered above."""

    label = "instant://"
    item_format = "cbor"
    item_sep = b""

    def __init__(self, sent: list[tuple[str, str, int, bytes]]) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent = sent

    def send(
        self, lane: str, stream: str, type_: str, n: int, joined: bytes
    ) -> asyncio.Future[Ack]:
        self.sent.append((lane, stream, n, joined))
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        fut.set_result(ACCEPTED)
        return fut

    def fits(self, lane: str, stream: str, type_: str, size: int) -> bool:
        return True

    async def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _InstantSink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int, bytes]] = []
        self.connects = 0

    async def connect(self) -> _InstantChannel:
        self.connects += 1
        return _InstantChannel(self.sent)

    def kick(self) -> None:
        pass

    def figures(self) -> dict[str, Any]:
        return {"connects": self.connects}


@contextlib.asynccontextmanager
async def _instant_relay(store: EventStore, cfg: SyncConfig) -> AsyncIterator[Relay]:
    sink = _InstantSink()
    relay = Relay(store, sink, cfg, "gw", logging.getLogger("test.sync"))
    task = asyncio.create_task(relay.run(), name="relay")
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _sent_in_order(sink: Any, total: int) -> None:
    per_stream: dict[str, list[int]] = {}
    for _lane, stream, n, joined in sink.sent:
        items = _decode("cbor", b"", joined)
        assert len(items) == n and {e["stream"] for e in items} == {stream}
        per_stream.setdefault(stream, []).extend(e["seq"] for e in items)
    seqs = [s for q in per_stream.values() for s in q]
    assert sorted(seqs) == list(range(1, total + 1)), "each event exactly once"
    assert all(q == sorted(q) for q in per_stream.values())


@pytest.mark.parametrize(
    ("backfill", "late_job_end"),
    [({"threshold": 100_000}, False), ({"threshold": 100_000}, True),
     ({"threshold": 1000, "rate": 1e9}, False)],
    ids=["one-lane", "one-lane-late-job-end", "live-first"],
)  # fmt: skip
@aio
async def test_a_deep_backlog_of_many_streams_drains_to_the_last_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backfill: dict[str, Any], late_job_end: bool
) -> None:
    # 20 000 events, 50 streams, batches of 100: many chunks per read job, read-ahead
    # full. It once stalled when a read job ended after handing over its last chunk: the
    # pump, having sent and seen acked all it had, slept with nothing left to wake it.
    n = 20_000
    async with _store(tmp_path / "gw.db", Encoder("cbor", "gw")) as store:
        await _append(store, _events(n, 50, seed=11), per=2000)
        if late_job_end:
            read = store.read

            async def late_read(fn: Callable[[sqlite3.Connection], Any]) -> Any:
                result = await read(fn)
                # Turns of the loop (not time) before the end of the job reaches the relay:
                # the pump drains what the job handed over first - the order that stalled.
                for _ in range(200):
                    await asyncio.sleep(0)
                return result

            monkeypatch.setattr(store, "read", late_read)
        cfg = mqtt_config(1, batch_size=100, backfill=backfill)
        async with _instant_relay(store, cfg) as relay:
            await until(lambda: relay.delivered == n, f"{n} delivered")
            await _drained(store, n)
            assert relay.dead_lettered == 0
            assert relay.sink.figures()["connects"] == 1
            _sent_in_order(relay.sink, n)


@aio
async def test_acks_that_arrive_while_a_prune_runs_still_move_the_watermark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _store(tmp_path / "gw.db", Encoder("cbor", "gw")) as store:
        await _append(store, _events(300, 5, seed=12))
        entered, release = asyncio.Event(), asyncio.Event()
        prune = store.prune_outbox
        calls = 0

        async def held_prune(batch: int = 20_000) -> int:
            nonlocal calls
            calls += 1
            entered.set()
            await release.wait()
            return await prune(batch)

        monkeypatch.setattr(store, "prune_outbox", held_prune)
        async with _instant_relay(store, mqtt_config(1, batch_size=7)) as relay:
            await asyncio.wait_for(entered.wait(), 30)  # the relay went idle and prunes
            await _append(store, _events(200, 5, seed=13))
            await until(lambda: relay.delivered == 500, "the new events acked")
            # Acked during the prune: not recorded yet (the recorder is the one pruning).
            assert await _watermark(store) <= 300
            release.set()
            await _drained(store, 500)
            assert calls >= 2
            _sent_in_order(relay.sink, 500)


# -- stream ids (schema v3) -------------------------------------------------------------------
def _sids_consistent(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Outbox rows with a body whose sid is missing or names another stream (want none)."""
    rows: list[tuple[Any, ...]] = c.execute(
        "SELECT o.seq, o.stream, o.sid, s.stream FROM outbox o "
        "LEFT JOIN outbox_streams s ON s.sid = o.sid "
        "WHERE o.body IS NOT NULL AND (s.stream IS NULL OR s.stream != o.stream)"
    ).fetchall()
    return rows


class _Boom:
    """A projection that fails on one event type: the append's transaction rolls back.
    Registered for the whole process, it is active only in a database that has its table
    (`active_projections`): the one made by `_boom_db`."""

    tables: tuple[str, ...] = ("test_boom",)

    def reset(self, conn: sqlite3.Connection) -> None:
        pass

    def apply(self, conn: sqlite3.Connection, events: Any) -> None:
        if any(e.type == "boom" for e in events):
            raise sqlite3.OperationalError("injected failure")

    def snapshot(self, conn: sqlite3.Connection, stream: str) -> Any:
        return None

    def restore(self, conn: sqlite3.Connection, stream: str, state: Any) -> None:
        pass


@aio
async def test_a_stream_id_given_in_a_rolled_back_append_is_not_reused_for_another_stream(
    tmp_path: Path,
) -> None:
    # SQLite hands out the rolled-back id again: were it kept in the writer's cache, two
    # streams would share an id and SQLite would join their events into one batch.
    db = tmp_path / "gw.db"
    register_projection(_Boom())
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE test_boom (x)")
    conn.close()
    async with _store(db, Encoder("cbor", "gw")) as store:
        await store.append("device:a", "readings", {"i": 0})
        with pytest.raises(StoreError, match="injected failure"):
            await store.append("device:x", "boom", {"i": 1})
        await store.append("device:y", "readings", {"i": 2})
        await store.append("device:x", "readings", {"i": 3})
    # A store opened again starts with no id cached (as after the bounded cache is emptied):
    # ids are read back from the table.
    async with _store(db, Encoder("cbor", "gw")) as store:
        await store.append_many([NewEvent("device:x", "readings", {"i": 4}),
                                 NewEvent("device:z", "readings", {"i": 5})])  # fmt: skip

        assert await store.read(_sids_consistent) == []
        ids = dict(await store.read(lambda c: c.execute(
            "SELECT stream, sid FROM outbox_streams").fetchall()))  # fmt: skip
        assert sorted(ids) == ["device:a", "device:x", "device:y", "device:z"]
        assert len(set(ids.values())) == 4
        chunks, dead = await store.read(lambda c: _read_all(c, 100, 10, b"", "cbor", True))
        assert dead == []
        assert all(b.seqs is None for chunk in chunks for b in chunk)  # SQLite cut them
        per_stream, _ = _merged(chunks)
        assert {s: [(b.first, b.last, b.n) for b in q] for s, q in per_stream.items()} == {
            "device:a": [(1, 1, 1)], "device:y": [(2, 2, 1)],
            "device:x": [(3, 4, 2)], "device:z": [(5, 5, 1)],
        }  # fmt: skip


@aio
async def test_a_v2_outbox_gets_stream_ids_at_open_and_drains_the_fast_way(tmp_path: Path) -> None:
    size, limit = 7, 45
    events = _events(300, 9, seed=11)
    db = tmp_path / "gw.db"
    async with _store(db, Encoder("cbor", "gw"), _FixedClock()) as store:
        await _append(store, events)
        want, _ = await store.read(lambda c: _read_all(c, limit, size, b"", "cbor", False))
    # Back to schema v2: no ids, no id table.
    conn = sqlite3.connect(db)
    conn.executescript(
        "ALTER TABLE outbox DROP COLUMN sid; DROP TABLE outbox_streams; "
        "UPDATE schema_versions SET version = 2 WHERE component = 'core';"
    )
    conn.close()
    async with _store(db, Encoder("cbor", "gw"), _FixedClock()) as store:
        assert await _count(store, "SELECT count(*) FROM outbox WHERE sid IS NULL") == 0
        assert await store.read(_sids_consistent) == []
        fast, dead = await store.read(lambda c: _read_all(c, limit, size, b"", "cbor", True))
        assert dead == []
        assert all(b.seqs is None for chunk in fast for b in chunk)
        assert _shape(_merged(fast)[0]) == _shape(_merged(want)[0])
        # New appends to the old streams take their ids; a new stream gets a new one.
        await store.append("device:d1", "readings", {"i": "later"})
        await store.append("device:new", "readings", {"i": "later"})
        assert await store.read(_sids_consistent) == []
        assert await _count(store, "SELECT count(DISTINCT sid) FROM outbox") == 10


@aio
async def test_a_stream_id_missing_from_its_table_is_said_once_and_goes_the_per_event_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A damaged file: the relay must keep sending (correctly), not stop on it.
    events = _events(100, 5, seed=4) + _events(200, 3, seed=5, prefix="device:e")
    async with _store(tmp_path / "gw.db", Encoder("cbor", "gw"), _FixedClock()) as store:
        await _append(store, events)
        want, _ = await store.read(lambda c: _read_all(c, 45, 7, b"", "cbor", False))
        await store.write(lambda c: c.execute(
            "DELETE FROM outbox_streams WHERE stream = 'device:d3'"))  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="gateway.sync"):
            got, dead = await store.read(lambda c: _read_all(c, 45, 7, b"", "cbor", True))
        assert dead == []
        d3 = [chunk for chunk in got if any(b.stream == "device:d3" for b in chunk)]
        assert d3 and all(b.seqs is not None for chunk in d3 for b in chunk)  # per event
        others = [chunk for chunk in got if chunk not in d3 and chunk]
        assert others and all(b.seqs is None for chunk in others for b in chunk)  # by SQLite
        assert _shape(_merged(got)[0]) == _shape(_merged(want)[0])  # (merging mutates)
        said = [r for r in caplog.records if "missing from outbox_streams" in r.getMessage()]
        assert len(said) == 1


@aio
async def test_rows_without_a_stream_id_go_the_per_event_way(tmp_path: Path) -> None:
    # The invariant (a body has a sid) broken by hand: a NULL sid must never become one
    # batch of several streams.
    events = _events(60, 4, seed=2)
    async with _store(tmp_path / "gw.db", Encoder("cbor", "gw"), _FixedClock()) as store:
        await _append(store, events)
        want, _ = await store.read(lambda c: _read_all(c, 1000, 10, b"", "cbor", False))
        await store.write(lambda c: c.execute("UPDATE outbox SET sid = NULL WHERE seq % 2 = 0"))
        got, dead = await store.read(lambda c: _read_all(c, 1000, 10, b"", "cbor", True))
        assert dead == []
        assert all(b.seqs is not None for chunk in got for b in chunk)  # per-event path
        assert _shape(_merged(got)[0]) == _shape(_merged(want)[0])
