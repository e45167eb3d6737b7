"""The delivery record: what the sink acked and what went to the dead letters, written
through the store's writer (`gateway.store.outbox.record_delivery`) in the background, and
the delivered rows pruned behind the watermark. Nothing leaves memory before the write that
holds it has committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.logs import RateLimitedLog
from gateway.store import outbox
from gateway.sync.batch import Batch
from gateway.sync.link import Backoff

if TYPE_CHECKING:
    from gateway.store import EventStore

PRUNE_EVERY = 5.0  # seconds between prunes of delivered rows while a drain keeps going
RECORD_RETRY_BASE, RECORD_RETRY_CAP = 0.2, 10.0  # pauses between tries of a failed record


class DeliveryRecord:
    """Acks and dead letters waiting to be written, and the watermark: what the bottom lane
    has had acked (`target`, raised by `position`) and what is written."""

    def __init__(
        self,
        store: EventStore,
        log: logging.Logger,
        clock: Callable[[], float],
        position: Callable[[], int | None],
        idle: Callable[[], bool],
    ) -> None:
        self.store = store
        self.log = log
        self._clock = clock
        #: The bottom lane's watermark now (None: no session), and whether the relay is idle
        #: (nothing in flight, the bottom lane read to its end).
        self._position = position
        self._idle = idle
        self.ops: list[tuple[int, str, str, float]] = []  # dead letters to record
        # Acked batches outside the bottom lane: their seqs, or (stream, first, last) - all
        # the stream's rows in that range, for batches cut by SQLite.
        self.dels: list[list[int] | tuple[str, int, int]] = []
        self.acked: list[tuple[str, int, int]] = []  # bottom-lane batches acked: (stream, lo, hi)
        self.target = 0
        self.written = 0
        self.failures = 0
        self.stopping = False
        self.stopped = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._pruned_upto = 0
        self._last_prune = clock()
        self._repeats = RateLimitedLog(log)
        self._rates: deque[tuple[float, int]] = deque()  # (second, events acked in it)

    def start(self, w: int) -> None:
        """A new session, from the recorded watermark `w`."""
        self.target = self.written = w
        self.acked.clear()

    def delivered(self, batch: Batch, bottom: bool) -> None:
        """A batch the sink acked: recorded by the watermark for the bottom lane (above it,
        as a range), row by row for the others; counted in the delivery rate."""
        n = batch.n
        now = float(int(self._clock()))  # one entry per second keeps this small
        if self._rates and self._rates[-1][0] == now:
            self._rates[-1] = (now, self._rates[-1][1] + n)
        else:
            self._rates.append((now, n))
            if len(self._rates) > 120:
                self._rates.popleft()
        if bottom:  # its progress is the watermark; above it, ranges
            self.acked.append((batch.stream, batch.first, batch.last))
        else:
            self.dels.append(batch.seq_list() if batch.seqs is not None else
                             (batch.stream, batch.first, batch.last))  # fmt: skip
        self.kick()

    def dead(self, seq: int, stream: str, reason: str) -> None:
        """An event for the dead letters, with the reason."""
        self.ops.append((seq, stream, reason, time.time()))
        self.kick()

    def rate(self, window: float = 60.0) -> float:
        """Events acked per second over the last `window` seconds."""
        now = self._clock()
        while self._rates and now - self._rates[0][0] > window:
            self._rates.popleft()
        if not self._rates:
            return 0.0
        span = max(now - self._rates[0][0], 1.0)
        return sum(n for _, n in self._rates) / span

    def unrecorded(self) -> int:
        return len(self.dels) + len(self.acked) + len(self.ops)

    def kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="sync-outbox-flush"
            )

    def refresh(self) -> None:
        w = self._position()
        if w is not None and w > self.target:
            self.target = w

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
            if self.stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause.next()):
                    await self.stopped.wait()  # a stop does not wait out the pause

    async def _record(self) -> bool:
        """Write what was acked and dead-lettered. Nothing leaves memory before the write
        that holds it has committed: after a failed write (a full disk...) all of it is
        written again, in order, with whatever came since."""
        while True:
            self.refresh()
            w = self.target if self.target > self.written else None
            if not (self.ops or self.dels or self.acked or w is not None):
                break
            dels, ops, nacked = list(self.dels), list(self.ops), len(self.acked)
            mark = self.target
            acked = [a for a in self.acked[:nacked] if a[2] > mark]  # (the rest: below the mark)
            try:
                await self.store.write(
                    lambda c, d=dels, o=ops, u=w, a=acked: outbox.record_delivery(c, u, d, o, a)  # type: ignore[misc]
                )
            except Exception as exc:  # the store's errors, and anything else: never die
                # Kept for the next write; the rows stay undelivered until then.
                self.failures += 1
                self._repeats.warning(
                    "record", "sync: could not record deliveries and dead letters (%d "
                    "pending, kept to retry): %s", len(dels) + len(ops) + nacked, exc,
                )  # fmt: skip
                return False
            del self.dels[: len(dels)]
            del self.ops[: len(ops)]
            del self.acked[:nacked]
            if w is not None:
                self.written = w
            if self.failures:
                self.log.info("sync: deliveries and dead letters recorded again after %d "
                              "failed writes", self.failures)  # fmt: skip
                self.failures = 0
        return True

    async def _prune(self) -> bool:
        """Delivered rows are pruned behind the watermark, in slices: once the outbox is
        drained and nothing is in flight, or every few seconds during a long drain.
        Returns whether it pruned (then there may be more to record)."""
        now = self._clock()
        if self.written <= self._pruned_upto or not (
            self._idle() or now - self._last_prune >= PRUNE_EVERY
        ):
            return False
        self._last_prune = now
        upto = self.written
        try:
            await self.store.prune_outbox()
        except Exception as exc:
            self._repeats.warning("prune", "sync: could not prune delivered rows: %s", exc)
            return False
        self._pruned_upto = upto
        return True

    async def wait(self) -> None:
        """Until everything acked and dead-lettered so far is written (or a write failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self.ops or self.dels or self.acked or self.target > self.written:
            self.kick()
            if self._flusher is not None:
                await asyncio.shield(self._flusher)

    def flush_log(self) -> None:
        self._repeats.flush()
