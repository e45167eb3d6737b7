"""The driver interface: one protocol per driver, held by the core, unaware of store and services.

After EdgeX's ProtocolDriver and bleak's backends. Optional abilities (discovery) are
separate protocols; push drivers call `ctx.emit(...)`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

from gateway.config import (
    GENERIC_DEVICE_KEYS,
    GENERIC_POINT_KEYS,
    DeviceSpec,
    Issues,
    PointSpec,
    Section,
)
from gateway.errors import ConfigError, ConfigIssue

#: A reading's value: numbers, booleans, strings, raw bytes; None = "not available".
Value = float | int | bool | str | bytes | None


class RawReading(NamedTuple):
    """One value read from a device. `ts` is the device's own time (Unix seconds) if it has one.
    (A NamedTuple: a poll of a 100-point map makes 100 of them.)"""

    point: str
    value: Value
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class DiscoveredDevice:
    """A device seen on a bus or the air that is not configured (a technician may adopt it)."""

    driver: str
    address: str
    name: str | None = None
    kind: str | None = None  # a format or model, e.g. "bthome", "ruuvi-5"
    rssi: int | None = None
    values: Mapping[str, Any] = field(default_factory=dict)


class Clock(Protocol):
    boot_id: str

    def time(self) -> float: ...
    def monotonic(self) -> float: ...
    def synced(self) -> bool: ...


class DriverContext(Protocol):
    """What a driver may do with the outside world: four things (and a discovery report)."""

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def clock(self) -> Clock: ...

    def emit(self, device_id: str, readings: Sequence[RawReading]) -> None:
        """Hand readings a device pushed (notifications, advertisements) to the core."""

    def set_available(self, device_id: str, available: bool, reason: str = "") -> None:
        """Report a change of a device's availability (the core events it, once per change)."""

    def discovered(self, device: DiscoveredDevice) -> None:
        """Report an unconfigured device that speaks a known format."""


class Driver(abc.ABC):
    """One protocol. The core makes one instance per kind that the config uses."""

    kind: ClassVar[str]

    def __init__(self, ctx: DriverContext, options: Mapping[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.options: Mapping[str, Any] = options or {}

    @classmethod
    def validate_options(
        cls, options: Mapping[str, Any], path: str
    ) -> Sequence[ConfigIssue] | None:
        """Check the `[drivers.<kind>]` table; raise ConfigError with every issue, return
        the warnings (such as a deprecated key). Pure."""
        issues = Issues()
        Section(options, path, issues).done()
        issues.raise_if_any()
        return issues.warnings

    @classmethod
    @abc.abstractmethod
    def validate_device(cls, spec: DeviceSpec) -> Sequence[ConfigIssue] | None:
        """Check a device's driver-specific options and points; raise ConfigError, return
        the warnings (such as a deprecated key). Pure: no I/O, no protocol library import
        (config check must stay cheap)."""

    @classmethod
    def value_kind(cls, spec: DeviceSpec, point: PointSpec) -> str:
        """What a write to `point` takes: "number", "bool", "string" or "any" (the driver's
        encoding decides). Pure, from the config: the control service checks a value against
        it, with the point's other rules, before the driver sees it."""
        return "any"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Bounded; cancels the driver's tasks and closes its connections."""

    @abc.abstractmethod
    async def add_device(self, spec: DeviceSpec) -> None: ...

    @abc.abstractmethod
    async def remove_device(self, device_id: str) -> None: ...

    @abc.abstractmethod
    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        """Read these points now. Raises DriverError subclasses, never returns None."""

    @abc.abstractmethod
    async def write(self, device_id: str, point: PointSpec, value: object) -> None: ...

    #: A push-only driver (BLE advertisements) sets this False: the collection service then
    #: does not poll it and relies on `ctx.emit`.
    polled: ClassVar[bool] = True

    def polls(self, spec: DeviceSpec) -> bool:
        """Whether the collection service polls this device (a driver whose devices differ,
        such as serial streams versus request/response, decides per device)."""
        return self.polled


def device_options(spec: DeviceSpec) -> tuple[Section, Issues]:
    """A Section over a device's driver-specific keys, for `validate_device` to read."""
    issues = Issues()
    sec = Section(spec.options, spec.path, issues, (*GENERIC_DEVICE_KEYS, "points"))
    return sec, issues


def point_options(spec: DeviceSpec, point: PointSpec, issues: Issues) -> Section:
    return Section(point.options, spec.point_path(point.name), issues, GENERIC_POINT_KEYS)


def raise_issues(issues: Issues) -> None:
    if issues:
        raise ConfigError(issues.items)
