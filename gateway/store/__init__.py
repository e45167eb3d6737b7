"""The event store: an append-only log in SQLite (WAL) with projections and an outbox.

One writer thread owns the write connection and does group commit: appends from many
producers are batched into one transaction, and each producer's await returns only after
that transaction committed. The whole batch (events, outbox rows, projections, stream
versions) runs as one function in the writer thread: one thread hop per transaction, which
is why the writer uses sqlite3 in its own thread rather than aiosqlite, whose API is one
thread hop per statement. Readers use their own connection in a reader thread, and run the
same query functions (`gateway.store.queries`) that `gatewayctl` runs on the file read-only.
This class queues and dispatches; the transaction is `commit`, stream versions and snapshots
`streams`, every outbox statement `outbox`, then `retention`, `lifecycle` (open, close,
figures) and `files` (connections, quarantine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway import events as ev
from gateway.clock import SystemClock
from gateway.config import StoreConfig
from gateway.errors import StoreClosedError, StoreError, StoreFullError
from gateway.events import Event, NewEvent
from gateway.logs import RateLimitedLog
from gateway.store import commit, lifecycle, queries, retention, streams
from gateway.store.errors import rollback, store_error
from gateway.store.files import make_private, open_readonly, quarantine
from gateway.store.lifecycle import StoreStats
from gateway.store.outbox import OutboxCodec
from gateway.store.projections import Projection

__all__ = [
    "Event", "EventStore", "NewEvent", "OutboxCodec", "StoreStats", "make_private",
    "open_readonly", "quarantine",
]  # fmt: skip

log = logging.getLogger("gateway.store")
T = TypeVar("T")

Listener = Callable[[Sequence[Event]], None]


class _Pending:
    """Appends waiting for the writer. `single`: the future resolves to the one Event (not a
    list): `append` hands that future to its caller as is, no coroutine in between."""

    __slots__ = ("events", "future", "lazy", "single")

    def __init__(
        self,
        events: Sequence[NewEvent],
        future: asyncio.Future[Any] | None,
        single: bool = False,
        lazy: float = 0.0,
    ) -> None:
        self.events = events
        self.future = future
        self.single = single
        #: For an append nobody waits for: when it was queued (monotonic), else 0.
        self.lazy = lazy


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


def _settle(future: asyncio.Future[Any] | None, result: Any) -> None:
    if future is None or future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class EventStore:
    """Append events durably; read them back; keep projections and the outbox in step."""

    def __init__(
        self,
        path: Path,
        config: StoreConfig,
        gateway_id: str,
        clock: SystemClock,
        outbox_codec: OutboxCodec | None = None,
        sink: bool = True,
        local_types: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.local_types = local_types
        # Without a sink (no [sync]) nothing would ever deliver an outbox row: none is
        # written, and retention does not wait for deliveries that cannot happen.
        self.sink = sink
        self.config = config
        self.gateway_id = gateway_id
        self.clock = clock
        self.outbox_codec = outbox_codec
        self.quarantined: Path | None = None
        self._wx = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._rx = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._queue: deque[_Pending] = deque()
        #: Queued appends somebody waits for: while there is none, the writer may hold lazy
        #: ones back for up to `commit_interval` (fewer commits, fewer bytes on the SD card).
        self._eager = 0
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # made by `open`, inside the loop it serves
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._listeners: list[Listener] = []
        # Writer-thread state (touched only in the writer thread, or before it starts).
        self._versions: dict[str, int] = {}
        # Stream -> id in `outbox_streams` (committed ones only), for outbox rows with a body.
        self._sids: dict[str, int] = {}
        # Versions committed but not yet in the `streams` table (written behind).
        self._dirty: dict[str, int] = {}
        self._streams_seq = 0
        self._streams_flushed_at = time.monotonic()
        self._flushing: tuple[dict[str, int], int] | None = None
        self._projections: list[Projection] = []
        self._last_seq = 0
        self._since_snapshot: dict[str, int] = {}
        self._used_bytes = 0
        self._page_size = 4096
        #: Moving average of COMMIT durations (s); starts in the writer thread until measured.
        self._commit_time = commit.INLINE_COMMIT_LIMIT * 2
        self._wal_pages = 0.0  # WAL pages written since the last checkpoint (estimated)
        self._wal_scale = 1.0  # real pages / estimated, as the last checkpoint found
        # Figures.
        self.batches = 0
        self.appended = 0
        self.rejected = 0
        self.dropped = 0
        self.last_commit_mono = time.monotonic()
        self.writer_error: BaseException | None = None
        #: Why appends are refused right now (quota reached, disk full), else None. Set by a
        #: refused append, cleared by the next commit: producers retrying is what resumes it.
        self.full: StoreFullError | None = None
        self.on_full_change: Callable[[StoreFullError | None], None] | None = None
        self._repeats = RateLimitedLog(log)  # a failing commit can repeat thousands of times

    # -- life -----------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        config: StoreConfig | None = None,
        *,
        gateway_id: str = "gateway",
        clock: SystemClock | None = None,
        outbox_codec: OutboxCodec | None = None,
        sink: bool = True,
        local_types: frozenset[str] = frozenset(),
    ) -> EventStore:
        """Open (or create) the store. With `outbox_codec`, every outbox row also carries
        its event encoded for the sink (see `OutboxCodec`). `sink=False` (no cloud sync
        configured): no outbox rows are written, and retention prunes events (and outbox
        rows left from before) by age alone. Events of `local_types` get no outbox row:
        they stay in the local log only."""
        store = cls(
            Path(path), config or StoreConfig(), gateway_id, clock or SystemClock(), outbox_codec,
            sink, local_types,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(store._wx, store._open_sync)
        except BaseException as exc:
            for conn in (store._w, store._r):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            store._wx.shutdown(wait=False)
            store._rx.shutdown(wait=False)
            mapped = store_error(exc, f"opening {store.path}", str(store.path.parent))
            if mapped is exc:
                raise
            raise mapped from exc
        store._writer = asyncio.create_task(store._run_writer(), name="store-writer")
        store._writer.add_done_callback(store._writer_done)
        if store.quarantined is not None:
            await store.append(
                ev.GATEWAY_STREAM, "store.quarantined",
                {"moved_to": str(store.quarantined), "reason": "corrupt database at start"},
            )  # fmt: skip
        return store

    def _open_sync(self) -> None:
        lifecycle.open_sync(self)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        """The writer ended. After close that is normal; otherwise it crashed: say so, and
        fail everything waiting instead of leaving callers awaiting forever (the watchdog
        sees `healthy()` go false and systemd restarts the daemon)."""
        if task.cancelled() or task.exception() is None:
            return
        self.writer_error = task.exception()
        log.critical("store writer crashed: %r", self.writer_error, exc_info=self.writer_error)
        err = StoreError(f"store writer failed: {self.writer_error}")
        pending, jobs = list(self._queue), list(self._jobs)
        self._queue.clear()
        self._eager = 0
        self._jobs.clear()
        for p in pending:
            _settle(p.future, err)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)

    async def close(self) -> None:
        """Stop taking appends, commit everything queued, checkpoint, close. Idempotent."""
        if self._closing and self._writer is None:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):  # a crashed writer was reported already
                await self._writer
            self._writer = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._wx, self._close_sync)
        self._wx.shutdown(wait=True)
        self._rx.shutdown(wait=True)

    def _close_sync(self) -> None:
        lifecycle.close_sync(self)

    @property
    def closed(self) -> bool:
        return self._closing

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    # -- appending ------------------------------------------------------------------------
    def append(
        self,
        stream: str,
        type: str,
        data: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        outbox: bool = True,
        lazy: bool = False,
    ) -> asyncio.Future[Event]:
        """Append one event; the future resolves once it is committed (durable under
        `synchronous=full`). Use as `await store.append(...)`.

        `lazy`: nobody is waiting for this one (a polled reading): it may wait up to
        `commit_interval` for company, or for the next append somebody waits for."""
        future: asyncio.Future[Event] = self._loop.create_future()
        if self._closing or self.writer_error is not None:
            self._refuse(future)
        else:  # inlined: this is the hot path of every producer
            self._queue.append(
                _Pending(
                    (NewEvent(stream, type, data, expected_version, outbox),), future, True,
                    self.clock.monotonic() if lazy else 0.0,
                )
            )  # fmt: skip
            self._queued(lazy)
        return future

    def append_many(
        self, events: Sequence[NewEvent], *, lazy: bool = False
    ) -> asyncio.Future[list[Event]]:
        """Append events atomically (all or none); the future resolves after the commit.
        `lazy` as for `append`."""
        future: asyncio.Future[list[Event]] = self._loop.create_future()
        if self._closing or self.writer_error is not None:
            self._refuse(future)
        else:
            held = self.clock.monotonic() if lazy else 0.0
            self._queue.append(_Pending(events, future, False, held))
            self._queued(lazy)
        return future

    async def flush(self) -> None:
        """Commit now what is queued, appends held back for the commit interval included;
        returns once that commit is done (its outcome goes to each append's future)."""
        if not self._queue:
            return
        last = self._queue[-1]
        if last.lazy:  # now somebody waits for it: the writer commits it, and all before it
            last.lazy = 0.0
            self._eager += 1
            self._wake.set()
        if last.future is not None:
            await asyncio.wait({last.future})

    def _queued(self, lazy: bool) -> None:
        if not lazy:
            self._eager += 1
            self._wake.set()
        elif len(self._queue) == 1:  # the writer may be idle: it starts the interval
            self._wake.set()

    def _refuse(self, future: asyncio.Future[Any]) -> None:
        if self._closing:
            future.set_exception(StoreClosedError())
        else:
            future.set_exception(StoreError(f"store writer failed: {self.writer_error}"))

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the writer thread inside its own transaction; returns its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._closing and self._writer is None:
            raise StoreClosedError()
        self._jobs.append(_Job(fn, future))
        self._wake.set()
        return await future

    async def _run_writer(self) -> None:
        loop = asyncio.get_running_loop()
        linger = self.config.linger_ms / 1000
        limit = self.config.batch_max
        hold = self.config.commit_interval
        while True:
            if not self._queue and not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._jobs:
                job = self._jobs.popleft()
                try:
                    result = await loop.run_in_executor(self._wx, self._run_job, job.fn)
                except Exception as exc:
                    if not job.future.done():
                        job.future.set_exception(
                            store_error(exc, "write", str(self.path.parent))
                        )
                else:
                    if not job.future.done():
                        job.future.set_result(result)
                continue
            if hold and not self._eager and not self._closing and len(self._queue) < limit:
                # Only lazy appends: wait for the oldest one's deadline, for an append
                # somebody waits for, for a job, or for close(), whichever comes first.
                delay = self._queue[0].lazy + hold - self.clock.monotonic()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    continue
            if linger and len(self._queue) < limit and not self._closing:
                await asyncio.sleep(linger)
            batch: list[_Pending] = []
            n = 0
            while self._queue and n < limit:
                p = self._queue.popleft()
                if not p.lazy:
                    self._eager -= 1
                if p.future is None or p.future.cancelled():
                    continue  # the producer gave up before we wrote: nothing was promised
                batch.append(p)
                n += len(p.events)
            if not batch:
                continue
            try:
                outcome, committed = await commit.run(self, batch)
            except Exception as exc:
                err = store_error(exc, "commit", str(self.path.parent))
                if not isinstance(err, StoreError):
                    err = StoreError(f"commit failed: {exc!r}")
                if isinstance(err, StoreFullError):
                    self._set_full(err)
                self._repeats.error(f"commit:{type(err).__name__}", "store commit failed: %s", err)
                for p in batch:
                    _settle(p.future, err)
                continue
            self.last_commit_mono = time.monotonic()
            if committed:
                self._set_full(None)
            elif outcome and isinstance(outcome[0], StoreFullError):
                self._set_full(outcome[0])
            for p, result in zip(batch, outcome, strict=True):
                _settle(p.future, result)
            if committed:
                for listener in self._listeners:
                    try:
                        listener(committed)
                    except Exception:
                        log.exception("store listener failed")
            await commit.checkpoint_due(self)

    def _set_full(self, why: StoreFullError | None) -> None:
        """Appends refused (`why`) or accepted again (None): said once per change."""
        was = self.full
        self.full = why
        if (was is None) == (why is None):
            return
        if why is not None:
            log.warning("store full, new events are refused until space comes back: %s", why)
        else:
            log.info("store takes new events again (was full: %s)", was)
        if self.on_full_change is not None:
            try:
                self.on_full_change(why)
            except Exception:
                log.exception("store: on_full_change failed")

    def _run_job(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._w
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            self._reload_versions()
            raise
        self._flushed()
        self._measure()
        return result

    def _quota_bytes(self) -> int:
        return int(self.config.quota_mb * 1024 * 1024)

    def _measure(self) -> None:
        assert self._w is not None
        pages, free = self._w.execute(
            "SELECT page_count, freelist_count FROM pragma_page_count, pragma_freelist_count"
        ).fetchone()
        self._used_bytes = (pages - free) * self._page_size

    def _reload_versions(self) -> None:
        streams.reload_versions(self)

    def _flushed(self) -> None:
        streams.flushed(self)

    # -- maintenance ----------------------------------------------------------------------
    async def prune(self, older_than: float | None = None, batch: int = 5000) -> int:
        """Retention: delete delivered events older than the configured age (snapshotting
        their streams first, so projections can still be rebuilt). Returns how many."""
        return await retention.prune(self, older_than, batch)

    async def prune_outbox(self, batch: int = 20_000) -> int:
        """Delete delivered outbox rows (at or below the delivery watermark), `batch` rows
        per transaction so appends go on in between. Returns how many."""
        return await retention.prune_outbox(self, batch)

    async def rebuild(self) -> int:
        """Reset every projection and replay snapshots + the log. Returns events replayed."""
        return await self.write(queries.rebuild)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the read connection, in the reader thread."""
        if self._r is None:
            raise StoreClosedError()
        conn = self._r
        try:
            return await asyncio.get_running_loop().run_in_executor(self._rx, fn, conn)
        except sqlite3.Error as exc:
            raise store_error(exc, "read") from exc

    async def events(
        self, after_seq: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[Event]:
        return await self.read(lambda c: queries.events(c, after_seq, limit, stream))

    async def stats(self) -> StoreStats:
        return await self.read(lambda c: lifecycle.stats(self, c))

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def healthy(self, stall: float = 30.0) -> bool:
        """The writer is alive and not stuck: nothing queued for longer than `stall` s."""
        if self.writer_error is not None or self._writer is None or self._writer.done():
            return False
        return not (self._queue and time.monotonic() - self.last_commit_mono > stall)
