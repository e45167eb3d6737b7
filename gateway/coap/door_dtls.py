"""The datagram layer (gateway.coap.door) for DTLS-PSK: aiocoap's tinydtls server transport
with `parse` and the fast ingest path in front of every decrypted datagram. Its own module:
aiocoap's tinydtls transport is imported only where DTLS is configured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiocoap.message import Message
from aiocoap.transports.tinydtls_server import MessageInterfaceTinyDTLSServer

from gateway.coap.door import Datagram, Door, RejectedError, parse
from gateway.coap.lean import source_of


class DoorDTLS(MessageInterfaceTinyDTLSServer):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's DTLS-PSK server transport with `parse` (and the fast path) in front of the
    decrypted datagrams (the record layer's size is DTLSSocket's business)."""

    door: Door
    #: (plaintext, parsed, remote) -> True if handled (the fast ingest path).
    fast: Callable[[bytes, Datagram, Any], bool] | None = None

    def _received_datagram(self, address: Any, data: bytes) -> None:
        door = self.door
        source = source_of(address)
        try:
            msg = parse(data)
        except RejectedError as exc:
            door.count(exc.kind, exc.detail, source)
            answer = door.answer_rejected(exc, data)
            if answer is not None:
                address.send(answer)
            return
        if msg.changed:
            door.count("elective_dropped", "option dropped", source)
            data = msg.encode()
        fast = self.fast
        if fast is not None and fast(data, msg, address):
            return
        try:
            message = Message.decode(data, remote=address)
        except Exception as exc:
            door.count("undecodable", f"{type(exc).__name__}: {exc}", source)
            return
        try:
            self._mman.dispatch_message(message)
        except Exception as exc:  # a bug: counted and said once a minute, not per datagram
            door.count("internal", f"{type(exc).__name__}: {exc}", source)
