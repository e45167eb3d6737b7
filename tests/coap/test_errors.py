"""The one error mapping: our hierarchy to CoAP responses, and 5.00 only for real bugs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiocoap import POST, Message
from aiocoap.message import Direction

from gateway.coap.base import Backend
from gateway.coap.config import CoapConfig
from gateway.coap.errors import error_response
from gateway.coap.gate import Gate
from gateway.coap.ingest import TelemetryResource
from gateway.errors import (
    ConcurrencyError,
    ForbiddenError,
    PayloadTooLargeError,
    StoreFullError,
)
from gateway.events import Event, NewEvent
from gateway.store import EventStore

LOG = logging.getLogger("test.coap.errors")


def test_mapping_codes_and_options() -> None:
    full = error_response(StoreFullError("quota", retry_after=42), LOG)
    assert full.code.dotted == "5.03" and full.opt.max_age == 42
    big = error_response(PayloadTooLargeError("too big", 512), LOG)
    assert big.code.dotted == "4.13" and big.opt.size1 == 512
    assert error_response(ForbiddenError("no"), LOG).code.dotted == "4.03"
    assert error_response(ConcurrencyError("s", 1, 2), LOG).code.dotted == "4.12"
    long = error_response(ForbiddenError("x" * 500), LOG)
    assert len(long.payload) <= 120


def _post(payload: bytes) -> Message:
    msg = Message(code=POST, payload=payload, content_format=110)
    msg.direction = Direction.INCOMING
    return msg


PACK = b'[{"bn":"d1/","n":"t","v":1}]'
OPEN = CoapConfig(allow_unauthenticated=True, accept_unknown_devices=True)


def test_store_shutting_down_is_5_03_with_max_age(tmp_path: Path) -> None:
    async def run() -> Message:
        store = await EventStore.open(tmp_path / "db.sqlite")
        await store.close()  # a real store that is closed: it refuses appends
        resource = TelemetryResource(Gate(OPEN), Backend(store))
        response: Message = await resource.render(_post(PACK))
        return response

    response = asyncio.run(run())
    assert response.code.dotted == "5.03"
    assert response.opt.max_age is not None and response.opt.max_age >= 1


class BrokenBackend(Backend):
    """Stands in for a store with a bug (no real store raises RuntimeError on purpose)."""

    def __init__(self) -> None:
        super().__init__(None)

    async def append_many(self, events: Sequence[NewEvent]) -> list[Event]:
        raise RuntimeError("secret internal detail")


def test_unexpected_exception_is_5_00_logged_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resource = TelemetryResource(Gate(OPEN), BrokenBackend())
    with caplog.at_level(logging.ERROR, logger="gateway.coap"):
        response = asyncio.run(resource.render(_post(PACK)))
    assert response.code.dotted == "5.00"
    assert b"secret" not in response.payload
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "secret internal detail" in str(record.exc_info[1])
