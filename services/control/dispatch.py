"""The control service's dispatcher: one command in flight per device, a bounded queue per
device, and the write itself (retried only when nothing reached the device, then read back).
Every step is recorded through the service (`ControlService._event`)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import events as ev
from gateway.breaker import Backoff
from gateway.errors import (
    ConnectError,
    DeviceProtocolError,
    DeviceTimeoutError,
    DriverError,
    GatewayError,
    StoreError,
    WriteRefusedError,
)
from gateway.events import NewEvent
from gateway.faults import kill_point
from services.control import projection as proj
from services.points import check_write

if TYPE_CHECKING:
    from services.control.service import ControlService

#: Retry pacing after a refused connection (the shared Backoff: exponential, jittered).
RETRY_BASE = 0.1
RETRY_CAP = 5.0


@dataclass
class Command:
    id: str
    device: str
    point: str
    value: Any
    deadline: float  # wall time
    remote: bool = False


@dataclass
class DeviceQueue:
    queue: deque[Command] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: str | None = None
    task: asyncio.Task[None] | None = None


class Dispatcher:
    """The queues and workers of one `ControlService` (made again at each start)."""

    def __init__(self, control: ControlService) -> None:
        self.control = control
        self.devices: dict[str, DeviceQueue] = {}

    def device(self, device: str) -> DeviceQueue:
        return self.devices.setdefault(device, DeviceQueue())

    def enqueue(self, cmd: Command) -> None:
        dev = self.device(cmd.device)
        dev.queue.append(cmd)
        dev.wake.set()
        if dev.task is None or dev.task.done():
            ctx = self.control._ctx
            assert ctx is not None
            dev.task = ctx.create_task(self._worker(cmd.device, dev), f"device:{cmd.device}")
        self.control._publish(cmd.device)

    def stop(self) -> None:
        for d in self.devices.values():
            if d.task is not None:
                d.task.cancel()

    @property
    def queued(self) -> int:
        return sum(len(d.queue) for d in self.devices.values())

    @property
    def inflight(self) -> int:
        return sum(1 for d in self.devices.values() if d.inflight)

    async def _worker(self, device: str, dev: DeviceQueue) -> None:
        while True:
            while not dev.queue:
                dev.wake.clear()
                await dev.wake.wait()
            cmd = dev.queue.popleft()
            dev.inflight = cmd.id
            try:
                await self._execute(cmd)
            except StoreError as exc:  # cannot record: the next restart says unknown_outcome
                self.control.log.error("command %s: its events cannot be recorded: %s", cmd.id, exc)
            finally:
                dev.inflight = None
                self.control._publish(device)

    async def _execute(self, cmd: Command) -> None:
        # `accepted` is version 2 of the stream: a command queued twice (a restarted service
        # recovering what its predecessor had queued) is run once, the second finds it moved on
        if time.time() >= cmd.deadline:
            await self.control._event(
                cmd.id, proj.COMMAND_EXPIRED, {"deadline": cmd.deadline}, expected=2
            )
            return
        try:  # the config may have changed since the command was accepted
            w = check_write(
                self.control.config.devices,
                cmd.device,
                cmd.point,
                cmd.value,
                remote=cmd.remote,
                allow_remote=self.control.config.control.allow_remote,
            )
        except WriteRefusedError as exc:
            await self.control._event(
                cmd.id, ev.COMMAND_FAILED, {"reason": exc.reason, "error": str(exc)}, expected=2
            )
            return
        drv = self.control.collection.driver_for(cmd.device)
        if drv is None:
            why = self.control.collection.why_not(cmd.device)
            await self.control._event(
                cmd.id, ev.COMMAND_FAILED, {"reason": "unreachable", "error": why}, expected=2
            )
            return
        if not await self.control._event(cmd.id, proj.COMMAND_SENT, {}, expected=2):
            return
        kill_point(f"command.sent:{cmd.id}")
        backoff = Backoff(RETRY_BASE, RETRY_CAP, floor=0.5)
        attempts = 0
        while True:
            attempts += 1
            try:
                # The driver's own time-out comes first; this bound is for one that hangs.
                async with asyncio.timeout(w.spec.timeout * 2 + 1):
                    await drv.write(cmd.device, w.point, w.raw)
                break
            except ConnectError as exc:
                delay = backoff.next()
                left = cmd.deadline - time.time()
                if attempts > self.control.config.control.retries or delay >= left:
                    await self.control._event(
                        cmd.id,
                        ev.COMMAND_FAILED,
                        {"reason": "unreachable", "error": str(exc), "attempts": attempts},
                    )
                    return
                self.control.log.info("command %s: %s; retrying in %.2f s", cmd.id, exc, delay)
                await asyncio.sleep(delay)
            except (TimeoutError, DeviceTimeoutError) as exc:
                why = str(exc) or f"no answer within {w.spec.timeout * 2 + 1:g} s"
                await self.control._event(
                    cmd.id,
                    ev.COMMAND_FAILED,
                    {
                        "reason": "unknown_outcome",
                        "attempts": attempts,
                        "error": f"{why}: the device may or may not have done it",
                    },
                )
                return
            except DeviceProtocolError as exc:
                await self.control._event(
                    cmd.id,
                    ev.COMMAND_FAILED,
                    {"reason": "device_error", "error": str(exc), "attempts": attempts},
                )
                return
            except DriverError as exc:  # connection lost mid-request: it may have arrived
                await self.control._event(
                    cmd.id,
                    ev.COMMAND_FAILED,
                    {"reason": "unknown_outcome", "error": str(exc), "attempts": attempts},
                )
                return
            except GatewayError as exc:  # the driver refused the value (what fits the wire)
                await self.control._event(
                    cmd.id,
                    ev.COMMAND_FAILED,
                    {"reason": "refused", "error": str(exc), "attempts": attempts},
                )
                return
        data: dict[str, Any] = {"attempts": attempts, "written": w.value}
        back = await self._read_back(drv, cmd.device, w.point)
        extra: list[NewEvent] = []
        if back is not None:
            data["value"] = back
            # what the device holds now is a reading too (a saga's `wait` sees it at once)
            rec = ev.reading_record(w.point.name, back, w.point.unit)
            extra.append(ev.readings_event(cmd.device, [rec]))
        await self.control._event(cmd.id, proj.COMMAND_SUCCEEDED, data, extra=extra)

    async def _read_back(self, drv: Any, device: str, point: Any) -> Any:
        from services.collection import convert

        spec = self.control.config.devices.get(device)
        if spec is None or not drv.polls(spec):
            return None
        try:
            async with asyncio.timeout(spec.timeout):
                readings = await drv.read(device, [point])
        except (GatewayError, TimeoutError):
            return None
        for r in readings:
            if r.point == point.name:
                return convert(point, r.value)
        return None
