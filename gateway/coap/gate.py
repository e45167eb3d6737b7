"""Who may do what at the CoAP front door: the identity a security context proved, the
credentials and known devices, and the caps on devices only telemetry made."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Message

from gateway.coap.config import CoapConfig
from gateway.errors import AuthError, CapacityError, ForbiddenError, NotFoundError


class Refusals:
    """Requests refused past a cap: all counted, a warning at most once per `interval` s
    saying how many since the last one (a flood is one line a minute, not one per request)."""

    def __init__(self, what: str, log: logging.Logger, interval: float = 60.0) -> None:
        self.what = what
        self.log = log
        self.interval = interval
        self.count = 0
        self._since = 0
        self._warned: float | None = None

    def refuse(self, detail: str) -> None:
        self.count += 1
        self._since += 1
        now = time.monotonic()
        if self._warned is None or now - self._warned >= self.interval:
            self.log.warning("%s: %d refused (latest: %s)", self.what, self._since, detail)
            self._warned = now
            self._since = 0


@dataclass
class Gate:
    """Who may do what: identity from the security context, credentials, known devices."""

    config: CoapConfig
    #: Devices from the config and from [coap] credentials.
    known: set[str] = field(default_factory=set)
    #: Endpoints registered in the Resource Directory (they come and go).
    registered: set[str] = field(default_factory=set)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("gateway.coap"))
    #: Devices of the [devices] config (any driver): no RD endpoint may take their name.
    configured: set[str] = field(default_factory=set)
    #: (min, max) of configured points that have one: device -> point -> limits.
    limits: dict[str, dict[str, tuple[float | None, float | None]]] = field(default_factory=dict)
    #: Devices only telemetry made (neither configured nor registered): at most
    #: `config.max_unknown_devices` of them, each with at most `config.max_unknown_points`
    #: point names; `gatewayctl devices forget` frees room.
    unknown: set[str] = field(default_factory=set)
    unknown_points: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unknown_refusals = Refusals("unknown devices at max_unknown_devices", self.log)
        self.point_refusals = Refusals("points of unknown devices at max_unknown_points", self.log)

    @property
    def unknown_refused(self) -> int:
        return self.unknown_refusals.count + self.point_refusals.count

    def admit(self, device: str, points: Iterable[str] = ()) -> None:
        """Telemetry for `device` is about to be stored: a new unknown name (or point name of
        an unknown device) takes a place under its cap, or is refused with 5.03 + Max-Age."""
        if self.is_known(device):
            return
        if device not in self.unknown and len(self.unknown) >= self.config.max_unknown_devices:
            self.unknown_refusals.refuse(f"{device!r}")
            raise CapacityError(
                f"too many unknown devices ({len(self.unknown)}): not taking {device!r}"
            )
        have = self.unknown_points.get(device, set())
        new = {p for p in points if p not in have}
        cap = self.config.max_unknown_points
        if len(have) + len(new) > cap:
            self.point_refusals.refuse(f"{device!r}")
            raise CapacityError(f"unknown device {device!r} may have at most {cap} points")
        self.unknown.add(device)
        if new:
            self.unknown_points[device] = have | new

    def forget(self, device: str) -> None:
        self.unknown.discard(device)
        self.unknown_points.pop(device, None)

    @staticmethod
    def identity(request: Message) -> str | None:
        return Gate.identity_of(request.remote)

    @staticmethod
    def identity_of(remote: Any) -> str | None:
        """The identity a remote's security context proved (DTLS-PSK, OSCORE), or None."""
        claims = getattr(remote, "authenticated_claims", None) or []
        for claim in claims:
            if isinstance(claim, str):
                return claim
        return None

    def is_known(self, device: str) -> bool:
        return device in self.known or device in self.registered

    def check_unauthenticated(self, device: str | None, *, write: bool = False) -> None:
        """An unauthenticated request about `device`. `write`: it would act as the device
        (post its values, register or remove it): never as a configured device or one with
        credentials, whatever `allow_unauthenticated` says."""
        if device is not None:
            creds = self.config.credentials_for(device)
            if creds is not None and creds.has_any:
                raise AuthError(f"device {device!r} has credentials: use DTLS-PSK or OSCORE")
        if not self.config.allow_unauthenticated:
            raise AuthError("unauthenticated requests are not allowed here")
        if write and device is not None and device in self.known:
            raise ForbiddenError(
                f"device {device!r} is configured: unauthenticated requests cannot act as it"
            )

    def authorize(self, request: Message, device: str, *, write: bool = False) -> None:
        """May the sender of `request` act as (`write`) / read `device`? Raises
        4.01/4.03/4.04."""
        self.authorize_as(self.identity(request), device, write=write)

    def authorize_as(self, who: str | None, device: str, *, write: bool = False) -> None:
        """`authorize` for a sender authenticated as `who` (None: not authenticated)."""
        if who is not None:
            if who != device:
                raise ForbiddenError(f"authenticated as {who!r}, not as {device!r}")
        else:
            self.check_unauthenticated(device, write=write)
        if not self.is_known(device) and not self.config.accept_unknown_devices:
            raise NotFoundError(f"unknown device {device!r}")
