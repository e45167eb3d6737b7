"""The outbox relay: undelivered events, in seq order, to a sink; deleted only on its ack.

How it keeps its promises:
- At-least-once: an outbox row is deleted (through the store's writer) only after the
  broker's PUBACK for the batch holding it (or, for the file sink, after fsync). A crash
  before that means the row is sent again: a duplicate with the same idempotency key.
- Order per stream: at most one batch per stream and lane is in flight (so a refused or lost
  batch cannot be overtaken by the next one of its stream), the halves of a split batch go
  before anything newer, and every new session re-reads the outbox from its oldest row.
- Live first: when the backlog at (re)connect is deeper than `backfill.threshold`, events
  newer than that moment go out at once on the telemetry topic (live lane) while the older
  ones drain on the backfill topic at `backfill.rate` events/s, using at most half the
  in-flight window (backfill lane). Each lane is in order per stream; a receiver merges
  them by (stream, version).
- Dead letters: a batch refused for good (PUBACK >= 0x80) is split in halves until the
  refused events stand alone; each goes to `dead_letters` with the reason; the rest flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway import events as ev
from gateway.errors import ConcurrencyError, PayloadError, StoreError
from gateway.sync.codec import Encoder, NotRepresentableError, parse_command
from gateway.sync.codec import response_payload as _response
from gateway.sync.config import SyncConfig
from gateway.sync.link import TRANSIENT_CODES, Ack, Backoff, Channel, LinkDownError, Sink

if TYPE_CHECKING:
    from gateway.store import EventStore

# In `Row` order; an outbox row whose event is gone has a NULL type (and its own stream).
_SELECT = (
    "SELECT o.seq, coalesce(e.stream, o.stream), e.version, e.type, e.wall_time, e.mono_time, "
    "e.boot_id, e.synced, e.data FROM outbox o LEFT JOIN events e ON e.seq = o.seq "
)


def _rows(
    conn: sqlite3.Connection, after: int, upto: int | None, limit: int
) -> list[tuple[Any, ...]]:
    if upto is None:
        q = _SELECT + "WHERE o.seq > ? ORDER BY o.seq LIMIT ?"
        return conn.execute(q, (after, limit)).fetchall()
    q = _SELECT + "WHERE o.seq > ? AND o.seq <= ? ORDER BY o.seq LIMIT ?"
    return conn.execute(q, (after, upto, limit)).fetchall()


def _rows_in(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    marks = ",".join("?" * len(seqs))
    return conn.execute(_SELECT + f"WHERE o.seq IN ({marks}) ORDER BY o.seq", list(seqs)).fetchall()


class _Batch:
    """Events of one stream, in seq order, ready to go (encoded in the reader thread, next
    to the query). Kept as parallel lists, not an object per event: a batch is taken and
    split with list slices, and its acked seqs are handed to the writer as one list."""

    __slots__ = ("bodies", "seqs", "stream", "types")

    def __init__(self, stream: str, seqs: list[int], types: list[str], bodies: list[bytes]):
        self.stream = stream
        self.seqs = seqs
        self.types = types
        self.bodies = bodies

    def __len__(self) -> int:
        return len(self.seqs)

    def extend(self, other: _Batch) -> None:
        self.seqs += other.seqs
        self.types += other.types
        self.bodies += other.bodies

    def take(self, n: int) -> _Batch:
        """The first `n` events, removed from this one."""
        b = _Batch(self.stream, self.seqs[:n], self.types[:n], self.bodies[:n])
        del self.seqs[:n], self.types[:n], self.bodies[:n]
        return b

    def halves(self) -> tuple[_Batch, _Batch]:
        h = len(self.seqs) // 2
        return (
            _Batch(self.stream, self.seqs[:h], self.types[:h], self.bodies[:h]),
            _Batch(self.stream, self.seqs[h:], self.types[h:], self.bodies[h:]),
        )


def _prepare(
    raw: list[tuple[Any, ...]], encode: Encoder
) -> tuple[dict[str, _Batch], list[tuple[int, str, str]]]:
    """Rows -> encoded events grouped per stream (in seq order), and the dead ones."""
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
    groups: dict[str, _Batch] = {}
    get = groups.get
    for r, body in zip(rows, bodies, strict=True):  # per event: keep this loop small
        g = get(r[1])
        if g is None:
            g = groups[r[1]] = _Batch(r[1], [], [], [])
        g.seqs.append(r[0])
        g.types.append(r[3])
        g.bodies.append(body)
    return groups, dead


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
    """One ordered source of rows: live (seq > mark), backfill (seq <= mark), or requeued."""

    def __init__(
        self,
        name: str,
        after: int = 0,
        upto: int | None = None,
        seqs: list[int] | None = None,
        bucket: _TokenBucket | None = None,
        max_slots: int | None = None,
    ) -> None:
        self.name = name
        self.after = after
        self.upto = upto
        self.seqs = seqs
        self.bucket = bucket
        self.max_slots = max_slots
        self.pending: dict[str, _Batch] = {}  # per stream: what is read and not yet sent
        self.splits: dict[str, deque[_Batch]] = {}  # halves and put-back batches: go first
        self.npending = 0
        self.filling: asyncio.Future[None] | None = None
        self.busy: set[str] = set()
        self.exhausted = False  # nothing more to read (for live: until the next commit)

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
        self._dels: list[list[int]] = []  # seqs of acked batches: rows to delete
        self._flusher: asyncio.Task[None] | None = None
        self._requeued: list[int] = []
        self._restart = False
        self._pause = Backoff(cfg.backoff_base, cfg.backoff_cap)
        self._rates: deque[tuple[float, int]] = deque()
        # Rows read ahead per lane: enough for full batches of many streams at once.
        self._prefetch = min(50_000, max(2000, cfg.batch_size * max(cfg.inflight, 8) * 8))
        # Reads come in chunks, one after the other while the read-ahead has room: the
        # reader thread (query + encoding) keeps working while batches are on the wire.
        self._chunk = max(500, self._prefetch // 4)
        self._committed = False
        self._commits = 0
        self._uses_type = "{type}" in cfg.topics.telemetry or "{type}" in cfg.topics.backfill
        self._encode = Encoder(cfg.format, gateway_id)
        # Figures.
        self.state = "starting"
        self.channel: Channel | None = None
        self.delivered = 0
        self.dead_lettered = 0
        self.batches = 0
        self.refusals = 0
        self.last_error: str | None = None
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
                    self.last_error = str(exc)
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
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._kick.wait(), pause)
        finally:
            self.state = "stopped"
            self.store.remove_listener(self._on_commit)
            with contextlib.suppress(Exception):
                await self._flush_wait()

    # -- internals ---------------------------------------------------------------------------
    def _on_commit(self, events: Sequence[ev.Event]) -> None:
        self._committed = True
        self._commits += 1
        self._progress.set()

    async def _session(self, ch: Channel) -> None:
        cfg = self.cfg
        self._restart = False
        await self._flush_wait()  # acked rows are gone before we re-read the outbox
        depth, mark = await self.store.read(
            lambda c: c.execute("SELECT count(*), coalesce(max(seq), 0) FROM outbox").fetchone()
        )
        lanes: list[_Lane] = []
        self.live_first = depth > cfg.backfill_threshold
        if self.live_first:
            self.log.info(
                "sync: %d events waiting: live events first, the backlog at %g events/s",
                depth, cfg.backfill_rate,
            )  # fmt: skip
            bucket = _TokenBucket(cfg.backfill_rate, cfg.batch_size, self._clock)
            lanes.append(_Lane("live", after=mark))
            lanes.append(_Lane("backfill", after=0, upto=mark, bucket=bucket,
                               max_slots=max(1, cfg.inflight // 2)))  # fmt: skip
            self.backfill_left = depth
        else:
            lanes.append(_Lane("live", after=0))
            self.backfill_left = 0
        inflight: dict[asyncio.Future[Ack], _Inflight] = {}
        self._requeued.clear()  # a fresh read from the start covers them
        self._encode = Encoder(ch.item_format, self.gw)
        fills: list[asyncio.Future[None]] = []
        try:
            await self._pump(ch, lanes, inflight, fills)
        finally:
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
        limit = self._chunk
        enc = self._encode
        if lane.seqs is not None:
            chunk, lane.seqs = lane.seqs[:500], lane.seqs[500:]
            items, dead = (
                await self.store.read(lambda c: _prepare(_rows_in(c, chunk), enc))
                if chunk else ({}, [])
            )  # fmt: skip
            if not lane.seqs:
                lane.exhausted = True
        else:
            after, upto = lane.after, lane.upto
            commits = self._commits

            def read(c: sqlite3.Connection) -> tuple[dict[str, _Batch], list[Any], int, int]:
                raw = _rows(c, after, upto, limit)
                return (*_prepare(raw, enc), len(raw), raw[-1][0] if raw else after)

            items, dead, n, last = await self.store.read(read)
            # "Nothing more" holds only if nothing committed while we were reading.
            if n < limit and (upto is not None or commits == self._commits):
                lane.exhausted = True
            lane.after = last
        for seq, stream, reason in dead:
            self._dead(seq, stream, reason)
        pending = lane.pending
        for stream, g in items.items():  # per stream, not per event
            q = pending.get(stream)
            if q is None:
                pending[stream] = g
            else:
                q.extend(g)
            lane.npending += len(g)
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
            for stream in list(lane.splits.keys() | lane.pending.keys()):
                if len(inflight) >= cfg.inflight:
                    return wait
                if lane.max_slots is not None and used >= lane.max_slots:
                    break
                if stream in lane.busy:
                    continue
                # While more rows wait in the database, send only full batches: a stream
                # with a short queue gets more rows at the next read. At the tail, send all.
                if (
                    not lane.exhausted and stream not in lane.splits
                    and len(lane.pending.get(stream, ())) < cfg.batch_size
                    and lane.npending <= self._prefetch - self._chunk  # (more is coming)
                ):  # fmt: skip
                    continue
                batch = self._take(lane, stream)
                if batch is None:
                    continue
                if lane.bucket is not None:
                    need = float(len(batch))
                    if lane.bucket.available() < need:
                        self._put_back(lane, stream, batch)
                        w = lane.bucket.wait_for(need)
                        wait = w if wait is None else min(wait, w)
                        break
                    lane.bucket.take(len(batch))
                bodies = batch.bodies
                if not ch.fits(lane.name, stream, batch.types[0], sum(map(len, bodies))):
                    # Over the broker's maximum packet size: it would drop the connection,
                    # again and again. Halve the batch; an event too big alone is dead.
                    if len(batch) == 1:
                        seq = batch.seqs[0]
                        self.log.warning("sync: event %d (%s) is too large for %s -> dead "
                                         "letters", seq, stream, ch.label)  # fmt: skip
                        self._dead(seq, stream, f"too large for {ch.label}: "
                                   f"{len(bodies[0])} bytes")  # fmt: skip
                    else:
                        sp = lane.splits.setdefault(stream, deque())
                        sp.extendleft(reversed(batch.halves()))
                    self._progress.set()  # the halves go out on the next turn of the loop
                    continue
                fut = ch.send(lane.name, stream, batch.types[0], bodies)
                item = _Inflight(lane, stream, batch, self._clock())
                inflight[fut] = item
                lane.busy.add(stream)
                used += 1
                self.batches += 1
                fut.add_done_callback(functools.partial(self._on_ack, item=item))
        return wait

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
        n = min(self.cfg.batch_size, len(q))
        if self._uses_type:
            # With {type} in the topic, a batch holds one type: it goes to one topic.
            types = q.types
            first = types[0]
            for i in range(1, n):
                if types[i] != first:
                    n = i
                    break
        batch = q.take(n)
        lane.npending -= n
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
            n = len(batch)
            self.delivered += n
            if lane.name == "backfill":
                self.backfill_left = max(0, self.backfill_left - n)
            now = float(int(self._clock()))  # one entry per second keeps this small
            if self._rates and self._rates[-1][0] == now:
                self._rates[-1] = (now, self._rates[-1][1] + n)
            else:
                self._rates.append((now, n))
                if len(self._rates) > 120:
                    self._rates.popleft()
            self._dels.append(batch.seqs)
            self._kick_flush()
            return
        self.refusals += 1
        reason = f"0x{ack.code:02X} {ack.reason} ({ch.label})"
        if ack.code in TRANSIENT_CODES:
            self._put_back(lane, item.stream, batch)
            raise LinkDownError(f"{ch.label}: batch refused for now: {reason}")
        if len(batch) == 1:
            seq = batch.seqs[0]
            self.log.warning("sync: event %d (%s) refused: %s -> dead letters",
                             seq, item.stream, reason)  # fmt: skip
            self._dead(seq, item.stream, reason)
            return
        lane.splits.setdefault(item.stream, deque()).extendleft(reversed(batch.halves()))

    def _dead(self, seq: int, stream: str, reason: str) -> None:
        self.dead_lettered += 1
        self.last_error = f"event {seq} to dead letters: {reason}"
        self._ops.append((seq, stream, reason, time.time()))
        self._kick_flush()

    def _kick_flush(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="sync-outbox-flush"
            )

    async def _flush(self) -> None:
        while self._ops or self._dels:
            dels, ops, self._dels, self._ops = self._dels, self._ops, [], []
            try:
                await self.store.write(
                    lambda c, d=dels, o=ops: _apply_ops(c, d, o)  # type: ignore[misc]
                )
            except StoreError as exc:
                # The rows stay in the outbox and are sent again later: a duplicate, no loss.
                self.log.warning("sync: could not record deliveries: %s", exc)
                return

    async def _flush_wait(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._ops or self._dels:
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
    conn: sqlite3.Connection, acked: list[list[int]], dead: list[tuple[int, str, str, float]]
) -> None:
    if acked:
        # One statement for the whole group: SQLite walks the list without the GIL (a
        # statement per row or per run hands the GIL back and forth once per step).
        conn.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
            ("[" + ",".join(map(str, itertools.chain.from_iterable(acked))) + "]",),
        )
    for seq, stream, reason, at in dead:
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT OR REPLACE INTO dead_letters (seq, stream, reason, at) VALUES (?,?,?,?)",
            (seq, stream, reason, at),
        )


def requeue_rows(conn: sqlite3.Connection, seqs: Sequence[int] | None) -> list[int]:
    """Move dead letters back to the outbox (all when `seqs` is None); returns their seqs."""
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
            "INSERT OR IGNORE INTO outbox (seq, stream, attempts, last_error) VALUES (?, ?, 0, ?)",
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
