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
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
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
from services.expr import EvalError
from services.processing.anomaly import Detector
from services.processing.config import DerivedPoint, PointProcessing
from services.processing.projection import AGGREGATE, ANOMALY, aggregate_stream, watermarks
from services.processing.windows import Window

GRACE = 1.0  # seconds after a window's end before it closes (commits in flight land)
SAVE_EVERY = 30.0  # seconds between saves of detector state
MAX_BACKFILL = 6 * 3600.0  # windows older than this are not rebuilt after a long outage
MAX_INFLIGHT = 64  # appends not yet committed before the loop waits
REPLAY_TAIL = 50_000  # events replayed into a detector that has no saved state

Key = tuple[str, str]


def _number(v: Any) -> float | int | None:
    if type(v) is float:
        return v if math.isfinite(v) else None
    if type(v) is int:
        return v
    return None


class ProcessingService(Service):
    name: ClassVar[str] = "processing"

    def __init__(self) -> None:
        self.lag = 0.0
        self.grace = GRACE
        self.derived: dict[Key, DerivedPoint] = {}
        self.by_input: dict[Key, list[DerivedPoint]] = defaultdict(list)
        self.points: dict[Key, PointProcessing] = {}
        self.devices: set[str] = set()  # devices whose readings matter
        self.inputs: dict[Key, tuple[Any, float]] = {}  # latest value and its time
        self.state: dict[Key, str] = {}  # derived point -> "value" | "missing"
        self.last_emit: dict[Key, float] = {}
        self.trailing: dict[Key, asyncio.TimerHandle] = {}
        self.windows: dict[Key, Window] = {}
        self.emitted_to: dict[Key, float] = {}  # window watermark per point
        self.detectors: dict[Key, Detector] = {}
        self.processed = 0  # seq of the last event handled
        self._caught_up: asyncio.Event = asyncio.Event()
        self._target = 0
        self._inflight: list[asyncio.Future[Any]] = []
        self._flush_soon = False
        self._out: list[NewEvent] = []
        self.figures = {"derived": 0, "missing": 0, "aggregates": 0, "anomalies": 0,
                        "late": 0, "not_stored": 0}  # fmt: skip

    # -- life -----------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.logger
        # Readings held back by the store's commit interval arrive that much later (windows
        # need not wait for them: the ticker has them committed before it closes any).
        self.lag = ctx.config.store.commit_interval
        # Started again after a crash: everything is rebuilt from the store, nothing kept.
        for h in self.trailing.values():
            h.cancel()
        for table in (self.inputs, self.state, self.last_emit, self.trailing, self.windows,
                      self.emitted_to, self.detectors):  # fmt: skip
            table.clear()
        self._out.clear()
        self._configure(ctx.config)
        # Subscribe first: nothing committed from here on is missed while state is loaded.
        self.sub = ctx.bus.subscribe("processing", maxsize=10_000)
        self.processed = self.sub.cursor
        await self._load_inputs()
        await self._rebuild(self.sub.cursor)
        ctx.create_task(self._run(), "events")
        ctx.create_task(self._ticker(), "ticker")

    async def stop(self) -> None:
        self.sub.close()
        for h in self.trailing.values():
            h.cancel()
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
            f"{len(self.derived)} derived, {sum(1 for p in self.points.values() if p.window)}"
            f" windows, {len(self.detectors)} detectors"
        )
        if self.figures["not_stored"]:
            return Health.degraded(
                f"{self.figures['not_stored']} results not stored; {detail}",
                processed_seq=self.processed, **self.figures,
            )  # fmt: skip
        return Health.ok(detail, processed_seq=self.processed, **self.figures)

    def _configure(self, config: GatewayConfig) -> None:
        derived: Mapping[Key, DerivedPoint] = config.section("derived", dict) or {}
        points: Mapping[Key, PointProcessing] = config.section("processing", dict) or {}
        self.derived = dict(derived)
        for (device, point), dp in self.derived.items():
            spec = config.devices.get(device)
            if spec is not None and spec.point(point) is not None:
                self.log.warning(
                    "%s: %s/%s is also a point the device reports: both write its value",
                    dp.path, device, point,
                )  # fmt: skip
        self.by_input = defaultdict(list)
        for dp in self.derived.values():
            for ref in dict.fromkeys(dp.inputs.values()):
                self.by_input[ref].append(dp)
        self.points = dict(points)
        self.devices = {d for d, _ in self.by_input} | {d for d, _ in self.points}
        for key, pp in self.points.items():
            if pp.anomaly is None:
                self.detectors.pop(key, None)
            elif key not in self.detectors or self.detectors[key].conf != pp.anomaly:
                self.detectors[key] = Detector(pp.anomaly)
        for key in [k for k in self.detectors if k not in self.points]:
            del self.detectors[key]
        for key in [k for k in self.windows if not (k in self.points and self.points[k].window)]:
            del self.windows[key]

    async def _load_inputs(self) -> None:
        rows = await self.ctx.store.read(queries.latest)
        for r in rows:
            key = (r["device"], r["point"])
            # Newer ones come through the subscription (and make a value then).
            if key in self.by_input and r["seq"] <= self.sub.cursor:
                self.inputs[key] = (r["value"], float(r["ts"]))

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
        for rec in ev.iter_readings(e.data):
            name = rec.get("n")
            if type(name) is not str:
                continue
            key = (device, name)
            v = rec.get("v")
            if not replay:
                deps = self.by_input.get(key)
                if deps:
                    t = rec.get("t")
                    self.inputs[key] = (v, float(t) if isinstance(t, int | float) else wall)
                    for dp in deps:
                        dirty[(dp.device, dp.point)] = dp
            pp = self.points.get(key)
            if pp is None:
                continue
            x = _number(v)
            if x is None:
                continue
            if pp.window:
                self._window_add(key, pp, wall, x)
            det = self.detectors.get(key)
            if det is not None and (flag := det.score(float(x))) is not None and not replay:
                z, lo, hi = flag
                self.figures["anomalies"] += 1
                self._out.append(NewEvent(e.stream, ANOMALY, {
                    "n": name, "v": x, "score": round(z, 3), "band": [lo, hi], "seq": e.seq,
                }))  # fmt: skip
        for dp in dirty.values():
            self._derive(dp)

    # -- derived points -------------------------------------------------------------------
    def _derive(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        if dp.min_interval:
            now = time.monotonic()
            wait = self.last_emit.get(key, -math.inf) + dp.min_interval - now
            if wait > 0:
                if key not in self.trailing:
                    loop = asyncio.get_running_loop()
                    self.trailing[key] = loop.call_later(wait, self._trailing, dp)
                return
            self.last_emit[key] = now
        self._evaluate(dp)

    def _trailing(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        self.trailing.pop(key, None)
        self.last_emit[key] = time.monotonic()
        self._evaluate(dp)
        self._flush()

    def _evaluate(self, dp: DerivedPoint) -> None:
        key = (dp.device, dp.point)
        # Inputs are judged as of `commit_interval` ago: a polled reading may be held back
        # that long before it is committed, so a fresh one can arrive with that age.
        now = time.time() - self.lag
        env: dict[str, Any] = {}
        stale: list[str] = []
        for name, ref in dp.inputs.items():
            got = self.inputs.get(ref)
            if got is None or got[0] is None:
                stale.append(name)
                continue
            if dp.max_age is not None and now - got[1] > dp.max_age:
                stale.append(name)
                continue
            env[name] = got[0]
        if stale:
            unseen = any(self.inputs.get(dp.inputs[n], (None,))[0] is None for n in stale)
            self._missing(dp, "no value" if unseen else "stale", stale)
            return
        try:
            value = dp.expr.evaluate(env)
        except EvalError as exc:
            self._missing(dp, "error", [str(exc)])
            return
        if isinstance(value, float):
            value = round(value, 9)
        rec = ev.reading_record(dp.point, value, dp.unit)
        self.state[key] = "value"
        self.figures["derived"] += 1
        self._out.append(ev.readings_event(dp.device, [rec]))

    def _missing(self, dp: DerivedPoint, why: str, detail: list[str]) -> None:
        """A value that cannot be computed is recorded as missing once (not every time)."""
        key = (dp.device, dp.point)
        before = self.state.get(key)
        if before == "missing" or (before is None and why == "no value"):
            return  # inputs not all seen yet since start: nothing to say
        self.state[key] = "missing"
        self.figures["missing"] += 1
        rec = ev.reading_record(dp.point, None, dp.unit)
        rec["q"] = why
        rec["why"] = detail
        self._out.append(ev.readings_event(dp.device, [rec]))

    def _check_stale(self) -> None:
        now = time.time() - self.lag
        for dp in self.derived.values():
            if dp.max_age is None or self.state.get((dp.device, dp.point)) != "value":
                continue
            if any(
                (got := self.inputs.get(ref)) is None or now - got[1] > dp.max_age
                for ref in dp.inputs.values()
            ):
                self._evaluate(dp)

    # -- windows --------------------------------------------------------------------------
    def _window_add(self, key: Key, pp: PointProcessing, t: float, x: float | int) -> None:
        assert pp.window is not None
        start = math.floor(t / pp.window) * pp.window
        if start + pp.window <= self.emitted_to.get(key, -math.inf):
            self.figures["late"] += 1
            return
        w = self.windows.get(key)
        if w is None or start > w.start:
            if w is not None:
                self._close(key, pp, w)
            if pp.empty:
                self._fill_empty(key, pp, start)
            w = self.windows[key] = Window(start, start + pp.window)
        elif start < w.start:
            self.figures["late"] += 1
            return
        w.add(x)

    def _close(self, key: Key, pp: PointProcessing, w: Window) -> None:
        self.emitted_to[key] = w.end
        if w.count == 0 and not pp.empty:
            return
        data: dict[str, Any] = {
            "n": key[1], "device": key[0], "start": w.start, "end": w.end,
            "window": pp.window, "count": w.count,
        }  # fmt: skip
        if w.count:
            data.update(min=w.min, max=w.max, mean=round(w.sum / w.count, 9), last=w.last)
            if pp.counter:
                data["sum"] = round(w.sum, 9)
        elif pp.counter:
            data["sum"] = 0
        self.figures["aggregates"] += 1
        self._out.append(NewEvent(aggregate_stream(*key), AGGREGATE, data))

    def _close_due(self, now: float) -> None:
        """Close every window that ended at least the grace ago (empty ones too, when asked)."""
        for key, pp in self.points.items():
            if not pp.window:
                continue
            w = self.windows.get(key)
            if w is not None and w.end + self.grace <= now:
                del self.windows[key]
                self._close(key, pp, w)
                w = None
            if pp.empty and w is None:
                self._fill_empty(key, pp, math.floor((now - self.grace) / pp.window) * pp.window)

    def _fill_empty(self, key: Key, pp: PointProcessing, upto: float) -> None:
        """Emit count = 0 for the windows without readings between the watermark and `upto`."""
        assert pp.window is not None
        start = self.emitted_to.get(key)
        if start is None:
            self.emitted_to[key] = upto
            return
        start = max(start, upto - MAX_BACKFILL)
        while start + pp.window <= upto:
            self._close(key, pp, Window(start, start + pp.window))
            start += pp.window

    async def _ticker(self) -> None:
        every = [pp.window for pp in self.points.values() if pp.window]
        stale = [dp.max_age for dp in self.derived.values() if dp.max_age]
        while True:
            now = time.time()
            wakes = [math.floor(now / w) * w + w + self.grace for w in every]
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
                self._close_due(now)
            if stale:
                self._check_stale()
            self._flush()
            if self.detectors and time.monotonic() - getattr(self, "_saved", 0.0) >= SAVE_EVERY:
                await self._save_detectors()
            every = [pp.window for pp in self.points.values() if pp.window]
            stale = [dp.max_age for dp in self.derived.values() if dp.max_age]

    # -- output ---------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_soon = False
        if not self._out:
            return
        batch, self._out = _merge(self._out), []
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
            self.emitted_to[key] = mark
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
                self._window_add(key, pp, e.wall_time, x)  # type: ignore[arg-type]
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
