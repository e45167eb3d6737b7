"""POST /d/{device}/commands on the CoAP front door: a command from a local panel or device.

Authenticated peers only (DTLS-PSK or OSCORE) whose identity `[auth] coap` gives the
`operator` role (or `admin`); an anonymous peer never sends a command (4.01, answered
small). The payload is a CBOR (60) or JSON (50) map `{"point", "value", "id"?, "timeout"?}`
or one SenML record (`n` = point). 2.01 with the command's location once `command.accepted`
is committed; a refusal is its error class's 4.xx with the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from aiocoap import CREATED, Message

from gateway import errors
from gateway.coap import senml
from gateway.coap.gate import Gate
from gateway.coap.ingest import check_size
from gateway.errors import (
    AuthError,
    ForbiddenError,
    PayloadError,
    UnsupportedFormatError,
    WriteRefusedError,
)

#: reason of a rejection -> its error class (the same CoAP code as on every other door)
REFUSALS: dict[str, type[WriteRefusedError]] = {
    cls.reason: cls
    for cls in (errors.UnknownDeviceError, errors.UnknownPointError, errors.NotWritableError,
                errors.WrongTypeError, errors.OutOfRangeError, errors.DeviceDisabledError,
                errors.RemoteWriteError, errors.CommandExpiredError, errors.QueueFullError)
}  # fmt: skip

Submit = Callable[..., Awaitable[dict[str, Any]]]


class CommandsDoor:
    def __init__(
        self, submit: Submit, role: Callable[[str | None], int], limit: int,
        denied: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        self._submit = submit
        self._role = role  # identity -> services.auth.Role (an int)
        self._limit = limit
        self._denied = denied  # (identity, message): an `auth.denied` event

    def allows(self, request: Message) -> bool:
        from services.auth import Role

        return self._role(Gate.identity(request)) >= Role.OPERATOR

    async def post(self, request: Message, device: str) -> Message:
        from services.auth import Role

        who = Gate.identity(request)
        if who is None:
            raise AuthError("commands need an authenticated peer (DTLS-PSK or OSCORE)")
        if self._role(who) < Role.OPERATOR:
            err = ForbiddenError(f"{who!r} may not send commands: it needs role operator")
            if self._denied is not None:  # authenticated peers only: no event per anonymous packet
                await self._denied(who, f"POST /d/{device}/commands: {err}")
            raise err
        check_size(request, self._limit)
        point, value, cid, timeout = parse(request.payload, request.opt.content_format)
        row = await self._submit(device, point, value, cid=cid, source="coap",
                                 by=f"coap:{who}", timeout=timeout)  # fmt: skip
        if row.get("status") == "rejected":
            cls = REFUSALS.get(str(row.get("reason")), WriteRefusedError)
            raise cls(str(row.get("error") or row.get("reason")))
        body = {"id": row["id"], "status": row["status"]}
        cf = senml.CF_JSON if request.opt.content_format == senml.CF_JSON else senml.CF_CBOR
        payload = json.dumps(body).encode() if cf == senml.CF_JSON else cbor2.dumps(body)
        return Message(code=CREATED, payload=payload, content_format=cf,
                       location_path=("d", device, "commands", str(row["id"])))  # fmt: skip


def parse(payload: bytes, cf: int | None) -> tuple[str, Any, str | None, float | None]:
    """(point, value, id, timeout) from a command's payload."""
    if cf in (senml.CF_CBOR, senml.CF_JSON):
        try:
            obj = json.loads(payload) if cf == senml.CF_JSON else cbor2.loads(payload)
        except (ValueError, cbor2.CBORDecodeError) as exc:
            raise PayloadError(f"command: not a valid {'JSON' if cf == 50 else 'CBOR'} map: "
                               f"{exc}") from None  # fmt: skip
        if not isinstance(obj, dict):
            raise PayloadError("command: must be a map {point, value, id?, timeout?}")
        point, cid, timeout = obj.get("point"), obj.get("id"), obj.get("timeout")
        if not isinstance(point, str):
            raise PayloadError("command: 'point' must be a string")
        if "value" not in obj:
            raise PayloadError("command: 'value' is missing")
        if cid is not None and not isinstance(cid, str):
            raise PayloadError("command: 'id' must be a string")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise PayloadError("command: 'timeout' must be a positive number of seconds")
        return point, obj["value"], cid, None if timeout is None else float(timeout)
    if cf not in (None, senml.CF_SENML_CBOR, senml.CF_SENML_JSON):
        raise UnsupportedFormatError(
            f"content-format {cf} not supported: CBOR (60), JSON (50) or SenML (112, 110)"
        )
    records = senml.decode(payload, cf, time.time())
    if len(records) != 1:
        raise PayloadError(f"command: one SenML record (n = point), got {len(records)}")
    r = records[0]
    return r.name, r.value, None, None
