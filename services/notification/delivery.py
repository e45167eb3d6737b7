"""Delivery of alert events to local command channels (`[notify.<channel>]`).

Each channel works through the `alert.raised`/`alert.cleared` events in log order from its
cursor (the `alert_channels` projection, advanced by `alert.delivered` or a final
`alert.delivery_failed` event, committed after the command ran), so each raise and clear is
delivered once, and one committed before a crash is delivered after it. A command runs with
the alert as JSON on stdin, no shell, a minimal environment and a time-out; a failure is
recorded, retried with the shared backoff up to `retries` times, and never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from functools import partial
from typing import Any

from gateway import events as ev
from gateway.breaker import Backoff
from gateway.bus import Subscription
from gateway.errors import StoreError
from gateway.events import Event
from gateway.service import ServiceContext
from gateway.store import queries
from services.notification.config import Channel, severity_rank
from services.notification.projection import (
    ALERT_DELIVERED,
    ALERT_DELIVERY_FAILED,
    alerts,
    channel_cursors,
)

OUTPUT_MAX = 2000  # characters of a command's output kept in its event


class Deliveries:
    """The delivery loops of the configured channels, one task each."""

    def __init__(self, ctx: ServiceContext, figures: dict[str, int], log: logging.Logger) -> None:
        self.ctx = ctx
        self.figures = figures
        self.log = log
        self._stopping = False
        self._live: dict[str, Subscription] = {}
        self._tasks: dict[str, tuple[Channel, asyncio.Task[Any]]] = {}

    def start(self, channels: Mapping[str, Channel]) -> None:
        for name, ch in channels.items():
            if name not in self._tasks:
                task = self.ctx.create_task(self._deliver(ch), f"deliver:{name}")
                self._tasks[name] = (ch, task)

    async def reload(self, channels: Mapping[str, Channel]) -> None:
        """Channels changed or removed stop, new ones start (a new one gets the alerts
        active now, then what follows)."""
        for name, (ch, task) in list(self._tasks.items()):
            if channels.get(name) != ch:
                # Between two events (or inside a command, which is killed): the cursor
                # has not moved past anything undelivered.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                del self._tasks[name]
        self.start(channels)

    async def stop(self) -> None:
        """A delivery under way finishes and is recorded (bounded by its command's time-out):
        cut short, it would be delivered again after the restart."""
        self._stopping = True
        for live in self._live.values():
            live.close()
        running = [task for _ch, task in self._tasks.values() if not task.done()]
        if running:
            bound = max(ch.timeout for ch, _t in self._tasks.values()) + 2.0
            await asyncio.wait(running, timeout=min(bound, 10.0))

    async def _deliver(self, ch: Channel) -> None:
        store = self.ctx.store
        live = self.ctx.bus.subscribe(
            f"deliver:{ch.name}", types=[ev.ALERT_RAISED, ev.ALERT_CLEARED]
        )
        self._live[ch.name] = live
        try:
            cursors = await store.read(channel_cursors)
            cursor = cursors.get(ch.name)
            if cursor is None:
                # A new channel: the alerts active now still need to reach it.
                rows = await store.read(alerts)
                raised = [r["raise_seq"] for r in rows if r["active"] and r["raise_seq"]]
                cursor = min(raised) - 1 if raised else live.cursor
            while cursor < live.cursor:
                batch = await store.read(partial(_alert_events, after=cursor))
                batch = [e for e in batch if e.seq <= live.cursor]
                if not batch:
                    break
                for e in batch:
                    if self._stopping:
                        return
                    await self._deliver_one(ch, e)
                cursor = batch[-1].seq
            async for e in live:
                await self._deliver_one(ch, e)
        finally:
            live.close()
            if self._live.get(ch.name) is live:
                del self._live[ch.name]

    async def _deliver_one(self, ch: Channel, e: Event) -> None:
        if severity_rank(str(e.data.get("severity"))) < severity_rank(ch.min_severity):
            return
        payload = json.dumps({
            "id": e.stream[6:], "event": e.type, "seq": e.seq, "time": e.wall_time,
            "gateway": self.ctx.config.gateway.id, **dict(e.data),
        }, default=str).encode()  # fmt: skip
        backoff = Backoff(1.0, 60.0, floor=0.5)
        attempt = 0
        while True:
            attempt += 1
            error, output = await _run_command(ch, payload)
            base = {"channel": ch.name, "of": e.seq, "attempts": attempt}
            if error is None:
                self.figures["delivered"] += 1
                await self._record(e.stream, ALERT_DELIVERED, {**base, "output": output})
                return
            final = attempt > ch.retries
            self.figures["delivery_failures"] += 1
            self.log.warning("alert %s: channel %s failed (attempt %d%s): %s", e.stream[6:],
                             ch.name, attempt, ", giving up" if final else "", error)  # fmt: skip
            failed = {**base, "error": error, "output": output, "final": final}
            await self._record(e.stream, ALERT_DELIVERY_FAILED, failed)
            if final or self._stopping:
                return  # not final: the cursor stays, it is tried again after the restart
            await asyncio.sleep(backoff.next())

    async def _record(self, stream: str, etype: str, data: Mapping[str, Any]) -> None:
        while True:
            try:
                await self.ctx.store.append(stream, etype, data)
                return
            except StoreError as exc:
                # Without the record the cursor does not move: retried after a pause.
                self.log.warning("%s not stored (%s); retrying", etype, exc)
                await asyncio.sleep(5)


def _alert_events(conn: Any, after: int) -> list[Event]:
    return queries.events(conn, after, 500, types=(ev.ALERT_RAISED, ev.ALERT_CLEARED))


async def _run_command(ch: Channel, payload: bytes) -> tuple[str | None, str]:
    """Run the channel's command with `payload` on stdin: (None, output) on exit 0, else
    (what went wrong, output). No shell; killed at the timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *ch.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )  # fmt: skip
    except OSError as exc:
        return f"cannot run {ch.command[0]}: {exc.strerror or exc}", ""
    try:
        async with asyncio.timeout(ch.timeout):
            out, _ = await proc.communicate(payload)
    except asyncio.CancelledError:
        _kill(proc)  # the daemon is stopping: leave no command behind
        raise
    except TimeoutError:
        _kill(proc)
        out = b""
        with contextlib.suppress(Exception):
            out, _ = await asyncio.wait_for(proc.communicate(), 5)
        text = out.decode("utf-8", "replace")[-OUTPUT_MAX:]
        return f"no exit within {ch.timeout:g} s (killed)", text
    text = out.decode("utf-8", "replace")[-OUTPUT_MAX:]
    if proc.returncode != 0:
        return f"exit status {proc.returncode}", text
    return None, text


def _kill(proc: asyncio.subprocess.Process) -> None:
    """The command and whatever it started (its own session, so its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
