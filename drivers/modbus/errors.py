"""Errors of the Modbus driver that the gateway's hierarchy does not need to know about."""

from __future__ import annotations

from gateway.errors import DeviceUnavailable


class BusBusyError(DeviceUnavailable):
    """The bus already has `queue_size` requests waiting: this one fails at once. Says nothing
    about the device itself, so it does not count toward the device's breaker."""
