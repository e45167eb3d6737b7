"""The `sync` service: runs the outbox relay over the configured sink (MQTT or files),
reports its figures to `gatewayctl status`/systemd and answers the `outbox*` control verbs."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any, ClassVar

from gateway.config import GatewayConfig
from gateway.errors import PayloadError
from gateway.service import Health, Service, ServiceContext
from gateway.store import outbox
from gateway.sync.config import SyncConfig
from gateway.sync.downlink import CommandOwner, Downlink
from gateway.sync.filesink import FileSink
from gateway.sync.link import MqttLink, Sink
from gateway.sync.relay import Relay

STATS_EVERY = 5.0  # seconds between backlog measurements (count/sum over the outbox)
STATS_SHARE = 0.02  # at most this share of the time goes to them (a deep backlog is a scan)


class SyncService(Service):
    name: ClassVar[str] = "sync"

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.sink: Sink | None = None
        self.cfg: SyncConfig | None = None
        self._ctx: ServiceContext | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stats_task: asyncio.Task[Any] | None = None
        self._stats: dict[str, Any] = {}
        self._verbs = ("outbox", "outbox.retry", "outbox.dead_letters", "outbox.requeue")

    async def start(self, ctx: ServiceContext, cfg: SyncConfig | None = None) -> None:
        cfg = cfg or ctx.config.sections["sync"]
        assert isinstance(cfg, SyncConfig)
        self.cfg = cfg
        self._ctx = ctx
        gw = ctx.config.gateway.id

        def commands() -> CommandOwner | None:
            # Commands belong to the control service (started after this one: asked each time).
            try:
                owner = ctx.service("control")
            except KeyError:
                return None
            return owner if isinstance(owner, CommandOwner) else None

        downlink = Downlink(ctx.store, cfg.format, ctx.logger, commands)
        async def config_downlink(payload: bytes, endpoint: str) -> None:
            # The daemon owns config changes (gateway.sync.remote_config): an in-process verb.
            await ctx.control.ask("config.remote", {"document": payload, "endpoint": endpoint})

        if cfg.file is not None:
            self.sink = FileSink(cfg.file, ctx.logger, cfg.retry)
        else:
            self.sink = MqttLink(cfg, gw, ctx.logger, downlink=downlink,
                                 config_downlink=config_downlink)  # fmt: skip
        self.relay = Relay(ctx.store, self.sink, cfg, gw, ctx.logger)
        await self._measure()
        self._task = ctx.create_task(self.relay.run(), "relay")
        if self._stats_task is None or self._stats_task.done():  # (a reload keeps it)
            self._stats_task = ctx.create_task(self._stats_loop(), "stats")
        ctx.control.register("outbox", self._cmd_outbox, mutating=False)
        ctx.control.register("outbox.retry", self._cmd_retry, mutating=True)
        ctx.control.register("outbox.dead_letters", self._cmd_dead_letters, mutating=False)
        ctx.control.register("outbox.requeue", self._cmd_requeue, mutating=True)

    async def reload(self, config: GatewayConfig) -> None:
        """A changed `[sync]` takes effect: the relay and its link start again on it (the
        outbox stays as it is; delivery resumes from the watermark). Without `[sync]` in the
        new config the running relay stays (the supervisor adds and removes no service)."""
        new = config.sections.get("sync")
        if self._ctx is None or not isinstance(new, SyncConfig) or new == self.cfg:
            return
        await self._stop_relay()
        await self.start(self._ctx, new)

    async def stop(self) -> None:
        if self._ctx is not None:
            for verb in self._verbs:
                with contextlib.suppress(KeyError):
                    self._ctx.control.unregister(verb)
        await self._stop_relay()

    async def _stop_relay(self) -> None:
        if self._task is not None:
            # Cancelling the relay closes the session and records the acks already received.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if isinstance(self.sink, FileSink):
            self.sink.close()

    # -- figures ----------------------------------------------------------------------------
    async def _measure(self) -> None:
        assert self._ctx is not None
        st = await self._ctx.store.stats()
        self._stats = {
            "backlog": st.outbox_depth,
            "backlog_bytes": st.outbox_bytes,
            "oldest_undelivered": st.oldest_undelivered,
            "dead_letters": st.dead_letters,
        }

    async def _stats_loop(self) -> None:
        took = 0.0
        while True:
            await asyncio.sleep(max(STATS_EVERY, took / STATS_SHARE))
            start = time.monotonic()
            with contextlib.suppress(Exception):
                await self._measure()
            took = time.monotonic() - start

    def figures(self) -> dict[str, Any]:
        out = dict(self._stats)
        oldest = out.pop("oldest_undelivered", None)
        out["oldest_age"] = None if oldest is None else max(0.0, time.time() - oldest)
        if self.relay is not None:
            r = self.relay.figures()
            out.update(
                link=r["state"], delivered=r["delivered"], delivery_rate=r["delivery_rate"],
                dead_lettered=r["dead_lettered"], inflight_batches=r["inflight_batches"],
                live_first=r["live_first"], backfill_left=r["backfill_left"],
                unrecorded=r["unrecorded"], unrecorded_dead_letters=r["unrecorded_dead_letters"],
                record_failures=r["record_failures"],
            )  # fmt: skip
            last_error, error_at = r["last_error"], r["last_error_at"]
        else:
            last_error, error_at = None, 0.0
        if self.sink is not None:
            s = self.sink.figures()
            out["endpoint"] = s.get("endpoint")
            breakers = s.get("breakers") or {}
            out["breakers"] = breakers
            out["breaker"] = (
                breakers.get(out["endpoint"])
                if out["endpoint"] else ",".join(sorted(set(breakers.values()))) or None
            )  # fmt: skip
            # The current error is the newer of the link's and the relay's (each clears its
            # own when that trouble is over): an old one never hides a new one.
            if s.get("last_error") and (
                not last_error or s.get("last_error_at", math.inf) >= error_at
            ):
                last_error = s["last_error"]
        out["last_error"] = last_error
        return out

    def health(self) -> Health:
        f = self.figures()
        if f.get("link") == "connected":
            if f.get("dead_letters"):
                return Health.degraded(f"{f['dead_letters']} dead letters", **f)
            return Health.ok(f"to {f.get('endpoint')}", **f)
        return Health.degraded(f"not connected: {f.get('last_error') or f.get('link')}", **f)

    # -- control verbs --------------------------------------------------------------------------
    async def _cmd_outbox(self, args: dict[str, Any]) -> Any:
        await self._measure()
        return self.figures()

    async def _cmd_retry(self, args: dict[str, Any]) -> Any:
        assert self.relay is not None
        self.relay.retry()
        return {"retrying": True}

    async def _cmd_dead_letters(self, args: dict[str, Any]) -> Any:
        assert self._ctx is not None
        limit = int(args.get("limit", 1000))
        return await self._ctx.store.read(lambda c: outbox.dead_letters(c, limit))

    async def _cmd_requeue(self, args: dict[str, Any]) -> Any:
        assert self._ctx is not None and self.relay is not None
        seqs = args.get("seqs")
        if args.get("all"):
            seqs = None
        elif not isinstance(seqs, list) or not all(isinstance(s, int) for s in seqs) or not seqs:
            raise PayloadError("requeue needs 'seqs' (a list of sequence numbers) or 'all'")
        done = await self._ctx.store.write(lambda c: outbox.requeue(c, seqs))
        self.relay.requeued(done)
        await self._measure()
        return {"requeued": done}
