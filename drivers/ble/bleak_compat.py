"""Every use of bleak's private names, in one place (pyproject caps bleak).

bleak keeps one BlueZ D-Bus connection per event loop (`bluezdbus.manager._global_instances`)
and offers no way to close it; a short-lived loop (`gatewayctl probe ble`, a test) closes it
itself so the loop ends without an open socket. `check()` verifies the names used; when they
differ the connection is left to bleak (its stock path: it finalizes a closed loop's
connection when the next one is made), said once in the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("drivers.ble")

_checked: bool | None = None


def check(logger: logging.Logger = log) -> bool:
    """Whether bleak's manager internals have the shape relied on (once per process;
    `reset()` forgets the answer); if not, one line in the log."""
    global _checked
    if _checked is None:
        _checked = _shape_ok()
        if not _checked:
            from importlib.metadata import version

            logger.warning(
                "BLE: bleak %s internals differ (bluezdbus.manager._global_instances, "
                "BlueZManager._bus): its D-Bus connection is left to bleak",
                version("bleak"),
            )
    return _checked


def reset() -> None:
    """Forget the checked answer (tests that simulate other internals)."""
    global _checked
    _checked = None


def _shape_ok() -> bool:
    try:
        from bleak.backends.bluezdbus import manager
    except ImportError:
        return False
    if not isinstance(getattr(manager, "_global_instances", None), dict):
        return False
    fresh: Any = manager.BlueZManager()  # no I/O until async_init()
    return all(hasattr(fresh, name) for name in ("_bus", "_bus_watcher_task"))


async def close_manager(wait: bool = False) -> None:
    """Close the D-Bus connection bleak keeps for the running loop (stock path: nothing;
    bleak finalizes it later). `wait`: until bleak's watcher of that connection has ended."""
    if not check():
        return
    from bleak.backends.bluezdbus import manager

    inst = manager._global_instances.pop(asyncio.get_running_loop(), None)
    if inst is None or inst._bus is None:
        return
    inst._bus.disconnect()
    task = inst._bus_watcher_task
    if wait and task is not None:
        await asyncio.wait({task}, timeout=5)
