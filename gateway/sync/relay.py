"""The outbox relay: undelivered events, in seq order, to a sink; marked delivered only on
its ack.

How it keeps its promises:
- At-least-once: delivery is recorded (through the store's writer) only after the broker's
  PUBACK for the batch holding the events (for the file sink, after fsync). For the lane
  that drains the outbox from its oldest row, it is recorded as a watermark - every row at
  or below it is delivered - that advances to just below the oldest batch not yet acked;
  delivered rows are then pruned behind it, in slices, when the relay is idle or every few
  seconds. Other lanes (live events during a backfill, requeued dead letters) delete their
  rows one by one. A crash before the record means the events are sent again: duplicates
  with the same idempotency key, only for batches acked after the last record.
- Order per stream: at most one batch per stream and lane is in flight (so a refused or lost
  batch cannot be overtaken by the next one of its stream), the halves of a split batch go
  before anything newer, and every new session re-reads the outbox from the watermark.
- Live first: when the backlog at (re)connect is deeper than `backfill.threshold`, events
  newer than that moment go out at once on the telemetry topic (live lane) while the older
  ones drain on the backfill topic at `backfill.rate` events/s, using at most half the
  in-flight window (backfill lane). Each lane is in order per stream; a receiver merges
  them by (stream, version).
- Dead letters: a batch refused for good (PUBACK >= 0x80) is split in halves until the
  refused events stand alone; each goes to `dead_letters` with the reason; the rest flows.

Where the time goes: the store writes each outbox row with its event already encoded in
the sink's format (`body`, see `gateway.sync.codec.Encoder.bodies`), so SQLite itself cuts
a chunk of the outbox into per-stream batches and joins their bodies: one Python object per
batch, not per event, and the SQLite work runs without the GIL, beside the event loop. Rows
without a body (written before sync was configured, under another format, or with no form
in it) and topics with `{type}` take the per-event path (`_pieces`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cbor2

from gateway import events as ev
from gateway import names
from gateway.aio import wait_event
from gateway.errors import ConcurrencyError, PayloadError, StoreError
from gateway.logs import RateLimitedLog
from gateway.store import queries
from gateway.sync.codec import Encoder, NotRepresentableError, parse_command
from gateway.sync.codec import response_payload as _response
from gateway.sync.config import SyncConfig
from gateway.sync.link import (
    TRANSIENT_CODES,
    Ack,
    Backoff,
    Channel,
    LinkDownError,
    Sink,
    UnpublishableError,
)

if TYPE_CHECKING:
    from gateway.store import EventStore

log = logging.getLogger("gateway.sync")
PRUNE_EVERY = 5.0  # seconds between prunes of delivered rows while a drain keeps going
RECORD_RETRY_BASE, RECORD_RETRY_CAP = 0.2, 10.0  # pauses between tries of a failed record
NO_UPPER = 2**62

# In `Row` order; an outbox row whose event is gone has a NULL type (and its own stream).
_SELECT = (
    "SELECT o.seq, coalesce(e.stream, o.stream), e.version, e.type, e.wall_time, e.mono_time, "
    "e.boot_id, e.synced, e.data FROM outbox o LEFT JOIN events e ON e.seq = o.seq "
)

# A chunk of the outbox (rows with seq in (after, end]) cut into batches by SQLite: per
# stream, events whose versions fall in the same `size`-wide bucket, bodies joined by the
# sink's separator. Streams are grouped by their integer id (`sid`, schema v3): SQLite sorts
# integers much faster than names. Rows without a body come back as groups with count(body)
# < count(*) (a NULL sid as a group of its own); the chunk then goes the per-event way.
# SQLite's sorter keeps rows with equal keys in their input (seq) order: each group lists
# its bodies oldest first (the tests compare every byte with the per-event path).
# The whole chunk comes back as ONE row (the groups described in a JSON array, their
# bodies end to end in one blob): every row a query returns costs a hand-over of the GIL
# between the reader thread and the event loop, which cost more than the query itself.
# The chunk is a seq range, not a LIMIT: a subquery with a LIMIT would be run as a
# co-routine that copies every body once more. The same statement reads the newest seq,
# so "nothing more to read" is judged on the snapshot the rows came from.
# (The joined bodies travel as TEXT, read with text_factory=bytes: a CAST of the whole to
# BLOB would copy them twice more. A group's size in bytes is the length of its blob as a
# BLOB, once per group: length() of TEXT counts characters.)
_GROUPED = (
    "SELECT json_group_array(json_array(sid, b, n, lo, hi, nb, length(CAST(blob AS BLOB)))), "
    "group_concat(blob, ''), coalesce(sum(n), 0), (SELECT coalesce(max(seq), 0) FROM outbox) "
    "FROM (SELECT sid, (version - 1) / :size AS b, count(*) AS n, min(seq) AS lo, "
    "max(seq) AS hi, group_concat(body, :sep) AS blob, count(body) AS nb "
    "FROM outbox o WHERE seq > :after AND seq <= :end AND attempts >= 0 {skip} "
    "GROUP BY sid, b)"
)
# After a restart: rows of batches acked above the watermark by the previous session.
_SKIP_ACKED = (
    "AND NOT EXISTS (SELECT 1 FROM outbox_acked a "
    "WHERE a.stream = o.stream AND a.lo <= o.seq AND a.hi >= o.seq)"
)
_QUERIES = {
    (grouped, skip): (_GROUPED if grouped else _SELECT + (
        "WHERE o.seq > ? AND o.seq <= ? AND o.attempts >= 0 {skip} ORDER BY o.seq"
    )).format(skip=_SKIP_ACKED if skip else "")
    for grouped in (False, True) for skip in (False, True)
}  # fmt: skip


def _rows_in(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(seqs), 5000):
        part = seqs[i : i + 5000]
        marks = ",".join("?" * len(part))
        out += conn.execute(_SELECT + f"WHERE o.seq IN ({marks}) ORDER BY o.seq", part).fetchall()
    return out


def _decode_items(blob: bytes, sep: bytes) -> tuple[list[int], list[int]]:
    """(seq, encoded length) of each event in a joined batch: the envelopes say their seq.
    Only for the rare batch that has to be split or deleted row by row."""
    seqs: list[int] = []
    lens: list[int] = []
    at = 0
    if sep:  # JSON events, joined by "," (MQTT) or a newline (ndjson files)
        decoder = json.JSONDecoder()
        text = blob.decode()
        while at < len(text):
            obj, end = decoder.raw_decode(text, at)
            seqs.append(int(obj["seq"]))
            lens.append(len(text[at:end].encode()))
            at = end + len(sep)
        return seqs, lens
    buf = io.BytesIO(blob)
    while at < len(blob):
        obj = cbor2.load(buf)
        end = buf.tell()
        seqs.append(int(obj["seq"]))
        lens.append(end - at)
        at = end + len(sep)
        buf.seek(at)
    return seqs, lens


class _Batch:
    """Encoded events of one stream, in seq order, joined by the sink's separator. Batches
    cut by SQLite know only their first and last seq: the seq and length of each event are
    decoded from the blob if the batch has to be split or its rows deleted one by one."""

    __slots__ = ("blob", "first", "key", "last", "lens", "n", "sep", "seqs", "stream", "type")

    def __init__(
        self, stream: str, key: Any, type_: str, n: int, first: int, last: int,
        seqs: list[int] | None, lens: list[int] | None, blob: bytes, sep: bytes,
    ) -> None:  # fmt: skip
        self.stream = stream
        self.key = key  # batches with equal keys may be merged (same version bucket, type)
        self.type = type_
        self.n = n
        self.first = first
        self.last = last
        self.seqs = seqs
        self.lens = lens
        self.blob = blob
        self.sep = sep

    def _items(self) -> tuple[list[int], list[int]]:
        if self.seqs is None or self.lens is None:
            self.seqs, self.lens = _decode_items(self.blob, self.sep)
            if len(self.seqs) != self.n:
                raise StoreError(f"batch of {self.stream}: {len(self.seqs)} events, not {self.n}")
        return self.seqs, self.lens

    def seq_list(self) -> list[int]:
        return self._items()[0]

    def merge(self, other: _Batch) -> None:
        """Append `other` (the same stream and key, newer events)."""
        self.blob = self.blob + self.sep + other.blob
        self.n += other.n
        self.last = other.last
        if self.seqs is not None and other.seqs is not None:
            self.seqs = self.seqs + other.seqs
        else:
            self.seqs = None
        if self.lens is not None and other.lens is not None:
            self.lens = self.lens + other.lens
        else:
            self.lens = None

    def halves(self) -> tuple[_Batch, _Batch]:
        seqs, lens = self._items()
        sep, h = self.sep, self.n // 2
        cut = sum(lens[:h]) + len(sep) * (h - 1)
        s, k, t = self.stream, self.key, self.type
        return (
            _Batch(s, k, t, h, seqs[0], seqs[h - 1], seqs[:h], lens[:h], self.blob[:cut], sep),
            _Batch(s, k, t, self.n - h, seqs[h], seqs[-1], seqs[h:], lens[h:],
                   self.blob[cut + len(sep):], sep),
        )  # fmt: skip


def _pieces(
    raw: list[tuple[Any, ...]], encode: Encoder, size: int, sep: bytes, by_type: bool
) -> tuple[list[_Batch], list[tuple[int, str, str]]]:
    """The per-event path: rows (in `Row` order) encoded here and cut into batches like
    `_GROUPED` cuts them (and, with `{type}` in a topic, per run of one type)."""
    dead: list[tuple[int, str, str]] = []
    rows = raw
    if any(r[3] is None for r in raw):  # outbox rows whose event is gone: nothing to send
        dead += [(r[0], r[1], "event missing from the log") for r in raw if r[3] is None]
        rows = [r for r in raw if r[3] is not None]
    try:
        bodies = encode.many(rows)
    except NotRepresentableError:
        # Rare (JSON only): find the events that have no form in this format, one by one.
        ok, bodies = [], []
        for r in rows:
            try:
                bodies.append(encode(r))
                ok.append(r)
            except NotRepresentableError as exc:
                dead.append((r[0], r[1], f"not representable as {encode.fmt}: {exc}"))
        rows = ok
    out: list[_Batch] = []
    parts: dict[int, list[bytes]] = {}
    current: dict[str, _Batch] = {}
    for r, body in zip(rows, bodies, strict=True):
        key = ((r[2] - 1) // size, r[3] if by_type else None)
        b = current.get(r[1])
        if b is None or b.key != key:
            b = current[r[1]] = _Batch(r[1], key, r[3], 0, r[0], r[0], [], [], b"", sep)
            parts[id(b)] = []
            out.append(b)
        b.n += 1
        b.last = r[0]
        b.seqs.append(r[0])  # type: ignore[union-attr]
        b.lens.append(len(body))  # type: ignore[union-attr]
        parts[id(b)].append(body)
    for b in out:
        b.blob = sep.join(parts[id(b)])
    return out, dead


def _read_chunk(
    conn: sqlite3.Connection, after: int, upto: int, limit: int, size: int, sep: bytes,
    encode: Encoder, grouped: bool, by_type: bool, skip: bool, names: dict[int, str | None],
) -> tuple[list[_Batch], list[tuple[int, str, str]], int, int, bool]:  # fmt: skip
    """Reader thread: the outbox rows with seq in (after, min(upto, after + limit)] as
    batches. Returns (batches, dead rows, rows read, the seq read up to, whether that was
    everything: nothing newer was committed when the rows were read). `skip`: leave out rows
    in `outbox_acked` ranges. `names`: stream ids -> names, filled as ids are met."""
    end = min(upto, after + limit)
    if grouped:
        args = {"sep": sep, "size": size, "after": after, "end": end}
        conn.text_factory = bytes
        try:
            meta, joined, n, top = conn.execute(_QUERIES[True, skip], args).fetchone()
        finally:
            conn.text_factory = str
        last = min(end, max(top, after))
        groups = json.loads(meta)
        # Rows without a body in the chunk (rare), or a stream id with no name (a damaged
        # file): the whole chunk goes the per-event way.
        streams = (
            _stream_names(conn, [g[0] for g in groups], names)
            if all(g[5] == g[2] and g[0] is not None for g in groups)
            else None
        )
        if streams is not None:
            joined = joined or b""  # (NULL for an empty chunk)
            out: list[_Batch] = []
            at = 0
            for stream, (_sid, b, count, first, last_seq, _nb, nbytes) in zip(
                streams, groups, strict=True
            ):
                out.append(_Batch(stream, (b, None), "", count, first, last_seq, None, None,
                                  joined[at : at + nbytes], sep))  # fmt: skip
                at += nbytes
            if at != len(joined):
                raise StoreError(f"outbox after {after}: batches of {at} bytes, {len(joined)} read")
            return out, [], n, last, last >= min(top, upto)
        end = last
    else:
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
        end = min(end, max(top, after))
    raw = conn.execute(_QUERIES[False, skip], (after, end)).fetchall()
    batches, missing_rows = _pieces(raw, encode, size, sep, by_type)
    return batches, missing_rows, len(raw), end, end >= min(top, upto)


def _stream_names(
    conn: sqlite3.Connection, sids: list[int], names: dict[int, str | None]
) -> list[str] | None:
    """The streams of these ids, from `names`, which reads `outbox_streams` for ids met for
    the first time. None if one is not there, which only a damaged file can do: such an id
    is kept as None (said once in the log) and its chunks go the per-event way."""
    missing = [s for s in sids if s not in names]
    if missing:
        if len(names) > 50_000:
            names.clear()
            missing = sids
        marks = ",".join("?" * len(missing))
        q = f"SELECT sid, stream FROM outbox_streams WHERE sid IN ({marks})"
        names.update(conn.execute(q, missing).fetchall())
        lost = [s for s in missing if s not in names]
        if lost:
            log.warning("outbox rows name stream ids %s missing from outbox_streams: their "
                        "events are encoded one by one", lost[:5])  # fmt: skip
            names.update(dict.fromkeys(lost))
    out: list[str] = []
    for s in sids:
        name = names[s]
        if name is None:
            return None
        out.append(name)
    return out


def read_ahead(cfg: SyncConfig) -> tuple[int, int]:
    """(rows read ahead per lane, rows per read). The read-ahead holds full batches of many
    streams at once; reads come in chunks, one after the other while it has room, so the
    reader thread keeps working while batches are on the wire. A quarter of the read-ahead
    per read: with fewer, larger reads a batch is cut in fewer pieces (bench/sync.py: an
    eighth was ~10% slower, a larger read-ahead did not help)."""
    prefetch = min(50_000, max(2000, cfg.batch_size * max(cfg.inflight, 8) * 8))
    return prefetch, max(500, prefetch // 4)


class _TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self._clock = clock
        self._t = clock()

    def available(self) -> float:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now
        return self.tokens

    def take(self, n: int) -> None:
        self.tokens -= n

    def wait_for(self, n: float) -> float:
        return max(0.0, (n - self.available()) / self.rate)


class _Lane:
    """One ordered source of rows: live (seq > mark), backfill (seq <= mark), or requeued.
    The `bottom` lane reads from the watermark up: its progress moves the watermark."""

    def __init__(
        self,
        name: str,
        after: int = 0,
        upto: int | None = None,
        seqs: list[int] | None = None,
        bucket: _TokenBucket | None = None,
        max_slots: int | None = None,
        bottom: bool = False,
    ) -> None:
        self.name = name
        self.after = after
        self.upto = upto
        self.seqs = seqs
        self.bucket = bucket
        self.max_slots = max_slots
        self.bottom = bottom
        self.skip_upto = 0  # below this, leave out rows acked by an earlier session
        self.pending: dict[str, deque[_Batch]] = {}  # per stream: read and not yet sent
        self.splits: dict[str, deque[_Batch]] = {}  # halves and put-back batches: go first
        self.npending = 0
        self.filling: asyncio.Future[None] | None = None
        self.busy: set[str] = set()
        self.exhausted = False  # nothing more to read (for live: until the next commit)
        self.dropped = False  # its session ended: reads still under way are thrown away

    def finished(self) -> bool:
        return (
            self.name != "live" and self.exhausted and not self.npending and not self.busy
            and not self.splits and (self.filling is None or self.filling.done())
        )  # fmt: skip


class _Inflight:
    __slots__ = ("batch", "lane", "sent", "stream")

    def __init__(self, lane: _Lane, stream: str, batch: _Batch, sent: float) -> None:
        self.lane = lane
        self.stream = stream
        self.batch = batch
        self.sent = sent


class Relay:
    """Drains the outbox to a sink for as long as it runs (cancel it to stop)."""

    def __init__(
        self,
        store: EventStore,
        sink: Sink,
        cfg: SyncConfig,
        gateway_id: str,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.sink = sink
        self.cfg = cfg
        self.gw = gateway_id
        self.log = logger or logging.getLogger("gateway.sync")
        self._clock = clock
        self._progress = asyncio.Event()
        self._kick = asyncio.Event()
        self._done: deque[tuple[asyncio.Future[Ack], _Inflight]] = deque()
        self._ops: list[tuple[int, str, str, float]] = []  # dead letters to record
        # Acked batches outside the bottom lane: their seqs, or (stream, first, last) - all
        # the stream's rows in that range, for batches cut by SQLite.
        self._dels: list[list[int] | tuple[str, int, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._record_failures = 0
        self._repeats = RateLimitedLog(self.log)
        # The watermark: what the bottom lane has had acked (target) and what is recorded.
        self._bottom: _Lane | None = None
        self._lanes: list[_Lane] = []
        self._inflight: dict[asyncio.Future[Ack], _Inflight] = {}
        self._w_target = 0
        self._w_written = 0
        self._acked: list[tuple[str, int, int]] = []  # bottom-lane batches acked: (stream, lo, hi)
        self._pruned_upto = 0
        self._last_prune = clock()
        self._requeued: list[int] = []
        self._restart = False
        self._pause = cfg.retry.backoff()
        self._rates: deque[tuple[float, int]] = deque()
        self._prefetch, self._chunk = read_ahead(cfg)
        self._committed = False
        self._commits = 0
        self._uses_type = "{type}" in cfg.topics.telemetry or "{type}" in cfg.topics.backfill
        self._encode = Encoder(cfg.format, gateway_id)
        self._grouped = False  # batches cut by SQLite from stored bodies (see module doc)
        self._sep = b""
        self._names: dict[int, str | None] = {}  # stream ids: reader thread only
        # Figures.
        self.state = "starting"
        self.channel: Channel | None = None
        self.delivered = 0
        self.dead_lettered = 0
        self.batches = 0
        self.refusals = 0
        self.last_error: str | None = None
        self.last_error_at = 0.0  # monotonic time of last_error
        self._link_error = False  # last_error says the link went down (cleared on an ack)
        self.live_first = False
        self.backfill_left = 0
        self.inflight_batches = 0

    # -- public ------------------------------------------------------------------------------
    def retry(self) -> None:
        """Drop the current session (if any) and reconnect now."""
        self._restart = True
        self._pause.reset()
        self._kick.set()
        self.sink.kick()
        self._progress.set()

    def requeued(self, seqs: Sequence[int]) -> None:
        """Rows put back in the outbox (older than the cursor): send them too."""
        self._requeued.extend(seqs)
        self._progress.set()

    def rate(self, window: float = 60.0) -> float:
        now = self._clock()
        while self._rates and now - self._rates[0][0] > window:
            self._rates.popleft()
        if not self._rates:
            return 0.0
        span = max(now - self._rates[0][0], 1.0)
        return sum(n for _, n in self._rates) / span

    def figures(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "delivered": self.delivered,
            "delivery_rate": round(self.rate(), 1),
            "dead_lettered": self.dead_lettered,
            "refusals": self.refusals,
            "inflight_batches": self.inflight_batches,
            "live_first": self.live_first,
            "backfill_left": self.backfill_left,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            # Acked batches and dead letters not written yet (kept while writes fail).
            "unrecorded": len(self._dels) + len(self._acked) + len(self._ops),
            "unrecorded_dead_letters": len(self._ops),
            "record_failures": self._record_failures,  # in a row, since the last good write
        }

    async def handle_command(self, payload: bytes) -> bytes | None:
        """Downlink: a valid command becomes one `command.requested` event (the same id twice
        is still one event); an invalid one is answered with the reason and not evented."""
        fmt = self.cfg.format
        try:
            cmd = parse_command(payload)
        except PayloadError as exc:
            self.log.warning("sync: command refused: %s", exc)
            return _response(fmt, {"status": "rejected", "reason": str(exc),
                                   "id": _guess_id(payload)})  # fmt: skip
        try:
            await self.store.append(
                f"command:{cmd.id}", ev.COMMAND_REQUESTED, cmd.data, expected_version=0
            )
        except ConcurrencyError:
            self.log.debug("sync: command %s already requested (duplicate delivery)", cmd.id)
        except StoreError as exc:
            return _response(fmt, {"status": "unavailable", "reason": str(exc), "id": cmd.id,
                                   "retry_after": getattr(exc, "retry_after", 30)})  # fmt: skip
        return None

    async def run(self) -> None:
        self._stopping = False
        self._stopped.clear()
        self.store.add_listener(self._on_commit)
        try:
            while True:
                self.state = "connecting"
                ch = await self.sink.connect()
                self.channel = ch
                self.state = "connected"
                ch.closed.add_done_callback(lambda _f: self._progress.set())
                pause = 0.0
                delivered_before = self.delivered
                try:
                    await self._session(ch)
                except LinkDownError as exc:
                    self.last_error, self.last_error_at = str(exc), time.monotonic()
                    self._link_error = True
                    self.log.warning("sync: %s", exc)
                    # A session that delivered nothing (a broker that takes the connection
                    # and then refuses, drops or ignores us) must not become a tight loop.
                    if self.delivered == delivered_before and not self._restart:
                        pause = self._pause.next()
                    else:
                        self._pause.reset()
                finally:
                    self.channel = None
                    self.inflight_batches = 0
                    self._done.clear()
                    await ch.close()
                    await self._flush_wait()
                if pause:
                    self.state = "paused"
                    self._kick.clear()
                    await wait_event(self._kick, pause)
        finally:
            self.state = "stopped"
            self.store.remove_listener(self._on_commit)
            self._stopping = True  # one last try to record, no retries
            self._stopped.set()
            with contextlib.suppress(Exception):
                await self._flush_wait()
            left = len(self._ops) + len(self._dels) + len(self._acked)
            if left:
                self.log.warning(
                    "sync: stopped with %d deliveries or dead letters not recorded: "
                    "their events are still in the outbox and are sent again",
                    left,
                )
            self._repeats.flush()

    # -- internals ---------------------------------------------------------------------------
    def _on_commit(self, events: Sequence[ev.Event]) -> None:
        self._committed = True
        self._commits += 1
        self._progress.set()

    async def _session(self, ch: Channel) -> None:
        cfg = self.cfg
        self._restart = False
        await self._flush_wait()  # what was acked is recorded before we re-read the outbox

        threshold = cfg.backfill_threshold

        def survey(c: sqlite3.Connection) -> tuple[int, int, int, list[int], int]:
            # No count over the whole outbox (its rows carry their bodies: a backlog is a
            # scan of megabytes): at most `threshold` rows are counted, and only when the
            # seq range says the backlog may be that deep; a deeper one is counted for the
            # backfill figure only then.
            w = queries.delivered_upto(c)
            mark = max(w, c.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
            depth = 0
            if mark - w > threshold:
                depth = c.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM outbox "
                    "WHERE seq > ? AND attempts >= 0 LIMIT ?)", (w, threshold + 1)
                ).fetchone()[0]  # fmt: skip
                if depth > threshold:
                    depth = c.execute(
                        "SELECT count(*) FROM outbox WHERE seq > ? AND attempts >= 0", (w,)
                    ).fetchone()[0]  # fmt: skip
            requeued = [r[0] for r in c.execute(
                "SELECT seq FROM outbox WHERE attempts < 0 ORDER BY seq")]  # fmt: skip
            skip = c.execute("SELECT coalesce(max(hi), 0) FROM outbox_acked").fetchone()[0]
            return w, depth, mark, requeued, skip

        w, depth, mark, requeued, skip = await self.store.read(survey)
        self._w_target = self._w_written = w
        lanes: list[_Lane] = []
        self.live_first = depth > cfg.backfill_threshold
        if self.live_first:
            self.log.info(
                "sync: %d events waiting: live events first, the backlog at %g events/s",
                depth, cfg.backfill_rate,
            )  # fmt: skip
            bucket = _TokenBucket(cfg.backfill_rate, cfg.batch_size, self._clock)
            lanes.append(_Lane("live", after=mark))
            lanes.append(_Lane("backfill", after=w, upto=mark, bucket=bucket,
                               max_slots=max(1, cfg.inflight // 2), bottom=True))  # fmt: skip
            self.backfill_left = depth
        else:
            lanes.append(_Lane("live", after=w, bottom=True))
            self.backfill_left = 0
        self._requeued.clear()  # read again below, from the table
        if requeued:
            lanes.append(_Lane("requeue", seqs=requeued))
        self._bottom = next(ln for ln in lanes if ln.bottom)
        self._lanes = list(lanes)  # every lane of this session (requeue lanes join later)
        self._bottom.skip_upto = skip
        self._acked.clear()
        inflight: dict[asyncio.Future[Ack], _Inflight] = {}
        self._inflight = inflight
        self._encode = Encoder(ch.item_format, self.gw)
        self._sep = ch.item_sep
        codec = self.store.outbox_codec
        self._grouped = (
            not self._uses_type and codec is not None
            and codec.signature == self._encode.signature
        )  # fmt: skip
        fills: list[asyncio.Future[None]] = []
        try:
            await self._pump(ch, lanes, inflight, fills)
        finally:
            # What was acked until now is recorded; in-flight batches are sent again.
            self._refresh_watermark()
            self._bottom = None
            for ln in self._lanes:
                ln.dropped = True
            self._kick_flush()
            for f in fills:
                f.cancel()
            for f in fills:
                with contextlib.suppress(BaseException):
                    await f

    async def _pump(
        self,
        ch: Channel,
        lanes: list[_Lane],
        inflight: dict[asyncio.Future[Ack], _Inflight],
        fills: list[asyncio.Future[None]],
    ) -> None:
        cfg = self.cfg
        timer: asyncio.TimerHandle | None = None
        while True:
            fills[:] = [f for f in fills if not f.done() or _reraise(f)]
            if ch.closed.done():
                raise LinkDownError(f"{ch.label}: connection lost")
            if self._restart:
                raise LinkDownError(f"{ch.label}: reconnect requested")
            if self._requeued:
                seqs, self._requeued = sorted(set(self._requeued)), []
                lanes.append(_Lane("requeue", seqs=seqs))
                self._lanes.append(lanes[-1])
            # Completed batches first: they free streams and window slots.
            while self._done:
                fut, item = self._done.popleft()
                if inflight.pop(fut, None) is None:
                    fut.exception()  # from an earlier session: retrieved, ignored
                    continue
                self._completed(fut, item, ch)
            for lane in lanes:
                # One read at a time per lane, in chunks, while the read-ahead has room.
                if (
                    not lane.exhausted and lane.npending <= self._prefetch - self._chunk
                    and (lane.filling is None or lane.filling.done())
                ):  # fmt: skip
                    # In the background: batches keep going out while the reader thread reads.
                    lane.filling = asyncio.ensure_future(self._fill(lane))
                    fills.append(lane.filling)
            lanes = [ln for ln in lanes if not ln.finished()]
            if self.live_first and not any(ln.name == "backfill" for ln in lanes):
                self.live_first = False
                self.backfill_left = 0
                self.log.info("sync: backlog drained")
            wait = self._send(ch, lanes, inflight)
            self.inflight_batches = len(inflight)
            # An unanswered batch past ack_timeout: the link is dead even if TCP says not.
            if inflight:
                oldest = min(i.sent for i in inflight.values())
                left = oldest + cfg.ack_timeout - self._clock()
                if left <= 0:
                    raise LinkDownError(
                        f"{ch.label}: no PUBACK within {cfg.ack_timeout:g} s; reconnecting"
                    )
                wait = left if wait is None else min(wait, left)
            if timer is not None:
                timer.cancel()
                timer = None
            # Sleep only when nothing happened during this turn (no lost wake-ups).
            if not (self._done or self._progress.is_set()):
                if wait is not None:
                    timer = asyncio.get_running_loop().call_later(wait, self._progress.set)
                await self._progress.wait()
            self._progress.clear()
            if self._committed:
                self._committed = False
                for lane in lanes:
                    if lane.name == "live":
                        lane.exhausted = False

    async def _fill(self, lane: _Lane) -> None:
        """Read the lane's next rows. One job in the reader thread reads chunk after chunk
        (up to the room left in the read-ahead) and hands each to the loop as soon as it is
        read: the reader does not wait for a turn of the event loop between chunks."""
        limit, size, sep = self._chunk, self.cfg.batch_size, self._sep
        enc, grouped, by_type = self._encode, self._grouped, self._uses_type
        if lane.seqs is not None:
            chunk, lane.seqs = lane.seqs[:500], lane.seqs[500:]
            pieces, dead = (
                await self.store.read(
                    lambda c: _pieces(_rows_in(c, chunk), enc, size, sep, by_type)
                )
                if chunk else ([], [])
            )  # fmt: skip
            if not lane.seqs:
                lane.exhausted = True
            self._take_in(lane, pieces, dead)
            return
        loop = asyncio.get_running_loop()
        names = self._names
        start = lane.after
        upto = NO_UPPER if lane.upto is None else lane.upto
        budget = max(limit, self._prefetch - lane.npending)

        def job(c: sqlite3.Connection) -> None:  # in the reader thread
            after, got = start, 0
            while got < budget and not lane.dropped:
                commits = self._commits  # (an int read: no lock needed)
                skip = after < lane.skip_upto
                pieces, dead, n, last, short = _read_chunk(
                    c, after, upto, limit, size, sep, enc, grouped, by_type, skip, names
                )
                loop.call_soon_threadsafe(self._delivered, lane, pieces, dead, short, last, commits)
                got += n
                after = last
                if short:
                    return

        try:
            await self.store.read(job)
        finally:
            # The pump may have looked while this read was finishing: let it look again.
            self._progress.set()

    def _delivered(
        self, lane: _Lane, pieces: list[_Batch], dead: list[tuple[int, str, str]],
        short: bool, last: int, commits: int,
    ) -> None:  # fmt: skip
        """One chunk read: in the loop, in the order the chunks were read."""
        if lane.dropped:
            return
        # "Nothing more" holds only if nothing committed while it was being read.
        if short and (lane.upto is not None or commits == self._commits):
            lane.exhausted = True
        lane.after = last
        self._take_in(lane, pieces, dead)

    def _take_in(self, lane: _Lane, pieces: list[_Batch], dead: list[tuple[int, str, str]]) -> None:
        for seq, stream, reason in dead:
            self._dead(seq, stream, reason)
        pending = lane.pending
        for p in pieces:  # per batch, not per event
            q = pending.get(p.stream)
            if q is None:
                q = pending[p.stream] = deque()
            q.append(p)
            lane.npending += p.n
        self._progress.set()

    def _send(
        self, ch: Channel, lanes: list[_Lane], inflight: dict[asyncio.Future[Ack], _Inflight]
    ) -> float | None:
        """Start as many batches as the window allows, live lane first. Returns how long
        until a rate-limited lane may send again (None: no timer needed)."""
        cfg = self.cfg
        wait: float | None = None
        for lane in lanes:
            used = sum(1 for i in inflight.values() if i.lane is lane)
            # Oldest first: fair between streams, and the watermark follows closely.
            heads = [(sp[0].first, s) for s, sp in lane.splits.items() if sp]
            heads += [
                (q[0].first, s) for s, q in lane.pending.items() if q and s not in lane.splits
            ]
            heads.sort()
            for _first, stream in heads:
                if len(inflight) >= cfg.inflight:
                    return wait
                if lane.max_slots is not None and used >= lane.max_slots:
                    break
                if stream in lane.busy:
                    continue
                # While more rows wait in the database, send only whole batches: the rest
                # of a stream's last batch may come with the next read. At the tail, send.
                if (
                    not lane.exhausted and stream not in lane.splits
                    and lane.npending <= self._prefetch - self._chunk  # (more is coming)
                    and self._partial(lane.pending.get(stream))
                ):  # fmt: skip
                    continue
                batch = self._take(lane, stream)
                if batch is None:
                    continue
                if lane.bucket is not None:
                    need = float(batch.n)
                    if lane.bucket.available() < need:
                        self._put_back(lane, stream, batch)
                        w = lane.bucket.wait_for(need)
                        wait = w if wait is None else min(wait, w)
                        break
                    lane.bucket.take(batch.n)
                try:
                    fits = ch.fits(lane.name, stream, batch.type, len(batch.blob))
                    fut = (
                        ch.send(lane.name, stream, batch.type, batch.n, batch.blob)
                        if fits
                        else None
                    )
                except UnpublishableError as exc:
                    self._unpublishable(stream, batch, str(exc))
                    continue
                except BaseException:
                    self._put_back(lane, stream, batch)  # not sent: the watermark stays below
                    raise
                if fut is None:
                    # Over the broker's maximum packet size: it would drop the connection,
                    # again and again. Halve the batch; an event too big alone is dead.
                    if batch.n == 1:
                        seq = batch.seq_list()[0]
                        self.log.warning("sync: event %d (%s) is too large for %s -> dead "
                                         "letters", seq, stream, ch.label)  # fmt: skip
                        self._dead(seq, stream, f"too large for {ch.label}: "
                                   f"{len(batch.blob)} bytes")  # fmt: skip
                    else:
                        sp = lane.splits.setdefault(stream, deque())
                        sp.extendleft(reversed(batch.halves()))
                    self._progress.set()  # the halves go out on the next turn of the loop
                    continue
                item = _Inflight(lane, stream, batch, self._clock())
                inflight[fut] = item
                lane.busy.add(stream)
                used += 1
                self.batches += 1
                fut.add_done_callback(functools.partial(self._on_ack, item=item))
        return wait

    def _partial(self, q: deque[_Batch] | None) -> bool:
        """Whether the stream's next batch is all read and short: its rest may be next."""
        if not q:
            return False
        key, total = q[0].key, 0
        for b in q:
            if b.key != key:
                return False
            total += b.n
        return total < self.cfg.batch_size

    def _on_ack(self, fut: asyncio.Future[Ack], *, item: _Inflight) -> None:
        self._done.append((fut, item))
        self._progress.set()

    def _take(self, lane: _Lane, stream: str) -> _Batch | None:
        sp = lane.splits.get(stream)
        if sp:
            batch = sp.popleft()
            if not sp:
                del lane.splits[stream]
            return batch
        q = lane.pending.get(stream)
        if not q:
            lane.pending.pop(stream, None)
            return None
        batch = q.popleft()
        # A batch cut at the edge of a read goes out whole: with the rest of it.
        size = self.cfg.batch_size
        while q and q[0].key == batch.key and batch.n + q[0].n <= size:
            batch.merge(q.popleft())
        lane.npending -= batch.n
        if not q:
            del lane.pending[stream]
        return batch

    def _put_back(self, lane: _Lane, stream: str, batch: _Batch) -> None:
        lane.splits.setdefault(stream, deque()).appendleft(batch)

    def _completed(self, fut: asyncio.Future[Ack], item: _Inflight, ch: Channel) -> None:
        lane = item.lane
        lane.busy.discard(item.stream)
        exc = fut.exception()
        if exc is not None:
            raise exc if isinstance(exc, LinkDownError) else LinkDownError(str(exc))
        ack = fut.result()
        batch = item.batch
        if ack.ok:
            n = batch.n
            self.delivered += n
            if self._link_error:  # delivering again: that error is not current any more
                self.last_error, self._link_error = None, False
            if lane.name == "backfill":
                self.backfill_left = max(0, self.backfill_left - n)
            now = float(int(self._clock()))  # one entry per second keeps this small
            if self._rates and self._rates[-1][0] == now:
                self._rates[-1] = (now, self._rates[-1][1] + n)
            else:
                self._rates.append((now, n))
                if len(self._rates) > 120:
                    self._rates.popleft()
            if lane.bottom:  # its progress is the watermark; above it, ranges
                self._acked.append((batch.stream, batch.first, batch.last))
            else:
                self._dels.append(batch.seq_list() if batch.seqs is not None else
                                  (batch.stream, batch.first, batch.last))  # fmt: skip
            self._kick_flush()
            return
        self.refusals += 1
        reason = f"0x{ack.code:02X} {ack.reason} ({ch.label})"
        if ack.code in TRANSIENT_CODES:
            self._put_back(lane, item.stream, batch)
            raise LinkDownError(f"{ch.label}: batch refused for now: {reason}")
        if batch.n == 1:
            seq = batch.seq_list()[0]
            self.log.warning("sync: event %d (%s) refused: %s -> dead letters",
                             seq, item.stream, reason)  # fmt: skip
            self._dead(seq, item.stream, reason)
            return
        halves = batch.halves()
        lane.splits.setdefault(item.stream, deque()).extendleft(reversed(halves))

    def _unpublishable(self, stream: str, batch: _Batch, reason: str) -> None:
        """A batch the sink can never take (all its events share the topic that failed):
        each event goes to the dead letters with the reason - never counted as delivered,
        and recorded with the watermark that passes it."""
        seqs = batch.seq_list()
        self.log.warning("sync: %d event(s) of %s cannot be published (%s) -> dead letters",
                         len(seqs), names.escape(stream), reason)  # fmt: skip
        for seq in seqs:
            self._dead(seq, stream, f"cannot publish: {reason}")
        self._progress.set()

    def _dead(self, seq: int, stream: str, reason: str) -> None:
        self.dead_lettered += 1
        self.last_error = f"event {seq} to dead letters: {reason}"
        self.last_error_at = time.monotonic()
        self._link_error = False
        self._ops.append((seq, stream, reason, time.time()))
        self._kick_flush()

    def _kick_flush(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="sync-outbox-flush"
            )

    def _refresh_watermark(self) -> None:
        """The bottom lane's watermark: just below its oldest event not yet acked (read
        and waiting, split, put back or in flight), or everything it has read."""
        lane = self._bottom
        if lane is None:
            return
        w = lane.upto if lane.exhausted and lane.upto is not None else lane.after
        for q in lane.pending.values():
            if q and q[0].first <= w:
                w = q[0].first - 1
        for sp in lane.splits.values():
            for b in sp:
                if b.first <= w:
                    w = b.first - 1
        for item in self._inflight.values():
            if item.lane is lane and item.batch.first <= w:
                w = item.batch.first - 1
        if w > self._w_target:
            self._w_target = w

    async def _flush(self) -> None:
        """Record deliveries and dead letters (then prune, when idle) until nothing is left
        to record: what is acked while a write or a prune is under way goes in the next.
        A failed write is tried again after a pause (until it commits, or the relay stops:
        the rows are then still undelivered in the outbox, and are sent again)."""
        pause = Backoff(RECORD_RETRY_BASE, RECORD_RETRY_CAP)
        while True:
            if await self._record():
                pause.reset()
                if not await self._prune():
                    return
                continue
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause.next()):
                    await self._stopped.wait()  # a stop does not wait out the pause

    async def _record(self) -> bool:
        """Write what was acked and dead-lettered. Nothing leaves memory before the write
        that holds it has committed: after a failed write (a full disk...) all of it is
        written again, in order, with whatever came since."""
        while True:
            self._refresh_watermark()
            w = self._w_target if self._w_target > self._w_written else None
            if not (self._ops or self._dels or self._acked or w is not None):
                break
            dels, ops, nacked = list(self._dels), list(self._ops), len(self._acked)
            mark = self._w_target
            acked = [a for a in self._acked[:nacked] if a[2] > mark]  # (the rest: below the mark)
            try:
                await self.store.write(
                    lambda c, d=dels, o=ops, u=w, a=acked: _apply_ops(c, u, d, o, a)  # type: ignore[misc]
                )
            except Exception as exc:  # the store's errors, and anything else: never die
                # Kept for the next write; the rows stay undelivered until then.
                self._record_failures += 1
                self._repeats.warning(
                    "record", "sync: could not record deliveries and dead letters (%d "
                    "pending, kept to retry): %s", len(dels) + len(ops) + nacked, exc,
                )  # fmt: skip
                return False
            del self._dels[: len(dels)]
            del self._ops[: len(ops)]
            del self._acked[:nacked]
            if w is not None:
                self._w_written = w
            if self._record_failures:
                self.log.info("sync: deliveries and dead letters recorded again after %d "
                              "failed writes", self._record_failures)  # fmt: skip
                self._record_failures = 0
        return True

    async def _prune(self) -> bool:
        """Delivered rows are pruned behind the watermark, in slices: once the outbox is
        drained and nothing is in flight, or every few seconds during a long drain.
        Returns whether it pruned (then there may be more to record)."""
        now = self._clock()
        bottom = self._bottom
        idle = not self._inflight and (bottom is None or bottom.exhausted)
        if self._w_written <= self._pruned_upto or not (
            idle or now - self._last_prune >= PRUNE_EVERY
        ):
            return False
        self._last_prune = now
        upto = self._w_written
        try:
            await self.store.prune_outbox()
        except Exception as exc:
            self._repeats.warning("prune", "sync: could not prune delivered rows: %s", exc)
            return False
        self._pruned_upto = upto
        return True

    async def _flush_wait(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._ops or self._dels or self._acked or self._w_target > self._w_written:
            self._kick_flush()
            if self._flusher is not None:
                await asyncio.shield(self._flusher)


def _reraise(f: asyncio.Future[None]) -> bool:
    """A finished read: surface its error (the session then ends); drop it otherwise."""
    exc = f.exception()
    if exc is not None:
        raise exc
    return False


def _apply_ops(
    conn: sqlite3.Connection, upto: int | None, acked: list[list[int] | tuple[str, int, int]],
    dead: list[tuple[int, str, str, float]], ranges: Sequence[tuple[str, int, int]] = (),
) -> None:  # fmt: skip
    if ranges:
        conn.executemany("INSERT OR REPLACE INTO outbox_acked VALUES (?, ?, ?)", ranges)
    if upto is not None:
        queries.set_delivered_upto(conn, upto)
    seqs = [s for a in acked if isinstance(a, list) for s in a]
    if seqs:
        # One statement for the whole group: SQLite walks the list without the GIL (a
        # statement per row or per run hands the GIL back and forth once per step).
        conn.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
            ("[" + ",".join(map(str, seqs)) + "]",),
        )
    spans = [a for a in acked if isinstance(a, tuple)]
    if spans:
        conn.executemany(
            "DELETE FROM outbox WHERE seq BETWEEN ? AND ? AND stream = ? AND attempts >= 0",
            [(lo, hi, stream) for stream, lo, hi in spans],
        )
    for seq, stream, reason, at in dead:
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT OR REPLACE INTO dead_letters (seq, stream, reason, at) VALUES (?,?,?,?)",
            (seq, stream, reason, at),
        )


def requeue_rows(conn: sqlite3.Connection, seqs: Sequence[int] | None) -> list[int]:
    """Move dead letters back to the outbox (all when `seqs` is None); returns their seqs.
    They are marked requeued (attempts = -1): below the watermark, yet not delivered."""
    if seqs is None:
        rows = conn.execute("SELECT seq, stream FROM dead_letters ORDER BY seq").fetchall()
    else:
        rows = []
        for s in seqs:
            r = conn.execute("SELECT seq, stream FROM dead_letters WHERE seq = ?", (s,)).fetchone()
            if r is not None:
                rows.append(r)
    for seq, stream in rows:
        conn.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT INTO outbox (seq, stream, attempts, last_error) VALUES (?, ?, -1, ?) "
            "ON CONFLICT(seq) DO UPDATE SET attempts = -1, last_error = excluded.last_error",
            (seq, stream, "requeued"),
        )
    return [r[0] for r in rows]


def dead_letter_rows(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT d.seq, d.stream, d.reason, d.at, e.type, e.version, length(e.data) "
        "FROM dead_letters d LEFT JOIN events e ON e.seq = d.seq ORDER BY d.seq LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        {"seq": r[0], "stream": r[1], "reason": r[2], "at": r[3], "type": r[4],
         "version": r[5], "bytes": r[6]}
        for r in rows
    ]  # fmt: skip


def _guess_id(payload: bytes) -> str | None:
    import json

    import cbor2

    try:
        obj = json.loads(payload) if payload.lstrip()[:1] == b"{" else cbor2.loads(payload)
    except Exception:
        return None
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and len(cid) <= 128 else None
