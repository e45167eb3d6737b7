"""What every resource of the CoAP front door builds on: `Backend` (the store, as the
resources need it) and `GatewayResource` (one error mapping, stateless Block2).

Every resource derives from `GatewayResource`, whose `render` sends any exception through
`gateway.coap.errors.error_response` (the one mapping). Block-wise *uploads* are refused
(4.13 with Size1): a request must fit one datagram, so no per-request reassembly state is
kept for anyone (aiocoap's Block1Spool would hold partial uploads for 93 s, unbounded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiocoap import Message
from aiocoap import resource as coap_resource

from gateway.coap.errors import error_response
from gateway.coap.lean import block_of
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
