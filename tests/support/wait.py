"""Bounded waiting in async tests, for state that no event announces (a peer's output file, a
table, a breaker's state). Where the code under test reports something, await that instead
(`drivers.testing.RecordingContext.wait_for`); the bound here only stops a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Bounded poll of something that offers no event; `check` may return an awaitable."""
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
