"""The notification service: alert rules over committed events, one `alert.raised` and one
`alert.cleared` per episode; delivery to local channels is `delivery.py`'s job.

A rule's state is "active" (from the `alerts` projection, so it survives a restart: an active
alert is never raised twice) or "pending" (bad, waiting for `min_duration`; not kept across a
restart: the rule simply waits again). Thresholds have hysteresis: raised above `raise_above`
(below `raise_below`), cleared only below `clear_below` (above `clear_above`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway import events as ev
from gateway.config import GatewayConfig
from gateway.errors import NotFoundError, PayloadError, StoreError
from gateway.events import Event
from gateway.service import Health, HealthState, Service, ServiceContext
from gateway.store import queries
from services.expr import EvalError
from services.notification.config import AlertRule, Channel
from services.notification.delivery import Deliveries
from services.notification.projection import (
    ALERT_ACKED,
    alert_stream,
    alerts,
)

ANOMALY = "anomaly"
PERIODIC = ("outbox_older_than", "store_above", "anomaly", "service_degraded")
CHECK_EVERY = 5.0  # seconds between outbox/store checks


@dataclass
class _State:
    active: bool = False
    episode: int = 0
    pending_since: float | None = None
    timer: asyncio.TimerHandle | None = None
    last_value: Any = None
    last_seq: int | None = None  # the last event that informed the rule
    trigger_seq: int | None = None  # the event that started the pending period
    last_flag: float = 0.0  # anomaly rules: monotonic time of the last flag
    prev: tuple[float, float] | None = None  # rate rules: the previous value and its time


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


class NotificationService(Service):
    name: ClassVar[str] = "notification"

    def __init__(self) -> None:
        self.lag = 0.0  # the store's commit interval: how late a polled reading may arrive
        self.rules: dict[str, AlertRule] = {}
        self.channels: dict[str, Channel] = {}
        self.states: dict[str, _State] = {}
        self.by_point: dict[tuple[str, str], list[AlertRule]] = {}
        self.by_device: dict[str, list[AlertRule]] = {}
        self.inputs: dict[tuple[str, str], Any] = {}
        self.figures = {"evaluated": 0, "raised": 0, "cleared": 0, "delivered": 0,
                        "delivery_failures": 0}  # fmt: skip
        self._lock = asyncio.Lock()
        self.coap: Any = None  # the CoAP `/alerts` resource, when [coap] runs

    # -- life -----------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.logger
        self.lag = ctx.config.store.commit_interval
        # Started again after a crash: states come from the projection, nothing is kept.
        for st in self.states.values():
            if st.timer is not None:
                st.timer.cancel()
        self.states.clear()
        self.inputs.clear()
        self._configure(ctx.config)
        types = [ev.READINGS, ev.DEVICE_AVAILABLE, ev.DEVICE_UNAVAILABLE, ANOMALY]
        self.sub = ctx.bus.subscribe("notification", types=types, maxsize=10_000)
        for row in await ctx.store.read(alerts):
            st = self.states.setdefault(row["id"], _State())
            st.active, st.episode = row["active"], int(row["episode"])
        await self._clear_orphans()
        # Devices known to be down at start (an unavailable rule with no event to wait for).
        for d in await ctx.store.read(queries.devices):
            for rule in self.by_device.get(d["id"], []):
                if d["available"] is False:
                    await self._observe(rule, True, None, None)
                elif d["available"] is True and self.states[rule.name].active:
                    await self._observe(rule, False, None, None)
        ctx.create_task(self._run(), "events")
        if any(r.kind in PERIODIC for r in self.rules.values()):
            ctx.create_task(self._periodic(), "checks")
        self.deliveries = Deliveries(ctx, self.figures, self.log)
        self.deliveries.start(self.channels)
        self._attach_coap()
        ctx.control.register("alerts", self._cmd_alerts, mutating=False)
        ctx.control.register("alerts.ack", self._cmd_ack)

    async def stop(self) -> None:
        self.sub.close()
        for st in self.states.values():
            if st.timer is not None:
                st.timer.cancel()
        await self.deliveries.stop()
        self.ctx.control.unregister("alerts")
        self.ctx.control.unregister("alerts.ack")

    def _attach_coap(self) -> None:
        """`/alerts` on the CoAP front door, when it runs (it starts before this service)."""
        self.coap = None
        try:
            server = getattr(self.ctx.service("coap"), "server", None)
        except KeyError:
            return
        if server is None:
            return
        from services.notification.coap import AlertsResource

        async def active() -> list[dict[str, Any]]:
            return await self.ctx.store.read(lambda c: alerts(c, False))

        self.coap = AlertsResource(active)
        server.site.add_resource(("alerts",), self.coap)

    async def reload(self, config: GatewayConfig) -> None:
        self._configure(config)
        await self._clear_orphans()
        await self.deliveries.reload(self.channels)

    def health(self) -> Health:
        active = sorted(n for n, s in self.states.items() if s.active and n in self.rules)
        return Health.ok(f"{len(active)} active of {len(self.rules)} rules",
                         active=active, **self.figures)  # fmt: skip

    def _configure(self, config: GatewayConfig) -> None:
        self.rules = dict(config.section("alerts", dict) or {})
        self.channels = dict(config.section("notify", dict) or {})
        self.by_point = {}
        self.by_device = {}
        for rule in self.rules.values():
            self.states.setdefault(rule.name, _State())
            refs = list(rule.inputs.values()) if rule.inputs else []
            if rule.point is not None and rule.kind != "anomaly":
                refs.append(rule.point)
            for ref in dict.fromkeys(refs):
                self.by_point.setdefault(ref, []).append(rule)
            if rule.device is not None:
                self.by_device.setdefault(rule.device, []).append(rule)

    async def _clear_orphans(self) -> None:
        """An active alert whose rule left the configuration is cleared (once, with why):
        nothing else would ever clear it."""
        for name, st in list(self.states.items()):
            if name in self.rules or not st.active:
                continue
            data = {"rule": name, "episode": st.episode, "reason": "rule removed"}
            try:
                await self.ctx.store.append(alert_stream(name), ev.ALERT_CLEARED, data)
            except StoreError as exc:
                self.log.warning("alert %s: clear not stored: %s", name, exc)
                continue
            st.active = False
            self.figures["cleared"] += 1

    # -- evaluation -----------------------------------------------------------------------
    async def _run(self) -> None:
        async for e in self.sub:
            device = ev.stream_device(e.stream)
            if device is None:
                continue
            if e.type == ev.READINGS:
                await self._on_readings(device, e)
            elif e.type in (ev.DEVICE_AVAILABLE, ev.DEVICE_UNAVAILABLE):
                for rule in self.by_device.get(device, []):
                    bad = e.type == ev.DEVICE_UNAVAILABLE
                    await self._observe(rule, bad, None, e.seq, e.wall_time)
            elif e.type == ANOMALY:
                await self._on_anomaly(device, e)

    async def _on_readings(self, device: str, e: Event) -> None:
        touched: dict[str, AlertRule] = {}
        for rec in ev.iter_readings(e.data):
            name = rec.get("n")
            rules = self.by_point.get((device, name)) if type(name) is str else None
            if not rules:
                continue
            self.inputs[(device, name)] = rec.get("v")  # type: ignore[index]
            for rule in rules:
                touched[rule.name] = rule
        for rule in touched.values():
            self.figures["evaluated"] += 1
            value: Any
            if rule.kind == "rate_of_change":
                value = self._rate(rule, e)
                if value is None:
                    continue
            elif rule.expr is not None and rule.inputs is not None:
                env = {n: self.inputs.get(ref) for n, ref in rule.inputs.items()}
                try:
                    value = rule.expr.evaluate(env)
                except EvalError:
                    continue  # unknown: the rule keeps its state
            else:
                assert rule.point is not None
                value = self.inputs.get(rule.point)
            bad = self._judge(rule, value)
            if bad is not None:
                await self._observe(rule, bad, value, e.seq, e.wall_time)

    def _rate(self, rule: AlertRule, e: Event) -> float | None:
        """Change per second since the rule's previous reading (by commit time)."""
        assert rule.point is not None
        v = _num(self.inputs.get(rule.point))
        st = self.states[rule.name]
        prev, st.prev = st.prev, (None if v is None else (v, e.wall_time))
        if v is None or prev is None or e.wall_time <= prev[1]:
            return None
        return round((v - prev[0]) / (e.wall_time - prev[1]), 9)

    def _judge(self, rule: AlertRule, value: Any) -> bool | None:
        """True: the condition holds (raise, or stay raised); False: clear; None: unknown."""
        if isinstance(value, bool) and rule.raise_above is None and rule.raise_below is None:
            return value
        v = _num(value)
        if v is None:
            return None
        if rule.raise_above is None and rule.raise_below is None:
            return v != 0
        if self.states[rule.name].active:
            above = rule.clear_below is not None and v >= rule.clear_below
            below = rule.clear_above is not None and v <= rule.clear_above
            return above or below
        return (rule.raise_above is not None and v > rule.raise_above) or (
            rule.raise_below is not None and v < rule.raise_below
        )

    async def _on_anomaly(self, device: str, e: Event) -> None:
        ref = (device, e.data.get("n"))
        for rule in self.rules.values():
            if rule.kind == "anomaly" and rule.point == ref:
                self.states[rule.name].last_flag = time.monotonic()
                await self._observe(rule, True, e.data.get("v"), e.seq, e.wall_time)

    async def _observe(
        self, rule: AlertRule, bad: bool, value: Any, seq: int | None, at: float | None = None
    ) -> None:
        """`at`: the event's time (None: now). `min_duration` is measured in event time: polled
        readings held back by the store's commit interval arrive in bursts, so arrival time
        would squeeze a bad stretch to nothing."""
        st = self.states[rule.name]
        st.last_value = value
        st.last_seq = seq
        if not bad:
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            st.pending_since = None
            if st.active:
                await self._transition(rule, False, value, seq)
            return
        if st.active:
            return
        if rule.min_duration <= 0:
            await self._transition(rule, True, value, seq)
            return
        now = time.time() if at is None else at
        if st.pending_since is None:
            st.pending_since = now
            st.trigger_seq = seq
            # If nothing else comes (a device that stops sending), raise by the clock, once
            # readings of that time have had their commit interval to arrive.
            delay = max(0.0, now + rule.min_duration + self.lag - time.time())
            st.timer = asyncio.get_running_loop().call_later(delay, self._pending_due, rule)
        elif now - st.pending_since >= rule.min_duration:
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            await self._transition(rule, True, value, seq, since=st.pending_since)

    def _pending_due(self, rule: AlertRule) -> None:
        st = self.states[rule.name]
        st.timer = None
        if st.pending_since is not None and not st.active:
            self.ctx.create_task(self._raise_pending(rule, st.pending_since), f"raise:{rule.name}")

    async def _raise_pending(self, rule: AlertRule, since: float) -> None:
        st = self.states[rule.name]
        await self._transition(rule, True, st.last_value, st.last_seq, since=since)

    async def _transition(
        self, rule: AlertRule, raise_: bool, value: Any, seq: int | None, since: float | None = None
    ) -> None:
        async with self._lock:
            st = self.states[rule.name]
            if st.active == raise_:
                return
            if since is not None and st.pending_since != since:
                return  # the condition went away (or started again) in the meantime
            value, seq = (st.last_value, st.last_seq) if since is not None else (value, seq)
            since_seq = st.trigger_seq if since is not None else None
            st.active = raise_
            st.pending_since = None
            data: dict[str, Any] = {"rule": rule.name, "kind": rule.kind,
                                    "severity": rule.severity}  # fmt: skip
            if raise_:
                st.episode += 1
                data["message"] = rule.message or _describe(rule)
            data["episode"] = st.episode
            if value is not None:
                data["value"] = value
            if seq is not None:
                data["at_seq"] = seq
            if since_seq is not None:
                data["since_seq"] = since_seq
            etype = ev.ALERT_RAISED if raise_ else ev.ALERT_CLEARED
            try:
                await self.ctx.store.append(alert_stream(rule.name), etype, data)
            except StoreError as exc:
                st.active = not raise_  # not recorded: it did not happen
                if raise_:
                    st.episode -= 1
                self.log.warning("alert %s: %s not stored: %s", rule.name, etype, exc)
                return
            self.figures["raised" if raise_ else "cleared"] += 1
            if self.coap is not None:
                self.coap.changed()
            log = self.log.warning if raise_ else self.log.info
            log("alert %s %s (%s)", rule.name, "raised" if raise_ else "cleared", value)

    async def _periodic(self) -> None:
        while True:
            # Often enough that an alert is at most a quarter of its limit late.
            bounds = [r.quiet / 4 for r in self.rules.values() if r.kind == "anomaly"]
            bounds += [max(0.25, r.limit / 4) for r in self.rules.values()
                       if r.kind == "outbox_older_than" and r.limit]  # fmt: skip
            await asyncio.sleep(min([CHECK_EVERY, *bounds]))
            stats = None
            for rule in list(self.rules.values()):
                if rule.kind == "anomaly":
                    st = self.states[rule.name]
                    if st.active and time.monotonic() - st.last_flag >= rule.quiet:
                        await self._observe(rule, False, None, None)
                    continue
                if rule.kind == "service_degraded":
                    await self._check_service(rule)
                    continue
                if rule.kind not in ("outbox_older_than", "store_above"):
                    continue
                if stats is None:
                    stats = await self.ctx.store.stats()
                assert rule.limit is not None
                if rule.kind == "outbox_older_than":
                    oldest = stats.oldest_undelivered
                    age = 0.0 if oldest is None else time.time() - oldest
                    await self._observe(rule, age > rule.limit, age, None)
                else:
                    pct = 100.0 * stats.used_bytes / max(1, stats.quota_bytes)
                    await self._observe(rule, pct > rule.limit, float(f"{pct:.3g}"), None)

    async def _check_service(self, rule: AlertRule) -> None:
        assert rule.service is not None
        try:
            state = self.ctx.service(rule.service).health().state
        except KeyError:
            return  # not running in this configuration: nothing to judge
        except Exception as exc:
            self.log.debug("health of %s failed: %s", rule.service, exc)
            state = HealthState.DEGRADED
        await self._observe(rule, state != HealthState.OK, str(state), None)

    # -- control verbs --------------------------------------------------------------------
    async def _cmd_alerts(self, args: Mapping[str, Any]) -> Any:
        include = bool(args.get("all"))
        return await self.ctx.store.read(lambda c: alerts(c, include))

    async def _cmd_ack(self, args: Mapping[str, Any]) -> Any:
        alert_id = args.get("id")
        if not isinstance(alert_id, str) or alert_id not in self.rules:
            raise NotFoundError(f"no alert rule {alert_id!r}")
        st = self.states[alert_id]
        if not st.active:
            raise PayloadError(f"alert {alert_id} is not active")
        by = args.get("by")
        data = {"episode": st.episode, "by": by if isinstance(by, str) and by else "unknown"}
        e = await self.ctx.store.append(alert_stream(alert_id), ALERT_ACKED, data)
        if self.coap is not None:
            self.coap.changed()
        return {"seq": e.seq, "episode": st.episode}


def _describe(rule: AlertRule) -> str:
    if rule.kind == "device_unavailable":
        return f"device {rule.device} unavailable"
    if rule.kind == "outbox_older_than":
        return f"outbox backlog older than {rule.limit:g} s"
    if rule.kind == "service_degraded":
        return f"service {rule.service} degraded"
    if rule.kind == "store_above":
        return f"store above {rule.limit:g} % of its quota"
    what = "/".join(rule.point) if rule.point else (rule.expr.text if rule.expr else "")
    if rule.kind == "anomaly":
        return f"anomaly on {what}"
    if rule.kind == "rate_of_change":
        what = f"rate of change of {what} (per s)"
    parts = []
    if rule.raise_above is not None:
        parts.append(f"above {rule.raise_above:g}")
    if rule.raise_below is not None:
        parts.append(f"below {rule.raise_below:g}")
    return f"{what} {' or '.join(parts)}".strip() if parts else f"{what} holds"
