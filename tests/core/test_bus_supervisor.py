"""The bus (a slow subscriber catches up from the log) and the supervisor (order, restart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from gateway import supervisor as sup_mod
from gateway.bus import Bus
from gateway.config import StoreConfig, loads
from gateway.control import ControlServer
from gateway.service import HealthState, Service, ServiceContext
from gateway.store import EventStore
from gateway.supervisor import Supervisor, order


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    s = await EventStore.open(tmp_path / "b.db", StoreConfig())
    yield s
    await s.close()


async def test_slow_subscriber_falls_back_to_the_log_and_misses_nothing(store: EventStore) -> None:
    bus = Bus(store)
    fast = bus.subscribe("fast", maxsize=10_000)
    slow = bus.subscribe("slow", maxsize=5)
    await asyncio.gather(*(store.append(f"s:{i % 3}", "t", {"i": i}) for i in range(200)))
    assert slow.lagging  # its queue overflowed; the writer did not wait for it
    got_fast = [(await anext(fast)).seq for _ in range(200)]
    got_slow = [(await anext(slow)).seq for _ in range(200)]
    assert got_fast == got_slow == list(range(1, 201))
    # Caught up: back to live delivery, no duplicates, nothing skipped.
    await store.append("s:0", "t", {"i": "after"})
    assert (await anext(slow)).seq == 201
    pending = asyncio.ensure_future(anext(slow))
    await store.append("s:0", "t", {"i": "live"})
    assert (await pending).seq == 202
    assert fast._queue.qsize() == 2
    fast.close()
    slow.close()
    bus.close()


async def test_subscription_filters_types_and_starts_from_a_seq(store: EventStore) -> None:
    for i in range(5):
        await store.append("s", "a" if i % 2 else "b", {"i": i})
    bus = Bus(store)
    sub = bus.subscribe("x", types=["a"], from_seq=0)
    assert [(await anext(sub)).data["i"] for _ in range(2)] == [1, 3]
    await store.append("s", "a", {"i": 5})
    assert (await anext(sub)).data["i"] == 5
    sub.close()
    bus.close()


class Rec(Service):
    log: ClassVar[list[str]] = []
    crash_times: ClassVar[int] = 0

    def __init__(self, name: str, requires: tuple[str, ...] = ()) -> None:
        self.name = name  # type: ignore[misc]
        self.requires = requires  # type: ignore[misc]
        self.started = asyncio.Event()

    async def start(self, ctx: ServiceContext) -> None:
        self.log.append(f"start {self.name}")
        self.ctx = ctx
        self.started.set()

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


class Crashy(Rec):
    def __init__(self, crashes: int) -> None:
        super().__init__("crashy")
        self.remaining = crashes
        self.starts = 0

    async def start(self, ctx: ServiceContext) -> None:
        self.starts += 1
        self.started.set()
        if self.remaining > 0:
            self.remaining -= 1
            ctx.create_task(self._boom(), "boom")

    async def _boom(self) -> None:
        raise RuntimeError("sensor table corrupt")


def test_order_by_requires_and_errors() -> None:
    a, b, c = Rec("a", ("b",)), Rec("b", ("c",)), Rec("c")
    assert [s.name for s in order([a, b, c])] == ["c", "b", "a"]
    with pytest.raises(ValueError, match="requires 'zz', which is not configured"):
        order([Rec("a", ("zz",))])
    with pytest.raises(ValueError, match="circular service requirement: x -> y -> x"):
        order([Rec("x", ("y",)), Rec("y", ("x",))])


def _sup(services: list[Service], store: EventStore, tmp: Path) -> Supervisor:
    return Supervisor(
        services, config=loads(""), store=store, bus=Bus(store),
        control=ControlServer(tmp / "c.sock"),
    )  # fmt: skip


async def test_start_in_dependency_order_stop_in_reverse(store: EventStore, tmp_path: Path) -> None:
    Rec.log = []
    s = _sup([Rec("collection", ("devices",)), Rec("devices")], store, tmp_path)
    await s.start()
    await s.stop(timeout=5)
    assert Rec.log == ["start devices", "start collection", "stop collection", "stop devices"]


async def test_crashed_service_is_restarted_and_crash_loop_reported(
    store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sup_mod, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(sup_mod, "BACKOFF_CAP", 0.01)
    monkeypatch.setattr(sup_mod, "CRASH_LOOP_COUNT", 3)
    svc = Crashy(crashes=3)
    s = _sup([svc], store, tmp_path)
    states: list[str] = []
    await s.start()
    while svc.starts < 4:  # initial start + 3 restarts
        svc.started.clear()
        await svc.started.wait()
        states.append(s.health()["crashy"]["state"])
    health = s.health()["crashy"]
    assert health["restarts"] == 3
    assert str(HealthState.CRASH_LOOP) in states or health["state"] == "degraded"
    await s.stop(timeout=5)
    assert s.health()["crashy"]["state"] == "stopped"


async def test_service_failing_to_start_is_retried(
    store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sup_mod, "BACKOFF_BASE", 0.001)

    class FailsOnce(Rec):
        attempts = 0

        async def start(self, ctx: ServiceContext) -> None:
            FailsOnce.attempts += 1
            if FailsOnce.attempts == 1:
                raise OSError("port 5683 in use")
            await super().start(ctx)

    svc = FailsOnce("coap")
    s = _sup([svc], store, tmp_path)
    await s.start()
    assert s.health()["coap"]["state"] == "failed"
    assert "port 5683 in use" in s.health()["coap"]["detail"]
    await svc.started.wait()
    assert s.health()["coap"]["state"] == "ok"
    await s.stop(timeout=5)
