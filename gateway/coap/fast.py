"""The fast ingest path: a telemetry POST (to /telemetry or /d/<device>), plain UDP or
DTLS-PSK, answered from the datagram the door already parsed, without aiocoap's per-message
machinery (Message objects, pipes, render tasks, the Site).

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
from collections.abc import Callable
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK as MSG_ACK
from aiocoap.numbers.types import NON as MSG_NON

from gateway.coap.door import CON, NON, Datagram, Door, DoorUDP6
from gateway.coap.errors import error_response
from gateway.coap.lean import LeanMessageManager, cap_for_unproven, dedup_key, source_of
from gateway.coap.resources import Backend, DeviceResource, Gate, TelemetryResource, Upload

URI_HOST, URI_PORT, URI_PATH, CONTENT_FORMAT, SIZE1 = 3, 7, 11, 12, 60
#: Options the fast path understands; any other sends the request to aiocoap.
_OWN = frozenset((URI_HOST, URI_PORT, URI_PATH, CONTENT_FORMAT, SIZE1))
POST = 2
CHANGED = 0x44


class FastIngest:
    """Installed as `DoorUDP6.fast` on each plain UDP endpoint (called with the datagram)
    and as `DoorDTLS.fast` on each DTLS-PSK endpoint (`handle`, with the plaintext)."""

    def __init__(
        self,
        door: Door,
        manager: LeanMessageManager,
        telemetry: TelemetryResource,
        backend: Backend,
        log: logging.Logger,
    ) -> None:
        self.door = door
        self.manager = manager
        self.telemetry = telemetry
        self.backend = backend
        self.log = log
        #: Requests answered here (health).
        self.handled = 0

    def udp(self, transport: DoorUDP6) -> Callable[[bytes, Datagram, Any, Any], bool]:
        """The hook for a plain UDP endpoint."""

        def fast(data: bytes, msg: Datagram, ancdata: Any, address: Any) -> bool:
            return self.handle(
                data,
                msg,
                f"{address[0]} {address[1]} {msg.mid}",  # = lean.dedup_key of the UDP remote
                str(address[0]),  # = lean.source_of
                None,
                lambda answer: transport._reply(answer, ancdata, address),
            )

        return fast

    def dtls(self) -> Callable[[bytes, Datagram, Any], bool]:
        """The hook for a DTLS-PSK endpoint: the identity is the PSK's device."""

        def fast(data: bytes, msg: Datagram, remote: Any) -> bool:
            return self.handle(
                data,
                msg,
                dedup_key(remote, msg.mid),
                source_of(remote),
                Gate.identity_of(remote),
                remote.send,
            )

        return fast

    def handle(
        self,
        data: bytes,
        msg: Datagram,
        key: Any,
        source: str | None,
        who: str | None,
        reply: Callable[[bytes], None],
    ) -> bool:
        """Serve `msg` (parsed from `data`) if it is a telemetry POST of ours; False: not
        ours, aiocoap's. `key`: its duplicate-detection key, `source`: its token bucket,
        `who`: the identity its security context proved (None: none), `reply`: sends."""
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
        if not manager.allow_source(source):
            return True  # dropped: a CON sender retransmits later; counted in the limiter
        new, stored = manager.first_time(key)
        if not new:
            if msg.mtype == CON and stored:
                reply(stored)  # the same answer again (RFC 7252 section 4.5)
            return True  # (no answer yet: the first one is still being stored)
        try:
            path_device = None if device is None else DeviceResource.post_device([device])
            events = self.telemetry.prepare(Upload(msg.payload, cf, who, size1), path_device)
            future = self.backend.submit(events)
        except Exception as exc:
            self._answer_error(exc, data, msg, key, reply)
            return True
        future.add_done_callback(lambda f: self._committed(f, data, msg, key, reply))
        return True

    def _committed(
        self,
        future: asyncio.Future[Any],
        data: bytes,
        msg: Datagram,
        key: Any,
        reply: Callable[[bytes], None],
    ) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._answer_error(exc or asyncio.CancelledError(), data, msg, key, reply)
            return
        self.telemetry.accepted += 1
        token = msg.token
        if msg.mtype == CON:
            head = bytes((0x60 | len(token), CHANGED, msg.mid >> 8, msg.mid & 0xFF))
        else:
            mid = self.door.next_mid()
            head = bytes((0x50 | len(token), CHANGED, mid >> 8, mid & 0xFF))
        answer = head + token
        self.manager.dedup.set_response(key, answer)
        reply(answer)

    def _answer_error(
        self,
        exc: BaseException,
        data: bytes,
        msg: Datagram,
        key: Any,
        reply: Callable[[bytes], None],
    ) -> None:
        response = error_response(exc, self.log)
        if isinstance(exc, asyncio.CancelledError):
            response = Message(code=Code.SERVICE_UNAVAILABLE, max_age=1)
        if self.manager.verify_address:  # (DTLS: the handshake proved the address)
            cut = cap_for_unproven(response, len(data), len(msg.token))
            if cut is not None:
                response = cut
                self.manager.cut += 1
        response.token = msg.token
        if msg.mtype == CON:
            response.mtype, response.mid = MSG_ACK, msg.mid
        else:
            response.mtype, response.mid = MSG_NON, self.door.next_mid()
        answer = response.encode()
        self.manager.dedup.set_response(key, answer)
        reply(answer)
