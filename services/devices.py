"""Devices: the registry. Configured devices are registered (evented) when they appear or
change in the config and unregistered when they leave it; other sources (CoAP Resource
Directory, BLE adoption) register through events too. Serves the `devices` control verb."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from typing import Any, ClassVar

from gateway import events as ev
from gateway.config import DeviceSpec, GatewayConfig
from gateway.errors import StoreFullError, UsageError
from gateway.events import NewEvent
from gateway.service import Health, Service, ServiceContext
from gateway.store import queries


def _describe(spec: DeviceSpec) -> dict[str, Any]:
    return {
        "source": "config",
        "driver": spec.driver,
        "description": spec.description,
        "enabled": spec.enabled,
        "interval": spec.interval,
        "points": [p.name for p in spec.points],
    }


class DevicesService(Service):
    name: ClassVar[str] = "devices"
    # Registry changes a full store refused: retried until they are recorded.
    _unrecorded: str = ""
    _retry: asyncio.Task[None] | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        ctx.control.register("devices", self._cmd_devices, mutating=False)
        ctx.control.register("devices.forget", self._cmd_forget)  # mutating: audited
        await self._sync(ctx.config)

    async def stop(self) -> None:
        return None

    async def reload(self, config: GatewayConfig) -> None:
        await self._sync(config)

    async def _sync(self, config: GatewayConfig) -> None:
        rows = await self.ctx.store.read(queries.devices)
        known = {r["id"]: r for r in rows if r["source"] == "config"}
        todo: list[NewEvent] = []
        for dev_id, spec in config.devices.items():
            want = _describe(spec)
            have = known.pop(dev_id, None)
            meta_want = {k: v for k, v in want.items() if k not in ("source", "driver")}
            if have is None or have["driver"] != spec.driver or have["meta"] != meta_want:
                todo.append(NewEvent(ev.device_stream(dev_id), ev.DEVICE_REGISTERED, want))
        for dev_id in known:
            todo.append(
                NewEvent(
                    ev.device_stream(dev_id),
                    ev.DEVICE_UNREGISTERED,
                    {"reason": "removed from the configuration"},
                )
            )
        if todo:
            try:
                await self.ctx.store.append_many(todo)
            except StoreFullError as exc:
                # A full store must not stop the daemon (delivery and retention make room).
                if not self._unrecorded:  # said once, not at every retry
                    self.ctx.logger.warning(
                        "devices: %d registry changes not recorded yet: %s; retried until "
                        "there is room", len(todo), exc,
                    )  # fmt: skip
                self._unrecorded = f"{len(todo)} registry changes not recorded yet: {exc}"
                if self._retry is None or self._retry.done():
                    self._retry = self.ctx.create_task(self._retry_sync(), "devices-retry")
                return
        if self._unrecorded:
            self.ctx.logger.info("devices: registry changes recorded")
        self._unrecorded = ""

    async def _retry_sync(self) -> None:
        while self._unrecorded:
            await asyncio.sleep(self.ctx.config.store.check_interval)
            await self._sync(self.ctx.config)

    async def _cmd_devices(self, args: Mapping[str, Any]) -> Any:
        return await self.ctx.store.read(devices_view)

    async def _cmd_forget(self, args: Mapping[str, Any]) -> Any:
        """Forget devices that are not configured (telemetry-only, RD): one
        `device.forgotten` event each, all or none. A configured device is refused: it
        leaves by leaving the config."""
        ids = args.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise UsageError("devices.forget needs 'ids': a non-empty list of device ids")
        coap = self.ctx.config.sections.get("coap")
        configured = set(self.ctx.config.devices) | set(getattr(coap, "credentials", {}))
        rows = await self.ctx.store.read(queries.devices)
        present = {r["id"] for r in rows}
        problems = []
        for dev_id in dict.fromkeys(ids):
            if dev_id in configured:
                problems.append(
                    f"{dev_id!r} is a configured device: remove it from the config and "
                    "reload instead"
                )
            elif dev_id not in present:
                problems.append(f"no device {dev_id!r}")
        if problems:
            raise UsageError("nothing forgotten: " + "; ".join(problems))
        todo = [
            NewEvent(ev.device_stream(d), ev.DEVICE_FORGOTTEN, {"reason": "forgotten by operator"})
            for d in dict.fromkeys(ids)
        ]
        await self.ctx.store.append_many(todo)
        return {"forgotten": list(dict.fromkeys(ids))}

    def health(self) -> Health:
        if self._unrecorded:
            return Health.degraded(self._unrecorded)
        return Health.ok(f"{len(self.ctx.config.devices)} configured")


def devices_view(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Devices with their latest values, for `gatewayctl devices` (daemon or file)."""
    devs = queries.devices(conn)
    latest: dict[str, list[dict[str, Any]]] = {}
    for row in queries.latest(conn):
        latest.setdefault(row["device"], []).append(row)
    for d in devs:
        d["points"] = len(latest.get(d["id"], []))
    return devs
