"""Resource Directory (RFC 9176): registration, update, removal, expiry, and lookup.

Registrations are events on the device's stream (`device.registered` with source "rd",
`device.unregistered` with reason "removed" or "expired"); `RdProjection` keeps the table
`coap_rd` from them, so registrations survive a restart and the core's `devices`
projection shows them (source = 'rd'). The in-memory `Directory` is rebuilt from `coap_rd`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiocoap import Code, Message
from aiocoap import resource as coap_resource
from aiocoap.util.linkformat import Link, LinkFormat, parse

from gateway import events as ev
from gateway import names
from gateway.aio import wait_event
from gateway.coap import senml
from gateway.coap.resources import Backend, Gate, GatewayResource, Refusals, check_size
from gateway.errors import (
    CapacityError,
    ForbiddenError,
    GatewayError,
    NotFoundError,
    PayloadError,
    UnsupportedFormatError,
)
from gateway.events import NewEvent


@dataclass(frozen=True)
class Registration:
    ep: str
    sector: str | None
    href: str  # "/rd/<id>"
    base: str
    lt: int
    links: str
    expires: float  # monotonic

    def data(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": "rd",
            "driver": "coap",
            "href": self.href,
            "base": self.base,
            "lt": self.lt,
            "links": self.links,
        }
        if self.sector is not None:
            out["d"] = self.sector
        return out


def _query(request: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in request.opt.uri_query:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def _link_format(payload: bytes) -> LinkFormat:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("link-format payload is not UTF-8") from None
    if not text.strip():
        return LinkFormat([])
    try:
        return parse(text)
    except Exception as exc:  # the parser raises several types; all mean malformed input
        raise PayloadError(f"malformed link-format: {exc}") from None


def _source_base(request: Message) -> str:
    try:
        return str(request.remote.uri_base)
    except Exception:  # some remotes (OSCORE inner) have no URI of their own
        return ""


class Directory:
    """Live registrations, their expiry, and the events that record them."""

    def __init__(
        self,
        gate: Gate,
        backend: Backend,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gate = gate
        self.backend = backend
        self.log = log
        self.clock = clock
        self.by_ep: dict[str, Registration] = {}
        self.by_href: dict[str, Registration] = {}
        #: Each registration's links, parsed once (a lookup must not parse them all again).
        self.parsed: dict[str, list[Link]] = {}
        self.refusals = Refusals("RD registrations at rd_max_registrations", log)
        self._changed = asyncio.Event()

    @property
    def refused(self) -> int:
        return self.refusals.count

    async def load(self) -> None:
        """Rebuild from `coap_rd`; registrations that expired while we were down expire now."""

        def q(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT ep, sector, href, base, lt, links, updated FROM coap_rd"
            ).fetchall()

        rows: list[tuple[Any, ...]] = await self.backend.store.read(q)
        now_wall, now = time.time(), self.clock()
        for ep, sector, href, base, lt, links, updated in rows:
            if ep in self.gate.configured or not names.is_valid(ep):
                # Recorded before configured names were refused: it must not come back
                # (its expiry would detach the configured device).
                self.log.warning("rd: registration %r not restored: %s", names.escape(ep),
                                 "a configured device" if ep in self.gate.configured
                                 else "not a valid name")  # fmt: skip
                continue
            remaining = float(updated) + int(lt) - now_wall
            reg = Registration(ep, sector, href, base, int(lt), links, now + remaining)
            self._put(reg)
        self._changed.set()

    def _put(self, reg: Registration) -> None:
        old = self.by_ep.get(reg.ep)
        if old is not None:
            self.by_href.pop(old.href, None)
        self.by_ep[reg.ep] = reg
        self.by_href[reg.href] = reg
        try:
            self.parsed[reg.ep] = parse(reg.links).links if reg.links else []
        except Exception:  # stored before links were checked: nothing to look up
            self.parsed[reg.ep] = []
        self.gate.registered.add(reg.ep)
        self.gate.unknown.discard(reg.ep)
        self._changed.set()

    def _drop(self, reg: Registration) -> None:
        self.by_ep.pop(reg.ep, None)
        self.by_href.pop(reg.href, None)
        self.parsed.pop(reg.ep, None)
        self.gate.registered.discard(reg.ep)
        self._changed.set()

    def forget_configured(self) -> None:
        """Registrations whose name became a configured device (a reload) are dropped,
        without an event: the device is the config's now, and an expiry or a DELETE of the
        registration must not detach it."""
        for reg in [r for ep, r in self.by_ep.items() if ep in self.gate.configured]:
            self._drop(reg)
            self.log.warning("rd: registration of %s dropped: now a configured device", reg.ep)

    def _lifetime(self, query: dict[str, str]) -> int:
        if "lt" not in query:
            return self.gate.config.rd_default_lifetime
        try:
            lt = int(query["lt"])
        except ValueError:
            raise PayloadError(f"lt={query['lt']!r} is not an integer") from None
        if not 1 <= lt <= self.gate.config.rd_max_lifetime:
            raise PayloadError(f"lt must be 1..{self.gate.config.rd_max_lifetime} seconds")
        return lt

    async def register(self, request: Message) -> Message:
        check_size(request, self.gate.config.max_payload)
        cf = request.opt.content_format
        if cf is not None and int(cf) != senml.CF_LINK_FORMAT:
            raise UnsupportedFormatError("registrations are link-format (content-format 40)")
        query = _query(request)
        who = self.gate.identity(request)
        ep = query.get("ep") or who
        if not ep:
            raise PayloadError("registration needs ep=<endpoint name>")
        message = names.problem(ep, "endpoint name")
        if message is not None:
            raise PayloadError(message)
        if len(ep) > 63:  # RFC 9176 section 5.1: at most 63 bytes
            raise PayloadError(f"endpoint name {ep!r} is longer than 63 characters")
        sector = query.get("d")
        if sector is not None:
            message = names.problem(sector, "sector (d)")
            if message is not None:
                raise PayloadError(message)
        if who is not None and ep != who:
            raise ForbiddenError(f"authenticated as {who!r}, cannot register {ep!r}")
        if who is None:
            self.gate.check_unauthenticated(ep, write=True)
        if ep in self.gate.configured:
            raise ForbiddenError(f"{ep!r} is a configured device: it cannot be registered")
        lt = self._lifetime(query)
        links = _link_format(request.payload)
        base = query.get("base") or _source_base(request)
        old = self.by_ep.get(ep)
        if old is None and len(self.by_ep) >= self.gate.config.rd_max_registrations:
            self.refusals.refuse(repr(ep))
            raise CapacityError(f"resource directory is full ({len(self.by_ep)} endpoints)")
        href = old.href if old is not None else f"/rd/{os.urandom(4).hex()}"
        reg = Registration(ep, sector, href, base, lt, str(links), self.clock() + lt)
        await self.backend.append_many(
            [NewEvent(ev.device_stream(ep), ev.DEVICE_REGISTERED, reg.data())]
        )
        self._put(reg)
        self.log.info("rd: %s %s (lt %d s)", "re-registered" if old else "registered", ep, lt)
        msg = Message(code=Code.CREATED)
        msg.opt.location_path = tuple(href.strip("/").split("/"))
        return msg

    def _owned(self, request: Message, href: str, *, write: bool = True) -> Registration:
        reg = self.by_href.get(href)
        if reg is None:
            raise NotFoundError(f"no registration {href}")
        who = self.gate.identity(request)
        if who is not None and who != reg.ep:
            raise ForbiddenError(f"authenticated as {who!r}, not as {reg.ep!r}")
        if who is None:
            self.gate.check_unauthenticated(reg.ep, write=write)
        if write and reg.ep in self.gate.configured:
            raise ForbiddenError(f"{reg.ep!r} is a configured device: not an RD registration")
        return reg

    async def update(self, request: Message, href: str) -> Message:
        check_size(request, self.gate.config.max_payload)
        reg = self._owned(request, href)
        query = _query(request)
        lt = self._lifetime(query) if "lt" in query else reg.lt
        links = str(_link_format(request.payload)) if request.payload else reg.links
        new = replace(
            reg, lt=lt, base=query.get("base", reg.base), links=links, expires=self.clock() + lt
        )
        changed = (new.lt, new.base, new.links) != (reg.lt, reg.base, reg.links)
        # A plain refresh still has to survive a restart (its expiry moved), but it is
        # local bookkeeping: it does not go to the cloud.
        await self.backend.append_many(
            [NewEvent(ev.device_stream(reg.ep), ev.DEVICE_REGISTERED, new.data(), outbox=changed)]
        )
        self._put(new)
        return Message(code=Code.CHANGED)

    async def remove(self, request: Message, href: str, reason: str = "removed") -> Message:
        reg = self._owned(request, href)
        await self._unregister(reg, reason)
        return Message(code=Code.DELETED)

    async def _unregister(self, reg: Registration, reason: str) -> None:
        await self.backend.append_many(
            [
                NewEvent(
                    ev.device_stream(reg.ep),
                    ev.DEVICE_UNREGISTERED,
                    {"reason": reason, "source": "rd"},
                )
            ]
        )
        self._drop(reg)
        self.log.info("rd: %s %s", reason, reg.ep)

    async def expire_forever(self) -> None:
        """Expire registrations at their deadline (one task; woken when anything changes)."""
        while True:
            self._changed.clear()
            now = self.clock()
            due = [r for r in self.by_ep.values() if r.expires <= now]
            for reg in due:
                if self.by_ep.get(reg.ep) is reg:
                    try:
                        await self._unregister(reg, "expired")
                    except GatewayError as exc:
                        self.log.warning("rd: could not record expiry of %s: %s", reg.ep, exc)
                        await asyncio.sleep(1.0)
            nxt = min((r.expires for r in self.by_ep.values()), default=None)
            timeout = None if nxt is None else max(0.0, nxt - self.clock())
            await wait_event(self._changed, timeout)

    # -- lookup ---------------------------------------------------------------------------
    #: Links in one lookup answer, at most (and when the request gives no `count`).
    LOOKUP_MAX = 64

    def _filters(self, request: Message) -> list[tuple[str, str]]:
        out = []
        for key, value in _query(request).items():
            if key in ("page", "count"):
                continue
            out.append((key, value))
        return out

    def _page(self, request: Message) -> tuple[int, int]:
        """(links to skip, links to answer) from RFC 9176's `page` and `count`."""
        query = _query(request)
        try:
            page = int(query.get("page", "0"))
            count = int(query.get("count", str(self.LOOKUP_MAX)))
        except ValueError:
            raise PayloadError("page and count must be integers") from None
        if page < 0 or count < 1:
            raise PayloadError("page must be >= 0 and count >= 1")
        count = min(count, self.LOOKUP_MAX)
        return page * count, count

    @staticmethod
    def _match(value: str | None, pattern: str) -> bool:
        if value is None:
            return False
        if pattern.endswith("*"):
            return value.startswith(pattern[:-1])
        return fnmatch.fnmatchcase(value, pattern) if "*" in pattern else value == pattern

    def lookup_ep(self, request: Message) -> LinkFormat:
        links = []
        filters = self._filters(request)
        skip, count = self._page(request)
        for reg in sorted(self.by_ep.values(), key=lambda r: r.ep):
            attrs = {"ep": reg.ep, "base": reg.base, "rt": "core.rd-ep", "lt": str(reg.lt)}
            if reg.sector is not None:
                attrs["d"] = reg.sector
            ctx = {**attrs, "href": reg.href}
            if all(self._match(ctx.get(k), v) for k, v in filters):
                if skip:
                    skip -= 1
                    continue
                links.append(Link(reg.href, **attrs))
                if len(links) >= count:
                    break
        return LinkFormat(links)

    def lookup_res(self, request: Message) -> LinkFormat:
        links = []
        filters = self._filters(request)
        skip, count = self._page(request)
        for reg in sorted(self.by_ep.values(), key=lambda r: r.ep):
            for link in self.parsed.get(reg.ep, ()):
                target = link.href if "://" in link.href else reg.base + link.href
                attrs: dict[str, str] = {}
                for key, value in link.attr_pairs:
                    attrs.setdefault(key, value)
                attrs["anchor"] = reg.base
                ctx = {"ep": reg.ep, "d": reg.sector, "href": target, **attrs}
                if all(self._match(ctx.get(k), v) for k, v in filters):
                    if skip:
                        skip -= 1
                        continue
                    links.append(Link(target, **attrs))
                    if len(links) >= count:
                        return LinkFormat(links)
        return LinkFormat(links)


def _linkformat_message(links: LinkFormat) -> Message:
    return Message(payload=str(links).encode("utf-8"), content_format=senml.CF_LINK_FORMAT)


class RdResource(GatewayResource):
    """/rd (registration interface); `RdEntries` serves /rd/<id> (registration resources)."""

    rt = "core.rd"
    ct = str(senml.CF_LINK_FORMAT)

    def __init__(self, directory: Directory) -> None:
        super().__init__()
        self.directory = directory

    async def render_post(self, request: Message) -> Message:
        return await self.directory.register(request)


class RdEntries(RdResource, coap_resource.PathCapable):  # type: ignore[misc]
    """/rd/<id>: aiocoap's Site routes a path *below* a prefix only to a PathCapable."""

    def get_resources_as_linkheader(self) -> LinkFormat:
        return LinkFormat([])  # registration resources are found through rd-lookup/ep

    @staticmethod
    def _href(request: Message) -> str:
        path = tuple(request.opt.uri_path)  # what is left below /rd
        if len(path) != 1 or not path[0]:
            raise NotFoundError("no such registration")
        return "/rd/" + str(path[0])

    async def render_post(self, request: Message) -> Message:
        return await self.directory.update(request, self._href(request))

    async def render_delete(self, request: Message) -> Message:
        return await self.directory.remove(request, self._href(request))

    async def render_get(self, request: Message) -> Message:
        reg = self.directory._owned(request, self._href(request), write=False)
        return Message(payload=reg.links.encode("utf-8"), content_format=senml.CF_LINK_FORMAT)


class RdLookupResource(GatewayResource):
    def __init__(self, directory: Directory, kind: str) -> None:
        super().__init__()
        self.directory = directory
        self.kind = kind
        self.rt = f"core.rd-lookup-{kind}"
        self.ct = str(senml.CF_LINK_FORMAT)

    async def render_get(self, request: Message) -> Message:
        who = self.directory.gate.identity(request)
        if who is None:
            self.directory.gate.check_unauthenticated(None)
        if self.kind == "ep":
            return _linkformat_message(self.directory.lookup_ep(request))
        return _linkformat_message(self.directory.lookup_res(request))
