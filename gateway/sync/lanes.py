"""Lanes: the ordered sources of rows a relay session sends from (live, backfill, requeued),
each with its read-ahead per stream, the batches it must send first, its streams in flight
and, for the backfill, its rate."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.sync.batch import Batch
from gateway.sync.config import SyncConfig


class TokenBucket:
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


class Lane:
    """One ordered source of rows: live (seq > mark), backfill (seq <= mark), or requeued.
    The `bottom` lane reads from the watermark up: its progress moves the watermark."""

    def __init__(
        self,
        name: str,
        after: int = 0,
        upto: int | None = None,
        seqs: list[int] | None = None,
        bucket: TokenBucket | None = None,
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
        self.pending: dict[str, deque[Batch]] = {}  # per stream: read and not yet sent
        self.splits: dict[str, deque[Batch]] = {}  # halves and put-back batches: go first
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

    def partial(self, stream: str, size: int) -> bool:
        """Whether the stream's next batch is all read and short (under `size` events): its
        rest may be next."""
        q = self.pending.get(stream)
        if not q:
            return False
        key, total = q[0].key, 0
        for b in q:
            if b.key != key:
                return False
            total += b.n
        return total < size

    def take(self, stream: str, size: int) -> Batch | None:
        """The stream's next batch to send: a split or put-back one first, else the next
        read, merged with the rest of it read since (up to `size` events)."""
        sp = self.splits.get(stream)
        if sp:
            batch = sp.popleft()
            if not sp:
                del self.splits[stream]
            return batch
        q = self.pending.get(stream)
        if not q:
            self.pending.pop(stream, None)
            return None
        batch = q.popleft()
        # A batch cut at the edge of a read goes out whole: with the rest of it.
        while q and q[0].key == batch.key and batch.n + q[0].n <= size:
            batch.merge(q.popleft())
        self.npending -= batch.n
        if not q:
            del self.pending[stream]
        return batch

    def put_back(self, stream: str, *batches: Batch) -> None:
        """Batches that go before anything else of the stream (in the order given)."""
        self.splits.setdefault(stream, deque()).extendleft(reversed(batches))


class Inflight:
    __slots__ = ("batch", "lane", "sent", "stream")

    def __init__(self, lane: Lane, stream: str, batch: Batch, sent: float) -> None:
        self.lane = lane
        self.stream = stream
        self.batch = batch
        self.sent = sent


def session_lanes(
    cfg: SyncConfig, w: int, depth: int, mark: int, requeued: list[int],
    clock: Callable[[], float],
) -> list[Lane]:  # fmt: skip
    """The lanes of a new session, from the watermark `w`, the backlog's `depth` and the
    newest seq `mark`: the live lane alone, or (a backlog deeper than the threshold) the
    live lane above the mark and the backfill lane, rate-limited, up to it; then the
    requeued dead letters. The first lane with `bottom` set moves the watermark."""
    lanes: list[Lane] = []
    if depth > cfg.backfill_threshold:
        bucket = TokenBucket(cfg.backfill_rate, cfg.batch_size, clock)
        lanes.append(Lane("live", after=mark))
        lanes.append(Lane("backfill", after=w, upto=mark, bucket=bucket,
                          max_slots=max(1, cfg.inflight // 2), bottom=True))  # fmt: skip
    else:
        lanes.append(Lane("live", after=w, bottom=True))
    if requeued:
        lanes.append(Lane("requeue", seqs=requeued))
    return lanes


def watermark(lane: Lane, inflight: Iterable[Inflight]) -> int:
    """The bottom lane's watermark: just below its oldest event not yet acked (read and
    waiting, split, put back or in flight), or everything it has read."""
    w = lane.upto if lane.exhausted and lane.upto is not None else lane.after
    for q in lane.pending.values():
        if q and q[0].first <= w:
            w = q[0].first - 1
    for sp in lane.splits.values():
        for b in sp:
            if b.first <= w:
                w = b.first - 1
    for item in inflight:
        if item.lane is lane and item.batch.first <= w:
            w = item.batch.first - 1
    return w


def schedule(
    lanes: list[Lane], inflight: Mapping[Any, Inflight], window: int, size: int,
    more_at: int, send: Callable[[Lane, str, Batch], bool],
) -> float | None:  # fmt: skip
    """Hand `send` as many batches as the window (`window` batches in flight) allows, live
    lane first, oldest first in each lane, one batch per stream and lane in flight; `send`
    says whether the batch is in flight now. While a lane's read-ahead is at most `more_at`
    (more is coming) a stream's short last batch waits for the rest of it. Returns how long
    until a rate-limited lane may send again (None: no timer needed)."""
    wait: float | None = None
    for lane in lanes:
        used = sum(1 for i in inflight.values() if i.lane is lane)
        # Oldest first: fair between streams, and the watermark follows closely.
        heads = [(sp[0].first, s) for s, sp in lane.splits.items() if sp]
        heads += [(q[0].first, s) for s, q in lane.pending.items() if q and s not in lane.splits]
        heads.sort()
        for _first, stream in heads:
            if len(inflight) >= window:
                return wait
            if lane.max_slots is not None and used >= lane.max_slots:
                break
            if stream in lane.busy:
                continue
            # While more rows wait in the database, send only whole batches: the rest
            # of a stream's last batch may come with the next read. At the tail, send.
            if (
                not lane.exhausted and stream not in lane.splits
                and lane.npending <= more_at  # (more is coming)
                and lane.partial(stream, size)
            ):  # fmt: skip
                continue
            batch = lane.take(stream, size)
            if batch is None:
                continue
            if lane.bucket is not None:
                need = float(batch.n)
                if lane.bucket.available() < need:
                    lane.put_back(stream, batch)
                    w = lane.bucket.wait_for(need)
                    wait = w if wait is None else min(wait, w)
                    break
                lane.bucket.take(batch.n)
            if send(lane, stream, batch):
                used += 1
    return wait
