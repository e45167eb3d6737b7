"""The supervisor: starts services in dependency order, restarts a crashed one with backoff,
stops them in reverse order within a bound, and reports their health."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.aio import cancel_and_wait
from gateway.retry import RetrySettings
from gateway.service import Health, HealthState, Service, ServiceContext

if TYPE_CHECKING:
    from gateway.bus import Bus
    from gateway.config import GatewayConfig
    from gateway.control import ControlServer
    from gateway.store import EventStore

log = logging.getLogger("gateway.supervisor")

#: A crashed service restarts after the shared backoff: from 0.5 s, doubling per recent crash
#: up to 60 s (full jitter: restarts of many boxes do not align); in a crash loop, the cap.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
CRASH_LOOP_COUNT = 5  # crashes within CRASH_LOOP_WINDOW seconds = a crash loop
CRASH_LOOP_WINDOW = 300.0


def restart_delay(crashes: int) -> float:
    """The pause before restarting a service that crashed `crashes` times within the
    crash-loop window."""
    backoff = RetrySettings(initial=BACKOFF_BASE, cap=BACKOFF_CAP).backoff()
    backoff.attempt = crashes if crashes < CRASH_LOOP_COUNT else 62  # 62: the cap
    return backoff.next()


def order(services: Sequence[Service]) -> list[Service]:
    """Topological order by `requires`; ValueError names a missing or circular requirement."""
    by_name = {s.name: s for s in services}
    out: list[Service] = []
    state: dict[str, int] = {}

    def visit(s: Service, chain: tuple[str, ...]) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            raise ValueError(f"circular service requirement: {' -> '.join((*chain, s.name))}")
        state[s.name] = 1
        for req in s.requires:
            if req not in by_name:
                raise ValueError(f"service {s.name!r} requires {req!r}, which is not configured")
            visit(by_name[req], (*chain, s.name))
        state[s.name] = 2
        out.append(s)

    for s in services:
        visit(s, ())
    return out


@dataclass
class _Slot:
    service: Service
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    state: HealthState = HealthState.STARTING
    crashes: list[float] = field(default_factory=list)
    restarts: int = 0
    last_error: str = ""
    started_at: float = 0.0
    restarting: asyncio.Task[None] | None = None


class _Context(ServiceContext):
    def __init__(self, sup: Supervisor, slot: _Slot) -> None:
        self._sup = sup
        self._slot = slot
        self.config = sup.config
        self.store = sup.store
        self.bus = sup.bus
        self.control = sup.control
        self.logger = logging.getLogger(f"gateway.service.{slot.service.name}")

    def create_task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self._slot.service.name}:{name}")
        self._slot.tasks.add(task)
        task.add_done_callback(lambda t: self._sup._task_done(self._slot, t))
        return task

    def service(self, name: str) -> Service:
        return self._sup.service(name)


class Supervisor:
    def __init__(
        self,
        services: Sequence[Service],
        *,
        config: GatewayConfig,
        store: EventStore,
        bus: Bus,
        control: ControlServer,
    ) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.control = control
        self._slots = {s.name: _Slot(s) for s in order(services)}
        self._stopping = False

    def service(self, name: str) -> Service:
        return self._slots[name].service

    @property
    def services(self) -> list[Service]:
        return [s.service for s in self._slots.values()]

    async def start(self) -> None:
        for slot in self._slots.values():
            await self._start(slot)

    async def _start(self, slot: _Slot) -> None:
        slot.state = HealthState.STARTING
        try:
            await slot.service.start(_Context(self, slot))
        except Exception as exc:
            log.exception("service %s failed to start", slot.service.name)
            self._crashed(slot, exc)
            return
        slot.started_at = time.monotonic()
        slot.state = HealthState.OK
        log.debug("service %s started", slot.service.name)

    def _task_done(self, slot: _Slot, task: asyncio.Task[Any]) -> None:
        slot.tasks.discard(task)
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("service %s crashed in task %s: %r", slot.service.name, task.get_name(), exc,
                  exc_info=exc)  # fmt: skip
        self._crashed(slot, exc)

    def _crashed(self, slot: _Slot, exc: BaseException) -> None:
        now = time.monotonic()
        slot.crashes = [t for t in slot.crashes if now - t < CRASH_LOOP_WINDOW] + [now]
        slot.last_error = f"{type(exc).__name__}: {exc}"
        loop = len(slot.crashes) >= CRASH_LOOP_COUNT
        slot.state = HealthState.CRASH_LOOP if loop else HealthState.FAILED
        if loop:
            log.error(
                "service %s is in a crash loop (%d crashes in %.0f s): %s",
                slot.service.name, len(slot.crashes), CRASH_LOOP_WINDOW, slot.last_error,
            )  # fmt: skip
        if slot.restarting is None or slot.restarting.done():
            slot.restarting = asyncio.create_task(self._restart(slot), name="restart")

    async def _restart(self, slot: _Slot) -> None:
        delay = restart_delay(len(slot.crashes))
        await self._stop_slot(slot, timeout=5.0)
        await asyncio.sleep(delay)
        if self._stopping:
            return
        slot.restarts += 1
        log.info("restarting service %s (restart %d)", slot.service.name, slot.restarts)
        state_before = slot.state
        await self._start(slot)
        if slot.state == HealthState.OK and state_before == HealthState.CRASH_LOOP:
            slot.state = HealthState.DEGRADED  # keeps showing until it stays up

    async def _stop_slot(self, slot: _Slot, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancellation
                await slot.service.stop()
        except TimeoutError:
            log.warning("service %s did not stop within %.1f s", slot.service.name, timeout)
        except Exception:
            log.exception("service %s failed while stopping", slot.service.name)
        for t in list(slot.tasks):
            t.cancel()
        if slot.tasks:
            await asyncio.wait(list(slot.tasks), timeout=timeout)
        slot.tasks.clear()

    async def stop(self, timeout: float) -> None:
        """Stop every service in reverse order, sharing `timeout` seconds between them."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for slot in reversed(list(self._slots.values())):
            if slot.restarting is not None and not slot.restarting.done():
                await cancel_and_wait(slot.restarting)
            left = max(0.1, deadline - time.monotonic())
            await self._stop_slot(slot, left)
            slot.state = HealthState.STOPPED

    def health(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, slot in self._slots.items():
            if slot.state in (HealthState.OK, HealthState.DEGRADED):
                try:
                    h = slot.service.health()
                except Exception as exc:
                    h = Health(HealthState.DEGRADED, f"health check failed: {exc}")
                state = h.state if slot.state == HealthState.OK else slot.state
                out[name] = {"state": str(state), "detail": h.detail, **h.figures}
            else:
                out[name] = {"state": str(slot.state), "detail": slot.last_error}
            out[name]["restarts"] = slot.restarts
        return out

    async def reload(self, config: GatewayConfig) -> None:
        self.config = config
        for slot in self._slots.values():
            await slot.service.reload(config)
