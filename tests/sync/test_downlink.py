"""The downlink hands cloud commands to whoever owns commands; without an owner (a bare
relay) the request is recorded as the owner would record it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gateway import events as ev
from gateway.sync.downlink import Downlink
from tests.sync.helpers import aio, open_store

LOG = logging.getLogger("test.sync")


class Owner:
    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.got: list[tuple[bytes, str]] = []

    async def cloud_command(self, payload: bytes, fmt: str) -> bytes | None:
        self.got.append((payload, fmt))
        return b"answer"


@aio
async def test_a_ready_owner_gets_the_payload_and_nothing_is_recorded_here(tmp_path: Path) -> None:
    owner = Owner(ready=True)
    payload = json.dumps({"id": "c-1", "device": "valve", "point": "open", "value": 1}).encode()
    async with open_store(tmp_path / "gw.db") as store:
        answer = await Downlink(store, "json", LOG, lambda: owner)(payload)
        evs = await store.events(0, 100)
    assert answer == b"answer"
    assert owner.got == [(payload, "json")]
    assert [e for e in evs if e.type == ev.COMMAND_REQUESTED] == []


@aio
async def test_without_a_ready_owner_the_request_is_recorded_once(tmp_path: Path) -> None:
    owner = Owner(ready=False)
    payload = json.dumps({"id": "c-1", "device": "valve", "point": "open", "value": 1}).encode()
    async with open_store(tmp_path / "gw.db") as store:
        downlink = Downlink(store, "json", LOG, lambda: owner)
        assert await downlink(payload) is None
        assert await downlink(payload) is None  # the same id again: still one request
        evs = await store.events(0, 100)
    assert owner.got == []
    assert [(e.stream, e.type, e.data["source"]) for e in evs] == [
        ("command:c-1", ev.COMMAND_REQUESTED, "cloud")
    ]
