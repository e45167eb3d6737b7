"""Protocol drivers, loaded lazily: only the kinds a config uses are ever imported.

Each driver package must not import its protocol library (pymodbus, bleak, aiocoap,
pyserial) at module level of the module that holds its `Driver` class *validation*:
import it in `start()`/connection code, so `gatewayctl config check` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.base import Driver

#: kind -> "module:Class". The one place a new driver is registered.
DRIVERS: dict[str, str] = {
    "virtual": "drivers.virtual:VirtualDriver",
    "modbus": "drivers.modbus:ModbusDriver",
    "serial": "drivers.serial:SerialDriver",
    "ble": "drivers.ble:BleDriver",
    "coap": "drivers.coap:CoapDriver",
}


def driver_class(kind: str) -> type[Driver]:
    """The Driver class for `kind`, importing its package now. KeyError for unknown kinds."""
    module, _, attr = DRIVERS[kind].partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module), attr)
    return cls
