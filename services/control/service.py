"""The control service: commands that write a point of a device, from the CLI
(`gatewayctl command`), CoAP (`POST /d/{device}/commands`) and the cloud (the relay's
`command.requested`).

Every step is an event in the command's own stream `command:<id>`:
`requested -> accepted | rejected(reason) -> sent -> succeeded | failed(reason) | expired`.
The id is the idempotency key, one namespace for every source: `requested` is appended at
stream version 0, so a second request with the same id is the same command and gets its
outcome. Requests are judged in one place (the bus consumer below), by the point rules of
`services.points`. One command is in flight per device; a bounded queue per device holds the
rest (`services.control.dispatch`); an expired command is never sent. A write is retried
only when nothing reached the device (`ConnectError`); a time-out that may have reached it
is `failed(unknown_outcome)`. After a restart, `sent` commands without an outcome become
`failed(unknown_outcome)` and `accepted` ones are sent unless expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from gateway import events as ev
from gateway import names
from gateway.config import GatewayConfig
from gateway.errors import (
    CommandExpiredError,
    ConcurrencyError,
    GatewayError,
    PayloadError,
    QueueFullError,
    RemoteWriteError,
    WriteRefusedError,
)
from gateway.events import NewEvent
from gateway.service import Health, Service, ServiceContext
from gateway.store import queries
from services.control import projection as proj
from services.control.dispatch import Command, Dispatcher
from services.control.runner import SagaRunner
from services.control.verbs import Verbs, public
from services.points import check_write

if TYPE_CHECKING:
    from services.collection import CollectionService


class ControlService(Service):
    name: ClassVar[str] = "control"
    requires: ClassVar[tuple[str, ...]] = ("collection",)

    def __init__(self) -> None:
        self.dispatch = Dispatcher(self)
        self._waiters: dict[str, list[tuple[frozenset[str], asyncio.Future[dict[str, Any]]]]] = {}
        self._ctx: ServiceContext | None = None
        self._inline: set[str] = set()  # ids judged by `submit` (the bus consumer skips them)
        self.counts: dict[str, int] = {}

    # -- life -----------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        # (a restart after a crash: the log says what is still to do)
        self.dispatch = Dispatcher(self)
        self.config: GatewayConfig = ctx.config
        self.store = ctx.store
        self.log = ctx.logger
        self.collection: CollectionService = ctx.service("collection")  # type: ignore[assignment]
        self.bus = ctx.bus
        self.sagas = SagaRunner(self)
        sub = ctx.bus.subscribe("control", [ev.COMMAND_REQUESTED])
        Verbs(self).register(ctx.control)
        await self._recover()
        ctx.create_task(self._consume(sub), "requests")
        await self.sagas.resume_all()
        self._attach_coap()

    def _attach_coap(self) -> None:
        """POST /d/{device}/commands on the CoAP front door, when it runs (started first)."""
        assert self._ctx is not None
        try:
            server = getattr(self._ctx.service("coap"), "server", None)
            auth = self._ctx.service("auth")
        except KeyError:
            return
        if server is None:
            return
        from services.control.coap import CommandsDoor

        def role(identity: str | None) -> int:
            policy = getattr(auth, "policy", None)
            return 0 if policy is None else int(policy.coap_role(identity))

        async def denied(identity: str, message: str) -> None:
            record = getattr(auth, "coap_denied", None)
            if record is not None:
                await record(identity, message)

        limit = int(getattr(getattr(server, "config", None), "max_payload", 1024))
        server.devices.commands_door = CommandsDoor(self.submit, role, limit, denied)

    async def stop(self) -> None:
        self.dispatch.stop()
        for waiters in self._waiters.values():
            for _, fut in waiters:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    async def reload(self, config: GatewayConfig) -> None:
        self.config = config

    def health(self) -> Health:
        queued, inflight = self.dispatch.queued, self.dispatch.inflight
        return Health.ok(f"{inflight} in flight, {queued} queued", queued=queued,
                         inflight=inflight, **self.counts)  # fmt: skip

    # -- requests -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Started: takes cloud commands (`cloud_command`)."""
        return self._ctx is not None

    async def cloud_command(self, payload: bytes, fmt: str) -> bytes | None:
        """A command from the cloud, as the sync downlink received it: a valid one becomes
        its `command.requested` event (judged by the bus consumer, like every request that
        is not `submit`ted); an invalid one is answered in `fmt`, for the response topic."""
        from gateway.sync.downlink import record_command  # only with [sync]: not at start

        return await record_command(self.store, payload, fmt, self.log)

    async def submit(
        self, device: str, point: str, value: Any, *, cid: str | None = None,
        source: str, by: str | None = None, timeout: float | None = None,
        wait: bool = False, saga: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Request a command; returns its row once it is decided (accepted or rejected),
        or once it has its outcome with `wait`. A known id returns that command instead."""
        if cid is None:
            cid = os.urandom(16).hex()
        problem = names.problem(cid, "command id")
        if problem is not None:
            raise PayloadError(problem)
        for what, v in (("device", device), ("point", point)):
            p = names.problem(v, what) if isinstance(v, str) else f"{what} must be a string"
            if p is not None:
                raise PayloadError(p)
        span = self.config.control.deadline if timeout is None else timeout
        data: dict[str, Any] = {"id": cid, "device": device, "point": point, "value": value,
                                "source": source, "deadline": time.time() + span}  # fmt: skip
        if by is not None:
            data["by"] = by
        if saga is not None:
            data["saga"] = saga
        want = proj.TERMINAL if wait else proj.TERMINAL | {"accepted"}
        fut = self._waiter(cid, want)
        # Judged here and committed with the request (one transaction, not two); the bus
        # consumer, which judges the cloud's requests, leaves this one alone.
        etype, decided, cmd = self._decide(cid, data)
        requested = NewEvent(proj.command_stream(cid), ev.COMMAND_REQUESTED, data, 0)
        self._inline.add(cid)
        try:
            new = await self._event(cid, etype, decided, expected=1, before=[requested])
        except BaseException:
            self._inline.discard(cid)
            self._drop_waiter(cid, fut)
            raise
        if new:
            if cmd is not None:
                self._enqueue(cmd)
        else:  # the same id again: that command's state (or outcome) is the answer
            self._inline.discard(cid)
            row = await self.row(cid)
            if row is not None and row["status"] in want:
                self._drop_waiter(cid, fut)
                return row
        try:
            return await fut
        finally:
            self._drop_waiter(cid, fut)

    async def row(self, cid: str) -> dict[str, Any] | None:
        return await self.store.read(lambda c: proj.command(c, cid))

    def _waiter(self, cid: str, want: frozenset[str]) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(cid, []).append((want, fut))
        return fut

    def _drop_waiter(self, cid: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        left = [(w, f) for w, f in self._waiters.get(cid, []) if f is not fut]
        if left:
            self._waiters[cid] = left
        else:
            self._waiters.pop(cid, None)

    async def _consume(self, sub: Any) -> None:
        async for e in sub:
            if e.stream.startswith("command:") and e.version == 1:
                cid = e.stream[8:]
                if cid in self._inline:  # judged by `submit`, in the same transaction
                    self._inline.discard(cid)
                    continue
                await self._judge(cid, e.data)

    async def _judge(self, cid: str, d: Mapping[str, Any]) -> None:
        if "saga" in d and "point" not in d and d.get("source") == "cloud":
            await self._cloud_saga(cid, d)
            return
        etype, data, cmd = self._decide(cid, d)
        if await self._event(cid, etype, data, expected=1) and cmd is not None:
            self._enqueue(cmd)

    def _decide(self, cid: str, d: Mapping[str, Any]) -> tuple[str, dict[str, Any], Command | None]:
        """The point rules, the deadline and the queue: (accepted or rejected, its data, the
        command to queue)."""
        device, point = d.get("device"), d.get("point")
        deadline = d.get("deadline")
        if not isinstance(deadline, int | float) or isinstance(deadline, bool):
            deadline = time.time() + self.config.control.deadline  # the cloud's: ours
        remote = d.get("source") == "cloud"
        try:
            if not isinstance(device, str) or not isinstance(point, str):
                raise PayloadError("a command needs a 'device' and a 'point' (strings)")
            if "value" not in d:
                raise PayloadError("a command needs a 'value'")
            check_write(self.config.devices, device, point, d["value"], remote=remote,
                        allow_remote=self.config.control.allow_remote)  # fmt: skip
            if time.time() >= deadline:
                raise CommandExpiredError("the deadline passed before the command was accepted")
            dev = self.dispatch.device(device)
            if len(dev.queue) >= self.config.control.queue:
                raise QueueFullError(
                    f"{device}: {len(dev.queue)} commands already waiting (queue = "
                    f"{self.config.control.queue})"
                )
        except (WriteRefusedError, PayloadError) as exc:
            reason = getattr(exc, "reason", "invalid")
            return proj.COMMAND_REJECTED, {"reason": reason, "error": str(exc)}, None
        cmd = Command(cid, device, point, d["value"], float(deadline), remote)
        return ev.COMMAND_ACCEPTED, {"deadline": deadline}, cmd

    async def _cloud_saga(self, cid: str, d: Mapping[str, Any]) -> None:
        """A cloud command `{"id", "saga": NAME}`: starts the saga (id = the command's) where
        `[control] remote_sagas` lists it; the command succeeds when the saga completes."""
        name = str(d.get("saga"))
        if name not in self.config.control.remote_sagas:
            await self._event(cid, proj.COMMAND_REJECTED, {
                "reason": RemoteWriteError.reason,
                "error": f"saga {name!r}: not started from the cloud unless [control] "
                         "remote_sagas lists it"}, expected=1)  # fmt: skip
            return
        try:
            sid = await self.sagas.start(name, sid=cid, source="cloud", by=None)
        except GatewayError as exc:
            await self._event(cid, proj.COMMAND_REJECTED,
                              {"reason": "invalid", "error": str(exc)}, expected=1)  # fmt: skip
            return
        if not await self._event(cid, ev.COMMAND_ACCEPTED, {}, expected=1):
            return

        async def finish() -> None:
            end = await self.sagas.wait(sid)
            etype = proj.COMMAND_SUCCEEDED if end == "completed" else ev.COMMAND_FAILED
            await self._event(cid, etype, {"saga": end, **({} if end == "completed" else {
                "reason": f"saga_{end}"})})  # fmt: skip

        assert self._ctx is not None
        self._ctx.create_task(finish(), f"cloud-saga:{sid}")

    def _enqueue(self, cmd: Command) -> None:
        self.dispatch.enqueue(cmd)

    async def _event(
        self, cid: str, etype: str, data: dict[str, Any], expected: int | None = None,
        extra: Sequence[NewEvent] = (),
        before: Sequence[NewEvent] = (),
    ) -> bool:  # fmt: skip
        """Append one lifecycle event (with `extra` events, in one transaction) and tell
        whoever waits; False if someone else already moved this command on."""
        try:
            await self.store.append_many(
                [*before, NewEvent(proj.command_stream(cid), etype, data, expected), *extra]
            )
        except ConcurrencyError:
            return False
        status = proj.STATUS[etype]
        self.counts[status] = self.counts.get(status, 0) + 1
        waiters = [f for w, f in self._waiters.get(cid, []) if status in w and not f.done()]
        row = await self.row(cid) if waiters or self._observed() else None
        for f in waiters:
            if not f.done() and row is not None:
                f.set_result(row)
        device = row.get("device") if row is not None else None
        if isinstance(device, str):
            self._publish(device)
        return True

    def _observed(self) -> bool:
        assert self._ctx is not None
        try:
            self._ctx.service("coap")
        except KeyError:
            return False
        return True

    # -- the worker: one command in flight per device -------------------------------------
    # -- restart recovery -----------------------------------------------------------------
    async def _recover(self) -> None:
        rows = await self.store.read(proj.unfinished)
        for row in rows:
            cid = row["id"]
            if row["status"] == "sent":
                await self._event(cid, ev.COMMAND_FAILED, {
                    "reason": "unknown_outcome",
                    "error": "the gateway restarted while the write was under way: the device "
                             "may or may not have done it"})  # fmt: skip
            elif row["status"] == "accepted":
                deadline = row["deadline"] or 0.0
                if time.time() >= deadline:
                    await self._event(cid, proj.COMMAND_EXPIRED, {"deadline": deadline})
                else:
                    self._enqueue(Command(cid, row["device"], row["point"], row["value"], deadline,
                                       row["source"] == "cloud"))  # fmt: skip
            elif row["status"] == "requested":
                events = await self.store.read(
                    functools.partial(
                        queries.events, after_seq=0, limit=1, stream=proj.command_stream(cid)
                    )
                )
                if events:
                    await self._judge(cid, events[0].data)

    # -- observers ------------------------------------------------------------------------
    def _publish(self, device: str) -> None:
        """CoAP observers of /d/{device}/commands hear of every change."""
        assert self._ctx is not None
        try:
            coap = self._ctx.service("coap")
        except KeyError:
            return
        setter = getattr(coap, "set_commands", None)
        if setter is None:
            return
        self._spawn_publish(device, setter)

    def _spawn_publish(self, device: str, setter: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(GatewayError):
                rows = await self.store.read(lambda c: proj.commands(c, device, 10))
                setter(device, [public(r) for r in rows])

        assert self._ctx is not None
        self._ctx.create_task(run(), f"publish:{device}")
