"""The read side of the CoAP front door: device state and latest values under /d/, with
Observe, and discovery (/.well-known/core). `POST /d/<device>` goes to ingest
(gateway.coap.ingest), `/d/<device>/commands` to the control service's door."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap import resource as coap_resource
from aiocoap.interfaces import ObservableResource

from gateway import events as ev
from gateway.coap import senml
from gateway.coap.base import Backend, GatewayResource
from gateway.coap.gate import Gate, Refusals
from gateway.coap.ingest import TelemetryResource, Upload, check_size, valid_device
from gateway.errors import GatewayError, NotAcceptableError, NotFoundError
from gateway.events import Event

# The names gateway/coap/{fast,rd,service}.py import from here (their homes: base, gate, ingest).
__all__ = [
    "Backend",
    "DeviceResource",
    "Gate",
    "GatewayResource",
    "Refusals",
    "TelemetryResource",
    "Upload",
    "WellKnownCore",
    "check_size",
]


def _accept(request: Message, allowed: Sequence[int], default: int) -> int:
    accept = request.opt.accept
    if accept is None:
        return default
    if int(accept) not in allowed:
        raise NotAcceptableError(
            f"cannot answer in content-format {int(accept)}; "
            f"available: {', '.join(map(str, allowed))}"
        )
    return int(accept)


def _encode_any(value: Any, cf: int) -> bytes:
    if cf == senml.CF_JSON:
        return json.dumps(value, separators=(",", ":"), default=repr).encode("utf-8")
    return bytes(cbor2.dumps(value))


def _senml_value(value: Any) -> float | str | bool | bytes | None:
    if isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value) if isinstance(value, float) else value
    return None if value is None else str(value)


@dataclass
class _Observed:
    observations: set[Any] = field(default_factory=set)
    #: the values last sent to these observers (point -> value)
    values: dict[str, Any] = field(default_factory=dict)


class DeviceResource(GatewayResource, coap_resource.PathCapable, ObservableResource):  # type: ignore[misc]
    """/d/{device} (state, POST telemetry), /d/{device}/{point} (latest as SenML),
    /d/{device}/commands (pending commands). All GETs are observable."""

    rt = "gw.device"

    def __init__(self, gate: Gate, backend: Backend, telemetry: TelemetryResource) -> None:
        super().__init__()
        self.gate = gate
        self.backend = backend
        self.telemetry = telemetry
        self._observed: dict[tuple[str, ...], _Observed] = {}
        #: Pending commands per device, filled by the control service (set_commands).
        self.commands: dict[str, list[Any]] = {}
        #: The control service's door for POST /d/{device}/commands: `post(request, device)`
        #: and `allows(request)` (a peer whose role may command reads every device's list).
        self.commands_door: Any = None

    # -- paths ----------------------------------------------------------------------------
    @staticmethod
    def _path(request: Message) -> tuple[str, ...]:
        path = tuple(request.opt.uri_path)
        if not path or len(path) > 2 or not path[0]:
            raise NotFoundError("use /d/<device>, /d/<device>/<point> or /d/<device>/commands")
        return path

    def get_link_description(self) -> dict[str, Any] | None:
        return None  # listed per device by get_resources_as_linkheader

    def get_resources_as_linkheader(self) -> Any:
        from aiocoap.util.linkformat import LinkFormat

        return LinkFormat([])  # per device and per asker: WellKnownCore.device_links

    def device_links(self, request: Message) -> list[Any]:
        """/d/<device> for the devices the sender of `request` may read: its own when
        authenticated, else those open to it; a device list, not an inventory dump (<= 64)."""
        from aiocoap.util.linkformat import Link

        who = self.gate.identity(request)
        names = [who] if who is not None else sorted(self.gate.known | self.gate.registered)
        links = []
        for device in names:
            try:
                self.gate.authorize(request, device)
            except GatewayError:
                continue
            links.append(Link(f"/d/{device}", rt="gw.device", obs=None))
            if len(links) >= 64:
                break
        return links

    # -- rendering ------------------------------------------------------------------------
    async def render_get(self, request: Message) -> Message:
        path = self._path(request)
        device = path[0]
        self._authorize_read(request, path)
        if len(path) == 1:
            return await self._state(request, device)
        if path[1] == "commands":
            cf = _accept(request, (senml.CF_CBOR, senml.CF_JSON), senml.CF_CBOR)
            pending = self.commands.get(device, [])
            return Message(payload=_encode_any(pending, cf), content_format=cf)
        return await self._point(request, device, path[1])

    def _authorize_read(self, request: Message, path: tuple[str, ...]) -> None:
        door = self.commands_door
        if not (path[1:] == ("commands",) and door is not None and door.allows(request)):
            self.gate.authorize(request, path[0])

    async def render_post(self, request: Message) -> Message:
        path = self._path(request)
        if path[1:] == ("commands",) and self.commands_door is not None:
            return await self.commands_door.post(request, valid_device(path[0]))
        return await self.telemetry.ingest(request, self.post_device(path))

    @staticmethod
    def post_device(path: Sequence[str]) -> str:
        """The device of a telemetry POST to /d/<path> (the fast path's too)."""
        if len(path) != 1:
            raise NotFoundError("POST telemetry to /d/<device> or /telemetry")
        return valid_device(path[0])

    async def _state(self, request: Message, device: str) -> Message:
        cf = _accept(request, (senml.CF_CBOR, senml.CF_JSON), senml.CF_CBOR)
        row = await self.backend.device(device)
        rows = await self.backend.latest(device)
        if row is None and not rows and not self.gate.is_known(device):
            raise NotFoundError(f"no device {device!r}")
        driver, source, available, reason, last_seen = row or (None, None, None, None, None)
        points = {
            p: {"v": _senml_value(v), **({"u": u} if u else {}), "t": ts} for p, v, u, ts in rows
        }
        state = {
            "device": device,
            "driver": driver,
            "source": source,
            "available": None if available is None else bool(available),
            "reason": reason,
            "last_seen": last_seen,
            "points": points,
        }
        self._remember((device,), {p: v for p, v, _u, _t in rows})
        return Message(payload=_encode_any(state, cf), content_format=cf)

    async def _point(self, request: Message, device: str, point: str) -> Message:
        cf = _accept(request, (senml.CF_SENML_CBOR, senml.CF_SENML_JSON), senml.CF_SENML_CBOR)
        rows = await self.backend.latest(device, point)
        if not rows:
            raise NotFoundError(f"no value for {device!r} point {point!r} yet")
        p, value, unit, ts = rows[0]
        self._remember((device, point), {p: value})
        rec = senml.Record(f"{device}/{p}", _senml_value(value), unit, ts)
        return Message(payload=senml.encode([rec], cf, f"{device}/"), content_format=cf)

    # -- observation ----------------------------------------------------------------------
    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        try:
            path = self._path(request)
            self._authorize_read(request, path)
        except Exception:
            return  # the render that follows answers with the error
        total = sum(len(o.observations) for o in self._observed.values())
        if total >= self.gate.config.max_observations:
            self.log.info("observation refused: %d observations already", total)
            return
        entry = self._observed.setdefault(path, _Observed())
        entry.observations.add(serverobservation)

        def cancel() -> None:
            entry.observations.discard(serverobservation)
            if not entry.observations and self._observed.get(path) is entry:
                del self._observed[path]

        serverobservation.accept(cancel)

    def _remember(self, path: tuple[str, ...], values: dict[str, Any]) -> None:
        entry = self._observed.get(path)
        if entry is not None:
            entry.values.update(values)

    @property
    def observation_count(self) -> int:
        return sum(len(o.observations) for o in self._observed.values())

    def on_commit(self, events: Sequence[Event]) -> None:
        """Store listener: notify observers whose value changed in committed events."""
        if not self._observed:
            return
        for e in events:
            device = ev.stream_device(e.stream)
            if device is None:
                continue
            if e.type == ev.READINGS:
                changed: set[tuple[str, ...]] = set()
                for rec in ev.iter_readings(e.data):
                    point, value = rec.get("n"), rec.get("v")
                    if not isinstance(point, str):
                        continue
                    paths: tuple[tuple[str, ...], ...] = ((device, point), (device,))
                    for path in paths:
                        entry = self._observed.get(path)
                        if entry is not None and entry.values.get(point, _MISSING) != value:
                            entry.values[point] = value
                            changed.add(path)
                for path in changed:
                    self._trigger(path)
            elif e.type in (
                ev.DEVICE_AVAILABLE,
                ev.DEVICE_UNAVAILABLE,
                ev.DEVICE_REGISTERED,
                ev.DEVICE_UNREGISTERED,
            ):
                self._trigger((device,))

    def set_commands(self, device: str, commands: list[Any]) -> None:
        """The control service's hook: the commands waiting for `device` changed."""
        if commands:
            self.commands[device] = list(commands)
        else:
            self.commands.pop(device, None)
        self._trigger((device, "commands"))

    def _trigger(self, path: tuple[str, ...]) -> None:
        entry = self._observed.get(path)
        if entry is None:
            return
        for so in list(entry.observations):
            so.trigger()


_MISSING = object()


class WellKnownCore(GatewayResource):
    """/.well-known/core (RFC 6690), with the `href`, `rt`, `if`... query filters.

    It obeys the access rules of what it lists: nothing for an unauthenticated sender where
    unauthenticated requests are refused (4.01), and for anyone only the devices they may
    read. No implementation-information link (it named the library and its version)."""

    def __init__(self, site: coap_resource.Site, gate: Gate, devices: DeviceResource) -> None:
        super().__init__()
        self.site = site
        self.gate = gate
        self.devices = devices

    def get_link_description(self) -> dict[str, Any] | None:
        return None

    async def render_get(self, request: Message) -> Message:
        if self.gate.identity(request) is None:
            self.gate.check_unauthenticated(None)
        links = self.site.get_resources_as_linkheader()
        links.links = list(links.links) + self.devices.device_links(request)
        wkc = coap_resource.WKCResource(lambda: links, impl_info=None)
        response: Message = await wkc.render_get(request)
        return response
