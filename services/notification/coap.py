"""CoAP `/alerts` on the front door: the active alerts, observable (a siren relay or a panel
on DTLS-PSK observes it and hears every raise, clear and acknowledgement). Authenticated
peers only (DTLS-PSK or OSCORE): the list describes the site, and an anonymous peer gets
no answer larger than its request. Imported only when both `[coap]` and `[alerts]` run."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap.interfaces import ObservableResource

from gateway.coap.base import GatewayResource
from gateway.coap.gate import Gate
from gateway.errors import AuthError, UnsupportedFormatError

CF_JSON = 50
CF_CBOR = 60
MAX_OBSERVERS = 64


class AlertsResource(GatewayResource, ObservableResource):  # type: ignore[misc]
    rt = "gw.alerts"

    def __init__(self, read: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        super().__init__()
        self._read = read
        self._observers: set[Any] = set()

    def get_link_description(self) -> dict[str, Any]:
        return {"rt": self.rt, "obs": None}

    @property
    def observers(self) -> int:
        return len(self._observers)

    async def render_get(self, request: Message) -> Message:
        if Gate.identity(request) is None:
            raise AuthError("/alerts needs an authenticated peer (DTLS-PSK or OSCORE)")
        accept = request.opt.accept
        cf = CF_JSON if accept is None else int(accept)
        if cf not in (CF_JSON, CF_CBOR):
            raise UnsupportedFormatError(f"cannot answer in content-format {cf}; available: 50, 60")
        body = [
            {"id": a["id"], "severity": a["severity"], "since": a["raised_at"],
             "episode": a["episode"], "value": a["value"], "message": a["message"],
             "acked_by": a["acked_by"]}
            for a in await self._read()
        ]  # fmt: skip
        payload = (
            json.dumps(body, separators=(",", ":"), default=str).encode()
            if cf == CF_JSON
            else bytes(cbor2.dumps(body))
        )
        return Message(payload=payload, content_format=cf)

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        # Not accepted: the request is answered once (an anonymous one with 4.01).
        if Gate.identity(request) is None or len(self._observers) >= MAX_OBSERVERS:
            return
        self._observers.add(serverobservation)
        serverobservation.accept(lambda: self._observers.discard(serverobservation))

    def changed(self) -> None:
        """An alert was raised, cleared or acknowledged: observers get the new list."""
        for so in list(self._observers):
            so.trigger()
