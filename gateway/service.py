"""The in-process service contract: name, requires, start, stop, health.

A service does its long-running work in tasks made with `ctx.create_task`: the supervisor
watches them, and a task that raises counts as a crash of its service (restarted with backoff).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import asyncio

    from gateway.bus import Bus
    from gateway.config import GatewayConfig
    from gateway.control import ControlServer
    from gateway.store import EventStore


class HealthState(enum.StrEnum):
    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"  # working, but something needs attention (a device down, a backlog)
    FAILED = "failed"  # crashed; the supervisor is restarting it
    CRASH_LOOP = "crash-loop"  # crashed repeatedly; still retried, but at the longest backoff
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, detail: str = "", **figures: Any) -> Health:
        return cls(HealthState.OK, detail, figures)

    @classmethod
    def degraded(cls, detail: str, **figures: Any) -> Health:
        return cls(HealthState.DEGRADED, detail, figures)


class ServiceContext(abc.ABC):
    """What a service gets from the supervisor."""

    config: GatewayConfig
    store: EventStore
    bus: Bus
    control: ControlServer
    logger: logging.Logger

    @abc.abstractmethod
    def create_task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A supervised task: if it raises, the service is restarted."""

    @abc.abstractmethod
    def service(self, name: str) -> Service:
        """Another running service (one this service `requires`)."""


class Service(abc.ABC):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    async def start(self, ctx: ServiceContext) -> None:
        """Set up and return once serving; long work goes in `ctx.create_task`."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Bounded: release what start() took. The supervisor cancels the service's tasks."""

    def health(self) -> Health:
        return Health.ok()

    def before_serving(self, control: ControlServer, config: GatewayConfig) -> None:  # noqa: B027
        """Called once before the control socket opens and any service starts: what the socket
        must enforce from its first request on (the auth service's roles). Default: nothing."""

    async def reload(self, config: GatewayConfig) -> None:  # noqa: B027 - optional hook
        """Apply a new, already validated config (SIGHUP). Default: nothing to change."""
