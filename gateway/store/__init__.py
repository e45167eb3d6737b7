"""The event store: an append-only log in SQLite (WAL) with projections and an outbox.

One writer thread owns the write connection and does group commit: appends from many
producers are batched into one transaction, and each producer's await returns only after
that transaction committed. The whole batch (events, outbox rows, projections, stream
versions) runs as one function in the writer thread: one thread hop per transaction, which
is why the writer uses sqlite3 in its own thread rather than aiosqlite, whose API is one
thread hop per statement. Readers use their own connection in a reader thread, and run the
same query functions (`gateway.store.queries`) that `gatewayctl` runs on the file read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cbor2

from gateway import events as ev
from gateway.clock import SystemClock
from gateway.config import StoreConfig
from gateway.errors import ConcurrencyError, StoreClosedError, StoreError, StoreFullError
from gateway.events import Event, NewEvent
from gateway.logs import RateLimitedLog
from gateway.store import queries
from gateway.store.errors import is_corruption, rollback, store_error
from gateway.store.projections import Projection, active_projections
from gateway.store.schema import migrate

__all__ = [
    "Event", "EventStore", "NewEvent", "OutboxCodec", "StoreStats", "open_readonly", "quarantine",
]  # fmt: skip

log = logging.getLogger("gateway.store")
T = TypeVar("T")

Listener = Callable[[Sequence[Event]], None]

# The `streams` table is written behind: at most this many streams, events or seconds.
STREAMS_FLUSH_COUNT = 4096
STREAMS_FLUSH_EVENTS = 20_000
STREAMS_FLUSH_SECONDS = 2.0
#: How long a connection waits for another one's lock (the writer thread only; see `_stage`).
BUSY_TIMEOUT_MS = 5000
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


class OutboxCodec(Protocol):
    """Encodes events for the outbox at append time, in the sink's wire format (given by
    the cloud sync: `gateway.sync.codec.Encoder`). `signature` names the format and the
    gateway id: bodies written under another signature are dropped at open."""

    @property
    def signature(self) -> str: ...

    def bodies(self, rows: Sequence[tuple[Any, ...]]) -> list[bytes | None]:
        """Rows in `events` column order; None for an event with no form in the format."""
        ...


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


class _Staged:
    """A batch's transaction, written but not committed (see `EventStore._stage`)."""

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


def _settle(future: asyncio.Future[Any] | None, result: Any) -> None:
    if future is None or future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _connect(
    path: Path, synchronous: str, readonly: bool = False, page_size: int | None = None
) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        # Sorts (the relay cuts the outbox into batches with GROUP BY) in memory, not in a
        # temporary file created and removed for every query: ~20% of the relay's reads.
        conn.execute("PRAGMA temp_store=MEMORY")
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if not readonly:
            if page_size is not None:  # only takes effect on a new (empty) database
                conn.execute(f"PRAGMA page_size={int(page_size)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            # Checkpoints: by the store's writer thread (`EventStore._checkpoint`).
            conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        # Not left open: SQLite shares a file's -shm state between the connections of a
        # process, and a failed one (a full disk) would spoil the next try.
        conn.close()
        raise
    return conn


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection for the CLI (works while the daemon writes, thanks to WAL)."""
    p = Path(path)
    if not p.exists():
        where = str(p) if p.is_absolute() else f"{p} (relative to {Path.cwd()})"
        raise StoreError(f"{where}: no database here (has gatewayd run with this config?)")
    try:
        return _connect(p, "normal", readonly=True)
    except sqlite3.Error as exc:
        raise store_error(exc, f"opening {p} read-only") from exc


#: Database files (and their -wal/-shm, backups, quarantined copies) are the owner's alone:
#: they hold every reading and command. SQLite gives -wal/-shm the main file's mode.
PRIVATE_MODE = 0o600


def make_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if absent; take group/other bits off if present
    (and off its -wal/-shm: files made by an older version were 0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, PRIVATE_MODE)


def quarantine(path: Path, reason: str) -> Path:
    """Move a corrupt database (and its -wal/-shm) aside with a timestamped name; never delete."""
    import shutil  # rarely needed; keeps start-up RSS down

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    shutil.move(str(path), target)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            shutil.move(str(side), str(target) + suffix)
    make_private(target)  # moved aside, still full of data: nobody else reads it
    log.error("database %s is corrupt (%s): moved aside to %s; starting on a fresh file",
              path, reason, target)  # fmt: skip
    return target


def _check(path: Path) -> str | None:
    """None if the file is a healthy database (or absent), else what is wrong."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise  # a full disk, an I/O error: not the file's fault
        return str(exc)
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:5])
    return None


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
        self._commit_time = INLINE_COMMIT_LIMIT * 2
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        problem = _check(self.path)
        if problem is not None:
            self.quarantined = quarantine(self.path, problem)
        try:
            make_private(self.path)
            self._w = _connect(self.path, self.config.synchronous, page_size=self.config.page_size)
            migrate(self._w)
        except sqlite3.DatabaseError as exc:
            # quick_check passed but the file still cannot be used: quarantine, start fresh.
            if self._w is not None:
                self._w.close()
                self._w = None
            if not is_corruption(exc):
                raise
            self.quarantined = quarantine(self.path, str(exc))
            make_private(self.path)
            self._w = _connect(self.path, self.config.synchronous, page_size=self.config.page_size)
            migrate(self._w)
        self._projections = active_projections(self._w)
        self._r = _connect(self.path, self.config.synchronous, readonly=True)
        self._last_seq = self._w.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        # Counters survive restarts in the `counters` table (dropped events...).
        for name, value in self._w.execute("SELECT name, value FROM counters"):
            if name == "dropped":
                self.dropped = int(value)
            elif name == "streams_seq":
                self._streams_seq = int(value)
        # The `streams` table is written behind (see _flush_streams): versions of events
        # committed after its last flush are recovered from the tail of the log.
        for stream, version in self._w.execute(
            "SELECT stream, max(version) FROM events WHERE seq > ? GROUP BY stream",
            (self._streams_seq,),
        ):
            self._dirty[stream] = int(version)
        self._page_size = self._w.execute("PRAGMA page_size").fetchone()[0]
        self._check_outbox_codec(self._w)
        self._measure()
        if self._used_bytes >= self._quota_bytes() and self.config.overflow == "reject_new":
            self.full = self._quota_full()
            log.warning("store full at start, new events are refused until space comes back "
                        "(delivery and retention go on): %s", self.full)  # fmt: skip

    def _check_outbox_codec(self, conn: sqlite3.Connection) -> None:
        """Bodies encoded under another format or gateway id are dropped (the relay encodes
        those rows itself when it sends them)."""
        sig = 0 if self.outbox_codec is None else zlib.crc32(self.outbox_codec.signature.encode())
        row = conn.execute("SELECT value FROM counters WHERE name = 'outbox_codec'").fetchone()
        if row is not None and int(row[0]) == sig:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE outbox SET body = NULL, sid = NULL WHERE body IS NOT NULL")
            conn.execute(
                "INSERT INTO counters VALUES ('outbox_codec', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (sig,),
            )
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise

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
        if self._w is not None:
            with contextlib.suppress(sqlite3.Error):
                self._run_job(lambda conn: self._flush_streams(conn, {}, self._last_seq))
            with contextlib.suppress(sqlite3.Error):
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._w.close()
            self._w = None
        if self._r is not None:
            self._r.close()
            self._r = None

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
                # The statements here, the COMMIT (the fsync) in the writer thread: Python
                # work in the writer thread contends with this one for the GIL, which cost
                # more CPU than the work itself (bench/coap.py).
                staged = self._stage(batch, wait=False)
                if staged is None:
                    outcome, committed = await loop.run_in_executor(
                        self._wx, self._commit, batch
                    )
                elif staged.conn is None:
                    outcome, committed = staged.out, []
                elif self._commit_time < INLINE_COMMIT_LIMIT:
                    outcome, committed = self._finish(staged)
                else:
                    outcome, committed = await loop.run_in_executor(
                        self._wx, self._finish, staged
                    )
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
            if self._wal_pages * self._wal_scale >= CHECKPOINT_PAGES:
                try:
                    await loop.run_in_executor(self._wx, self._checkpoint)
                except Exception as exc:  # the next commit tells if the store is unwell
                    self._repeats.error("checkpoint", "store: WAL checkpoint failed: %s", exc)

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

    def _checkpoint(self) -> None:
        """Writer thread: copy the WAL into the database (PASSIVE: never waits for
        readers; what they still use is copied next time)."""
        assert self._w is not None
        estimate, self._wal_pages = self._wal_pages, 0.0
        pages = self._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        if pages > 0 and estimate > 0:
            self._wal_scale = min(max(pages / estimate, 0.1), 10.0)

    def _quota_full(self) -> StoreFullError:
        return StoreFullError(
            f"disk quota reached ({self._used_bytes // 1024} KiB used of "
            f"{self._quota_bytes() // 1024} KiB, policy reject_new)"
        )

    def _quota_bytes(self) -> int:
        return int(self.config.quota_mb * 1024 * 1024)

    def _measure(self) -> None:
        assert self._w is not None
        pages, free = self._w.execute(
            "SELECT page_count, freelist_count FROM pragma_page_count, pragma_freelist_count"
        ).fetchone()
        self._used_bytes = (pages - free) * self._page_size

    def _reload_versions(self) -> None:
        """After a rollback: forget cached versions (unflushed ones stay in `_dirty`)."""
        self._versions.clear()
        self._flushing = None

    def _version_of(self, conn: sqlite3.Connection, stream: str) -> int:
        v = self._versions.get(stream)
        if v is None:
            v = self._dirty.get(stream)
            if v is None:
                row = conn.execute(
                    "SELECT version FROM streams WHERE stream = ?", (stream,)
                ).fetchone()
                v = int(row[0]) if row else 0
            if len(self._versions) > 50_000:
                self._versions.clear()
            self._versions[stream] = v
        return v

    def _flush_due(self, versions: dict[str, int], seq: int) -> bool:
        return (
            len(self._dirty) + len(versions) >= STREAMS_FLUSH_COUNT
            or seq - self._streams_seq >= STREAMS_FLUSH_EVENTS
            or time.monotonic() - self._streams_flushed_at >= STREAMS_FLUSH_SECONDS
        )

    def _flush_streams(self, conn: sqlite3.Connection, versions: dict[str, int], seq: int) -> None:
        """Inside a transaction: bring the `streams` table up to `seq`.

        Stream versions are the optimistic-concurrency authority. Writing each stream's row
        on every commit cost as much as the events themselves, so the table is written
        behind: every few thousand events or seconds, before retention or the quota deletes
        events (the log is then the only other record of a version), and at close. At open,
        versions of events after the last flush are read back from the log's tail."""
        pending = {**self._dirty, **versions}
        if pending:
            conn.executemany(
                "INSERT INTO streams VALUES (?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET version = excluded.version",
                list(pending.items()),
            )
        conn.execute(
            "INSERT INTO counters VALUES ('streams_seq', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (seq,),
        )
        self._flushing = (pending, seq)

    def _flushed(self) -> None:
        """After a COMMIT: what `_flush_streams` wrote is no longer dirty."""
        if self._flushing is None:
            return
        pending, seq = self._flushing
        self._flushing = None
        for stream, version in pending.items():
            if self._dirty.get(stream) == version:
                del self._dirty[stream]
        self._streams_seq = seq
        self._streams_flushed_at = time.monotonic()

    def _commit(self, batch: Sequence[_Pending]) -> tuple[list[Any], list[Event]]:
        """Writer thread: one transaction for the whole batch. Returns, per append, what its
        future resolves to (its Event, its list of Events, or its error), and every event
        committed (the store's own store.dropped included) for the listeners."""
        staged = self._stage(batch, wait=True)
        assert staged is not None
        return self._finish(staged)

    def _stage(self, batch: Sequence[_Pending], wait: bool) -> _Staged | None:
        """Everything of a batch's transaction but its COMMIT: numbering, encoding, the
        statements (SQLite's page cache only: no fsync, no wait). Run by the event loop's
        thread (`wait=False`: None if another connection holds the write lock, then the
        writer thread does it all) or by the writer thread (`_commit`). On error the
        transaction is rolled back and the error raised."""
        conn = self._w
        assert conn is not None
        over = self._used_bytes >= self._quota_bytes()
        if over and self.config.overflow == "reject_new":
            self.rejected += sum(len(p.events) for p in batch)
            full = self._quota_full()
            return _Staged([full for _ in batch], [], [], None, {}, {}, 0)
        victims: list[tuple[int, str]] = []
        if over and self.config.overflow == "drop_oldest":
            # Single writer: what we select now is still there when we delete it below.
            victims = conn.execute(
                "SELECT seq, stream FROM events WHERE stream != ? ORDER BY seq LIMIT ?",
                (ev.GATEWAY_STREAM, max(100, self.appended // 100)),
            ).fetchall()
            if victims:
                self.dropped += len(victims)
                note = {"count": len(victims), "up_to_seq": victims[-1][0], "total": self.dropped}
                dropped = NewEvent(ev.GATEWAY_STREAM, ev.STORE_DROPPED, note)
                batch = [*batch, _Pending([dropped], None)]
        now = self.clock.time()
        mono = self.clock.monotonic()
        boot = self.clock.boot_id
        is_synced = self.clock.synced()
        synced = int(is_synced)
        seq = self._last_seq
        versions: dict[str, int] = {}
        out: list[Any] = []
        rows: list[tuple[Any, ...]] = []
        outbox: list[int] = []  # indexes in `rows`
        committed: list[Event] = []
        dumps = cbor2.dumps
        cached = self._versions
        kept_local = self.local_types
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
                        version = self._version_of(conn, stream)
                version += 1
                versions[stream] = version
                seq += 1
                if ne.outbox and ne.type not in kept_local:
                    outbox.append(len(rows))
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
                        cur = self._version_of(conn, ne.stream)
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
                    version = self._version_of(conn, ne.stream)
                version += 1
                versions[ne.stream] = version
                if ne.outbox and ne.type not in kept_local:
                    outbox.append(len(rows))
                rows.append((seq, ne.stream, version, ne.type, w, m, boot, synced, blob))
                numbered.append(
                    Event(seq, ne.stream, version, ne.type, w, m, boot, is_synced, ne.data)
                )
            committed.extend(numbered)
            out.append(numbered[0] if p.single else numbered)
        if not rows:
            return _Staged(out, [], [], None, {}, {}, seq)
        boxed = self._outbox_rows(rows, outbox) if outbox and self.sink else None
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
                    boxed = self._resolve_sids(conn, boxed, fresh)
                conn.executemany(
                    "INSERT INTO outbox (seq, stream, attempts, version, body, sid) "
                    "VALUES (?, ?, 0, ?, ?, ?)",
                    boxed,
                )
            if victims or self._flush_due(versions, seq):
                self._flush_streams(conn, versions, seq)
            for proj in self._projections:
                proj.apply(conn, committed)
            self._maybe_snapshot(conn, versions, seq)
            if victims:
                self._drop(conn, victims, versions, seq)
        except BaseException:
            rollback(conn)
            self._reload_versions()
            if victims:
                self.dropped -= len(victims)
            raise
        if victims:
            out.pop()  # the store.dropped event's slot: nobody awaits it
        size = sum(len(r[8]) for r in rows)
        return _Staged(out, committed, victims, conn, versions, fresh, seq, size)

    def _finish(self, staged: _Staged) -> tuple[list[Any], list[Event]]:
        """Writer thread: COMMIT what `_stage` wrote (the fsync: the GIL is free meanwhile),
        then take its numbering as the store's. On error: rolled back, error raised."""
        conn = staged.conn
        if conn is None:  # nothing to commit (all refused, or all failed their checks)
            return staged.out, []
        started = time.perf_counter()
        try:
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            self._reload_versions()
            if staged.victims:
                self.dropped -= len(staged.victims)
            raise
        self._commit_time += (time.perf_counter() - started - self._commit_time) * 0.2
        self._wal_pages += PAGES_PER_COMMIT + staged.size / self._page_size
        victims = staged.victims
        if victims:
            log.warning(
                "store over quota: dropped the %d oldest events (up to seq %d)",
                len(victims), victims[-1][0],
            )  # fmt: skip
        self._last_seq = staged.seq
        if staged.fresh:
            if len(self._sids) > 50_000:
                self._sids.clear()
            self._sids.update(staged.fresh)
        self._versions.update(staged.versions)
        self._dirty.update(staged.versions)
        self._flushed()
        self.batches += 1
        self.appended += len(staged.committed)
        self._measure()
        return staged.out, staged.committed

    def _outbox_rows(self, rows: list[tuple[Any, ...]], which: list[int]) -> list[tuple[Any, ...]]:
        """(seq, stream, version, body, sid) for the events that go to the outbox. A row
        with a body gets its stream's id (schema v3); ids not known yet are left None:
        `_resolve_sids` finds them inside the transaction."""
        picked = rows if len(which) == len(rows) else [rows[i] for i in which]
        codec = self.outbox_codec
        if codec is None:
            return [(r[0], r[1], r[2], None, None) for r in picked]
        try:
            bodies = codec.bodies(picked)
        except Exception:  # a codec bug must not cost the append: the relay encodes later
            log.exception("outbox codec failed; these events are encoded when sent")
            return [(r[0], r[1], r[2], None, None) for r in picked]
        sids = self._sids
        return [
            (r[0], r[1], r[2], b, None if b is None else sids.get(r[1]))
            for r, b in zip(picked, bodies, strict=True)
        ]

    def _resolve_sids(
        self, conn: sqlite3.Connection, boxed: list[tuple[Any, ...]], fresh: dict[str, int]
    ) -> list[tuple[Any, ...]]:
        """Inside the append's transaction: the ids of streams not in the cache, read from
        `outbox_streams` or given there now (so an id is never used before it is durable).
        `fresh` receives them; the cache takes them once the transaction commits."""
        out = []
        for r in boxed:
            if r[4] is not None or r[3] is None:
                out.append(r)
                continue
            stream = r[1]
            sid = fresh.get(stream)
            if sid is None:
                row = conn.execute(
                    "SELECT sid FROM outbox_streams WHERE stream = ?", (stream,)
                ).fetchone()
                if row is None:
                    cur = conn.execute("INSERT INTO outbox_streams (stream) VALUES (?)", (stream,))
                    sid = int(cur.lastrowid or 0)
                else:
                    sid = int(row[0])
                fresh[stream] = sid
            out.append((r[0], stream, r[2], r[3], sid))
        return out

    def _maybe_snapshot(self, conn: sqlite3.Connection, versions: dict[str, int], seq: int) -> None:
        """Snapshot a stream every `snapshot_every` events (counted since the last one)."""
        every = self.config.snapshot_every
        for stream, version in versions.items():
            n = self._since_snapshot.get(stream, 0) + version - self._version_of(conn, stream)
            if n >= every:
                self._snapshot(conn, stream, version, seq)
                n = 0
            self._since_snapshot[stream] = n

    def _snapshot(self, conn: sqlite3.Connection, stream: str, version: int, at: int) -> None:
        """Record the stream's projection state as of seq `at` (taken inside the transaction
        that brought the projections to `at`, so rebuild replays only events after it)."""
        state = {}
        for proj in self._projections:
            s = proj.snapshot(conn, stream)
            if s is not None:
                state[type(proj).__name__] = s
        conn.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
            (stream, version, at, cbor2.dumps(state)),
        )

    def _drop(
        self,
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
                version = self._version_of(conn, stream)
            self._snapshot(conn, stream, version, seq)
        upto = victims[-1][0]
        conn.execute("DELETE FROM outbox WHERE seq <= ? AND stream != ?", (upto, ev.GATEWAY_STREAM))
        conn.execute("DELETE FROM events WHERE seq <= ? AND stream != ?", (upto, ev.GATEWAY_STREAM))
        conn.execute(
            "INSERT INTO counters VALUES ('dropped', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (self.dropped,),
        )

    # -- maintenance ----------------------------------------------------------------------
    async def prune(self, older_than: float | None = None, batch: int = 5000) -> int:
        """Retention: delete delivered events older than the configured age (snapshotting
        their streams first, so projections can still be rebuilt). Returns how many."""
        cutoff = self.clock.time() - (
            older_than if older_than is not None else self.config.retention_days * 86400
        )
        total = 0
        while True:
            n = await self.write(lambda conn: self._prune_sync(conn, cutoff, batch))
            total += n
            if n < batch:
                return total

    async def prune_outbox(self, batch: int = 20_000) -> int:
        """Delete delivered outbox rows (at or below the delivery watermark), `batch` rows
        per transaction so appends go on in between. Returns how many."""
        total = 0
        while True:
            n = await self.write(lambda conn: queries.prune_delivered(conn, batch))
            total += n
            if n < batch:
                return total

    def _prune_sync(self, conn: sqlite3.Connection, cutoff: float, batch: int) -> int:
        # The events deleted here may be the only record of unflushed stream versions.
        self._flush_streams(conn, {}, self._last_seq)
        queries.prune_delivered(conn, batch)
        undelivered = (
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = e.seq AND ("
            + queries.UNDELIVERED
            + ")) "
            if self.sink
            else ""  # nothing will ever deliver them: retention alone decides
        )
        # No index on wall_time: bisection over seq bounds the scan to the old events.
        victims = conn.execute(
            "SELECT e.seq, e.stream FROM events e WHERE e.seq < ? AND e.wall_time < ? "
            + undelivered
            + "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = e.seq) "
            "ORDER BY e.seq LIMIT ?",
            (queries.seq_at(conn, cutoff), cutoff, batch),
        ).fetchall()
        if not victims:
            return 0
        for stream in {v[1] for v in victims}:
            self._snapshot(conn, stream, self._version_of(conn, stream), self._last_seq)
        gone = [(v[0],) for v in victims]
        if not self.sink:
            conn.executemany("DELETE FROM outbox WHERE seq = ?", gone)
        conn.executemany("DELETE FROM events WHERE seq = ?", gone)
        return len(victims)

    async def rebuild(self) -> int:
        """Reset every projection and replay snapshots + the log. Returns events replayed."""
        return await self.write(self._rebuild_sync)

    def _rebuild_sync(self, conn: sqlite3.Connection) -> int:
        return queries.rebuild(conn)

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
        def q(c: sqlite3.Connection) -> StoreStats:
            base = queries.stats(c)
            return StoreStats(
                path=str(self.path),
                file_bytes=_file_bytes(self.path),
                used_bytes=self._used_bytes,
                quota_bytes=self._quota_bytes(),
                last_seq=self._last_seq,
                events=base["events"],
                outbox_depth=base["outbox_depth"],
                outbox_bytes=base["outbox_bytes"],
                oldest_undelivered=base["oldest_undelivered"],
                dead_letters=base["dead_letters"],
                dropped=self.dropped,
                rejected=self.rejected,
                batches=self.batches,
                appended=self.appended,
            )

        return await self.read(q)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def healthy(self, stall: float = 30.0) -> bool:
        """The writer is alive and not stuck: nothing queued for longer than `stall` s."""
        if self.writer_error is not None or self._writer is None or self._writer.done():
            return False
        return not (self._queue and time.monotonic() - self.last_commit_mono > stall)


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += os.stat(str(path) + suffix).st_size
    return total
