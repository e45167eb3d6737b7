"""The downlink: a command the cloud sent on the command topic, handed to whoever owns
commands - the control service (`services.control`) in the daemon. A relay without one (a
bare relay in tests and benchmarks) records the request itself, as the owner would."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import cbor2

from gateway import events as ev
from gateway.errors import ConcurrencyError, PayloadError, StoreError
from gateway.sync.codec import parse_command, response_payload

if TYPE_CHECKING:
    from gateway.store import EventStore


@runtime_checkable
class CommandOwner(Protocol):
    """Whoever owns commands: takes a cloud command's payload and records it; returns the
    answer for the response topic (None: accepted, the outcome follows as events)."""

    @property
    def ready(self) -> bool: ...

    async def cloud_command(self, payload: bytes, fmt: str) -> bytes | None: ...


async def record_command(
    store: EventStore, payload: bytes, fmt: str, log: logging.Logger
) -> bytes | None:
    """A valid command becomes one `command.requested` event (the same id twice is still one
    event); an invalid one is answered with the reason and not evented."""
    try:
        cmd = parse_command(payload)
    except PayloadError as exc:
        log.warning("sync: command refused: %s", exc)
        return response_payload(
            fmt, {"status": "rejected", "reason": str(exc), "id": _guess_id(payload)}
        )
    try:
        await store.append(f"command:{cmd.id}", ev.COMMAND_REQUESTED, cmd.data, expected_version=0)
    except ConcurrencyError:
        log.debug("sync: command %s already requested (duplicate delivery)", cmd.id)
    except StoreError as exc:
        return response_payload(fmt, {"status": "unavailable", "reason": str(exc), "id": cmd.id,
                                      "retry_after": getattr(exc, "retry_after", 30)})  # fmt: skip
    return None


class Downlink:
    """The link's command callback: hands each payload to the owner `owner()` names (asked
    at every command: the control service starts after sync), or records it without one."""

    def __init__(
        self,
        store: EventStore,
        fmt: str,
        log: logging.Logger,
        owner: Callable[[], CommandOwner | None] = lambda: None,
    ) -> None:
        self.store = store
        self.fmt = fmt
        self.log = log
        self._owner = owner

    async def __call__(self, payload: bytes) -> bytes | None:
        owner = self._owner()
        if owner is not None and owner.ready:
            return await owner.cloud_command(payload, self.fmt)
        return await record_command(self.store, payload, self.fmt, self.log)


def _guess_id(payload: bytes) -> str | None:
    try:
        obj = json.loads(payload) if payload.lstrip()[:1] == b"{" else cbor2.loads(payload)
    except Exception:
        return None
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and len(cid) <= 128 else None
