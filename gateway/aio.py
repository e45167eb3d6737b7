"""Small asyncio helpers shared by the daemon's parts.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that lands just as the awaited
thing completes (it returns the result instead), and the cancelled task then runs on: use
`asyncio.timeout()` or `wait_event` on any path that may be cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

#: How long a cancelled task may run on before it is cancelled again: a library below it
#: (3.11's `wait_for`, in pymodbus or bleak) may have swallowed the first cancellation.
REDELIVER_AFTER = 0.5


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, timeout: float | None = None) -> None:
    """Cancel tasks and wait (bounded by `timeout`) until they have finished.

    A task still running `REDELIVER_AFTER` s after its cancellation is cancelled again, until
    it ends: a cancellation swallowed on the way down cannot leave the caller waiting forever.
    Unlike `with suppress(CancelledError): await task`, this does not swallow a cancellation of
    the *caller* (a stop() cancelled by its own time-out must stop, not carry on)."""
    pending = {t for t in tasks if t is not None and not t.done()}
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while pending:
        for t in pending:
            t.cancel()
        step = REDELIVER_AFTER if deadline is None else min(REDELIVER_AFTER, deadline - loop.time())
        if step <= 0:
            return
        done, pending = await asyncio.wait(pending, timeout=step)
        for t in done:
            if not t.cancelled():
                t.exception()  # retrieved: it was reported (or not worth it) where it happened


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` s have passed; True when it is set. Unlike
    `wait_for(event.wait(), timeout)`, a cancellation of the caller always propagates."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
