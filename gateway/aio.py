"""Small asyncio helpers shared by the daemon's parts."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, timeout: float | None = None) -> None:
    """Cancel tasks and wait (bounded by `timeout`) until they have finished.

    Unlike `with suppress(CancelledError): await task`, this does not swallow a cancellation of
    the *caller* (a stop() cancelled by its own time-out must stop, not carry on)."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    if live:
        done, _ = await asyncio.wait(live, timeout=timeout)
        for t in done:
            if not t.cancelled():
                t.exception()  # retrieved: it was reported (or not worth it) where it happened
