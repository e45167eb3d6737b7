"""Telemetry ingest at the CoAP front door: the rules of a telemetry POST (size, identity,
names, min/max, caps) and `POST /telemetry`; the one implementation for the aiocoap path
and the fast path (gateway.coap.fast)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiocoap import Code, Message

from gateway import events as ev
from gateway import names
from gateway.coap import senml
from gateway.coap.base import Backend, GatewayResource
from gateway.coap.gate import Gate
from gateway.errors import ForbiddenError, PayloadError, PayloadTooLargeError
from gateway.events import NewEvent


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


def valid_device(device: str) -> str:
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


#: Point names found valid lately (a gateway sees the same few names in every pack: a set
#: lookup instead of the name rule's regular expression for each reading).
_valid_points: set[str] = set()


def group_readings(
    records: Iterable[senml.Record], fixed_device: str | None
) -> dict[str, list[dict[str, Any]]]:
    """Records -> {device: [reading records]}. With `fixed_device` (from the path or the
    security context) a record without base name is a point of that device, and a base name
    must name that device."""
    out: dict[str, list[dict[str, Any]]] = {}
    valid = ""  # the device last found valid (a pack is mostly one device's)
    known = _valid_points
    for r in records:
        if r.base_name:
            device, point = senml.split_name(r.name, r.base_name)
        elif fixed_device is not None:
            device, point = fixed_device, r.name
        else:
            device, point = senml.split_name(r.name)
        if device != valid:
            valid = valid_device(device)
        if point not in known:
            message = names.problem(point, "point name")
            if message is not None:
                raise PayloadError(message)
            if len(known) >= 4096:
                known.clear()
            known.add(point)
        if fixed_device is not None and device != fixed_device:
            raise ForbiddenError(f"base name names device {device!r}, not {fixed_device!r}")
        # (ev.reading_record, inlined: once per reading)
        value: Any = r.value
        if value is None:
            value = r.sum
        rec: dict[str, Any] = {"n": point, "v": value}
        if r.unit is not None:
            rec["u"] = r.unit
        if r.time is not None:
            rec["t"] = r.time
        if r.sum is not None and r.value is not None:
            rec["s"] = r.sum
        group = out.get(device)
        if group is None:
            out[device] = [rec]
        else:
            group.append(rec)
    return out


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
