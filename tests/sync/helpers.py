"""Shared bits of the sync tests: configs, a running relay, bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.config import Issues, Section
from gateway.store import EventStore
from gateway.sync.config import SyncConfig, parse
from gateway.sync.downlink import Downlink
from gateway.sync.link import MqttLink
from gateway.sync.relay import Relay


def sync_config(data: dict[str, Any]) -> SyncConfig:
    issues = Issues()
    cfg = parse(Section(data, "sync", issues))
    issues.raise_if_any()
    return cfg


def mqtt_config(port: int, **extra: Any) -> SyncConfig:
    data: dict[str, Any] = {
        "endpoints": [{"url": f"mqtt://127.0.0.1:{port}"}],
        "retry": {"initial": 0.05, "cap": 0.5},
        "breaker": {"cooldown": 0.5},
        "connect_timeout": 3.0,
    }
    data.update(extra)
    return sync_config(data)


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Bounded poll of something that offers no event (a peer's output, a table)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        res = check()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def outbox_depth(store: EventStore) -> int:
    n: int = await store.read(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone()[0])
    return n


async def dead_letters(store: EventStore) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = await store.read(
        lambda c: c.execute("SELECT seq, stream, reason FROM dead_letters ORDER BY seq").fetchall()
    )
    return rows


@contextlib.asynccontextmanager
async def running_relay(
    store: EventStore, cfg: SyncConfig, gateway_id: str = "gw"
) -> AsyncIterator[Relay]:
    log = logging.getLogger("test.sync")
    link = MqttLink(cfg, gateway_id, log, downlink=Downlink(store, cfg.format, log))
    relay = Relay(store, link, cfg, gateway_id, log)
    task = asyncio.create_task(relay.run(), name="relay")
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def open_store(path: Path, gateway_id: str = "gw") -> AsyncIterator[EventStore]:
    store = await EventStore.open(path, gateway_id=gateway_id)
    try:
        yield store
    finally:
        await store.close()


def check_order(events: list[dict[str, Any]], gateway_id: str = "gw") -> dict[str, list[int]]:
    """Every event once or more; duplicates only with the same key and content; first
    sightings in version order per stream. Returns stream -> versions (first sightings)."""
    seen: dict[str, dict[str, Any]] = {}
    per_stream: dict[str, list[int]] = {}
    for e in events:
        key = e["key"]
        assert key == f"{gateway_id}:{e['seq']}", e
        if key in seen:
            assert seen[key] == e, f"duplicate {key} differs"
            continue
        seen[key] = e
        per_stream.setdefault(e["stream"], []).append(e["version"])
    for stream, versions in per_stream.items():
        assert versions == sorted(versions), f"{stream} out of order: {versions}"
    return per_stream


Awaitable_ = Awaitable


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test with asyncio.run (no pytest plugin needed); keeps the signature
    so fixtures still resolve."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper
