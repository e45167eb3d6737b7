"""Stores prepared before a daemon runs."""

from __future__ import annotations

from pathlib import Path

from gateway.config import StoreConfig
from gateway.events import NewEvent
from gateway.store import EventStore


async def fill_store(db: Path, used: int, gateway_id: str = "gw") -> None:
    """A store past `used` bytes, written before the daemon runs (a site that filled up)."""
    store = await EventStore.open(db, StoreConfig(quota_mb=64), gateway_id=gateway_id)
    try:
        n = 0
        while store.used_bytes < used:
            await store.append_many(
                [NewEvent("device:old-1", "device.readings", {"r": [n + i, "x" * 100]})
                 for i in range(200)]
            )  # fmt: skip
            n += 200
    finally:
        await store.close()
