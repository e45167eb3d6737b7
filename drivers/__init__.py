"""Protocol drivers, loaded lazily: only the kinds a config uses are ever imported.

Each driver package must not import its protocol library (pymodbus, bleak, aiocoap,
pyserial) at module level of the module that holds its `Driver` class *validation*:
import it in `start()`/connection code, so `gatewayctl config check` stays cheap.
A driver is registered in `gateway.parts`, with the rest of the optional parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway import parts
from gateway.parts import DRIVERS as DRIVERS

if TYPE_CHECKING:
    from drivers.base import Driver


def driver_class(kind: str) -> type[Driver]:
    """The Driver class for `kind`, importing its package now. KeyError for unknown kinds."""
    cls: type[Driver] = parts.load(DRIVERS[kind])
    return cls
