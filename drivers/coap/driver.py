"""The CoAP driver: the gateway as a CoAP client of devices that serve their own resources.

Per configured device: `poll` points are read by GET when the collection service calls
`read()`; `observe` points are registered (RFC 7641) and their notifications handed to the
core with `ctx.emit`, re-registering when notifications stop for longer than Max-Age plus a
margin (aiocoap's client never re-registers by itself, and a restarted device has forgotten
us). Writes are PUT or POST. One circuit breaker per device stops hammering a dead device;
its opening and recovery are the device's availability.

aiocoap is imported in `start()` (through `drivers.coap.client`), never at import time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from drivers.base import Driver, DriverContext, RawReading
from drivers.coap.options import CoapDevice, CoapPoint, compile_device
from gateway.aio import cancel_and_wait
from gateway.breaker import Breaker
from gateway.config import DeviceSpec, PointSpec
from gateway.errors import (
    ConfigIssue,
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
    GatewayError,
    PointNotFoundError,
)

if TYPE_CHECKING:
    from drivers.coap.client import Link, Response

T = TypeVar("T")

#: Share of the device timeout a whole `read()` may take (see `read`).
READ_BUDGET = 0.9
MIN_WAIT = 0.05


def device_breaker(cfg: CoapDevice, rng: Callable[[], float] = random.random) -> Breaker:
    """A device's breaker: it rests like the device's `retry` backoff (by default doubling
    from 1 s to 60 s, never less than half the step); an authentication failure waits the
    cap straight away."""
    return cfg.breaker.breaker(cfg.retry, rng)


@dataclass(eq=False)
class _Device:
    spec: DeviceSpec
    cfg: CoapDevice
    breaker: Breaker
    link: Link | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    available: bool | None = None  # None: not known yet (nothing reported)
    live: set[str] = field(default_factory=set)  # paths with an active observation
    # Problems already logged at WARNING (repeats go to DEBUG until the thing works again).
    warned: set[str] = field(default_factory=set)


class CoapDriver(Driver):
    """CoAP devices over aiocoap: GET for polls, Observe for pushes, PUT/POST for writes."""

    kind: ClassVar[str] = "coap"
    # Poll points are read on the collection schedule; observe points arrive via ctx.emit.
    polled: ClassVar[bool] = True

    def __init__(self, ctx: DriverContext, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx, options)
        self._devices: dict[str, _Device] = {}
        self._client: Any = None  # the drivers.coap.client module, once started
        self._started = False

    # -- configuration -----------------------------------------------------------------------
    @classmethod
    def validate_device(cls, spec: DeviceSpec) -> Sequence[ConfigIssue]:
        return compile_device(spec).warnings

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        from drivers.coap import aiocoap_compat, client

        aiocoap_compat.check(self.ctx.logger)  # which of aiocoap's internals to use: said once
        self._client = client
        self._started = True
        for dev in list(self._devices.values()):
            try:
                self._open(dev)
            except GatewayError as exc:
                # One device's unreadable key must not keep the others from starting.
                self.ctx.logger.error("coap device %s cannot start: %s", dev.cfg.id, exc)
                self._devices.pop(dev.cfg.id, None)
                self.ctx.set_available(dev.cfg.id, False, str(exc))

    async def stop(self) -> None:
        self._started = False
        devices = list(self._devices.values())
        for dev in devices:
            await self._close(dev)

    async def add_device(self, spec: DeviceSpec) -> None:
        if spec.id in self._devices:
            await self.remove_device(spec.id)
        cfg = compile_device(spec)
        dev = _Device(
            spec=spec, cfg=cfg,
            breaker=device_breaker(cfg),
        )  # fmt: skip
        if self._started:
            self._open(dev)  # raises ConfigError for unreadable keys: the device is not added
        self._devices[spec.id] = dev

    async def remove_device(self, device_id: str) -> None:
        dev = self._devices.pop(device_id, None)
        if dev is not None:
            await self._close(dev)

    def _open(self, dev: _Device) -> None:
        dev.link = self._client.Link(dev.cfg, self.ctx.logger)
        if not dev.spec.enabled:
            return
        by_path: dict[str, list[CoapPoint]] = {}
        for point in dev.cfg.observed():
            by_path.setdefault(point.path, []).append(point)
        for path, points in by_path.items():
            dev.tasks.append(
                asyncio.create_task(
                    self._observe_forever(dev, path, points),
                    name=f"coap observe {dev.cfg.id}{path}",
                )
            )

    async def _close(self, dev: _Device) -> None:
        tasks, dev.tasks = dev.tasks, []
        await cancel_and_wait(*tasks)
        if dev.link is not None:
            link, dev.link = dev.link, None
            await link.close()

    # -- the breaker around every exchange --------------------------------------------------
    def _device(self, device_id: str) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            raise DeviceUnavailableError(device_id, "not a configured coap device")
        if dev.link is None:
            raise DeviceUnavailableError(device_id, "the coap driver is not started")
        return dev

    async def _guarded(self, dev: _Device, call: Callable[[Link], Awaitable[T]]) -> T:
        """Run one exchange through the device's breaker. A 4.xx/5.xx answer proves the link
        works (the breaker counts it as a success) but is still raised to the caller."""
        now = self.ctx.clock.monotonic()
        b = dev.breaker
        if not b.allow(now):
            raise DeviceUnavailableError(
                dev.cfg.id,
                f"not tried: {b.failures} failures in a row (last: {b.last_error}); "
                f"next try in {b.wait(now):.1f} s",
            )
        assert dev.link is not None
        link = dev.link
        try:
            result = await call(link)
        except asyncio.CancelledError:
            b.abandon()  # a cancelled half-open attempt must not hold the only slot
            raise
        except DeviceProtocolError as exc:
            if self._client.is_auth_failure(exc):
                await self._failed(dev, link, exc, auth=True)
            else:
                self._succeeded(dev)
            raise
        except DriverError as exc:
            await self._failed(dev, link, exc, auth=self._client.is_auth_failure(exc))
            raise
        self._succeeded(dev)
        return result

    def _succeeded(self, dev: _Device) -> None:
        t = dev.breaker.success()
        if t.recovered:
            self.ctx.logger.info("coap device %s answers again", dev.cfg.id)
        if dev.available is not True:
            dev.available = True
            self.ctx.set_available(dev.cfg.id, True, "answered")

    async def _failed(self, dev: _Device, link: Link, exc: DriverError, *, auth: bool) -> None:
        t = dev.breaker.failure(self.ctx.clock.monotonic(), exc.message, auth=auth)
        log = self.ctx.logger
        if t.first_failure:
            log.warning("coap device %s", exc.message)  # the message starts with the device
        else:
            log.debug("coap device %s", exc.message)
        if t.opened:
            log.debug(
                "coap device %s: breaker open, next try in %.1f s",
                dev.cfg.id, dev.breaker.wait(self.ctx.clock.monotonic()),
            )  # fmt: skip
            if dev.available is not False:
                dev.available = False
                self.ctx.set_available(dev.cfg.id, False, exc.message)
            # A fresh context next time: a restarted device has lost our DTLS session.
            if dev.link is link:
                await link.reset()
        elif dev.cfg.secure and isinstance(exc, DeviceTimeoutError) and dev.link is link:
            # Over DTLS, silence usually means the device restarted and drops records of
            # the session it forgot: a new handshake now beats waiting for the breaker.
            await link.reset()

    def _problem(self, dev: _Device, key: str, message: str) -> None:
        """A device-side problem that is not a link failure (undecodable payload...)."""
        message = message.removeprefix(dev.cfg.id + ": ")
        if key in dev.warned:
            self.ctx.logger.debug("coap device %s: %s", dev.cfg.id, message)
        else:
            dev.warned.add(key)
            self.ctx.logger.warning("coap device %s: %s", dev.cfg.id, message)

    def _solved(self, dev: _Device, key: str) -> None:
        if key in dev.warned:
            dev.warned.discard(key)
            self.ctx.logger.info("coap device %s: %s works again", dev.cfg.id, key)

    # -- decoding ---------------------------------------------------------------------------
    def _readings(
        self, dev: _Device, points: Sequence[CoapPoint], resp: Response
    ) -> tuple[list[RawReading], list[GatewayError]]:
        from drivers.coap import payload

        errors: list[GatewayError] = []
        if not resp.ok:
            return [], [self._client.protocol_error(dev.cfg.id, resp)]
        try:
            decoded = payload.decode(
                resp.payload, resp.content_format, points[0].format, self.ctx.clock.time()
            )
        except GatewayError as exc:
            err = DeviceProtocolError(dev.cfg.id, f"{resp.url}: {exc}", resp.code)
            return [], [err]
        out: list[RawReading] = []
        for p in points:
            fmt_points = [p] if p.format == points[0].format else []
            if not fmt_points:  # same path, another format: decode again for this point
                try:
                    d = payload.decode(
                        resp.payload, resp.content_format, p.format, self.ctx.clock.time()
                    )
                except GatewayError as exc:
                    errors.append(DeviceProtocolError(dev.cfg.id, f"{resp.url}: {exc}"))
                    continue
            else:
                d = decoded
            try:
                value, ts = d.value_for(p.name, p.record)
            except GatewayError as exc:
                errors.append(DeviceProtocolError(dev.cfg.id, f"{resp.url} ({p.name}): {exc}"))
                continue
            out.append(RawReading(p.name, value, ts))
        return out, errors

    # -- Driver interface ---------------------------------------------------------------------
    async def read(self, device_id: str, points: Sequence[PointSpec]) -> list[RawReading]:
        """GET each distinct path once. A failure to reach the device raises; a point that
        cannot be decoded is left out (and logged) unless no point could be read at all.
        Observe points are read only while their observation is down (else they are pushed)."""
        dev = self._device(device_id)
        by_path: dict[str, list[CoapPoint]] = {}
        for spec in points:
            cp = dev.cfg.points.get(spec.name)
            if cp is None:
                raise PointNotFoundError(device_id, f"point {spec.name!r} is not configured")
            if cp.mode == "observe" and cp.path in dev.live:
                continue  # its notifications arrive through ctx.emit; a GET would duplicate them
            by_path.setdefault(cp.path, []).append(cp)
        out: list[RawReading] = []
        errors: list[tuple[str, GatewayError]] = []
        # The whole read fits in a little less than the device's timeout: the collection
        # service cancels a read after that same timeout, and a cancelled exchange teaches
        # the breaker nothing. Ending first, ours is counted as the failure it is.
        deadline = self.ctx.clock.monotonic() + dev.cfg.timeout * READ_BUDGET
        for path, pts in by_path.items():
            url = dev.cfg.uri + path

            async def get(link: Link, url: str = url) -> Response:
                left = max(MIN_WAIT, deadline - self.ctx.clock.monotonic())
                resp: Response = await link.request("GET", url, within=left)
                if not resp.ok:
                    raise self._client.protocol_error(dev.cfg.id, resp)
                return resp

            try:
                resp = await self._guarded(dev, get)
            except DeviceProtocolError as exc:
                errors.append((path, exc))
                continue
            readings, errs = self._readings(dev, pts, resp)
            out.extend(readings)
            errors.extend((path, e) for e in errs)
            if not errs:
                self._solved(dev, f"read {path}")
        if errors and not out:
            raise errors[0][1]
        for path, err in errors:
            self._problem(dev, f"read {path}", err.message)
        return out

    async def write(self, device_id: str, point: PointSpec, value: object) -> None:
        from drivers.coap import payload

        dev = self._device(device_id)
        cp = dev.cfg.points.get(point.name)
        if cp is None:
            raise PointNotFoundError(device_id, f"point {point.name!r} is not configured")
        if not point.writable:
            raise DriverError(device_id, f"point {point.name!r} is not writable")
        body, cf = payload.encode(value, cp.write_format, cp.record or cp.name)
        url = dev.cfg.url(cp)
        method = cp.write_method.upper()

        async def send(link: Link) -> Response:
            resp: Response = await link.request(method, url, payload=body, content_format=cf)
            if not resp.ok:
                raise self._client.protocol_error(dev.cfg.id, resp)
            return resp

        await self._guarded(dev, send)

    # -- Observe ----------------------------------------------------------------------------
    async def _pause(self, dev: _Device, delay: float) -> None:
        """Sleep before the next registration: the backoff, or longer while the breaker is open."""
        await asyncio.sleep(max(delay, dev.breaker.wait(self.ctx.clock.monotonic())))

    async def _observe_forever(self, dev: _Device, path: str, points: list[CoapPoint]) -> None:
        """`_observe`, restarted after a bug rather than silently dead (logged with its
        traceback): an observed point must not stop for good on one odd notification."""
        while True:
            try:
                await self._observe(dev, path, points)
            except Exception:
                self.ctx.logger.exception(
                    "coap device %s: observing %s failed unexpectedly", dev.cfg.id, path
                )
                await asyncio.sleep(dev.cfg.retry.cap)

    async def _observe(self, dev: _Device, path: str, points: list[CoapPoint]) -> None:
        cfg = dev.cfg
        url = cfg.uri + path
        key = f"observe {path}"
        backoff = cfg.retry.backoff()
        log = self.ctx.logger
        while True:
            try:
                obs = await self._guarded(dev, lambda link: link.observe(url))
            except DriverError as exc:
                if isinstance(exc, DeviceProtocolError):
                    self._problem(dev, key, exc.message)
                await self._pause(dev, backoff.next())
                continue
            try:
                if not obs.first.ok:
                    self._problem(dev, key, self._client.protocol_error(cfg.id, obs.first).message)
                    await self._pause(dev, backoff.next())
                    continue
                backoff.reset()
                self._deliver(dev, key, points, obs.first)
                if not obs.active:
                    # The resource is not observable: fall back to polling it ourselves.
                    self._problem(dev, key + " (not observable)",
                                  f"{url} is not observable; polling it every "
                                  f"{cfg_interval(dev):g} s instead")  # fmt: skip
                    await asyncio.sleep(cfg_interval(dev))
                    continue
                log.debug("coap device %s: observing %s", cfg.id, url)
                dev.live.add(path)
                max_age = obs.first.max_age
                while True:
                    deadline = max_age + cfg.observe_margin
                    try:
                        resp = await obs.next(deadline)
                    except DeviceProtocolError as exc:
                        self._problem(dev, key, f"observation of {url} ended: {exc.message}")
                        await self._pause(dev, backoff.first())
                        break
                    except DriverError as exc:
                        # The link failed under the observation (an ICMP error...): a failure
                        # like any other for the breaker, logged once with the rest.
                        if dev.link is not None:
                            await self._failed(dev, dev.link, exc, auth=False)
                        await self._pause(dev, backoff.first())
                        break
                    if resp is None:
                        log.debug(
                            "coap device %s: no notification from %s for %.1f s "
                            "(Max-Age %g s): registering again", cfg.id, url, deadline, max_age,
                        )  # fmt: skip
                        break
                    self._succeeded(dev)  # a notification proves the device is there
                    max_age = resp.max_age
                    if not resp.ok:
                        # RFC 7641 3.2: an error notification ends the observation.
                        self._problem(dev, key, self._client.protocol_error(cfg.id, resp).message)
                        await self._pause(dev, backoff.first())
                        break
                    self._deliver(dev, key, points, resp)
            finally:
                dev.live.discard(path)
                obs.cancel()

    def _deliver(self, dev: _Device, key: str, points: list[CoapPoint], resp: Response) -> None:
        readings, errors = self._readings(dev, points, resp)
        for err in errors:
            self._problem(dev, key + " payload", err.message)
        if readings:
            if not errors:
                self._solved(dev, key + " payload")
            self._solved(dev, key)
            self.ctx.emit(dev.cfg.id, readings)


def cfg_interval(dev: _Device) -> float:
    return dev.spec.interval
