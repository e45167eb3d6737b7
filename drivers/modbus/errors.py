"""Errors of the Modbus driver that the gateway's hierarchy does not need to know about."""

from __future__ import annotations

from gateway.errors import ConnectError


class BusBusyError(ConnectError):
    """The bus already has `queue_size` requests waiting, or no turn came within the device's
    time-out: this request was never sent. Says nothing about the device itself, so it does
    not count toward the device's breaker; and since nothing reached the device, a write may
    be tried again (the control service does, like any `ConnectError`)."""
