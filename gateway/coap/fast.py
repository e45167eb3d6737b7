"""The fast ingest path: a plain-UDP telemetry POST (to /telemetry or /d/<device>) answered
from the datagram the door already parsed, without aiocoap's per-message machinery (Message
objects, pipes, render tasks, the Site).

Nothing about the rules is its own: the token bucket and the RFC 7252 section 4.5 duplicate
detection are the transport's `LeanMessageManager`'s (same buckets, same cache, same keys),
every ingest rule is `TelemetryResource.prepare` (size, identity, names, min/max, caps),
errors go through `error_response`, and answers to unproven peers through
`cap_for_unproven` (3x the request). As on the aiocoap path, the 2.04 is sent only when the
store's future for the append resolves, i.e. after the commit.

Anything else (another method or path, Block1, Observe, OSCORE, No-Response, Echo...) is
left to aiocoap: `__call__` returns False.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK as MSG_ACK
from aiocoap.numbers.types import NON as MSG_NON

from gateway.coap.door import CON, NON, Datagram, DoorUDP6
from gateway.coap.errors import error_response
from gateway.coap.lean import LeanMessageManager, cap_for_unproven
from gateway.coap.resources import Backend, DeviceResource, TelemetryResource, Upload

URI_HOST, URI_PORT, URI_PATH, CONTENT_FORMAT, SIZE1 = 3, 7, 11, 12, 60
#: Options the fast path understands; any other sends the request to aiocoap.
_OWN = frozenset((URI_HOST, URI_PORT, URI_PATH, CONTENT_FORMAT, SIZE1))
POST = 2
CHANGED = 0x44


class FastIngest:
    """Installed as `DoorUDP6.fast` on each plain UDP endpoint."""

    def __init__(
        self,
        transport: DoorUDP6,
        manager: LeanMessageManager,
        telemetry: TelemetryResource,
        backend: Backend,
        log: logging.Logger,
    ) -> None:
        self.transport = transport
        self.manager = manager
        self.telemetry = telemetry
        self.backend = backend
        self.log = log
        #: Requests answered here (health).
        self.handled = 0

    def __call__(self, data: bytes, msg: Datagram, ancdata: Any, address: Any) -> bool:
        if msg.code != POST or msg.mtype > NON:
            return False
        path: list[bytes] = []
        cf = size1 = None
        for number, value in msg.options:
            if number == URI_PATH:
                path.append(value)
            elif number == CONTENT_FORMAT:
                cf = int.from_bytes(value, "big")
            elif number == SIZE1:
                size1 = int.from_bytes(value, "big")
            elif number not in _OWN:
                return False
        if len(path) == 1 and path[0] == b"telemetry":
            device = None
        elif len(path) == 2 and path[0] == b"d" and path[1]:
            device = path[1].decode()  # UTF-8: the door checked it
        else:
            return False
        manager = self.manager
        self.handled += 1
        if not manager.allow_source(str(address[0])):
            return True  # dropped: a CON sender retransmits later; counted in the limiter
        key = f"{address[0]} {address[1]} {msg.mid}"  # = lean.dedup_key of the UDP remote
        new, stored = manager.first_time(key)
        if not new:
            if msg.mtype == CON and stored:
                self.transport._reply(stored, ancdata, address)  # the same answer again
            return True  # (no answer yet: the first one is still being stored)
        try:
            path_device = None if device is None else DeviceResource.post_device([device])
            events = self.telemetry.prepare(Upload(msg.payload, cf, None, size1), path_device)
            future = self.backend.submit(events)
        except Exception as exc:
            self._answer_error(exc, data, msg, key, ancdata, address)
            return True
        future.add_done_callback(
            lambda f: self._committed(f, data, msg, key, ancdata, address)
        )  # fmt: skip
        return True

    def _committed(
        self, future: asyncio.Future[Any], data: bytes, msg: Datagram, key: str, anc: Any, to: Any
    ) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._answer_error(exc or asyncio.CancelledError(), data, msg, key, anc, to)
            return
        self.telemetry.accepted += 1
        token = msg.token
        if msg.mtype == CON:
            head = bytes((0x60 | len(token), CHANGED, msg.mid >> 8, msg.mid & 0xFF))
        else:
            mid = self.transport.door.next_mid()
            head = bytes((0x50 | len(token), CHANGED, mid >> 8, mid & 0xFF))
        answer = head + token
        self.manager.dedup.set_response(key, answer)
        self.transport._reply(answer, anc, to)

    def _answer_error(
        self, exc: BaseException, data: bytes, msg: Datagram, key: str, anc: Any, to: Any
    ) -> None:
        response = error_response(exc, self.log)
        if isinstance(exc, asyncio.CancelledError):
            response = Message(code=Code.SERVICE_UNAVAILABLE, max_age=1)
        cut = cap_for_unproven(response, len(data), len(msg.token))
        if cut is not None:
            response = cut
            self.manager.cut += 1
        response.token = msg.token
        if msg.mtype == CON:
            response.mtype, response.mid = MSG_ACK, msg.mid
        else:
            response.mtype, response.mid = MSG_NON, self.transport.door.next_mid()
        answer = response.encode()
        self.manager.dedup.set_response(key, answer)
        self.transport._reply(answer, anc, to)
