"""The CoAP resources of the front door: telemetry ingest, device state, Observe, discovery.

Every resource derives from `GatewayResource`, whose `render` sends any exception through
`gateway.coap.errors.error_response` (the one mapping). Block-wise *uploads* are refused
(4.13 with Size1): a request must fit one datagram, so no per-request reassembly state is
kept for anyone (aiocoap's Block1Spool would hold partial uploads for 93 s, unbounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from aiocoap import Code, Message
from aiocoap import resource as coap_resource
from aiocoap.interfaces import ObservableResource

from gateway import events as ev
from gateway import names
from gateway.coap import senml
from gateway.coap.config import CoapConfig
from gateway.coap.errors import error_response
from gateway.coap.lean import block_of
from gateway.errors import (
    AuthError,
    CapacityError,
    ForbiddenError,
    GatewayError,
    NotAcceptableError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
)
from gateway.events import Event, NewEvent
from gateway.store import queries


class Backend:
    """What the resources need from the store: append, and read projections.

    A thin adapter so that the resource layer does not depend on the store's module."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def append_many(self, events: Sequence[NewEvent]) -> list[Event]:
        result: list[Event] = await self.store.append_many(events)
        return result

    def submit(self, events: Sequence[NewEvent]) -> asyncio.Future[Any]:
        """`append_many` without a coroutine: the future resolves after the commit (one
        event, the common case, goes as `append`: the store's cheapest way)."""
        future: asyncio.Future[Any]
        if len(events) == 1:
            e = events[0]
            future = self.store.append(
                e.stream, e.type, e.data, expected_version=e.expected_version, outbox=e.outbox
            )
        else:
            future = self.store.append_many(events)
        return future

    async def latest(self, device: str, point: str | None = None) -> list[tuple[Any, ...]]:
        rows = await self.store.read(lambda c: queries.latest(c, device, point))
        return [(r["point"], r["value"], r["unit"], r["ts"]) for r in rows]

    async def device(self, device: str) -> tuple[Any, ...] | None:
        d = await self.store.read(lambda c: queries.device(c, device))
        if d is None:
            return None
        return (d["driver"], d["source"], d["available"], d["reason"], d["last_seen"])


class Refusals:
    """Requests refused past a cap: all counted, a warning at most once per `interval` s
    saying how many since the last one (a flood is one line a minute, not one per request)."""

    def __init__(self, what: str, log: logging.Logger, interval: float = 60.0) -> None:
        self.what = what
        self.log = log
        self.interval = interval
        self.count = 0
        self._since = 0
        self._warned: float | None = None

    def refuse(self, detail: str) -> None:
        self.count += 1
        self._since += 1
        now = time.monotonic()
        if self._warned is None or now - self._warned >= self.interval:
            self.log.warning("%s: %d refused (latest: %s)", self.what, self._since, detail)
            self._warned = now
            self._since = 0


@dataclass
class Gate:
    """Who may do what: identity from the security context, credentials, known devices."""

    config: CoapConfig
    #: Devices from the config and from [coap] credentials.
    known: set[str] = field(default_factory=set)
    #: Endpoints registered in the Resource Directory (they come and go).
    registered: set[str] = field(default_factory=set)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("gateway.coap"))
    #: Devices of the [devices] config (any driver): no RD endpoint may take their name.
    configured: set[str] = field(default_factory=set)
    #: (min, max) of configured points that have one: device -> point -> limits.
    limits: dict[str, dict[str, tuple[float | None, float | None]]] = field(default_factory=dict)
    #: Devices only telemetry made (neither configured nor registered): at most
    #: `config.max_unknown_devices` of them, each with at most `config.max_unknown_points`
    #: point names; `gatewayctl devices forget` frees room.
    unknown: set[str] = field(default_factory=set)
    unknown_points: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unknown_refusals = Refusals("unknown devices at max_unknown_devices", self.log)
        self.point_refusals = Refusals("points of unknown devices at max_unknown_points", self.log)

    @property
    def unknown_refused(self) -> int:
        return self.unknown_refusals.count + self.point_refusals.count

    def admit(self, device: str, points: Iterable[str] = ()) -> None:
        """Telemetry for `device` is about to be stored: a new unknown name (or point name of
        an unknown device) takes a place under its cap, or is refused with 5.03 + Max-Age."""
        if self.is_known(device):
            return
        if device not in self.unknown and len(self.unknown) >= self.config.max_unknown_devices:
            self.unknown_refusals.refuse(f"{device!r}")
            raise CapacityError(
                f"too many unknown devices ({len(self.unknown)}): not taking {device!r}"
            )
        have = self.unknown_points.get(device, set())
        new = {p for p in points if p not in have}
        cap = self.config.max_unknown_points
        if len(have) + len(new) > cap:
            self.point_refusals.refuse(f"{device!r}")
            raise CapacityError(f"unknown device {device!r} may have at most {cap} points")
        self.unknown.add(device)
        if new:
            self.unknown_points[device] = have | new

    def forget(self, device: str) -> None:
        self.unknown.discard(device)
        self.unknown_points.pop(device, None)

    @staticmethod
    def identity(request: Message) -> str | None:
        return Gate.identity_of(request.remote)

    @staticmethod
    def identity_of(remote: Any) -> str | None:
        """The identity a remote's security context proved (DTLS-PSK, OSCORE), or None."""
        claims = getattr(remote, "authenticated_claims", None) or []
        for claim in claims:
            if isinstance(claim, str):
                return claim
        return None

    def is_known(self, device: str) -> bool:
        return device in self.known or device in self.registered

    def check_unauthenticated(self, device: str | None, *, write: bool = False) -> None:
        """An unauthenticated request about `device`. `write`: it would act as the device
        (post its values, register or remove it): never as a configured device or one with
        credentials, whatever `allow_unauthenticated` says."""
        if device is not None:
            creds = self.config.credentials_for(device)
            if creds is not None and creds.has_any:
                raise AuthError(f"device {device!r} has credentials: use DTLS-PSK or OSCORE")
        if not self.config.allow_unauthenticated:
            raise AuthError("unauthenticated requests are not allowed here")
        if write and device is not None and device in self.known:
            raise ForbiddenError(
                f"device {device!r} is configured: unauthenticated requests cannot act as it"
            )

    def authorize(self, request: Message, device: str, *, write: bool = False) -> None:
        """May the sender of `request` act as (`write`) / read `device`? Raises
        4.01/4.03/4.04."""
        self.authorize_as(self.identity(request), device, write=write)

    def authorize_as(self, who: str | None, device: str, *, write: bool = False) -> None:
        """`authorize` for a sender authenticated as `who` (None: not authenticated)."""
        if who is not None:
            if who != device:
                raise ForbiddenError(f"authenticated as {who!r}, not as {device!r}")
        else:
            self.check_unauthenticated(device, write=write)
        if not self.is_known(device) and not self.config.accept_unknown_devices:
            raise NotFoundError(f"unknown device {device!r}")


def content_format(request: Message) -> int | None:
    cf = request.opt.content_format
    return None if cf is None else int(cf)


@dataclass(frozen=True, slots=True)
class Upload:
    """What the ingest rules look at in a telemetry POST: taken from aiocoap's `Message`
    (`upload_of`) or from a datagram by the fast path (gateway.coap.fast)."""

    payload: bytes
    content_format: int | None
    #: Identity from the security context (None: not authenticated).
    who: str | None
    size1: int | None = None
    #: (block number, more) of a Block1 option.
    block1: tuple[int, bool] | None = None


def upload_of(request: Message) -> Upload:
    block1 = request.opt.block1
    return Upload(
        request.payload,
        content_format(request),
        Gate.identity(request),
        request.opt.size1,
        None if block1 is None else (block1.block_number, bool(block1.more)),
    )


def check_size(request: Message, limit: int) -> None:
    """One datagram, at most `limit` bytes: no block-wise upload, nothing reassembled."""
    check_upload_size(upload_of(request), limit)


def check_upload_size(upload: Upload, limit: int) -> None:
    block1 = upload.block1
    if block1 is not None and (block1[1] or block1[0] != 0):
        raise PayloadTooLargeError(f"block-wise upload not supported: at most {limit} bytes", limit)
    size1 = upload.size1
    if size1 is not None and size1 > limit:
        raise PayloadTooLargeError(f"payload of {size1} bytes is over the limit of {limit}", limit)
    if len(upload.payload) > limit:
        raise PayloadTooLargeError(
            f"payload of {len(upload.payload)} bytes is over the limit of {limit}", limit
        )


def _valid_device(device: str) -> str:
    message = names.problem(device, "device name")
    if message is not None:
        raise PayloadError(message)
    return device


def check_limits(
    limits: dict[str, dict[str, tuple[float | None, float | None]]],
    grouped: dict[str, list[dict[str, Any]]],
) -> None:
    """Posted values of a configured point obey its `min`/`max`: one out of range refuses
    the whole request (4.00 naming the point), so nothing of it is stored."""
    for device, recs in grouped.items():
        points = limits.get(device)
        if not points:
            continue
        for rec in recs:
            bounds = points.get(rec["n"])
            if bounds is None:
                continue
            lo, hi = bounds
            v = rec["v"]
            where = f"point {device}/{rec['n']}"
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise PayloadError(f"{where}: must be a number (it has min/max)")
            if lo is not None and v < lo:
                raise PayloadError(f"{where}: {v:g} is below the minimum {lo:g}")
            if hi is not None and v > hi:
                raise PayloadError(f"{where}: {v:g} is above the maximum {hi:g}")


def group_readings(
    records: Iterable[senml.Record], fixed_device: str | None
) -> dict[str, list[dict[str, Any]]]:
    """Records -> {device: [reading records]}. With `fixed_device` (from the path or the
    security context) a record without base name is a point of that device, and a base name
    must name that device."""
    out: dict[str, list[dict[str, Any]]] = {}
    valid = ""  # the device last found valid (a pack is mostly one device's)
    for r in records:
        if r.base_name:
            device, point = senml.split_name(r.name, r.base_name)
        elif fixed_device is not None:
            device, point = fixed_device, r.name
        else:
            device, point = senml.split_name(r.name)
        if device != valid:
            valid = _valid_device(device)
        message = names.problem(point, "point name")
        if message is not None:
            raise PayloadError(message)
        if fixed_device is not None and device != fixed_device:
            raise ForbiddenError(f"base name names device {device!r}, not {fixed_device!r}")
        value: Any = r.value if r.value is not None else r.sum
        rec = ev.reading_record(point, value, r.unit, r.time)
        if r.sum is not None and r.value is not None:
            rec["s"] = r.sum
        out.setdefault(device, []).append(rec)
    return out


class GatewayResource(coap_resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """Base of our resources: one error mapping; no block-wise state at all.

    Block1 (uploads) is refused by `check_size`; Block2 (large responses) is served without
    state: each block request renders the answer again (projections: cheap) and takes its
    block, with an ETag. aiocoap's Block2Cache would keep every large answer for 93 s per
    (remote, token), for anyone who asks."""

    log = logging.getLogger("gateway.coap")

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False

    async def render(self, request: Message) -> Message:
        try:
            response: Message = await super().render(request)
        except Exception as exc:
            return error_response(exc, self.log)
        block2 = request.opt.block2
        if not response.code.is_successful() or not response.payload:
            return response
        if block2 is not None:
            return block_of(response, block2.block_number, min(block2.size_exponent, 6))
        if len(response.payload) > request.remote.maximum_payload_size:
            return block_of(response, 0, min(request.remote.maximum_block_size_exp, 6))
        return response


class TelemetryResource(GatewayResource):
    """POST /telemetry: SenML CBOR/JSON or a plain CBOR map; 2.04 only after the commit."""

    rt = "gw.telemetry"
    ct = f"{senml.CF_SENML_CBOR} {senml.CF_SENML_JSON} {senml.CF_CBOR}"

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return False  # one datagram in (check_size), a bodiless 2.04 out: nothing to split

    def __init__(self, gate: Gate, backend: Backend, clock: Callable[[], float] = time.time):
        super().__init__()
        self.gate = gate
        self.backend = backend
        self.clock = clock
        self.accepted = 0

    async def ingest(self, request: Message, path_device: str | None) -> Message:
        events = self.prepare(upload_of(request), path_device)
        # The acknowledgement is the commit: nothing is answered before append_many returns.
        await self.backend.append_many(events)
        self.accepted += 1
        return Message(code=Code.CHANGED)

    def prepare(self, upload: Upload, path_device: str | None) -> list[NewEvent]:
        """Every rule of a telemetry POST (size, identity, names, min/max, caps) and its
        events; raises a `GatewayError` for the answer. The one implementation, for the
        aiocoap path (`ingest`) and the fast path alike; the caller appends and answers
        after the commit."""
        check_upload_size(upload, self.gate.config.max_payload)
        who = upload.who
        if who is None and path_device is not None:
            self.gate.check_unauthenticated(path_device, write=True)
        # (Without a device in the path, the devices named in the pack are checked one by
        # one after decoding, so that the refusal can name the device.)
        fixed = path_device or who
        if path_device is not None and who is not None and path_device != who:
            raise ForbiddenError(f"authenticated as {who!r}, not as {path_device!r}")
        cf = upload.content_format
        if cf == senml.CF_CBOR and fixed is None:
            raise PayloadError("a plain CBOR map needs a device: POST it to /d/<device>")
        records = senml.decode(upload.payload, cf, self.clock())
        grouped = group_readings(records, fixed)
        for device in grouped:
            self.gate.authorize_as(who, device, write=True)
        check_limits(self.gate.limits, grouped)
        for device, recs in grouped.items():
            self.gate.admit(device, (rec["n"] for rec in recs))
        return [ev.readings_event(device, recs) for device, recs in grouped.items()]

    async def render_post(self, request: Message) -> Message:
        return await self.ingest(request, None)


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
            return await self.commands_door.post(request, _valid_device(path[0]))
        return await self.telemetry.ingest(request, self.post_device(path))

    @staticmethod
    def post_device(path: Sequence[str]) -> str:
        """The device of a telemetry POST to /d/<path> (the fast path's too)."""
        if len(path) != 1:
            raise NotFoundError("POST telemetry to /d/<device> or /telemetry")
        return _valid_device(path[0])

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
