"""The collection service on its own: a scripted driver, a real store, and the service's clock
and sleep injected, so the poll schedule is checked in the clock's time: overrun skipping,
availability after `offline_after` failed polls, the deadband, and the push queue's drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

import drivers
from drivers.base import Driver, RawReading
from drivers.testing import ManualClock
from gateway import events as ev
from gateway.config import DeviceSpec, GatewayConfig, PointSpec, loads
from gateway.control import ControlServer
from gateway.errors import DeviceTimeoutError
from gateway.events import Event
from gateway.service import Service, ServiceContext
from gateway.store import EventStore
from services import collection
from services.collection import CollectionService

BOUND = 30.0  # seconds: a bound against a hang, not a measurement


@dataclass
class Step:
    """What the driver's pending read does: take `takes` seconds of the clock, then return
    `value` for every point asked, or raise `error`."""

    takes: float = 0.0
    value: float = 0.0
    error: Exception | None = None


class ScriptedDriver(Driver):
    """Each read waits for the test's next Step, so the poll loop moves one read at a time.
    A device with `push = true` is not polled (its readings come through `ctx.emit`)."""

    kind: ClassVar[str] = "scripted"

    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> None:
        pass

    def polls(self, spec: DeviceSpec) -> bool:
        return spec.options.get("push") is not True

    async def start(self) -> None:
        self.script: asyncio.Queue[Step] = asyncio.Queue()
        self.reads_at: list[float] = []  # the clock's time at each read
        self._read = asyncio.Event()

    async def stop(self) -> None:
        pass

    async def add_device(self, spec: DeviceSpec) -> None:
        pass

    async def remove_device(self, device_id: str) -> None:
        pass

    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        clock = self.ctx.clock
        assert isinstance(clock, ManualClock)
        self.reads_at.append(clock.now)
        self._read.set()
        step = await self.script.get()
        clock.now += step.takes
        if step.error is not None:
            raise step.error
        return [RawReading(p.name, step.value) for p in points]

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        pass

    async def reads(self, n: int) -> None:
        """Wait until the service has asked for its n-th read."""
        async with asyncio.timeout(BOUND):
            while len(self.reads_at) < n:
                self._read.clear()
                await self._read.wait()

    async def answer(self, step: Step) -> None:
        """Answer the pending read, and wait until the service has dealt with it and asks
        again (that next read is the event that it has)."""
        n = len(self.reads_at)
        self.script.put_nowait(step)
        await self.reads(n + 1)


class Context(ServiceContext):
    """What the supervisor would hand the service; tasks are kept to be stopped at the end."""

    def __init__(self, config: GatewayConfig, store: EventStore, tmp: Path) -> None:
        self.config = config
        self.store = store
        self.control = ControlServer(tmp / "control.sock")
        self.logger = logging.getLogger("test.collection")
        self.tasks: list[asyncio.Task[Any]] = []

    def create_task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task

    def service(self, name: str) -> Service:
        raise KeyError(name)


class Timer:
    """The service's sleep: moves the clock by the delay at once, and records the delay."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.now += delay
        await asyncio.sleep(0)  # a turn of the loop, as a real sleep gives


@dataclass
class Running:
    service: CollectionService
    ctx: Context
    clock: ManualClock
    timer: Timer

    @property
    def driver(self) -> ScriptedDriver:
        drv = self.service.drivers["scripted"]
        assert isinstance(drv, ScriptedDriver)
        return drv

    def figures(self) -> dict[str, Any]:
        return self.service.health().figures

    async def stop(self) -> list[Event]:
        """Stop the service (it commits what it held back) and return the device's events."""
        await self.service.stop()
        for task in self.ctx.tasks:
            task.cancel()
        await asyncio.gather(*self.ctx.tasks, return_exceptions=True)
        return await self.ctx.store.events(0, 10_000, stream="device:d")


@contextlib.asynccontextmanager
async def collecting(tmp: Path, toml: str) -> AsyncIterator[Running]:
    store = await EventStore.open(tmp / "gateway.db", gateway_id="gw")
    clock = ManualClock()
    timer = Timer(clock)
    service = CollectionService(clock=clock, sleep=timer.sleep)
    ctx = Context(loads(toml), store, tmp)
    run = Running(service, ctx, clock, timer)
    try:
        await service.start(ctx)
        yield run
    finally:
        if service.drivers:
            await run.stop()
        await store.close()


@pytest.fixture(autouse=True)
def scripted_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(drivers.DRIVERS, "scripted", f"{__name__}:ScriptedDriver")


def device(extra: str = "", points: str = "[devices.d.points.v]\n") -> str:
    return f'[devices.d]\ndriver = "scripted"\ninterval = 10\njitter = 0\n{extra}\n{points}'


def values(events: list[Event], point: str) -> list[Any]:
    return [
        rec["v"]
        for e in events
        if e.type == ev.READINGS
        for rec in ev.iter_readings(e.data)
        if rec["n"] == point
    ]


async def test_a_poll_that_overruns_skips_the_cycles_it_missed(tmp_path: Path) -> None:
    async with collecting(tmp_path, device()) as run:
        drv = run.driver
        await drv.reads(1)
        await drv.answer(Step())  # on time: the next read one interval later
        await drv.answer(Step(takes=35.0))  # 3.5 intervals: cycles at +20, +30, +40 missed
        await drv.answer(Step())
        start = drv.reads_at[0]
        assert [t - start for t in drv.reads_at] == [0.0, 10.0, 50.0, 60.0]
        assert run.timer.delays == [0.0, 10.0, 5.0, 10.0]  # first: the spread (jitter 0)
        assert run.service.stats["d"].skipped == 3
        assert run.figures()["skipped_cycles"] == 3
        assert run.figures()["polls"] == 4  # the fourth is under way; none was piled up


async def test_a_device_is_unavailable_after_offline_after_failed_polls_in_a_row(
    tmp_path: Path,
) -> None:
    timeout = DeviceTimeoutError("d", "no answer")
    async with collecting(tmp_path, device("offline_after = 3")) as run:
        drv = run.driver
        await drv.reads(1)
        await drv.answer(Step(value=1.0))
        assert run.service.stats["d"].available is True
        await drv.answer(Step(error=timeout))
        await drv.answer(Step(error=timeout))
        assert run.figures()["unavailable"] == []  # two in a row: not yet
        await drv.answer(Step(error=timeout))
        assert run.figures()["unavailable"] == ["d"]
        assert run.service.stats["d"].consecutive == 3
        await drv.answer(Step(error=timeout))  # still down: no second event
        await drv.answer(Step(value=2.0))
        assert run.figures()["unavailable"] == []
        assert run.figures()["failures"] == 4
        events = await run.stop()
    changes = [
        (e.type, e.data.get("reason"))
        for e in events
        if e.type in (ev.DEVICE_AVAILABLE, ev.DEVICE_UNAVAILABLE)
    ]
    assert changes == [
        (ev.DEVICE_AVAILABLE, None),
        (ev.DEVICE_UNAVAILABLE, "d: no answer"),
        (ev.DEVICE_AVAILABLE, None),
    ]
    assert values(events, "v") == [1.0, 2.0]


async def test_the_deadband_keeps_changes_larger_than_it_from_the_last_kept_value(
    tmp_path: Path,
) -> None:
    points = "[devices.d.points.v]\ndeadband = 0.5\n[devices.d.points.w]\n"
    async with collecting(tmp_path, device(points=points)) as run:
        drv = run.driver
        await drv.reads(1)
        for value in (10.0, 10.3, 10.6, 10.9, 9.0):
            await drv.answer(Step(value=value))
        events = await run.stop()
    assert values(events, "v") == [10.0, 10.6, 9.0]  # 10.9 is within 0.5 of 10.6, the last kept
    assert values(events, "w") == [10.0, 10.3, 10.6, 10.9, 9.0]  # no deadband: every value


async def test_pushed_readings_past_the_queue_are_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(collection, "PUSH_QUEUE", 5)
    async with collecting(tmp_path, device("push = true")) as run:
        drv = run.driver
        # Eight pushes before the service gets a turn: five fit in the queue.
        for i in range(8):
            drv.ctx.emit("d", [RawReading("v", float(i))])
        assert run.figures()["push_dropped"] == 3
        assert drv.reads_at == []  # a push device is not polled
        events = await run.stop()
    assert values(events, "v") == [0.0, 1.0, 2.0, 3.0, 4.0]
