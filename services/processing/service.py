"""The processing service: reacts to committed `readings` from the bus and records what it
concludes as events again: derived points (`readings` on the derived device's stream),
window aggregates (`aggregate` on `aggregate:<device>:<point>`) and anomaly flags (`anomaly`
on the device's stream). Readings are never dropped or changed.

Windows are by the gateway's clock (an event's append time: a polled reading held back by
`[store] commit_interval` keeps the time it was polled) and close at wall-clock boundaries
once everything appended before the boundary plus `GRACE` has been committed (the ticker
has the store commit what it holds back) and seen; the
`windows` watermark commits with each aggregate, and after a restart the windows past it are
rebuilt from the log. Anomaly detectors save their state every `SAVE_EVERY` seconds and at
stop, and replay the log after the saved position at start.

This module is the loop, the clock, the output and the restart; the rules of derived points
are in `services.processing.derived`, the windows in `services.processing.windows`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, ClassVar

import cbor2

from gateway import events as ev
from gateway.config import GatewayConfig
from gateway.errors import StoreError
from gateway.events import Event, NewEvent
from gateway.service import Health, Service, ServiceContext
from gateway.store import queries
from services.processing.anomaly import Detector
from services.processing.config import DerivedPoint, PointProcessing
from services.processing.derived import DerivedPoints
from services.processing.projection import ANOMALY, aggregate_stream, watermarks
from services.processing.windows import MAX_BACKFILL, Key, Windows

SAVE_EVERY = 30.0  # seconds between saves of detector state
MAX_INFLIGHT = 64  # appends not yet committed before the loop waits
REPLAY_TAIL = 50_000  # events replayed into a detector that has no saved state


def _number(v: Any) -> float | int | None:
    if type(v) is float:
        return v if math.isfinite(v) else None
    if type(v) is int:
        return v
    return None


class ProcessingService(Service):
    name: ClassVar[str] = "processing"

    def __init__(self) -> None:
        self.points: dict[Key, PointProcessing] = {}
        self.devices: set[str] = set()  # devices whose readings matter
        self.detectors: dict[Key, Detector] = {}
        self.processed = 0  # seq of the last event handled
        self._caught_up: asyncio.Event = asyncio.Event()
        self._target = 0
        self._inflight: list[asyncio.Future[Any]] = []
        self._flush_soon = False
        self._out: list[NewEvent] = []
        self.figures = {"derived": 0, "missing": 0, "aggregates": 0, "anomalies": 0,
                        "late": 0, "not_stored": 0}  # fmt: skip
        self.derived = DerivedPoints(self._out, self.figures, self._flush)
        self.windows = Windows(self._out, self.figures)

    # -- life -----------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.logger
        # Readings held back by the store's commit interval arrive that much later (windows
        # need not wait for them: the ticker has them committed before it closes any).
        self.derived.lag = ctx.config.store.commit_interval
        # Started again after a crash: everything is rebuilt from the store, nothing kept.
        self.derived.clear()
        self.windows.clear()
        self.detectors.clear()
        self._out.clear()
        self._configure(ctx.config)
        # Subscribe first: nothing committed from here on is missed while state is loaded.
        self.sub = ctx.bus.subscribe("processing", maxsize=10_000)
        self.processed = self.sub.cursor
        self.derived.load_inputs(await self.ctx.store.read(queries.latest), self.sub.cursor)
        await self._rebuild(self.sub.cursor)
        ctx.create_task(self._run(), "events")
        ctx.create_task(self._ticker(), "ticker")

    async def stop(self) -> None:
        self.sub.close()
        self.derived.cancel_timers()
        self._flush()
        for f in self._inflight:
            with contextlib.suppress(StoreError):
                await f
        self._inflight.clear()
        try:
            await self._save_detectors()
        except StoreError as exc:
            self.log.warning("anomaly detector state not saved: %s", exc)

    async def reload(self, config: GatewayConfig) -> None:
        self._configure(config)

    def health(self) -> Health:
        detail = (
            f"{len(self.derived.specs)} derived, {sum(1 for p in self.points.values() if p.window)}"
            f" windows, {len(self.detectors)} detectors"
        )
        if self.figures["not_stored"]:
            return Health.degraded(
                f"{self.figures['not_stored']} results not stored; {detail}",
                processed_seq=self.processed, **self.figures,
            )  # fmt: skip
        return Health.ok(detail, processed_seq=self.processed, **self.figures)

    def _configure(self, config: GatewayConfig) -> None:
        self.derived.configure(config, self.log)
        points: Mapping[Key, PointProcessing] = config.sections.get("processing") or {}
        self.points = dict(points)
        self.devices = {d for d, _ in self.derived.by_input} | {d for d, _ in self.points}
        for key, pp in self.points.items():
            if pp.anomaly is None:
                self.detectors.pop(key, None)
            elif key not in self.detectors or self.detectors[key].conf != pp.anomaly:
                self.detectors[key] = Detector(pp.anomaly)
        for key in [k for k in self.detectors if k not in self.points]:
            del self.detectors[key]
        self.windows.configure(self.points)

    # -- the event loop -------------------------------------------------------------------
    async def _run(self) -> None:
        async for e in self.sub:
            if e.type == ev.READINGS:
                device = ev.stream_device(e.stream)
                if device is not None and device in self.devices:
                    self._on_readings(device, e)
            self.processed = e.seq
            if self.processed >= self._target:
                self._caught_up.set()
            if self._out and not self._flush_soon:
                # Everything the bus has queued is handled in this turn of the loop; its
                # results go out together, as few events as possible.
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
                await self._throttle()

    def _on_readings(self, device: str, e: Event, replay: bool = False) -> None:
        dirty: dict[Key, DerivedPoint] = {}
        wall = e.wall_time
        by_input, inputs = self.derived.by_input, self.derived.inputs
        window_add = self.windows.add
        for rec in ev.iter_readings(e.data):
            name = rec.get("n")
            if type(name) is not str:
                continue
            key = (device, name)
            v = rec.get("v")
            if not replay:
                deps = by_input.get(key)
                if deps:
                    t = rec.get("t")
                    inputs[key] = (v, float(t) if isinstance(t, int | float) else wall)
                    for dp in deps:
                        dirty[(dp.device, dp.point)] = dp
            pp = self.points.get(key)
            if pp is None:
                continue
            x = _number(v)
            if x is None:
                continue
            if pp.window:
                window_add(key, pp, wall, x)
            det = self.detectors.get(key)
            if det is not None and (flag := det.score(float(x))) is not None and not replay:
                z, lo, hi = flag
                self.figures["anomalies"] += 1
                self._out.append(NewEvent(e.stream, ANOMALY, {
                    "n": name, "v": x, "score": round(z, 3), "band": [lo, hi], "seq": e.seq,
                }))  # fmt: skip
        for dp in dirty.values():
            self.derived.derive(dp)

    # -- the clock ------------------------------------------------------------------------
    async def _ticker(self) -> None:
        every = [pp.window for pp in self.points.values() if pp.window]
        stale = self.derived.max_ages()
        while True:
            now = time.time()
            wakes = [math.floor(now / w) * w + w + self.windows.grace for w in every]
            wakes += [now + max(0.2, min(stale) / 4)] if stale else []
            wakes.append(now + SAVE_EVERY)
            await asyncio.sleep(max(0.01, min(wakes) - now))
            now = time.time()
            if every:
                # Readings the store holds back for its commit interval are committed now,
                # and everything committed before now is seen before windows close.
                with contextlib.suppress(StoreError):
                    await self.ctx.store.flush()
                self._target = self.ctx.bus.last_seq
                if self.processed < self._target:
                    self._caught_up.clear()
                    await self._caught_up.wait()
                self.windows.close_due(self.points, now)
            if stale:
                self.derived.check_stale()
            self._flush()
            if self.detectors and time.monotonic() - getattr(self, "_saved", 0.0) >= SAVE_EVERY:
                await self._save_detectors()
            every = [pp.window for pp in self.points.values() if pp.window]
            stale = self.derived.max_ages()

    # -- output ---------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_soon = False
        if not self._out:
            return
        batch = _merge(self._out)
        self._out.clear()  # (the same list: derived points and windows append to it)
        try:
            fut = self.ctx.store.append_many(batch)
        except StoreError as exc:
            self._not_stored(len(batch), exc)
            return
        n = len(batch)

        def done(f: asyncio.Future[Any]) -> None:
            self._appended(f, n)

        fut.add_done_callback(done)
        self._inflight.append(fut)

    def _appended(self, fut: asyncio.Future[Any], n: int) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._not_stored(n, fut.exception())

    def _not_stored(self, n: int, exc: BaseException | None) -> None:
        self.figures["not_stored"] += n
        self.log.warning("%d processing events not stored: %s", n, exc)

    async def _throttle(self) -> None:
        self._inflight = [f for f in self._inflight if not f.done()]
        while len(self._inflight) > MAX_INFLIGHT:
            await asyncio.wait(self._inflight[:1])
            self._inflight = [f for f in self._inflight if not f.done()]

    # -- state after a restart ------------------------------------------------------------
    async def _rebuild(self, upto: int) -> None:
        """Windows open (or closed unemitted) at a crash, from the log; detectors from their
        saved state plus the log after it. Nothing is emitted here but missed windows."""
        marks = await self.ctx.store.read(watermarks)
        now = time.time()
        since = now
        for key, pp in self.points.items():
            if not pp.window:
                continue
            mark = marks.get(aggregate_stream(*key))
            if mark is None:
                mark = math.floor(now / pp.window) * pp.window
            mark = max(mark, now - MAX_BACKFILL)
            self.windows.emitted_to[key] = mark
            since = min(since, mark)
        saved = await self.ctx.store.read(_load_state)
        after = upto
        for key, det in self.detectors.items():
            got = saved.get(f"anomaly:{key[0]}:{key[1]}")
            if got is not None:
                seq, state = got
                det.n, det.mean, det.var = int(state[0]), float(state[1]), float(state[2])
                det.seq = seq
                after = min(after, seq)
            else:
                # Never saved (killed before the first save): learn from the log's tail.
                det.seq = 0
                after = min(after, max(0, upto - REPLAY_TAIL))
        if any(p.window for p in self.points.values()):
            late = self.figures["late"]  # readings of windows emitted before: not late
            for e in await self.ctx.store.read(lambda c: _readings_since(c, since, upto)):
                self._replay(e, windowed_only=True)
            self.figures["late"] = late
        if self.detectors and after < upto:
            cursor = after
            while True:
                chunk = await self.ctx.store.read(partial(_readings_after, after=cursor))
                chunk = [e for e in chunk if e.seq <= upto]
                if not chunk:
                    break
                for e in chunk:
                    self._replay(e, windowed_only=False, windows=False)
                cursor = chunk[-1].seq
        self._flush()

    def _replay(self, e: Event, *, windowed_only: bool, windows: bool = True) -> None:
        device = ev.stream_device(e.stream)
        if device is None or device not in self.devices:
            return
        for rec in ev.iter_readings(e.data):
            key = (device, rec.get("n"))
            pp = self.points.get(key)  # type: ignore[arg-type]
            x = _number(rec.get("v"))
            if pp is None or x is None:
                continue
            if windows and pp.window:
                self.windows.add(key, pp, e.wall_time, x)  # type: ignore[arg-type]
            det = self.detectors.get(key)  # type: ignore[arg-type]
            if not windowed_only and det is not None and e.seq > det.seq:
                det.score(float(x))

    async def _save_detectors(self) -> None:
        self._saved = time.monotonic()
        if not self.detectors:
            return
        rows = [
            (f"anomaly:{d}:{p}", self.processed, cbor2.dumps([det.n, det.mean, det.var]))
            for (d, p), det in self.detectors.items()
        ]

        def save(conn: Any) -> None:
            conn.executemany("INSERT OR REPLACE INTO processing_state VALUES (?, ?, ?)", rows)

        await self.ctx.store.write(save)


def _merge(batch: list[NewEvent]) -> list[NewEvent]:
    """Derived readings for one device in one flush become one event (records in order)."""
    out: list[NewEvent] = []
    at: dict[str, int] = {}
    for e in batch:
        i = at.get(e.stream)
        if e.type != ev.READINGS:
            at.pop(e.stream, None)  # nothing moves past another event of its stream
            out.append(e)
        elif i is None:
            at[e.stream] = len(out)
            out.append(e)
        else:
            first = out[i]
            out[i] = first._replace(data={"r": [*first.data["r"], *e.data["r"]]})
    return out


def _readings_after(conn: Any, after: int) -> list[Event]:
    return queries.events(conn, after, 2000, types=(ev.READINGS,))


def _load_state(conn: Any) -> dict[str, tuple[int, list[Any]]]:
    return {
        k: (int(seq), cbor2.loads(blob))
        for k, seq, blob in conn.execute("SELECT key, seq, state FROM processing_state")
    }


def _readings_since(conn: Any, since: float, upto: int) -> Iterable[Event]:
    rows = conn.execute(
        "SELECT seq, stream, version, type, wall_time, mono_time, boot_id, synced, data "
        "FROM events WHERE seq >= ? AND seq <= ? AND wall_time >= ? AND type = 'readings' "
        "ORDER BY seq",
        (queries.seq_at(conn, since), upto, since),
    ).fetchall()
    return [queries.row_to_event(r) for r in rows]
