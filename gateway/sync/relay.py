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

The parts: `gateway.sync.reader` (outbox rows into batches), `gateway.sync.lanes` (lanes and
their read-ahead), `gateway.sync.delivery` (acks and dead letters written to the store);
this module runs the sessions and schedules batches onto the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway import events as ev
from gateway import names
from gateway.aio import wait_event
from gateway.store import outbox
from gateway.sync.batch import Batch
from gateway.sync.config import SyncConfig
from gateway.sync.delivery import DeliveryRecord
from gateway.sync.lanes import Inflight, Lane, schedule, session_lanes, watermark
from gateway.sync.link import (
    TRANSIENT_CODES,
    Ack,
    Channel,
    LinkDownError,
    Sink,
    UnpublishableError,
)
from gateway.sync.reader import Reader, reraise

if TYPE_CHECKING:
    from gateway.store import EventStore


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
        self._done: deque[tuple[asyncio.Future[Ack], Inflight]] = deque()
        self._bottom: Lane | None = None  # the lane whose progress is the watermark
        self._lanes: list[Lane] = []
        self._inflight: dict[asyncio.Future[Ack], Inflight] = {}
        self.record = DeliveryRecord(store, self.log, clock, self._watermark, self._idle)
        self._reader = Reader(store, cfg, gateway_id, self._progress, self._dead)
        self._requeued: list[int] = []
        self._restart = False
        self._pause = cfg.retry.backoff()
        self._prefetch, self._chunk = self._reader.prefetch, self._reader.chunk
        self._committed = False
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

    def figures(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "delivered": self.delivered,
            "delivery_rate": round(self.record.rate(), 1),
            "dead_lettered": self.dead_lettered,
            "refusals": self.refusals,
            "inflight_batches": self.inflight_batches,
            "live_first": self.live_first,
            "backfill_left": self.backfill_left,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            # Acked batches and dead letters not written yet (kept while writes fail).
            "unrecorded": self.record.unrecorded(),
            "unrecorded_dead_letters": len(self.record.ops),
            "record_failures": self.record.failures,  # in a row, since the last good write
        }

    async def run(self) -> None:
        self.record.stopping = False
        self.record.stopped.clear()
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
                    await self.record.wait()
                if pause:
                    self.state = "paused"
                    self._kick.clear()
                    await wait_event(self._kick, pause)
        finally:
            self.state = "stopped"
            self.store.remove_listener(self._on_commit)
            self.record.stopping = True  # one last try to record, no retries
            self.record.stopped.set()
            with contextlib.suppress(Exception):
                await self.record.wait()
            left = self.record.unrecorded()
            if left:
                self.log.warning(
                    "sync: stopped with %d deliveries or dead letters not recorded: "
                    "their events are still in the outbox and are sent again",
                    left,
                )
            self.record.flush_log()

    # -- internals ---------------------------------------------------------------------------
    def _on_commit(self, events: Sequence[ev.Event]) -> None:
        self._committed = True
        self._reader.commits += 1
        self._progress.set()

    async def _session(self, ch: Channel) -> None:
        cfg = self.cfg
        self._restart = False
        await self.record.wait()  # what was acked is recorded before we re-read the outbox

        threshold = cfg.backfill_threshold

        w, depth, mark, requeued, skip = await self.store.read(
            lambda c: outbox.survey(c, threshold)
        )
        self.record.start(w)
        self.live_first = depth > cfg.backfill_threshold
        if self.live_first:
            self.log.info(
                "sync: %d events waiting: live events first, the backlog at %g events/s",
                depth, cfg.backfill_rate,
            )  # fmt: skip
        self.backfill_left = depth if self.live_first else 0
        self._requeued.clear()  # read again below, from the table
        lanes = session_lanes(cfg, w, depth, mark, requeued, self._clock)
        self._bottom = next(ln for ln in lanes if ln.bottom)
        self._lanes = list(lanes)  # every lane of this session (requeue lanes join later)
        self._bottom.skip_upto = skip
        inflight: dict[asyncio.Future[Ack], Inflight] = {}
        self._inflight = inflight
        self._reader.begin(ch.item_format, ch.item_sep)
        fills: list[asyncio.Future[None]] = []
        try:
            await self._pump(ch, lanes, inflight, fills)
        finally:
            # What was acked until now is recorded; in-flight batches are sent again.
            self.record.refresh()
            self._bottom = None
            for ln in self._lanes:
                ln.dropped = True
            self.record.kick()
            for f in fills:
                f.cancel()
            for f in fills:
                with contextlib.suppress(BaseException):
                    await f

    async def _pump(
        self,
        ch: Channel,
        lanes: list[Lane],
        inflight: dict[asyncio.Future[Ack], Inflight],
        fills: list[asyncio.Future[None]],
    ) -> None:
        cfg = self.cfg
        timer: asyncio.TimerHandle | None = None
        while True:
            fills[:] = [f for f in fills if not f.done() or reraise(f)]
            if ch.closed.done():
                raise LinkDownError(f"{ch.label}: connection lost")
            if self._restart:
                raise LinkDownError(f"{ch.label}: reconnect requested")
            if self._requeued:
                seqs, self._requeued = sorted(set(self._requeued)), []
                lanes.append(Lane("requeue", seqs=seqs))
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
                    lane.filling = asyncio.ensure_future(self._reader.fill(lane))
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

    def _send(
        self, ch: Channel, lanes: list[Lane], inflight: dict[asyncio.Future[Ack], Inflight]
    ) -> float | None:
        """Start as many batches as the window allows (see `lanes.schedule`). Returns how
        long until a rate-limited lane may send again (None: no timer needed)."""
        cfg = self.cfg
        return schedule(
            lanes, inflight, cfg.inflight, cfg.batch_size, self._prefetch - self._chunk,
            functools.partial(self._send_one, ch, inflight),
        )  # fmt: skip

    def _send_one(
        self, ch: Channel, inflight: dict[asyncio.Future[Ack], Inflight], lane: Lane,
        stream: str, batch: Batch,
    ) -> bool:  # fmt: skip
        """Hand one batch to the channel; whether it is in flight now."""
        try:
            fits = ch.fits(lane.name, stream, batch.type, len(batch.blob))
            fut = ch.send(lane.name, stream, batch.type, batch.n, batch.blob) if fits else None
        except UnpublishableError as exc:
            self._unpublishable(stream, batch, str(exc))
            return False
        except BaseException:
            lane.put_back(stream, batch)  # not sent: the watermark stays below
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
                lane.put_back(stream, *batch.halves())
            self._progress.set()  # the halves go out on the next turn of the loop
            return False
        item = Inflight(lane, stream, batch, self._clock())
        inflight[fut] = item
        lane.busy.add(stream)
        self.batches += 1
        fut.add_done_callback(functools.partial(self._on_ack, item=item))
        return True

    def _on_ack(self, fut: asyncio.Future[Ack], *, item: Inflight) -> None:
        self._done.append((fut, item))
        self._progress.set()

    def _completed(self, fut: asyncio.Future[Ack], item: Inflight, ch: Channel) -> None:
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
            self.record.delivered(batch, lane.bottom)
            return
        self.refusals += 1
        reason = f"0x{ack.code:02X} {ack.reason} ({ch.label})"
        if ack.code in TRANSIENT_CODES:
            lane.put_back(item.stream, batch)
            raise LinkDownError(f"{ch.label}: batch refused for now: {reason}")
        if batch.n == 1:
            seq = batch.seq_list()[0]
            self.log.warning("sync: event %d (%s) refused: %s -> dead letters",
                             seq, item.stream, reason)  # fmt: skip
            self._dead(seq, item.stream, reason)
            return
        lane.put_back(item.stream, *batch.halves())

    def _unpublishable(self, stream: str, batch: Batch, reason: str) -> None:
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
        self.record.dead(seq, stream, reason)

    def _watermark(self) -> int | None:
        lane = self._bottom
        return None if lane is None else watermark(lane, self._inflight.values())

    def _idle(self) -> bool:
        bottom = self._bottom
        return not self._inflight and (bottom is None or bottom.exhausted)
