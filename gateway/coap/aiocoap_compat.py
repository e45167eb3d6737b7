"""Every use of aiocoap's private names by the front door's message layer, in one place
(pyproject caps aiocoap). What they buy is measured in `gateway.coap.lean`:

- duplicate detection in the bounded `DedupCache` instead of aiocoap's per-request timers
  and kept Messages (`MessageManager._deduplicate_message`, `_store_response_for_duplicates`,
  `_send_via_transport`); stock path: aiocoap's own (unbounded) duplicate state;
- no per-request `repr()` of the request when a render task is made
  (`Context.render_to_pipe` over `Context._render_to_pipe`); stock path: aiocoap's Context;
- routing without the per-request deep copy (`Site._find_child_and_pathstripped_message`,
  `Site._resources`, `Site._subsites`); stock path: aiocoap's Site;
- the UDP address under a DTLS session (`_underlying_address`), for the per-source rate limit;
  stock path: DTLS requests are not rate-limited by source (the handshake's cookie already
  bounds what a spoofer can do);
- the datagram layer (`gateway.coap.door.DoorUDP6`, `gateway.coap.door_dtls.DoorDTLS`):
  subclasses of aiocoap's UDP and tinydtls server transports that read the socket
  themselves and hand aiocoap what passed RFC 7252's checks (`MessageInterfaceUDP6._ctx`,
  its reader and error hooks; `MessageInterfaceTinyDTLSServer._received_datagram`,
  `_mman`); stock path: aiocoap's transports, without the door's checks and without the
  fast ingest path (every request through aiocoap, as before issue 16).

`check()` runs when the server starts (and when the first site is made): what does not have
the expected shape takes the stock path, said once in the log.

"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.compat import calls, wrong_signatures

log = logging.getLogger("gateway.coap")

# The private names relied on, with their parameters as in aiocoap 0.4.17 (and `check()` asks
# that `dispatch_message` still calls `_deduplicate_message`, so the override is reached).
MESSAGE_MANAGER = {
    "_deduplicate_message": ("self", "message"),
    "_store_response_for_duplicates": ("self", "message"),
    "_send_via_transport": ("self", "message"),
}
CONTEXT = {"_render_to_pipe": ("self", "pipe"), "render_to_pipe": ("self", "pipe")}
SITE = {"_find_child_and_pathstripped_message": ("self", "request")}
SITE_ATTRS = ("_resources", "_subsites")  # dicts, per instance
#: What DoorUDP6 relies on in MessageInterfaceUDP6 (and its __init__ keeping `_ctx`).
UDP6 = {
    "__init__": ("self", "ctx", "log", "loop"),
    "datagram_errqueue_received": ("self", "data", "ancdata", "flags", "address"),
    "error_received": ("self", "exc"),
}
UDP6_ADDRESS = ("self", "sockaddr", "interface", "pktinfo")
#: What DoorDTLS relies on in MessageInterfaceTinyDTLSServer (and `_mman` kept by __init__).
DTLS_SERVER = {
    "__init__": ("self", "mman", "log", "loop"),
    "_received_datagram": ("self", "address", "datagram"),
}


@dataclass(frozen=True, slots=True)
class Internals:
    """Which patched paths this process takes (False: aiocoap's stock path)."""

    dedup: bool
    render: bool
    routing: bool
    door: bool = True  # the datagram layer over aiocoap's UDP transport


_checked: Internals | None = None
_made: dict[str, type[Any]] = {}  # the classes made on the patched paths, once each


def check(logger: logging.Logger = log) -> Internals:
    """Verify the internals relied on (once per process; `reset()` forgets the answer) and
    log one line naming what falls back to aiocoap's stock path."""
    global _checked
    if _checked is not None:
        return _checked
    from aiocoap.messagemanager import MessageManager
    from aiocoap.protocol import Context
    from aiocoap.resource import Site

    mm = wrong_signatures(MessageManager, MESSAGE_MANAGER)
    if not mm and not calls(MessageManager.dispatch_message, "_deduplicate_message"):
        mm.append("MessageManager.dispatch_message")
    ctx = wrong_signatures(Context, CONTEXT)
    site = wrong_signatures(Site, SITE)
    if not site:
        fresh = Site()
        site += [f"Site.{a}" for a in SITE_ATTRS if not isinstance(getattr(fresh, a, None), dict)]
    from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

    udp = wrong_signatures(MessageInterfaceUDP6, UDP6)
    if not udp and not calls(MessageInterfaceUDP6.__init__, "self._ctx = ctx"):
        udp.append("MessageInterfaceUDP6.__init__")
    if not udp and wrong_signatures(UDP6EndpointAddress, {"__init__": UDP6_ADDRESS}):
        udp.append("UDP6EndpointAddress.__init__")
    _checked = Internals(not mm, not ctx, not site, not udp)
    wrong = mm + ctx + site + udp
    if wrong:
        from importlib.metadata import version

        logger.warning(
            "CoAP: aiocoap %s internals differ (%s): using aiocoap's stock path for them",
            version("aiocoap"), ", ".join(wrong),
        )  # fmt: skip
    return _checked


def reset() -> None:
    """Forget the checked answer (tests that simulate other internals)."""
    global _checked, _dtls_door
    _checked = None
    _dtls_door = None
    _made.clear()


def use(internals: Internals) -> None:
    """Take these paths instead of checking (the benchmark's comparison with aiocoap's own)."""
    global _checked
    _checked = internals


# -- the datagram layer's transports ---------------------------------------------------------
def udp_transport_class() -> type[Any]:
    """`DoorUDP6` where aiocoap's UDP transport is as expected, else aiocoap's own (no door,
    no fast path)."""
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    if not check().door:
        stock: type[Any] = MessageInterfaceUDP6
        return stock
    from gateway.coap.door import DoorUDP6

    return DoorUDP6


_dtls_door: bool | None = None


def dtls_transport_class(logger: logging.Logger = log) -> type[Any]:
    """`DoorDTLS` where aiocoap's tinydtls server transport is as expected, else aiocoap's
    own. Checked apart (and only where DTLS is configured): it imports DTLSSocket."""
    global _dtls_door
    from aiocoap.transports.tinydtls_server import MessageInterfaceTinyDTLSServer

    if _dtls_door is None:
        wrong = wrong_signatures(MessageInterfaceTinyDTLSServer, DTLS_SERVER)
        if not wrong and not calls(MessageInterfaceTinyDTLSServer.__init__, "self._mman"):
            wrong.append("MessageInterfaceTinyDTLSServer.__init__")
        _dtls_door = not wrong
        if wrong:
            from importlib.metadata import version

            logger.warning(
                "CoAP: aiocoap %s internals differ (%s): DTLS requests go through aiocoap's "
                "own transport (no datagram checks, no fast path)",
                version("aiocoap"), ", ".join(wrong),
            )  # fmt: skip
    if not _dtls_door:
        stock: type[Any] = MessageInterfaceTinyDTLSServer
        return stock
    from gateway.coap.door_dtls import DoorDTLS

    return DoorDTLS


# -- duplicate detection ---------------------------------------------------------------------
def with_bounded_dedup(cls: type[Any], key: Callable[[Any, int], Any]) -> type[Any]:
    """`cls` (a MessageManager with `first_time(key)` and a `dedup` cache, as
    `gateway.coap.lean.LeanMessageManager`) answering aiocoap's duplicate detection from
    that cache; `key(remote, mid)` makes its keys. Made once per class."""
    made = _made.get(f"dedup:{cls.__qualname__}")
    if made is not None:
        return made
    from aiocoap.message import Direction, Message
    from aiocoap.numbers.types import CON

    class Bounded(cls):  # type: ignore[misc]
        def _deduplicate_message(self, message: Message) -> bool:
            new, stored = self.first_time(key(message.remote, message.mid))
            if new:
                return False
            if message.mtype is CON and stored:
                # Same answer again, re-encoded from the bytes we kept (RFC 7252 section 4.5).
                again = Message.decode(stored, remote=message.remote.as_response_address())
                again.direction = Direction.OUTGOING
                self._send_via_transport(again)
            return True

        def _store_response_for_duplicates(self, message: Message) -> None:
            k = key(message.remote, message.mid)
            if self.dedup.get(k) is not None:
                self.dedup.set_response(k, message.encode())

    Bounded.__name__ = Bounded.__qualname__ = cls.__name__
    Bounded.__doc__ = cls.__doc__
    _made[f"dedup:{cls.__qualname__}"] = Bounded
    return Bounded


# -- context and site ------------------------------------------------------------------------
def context_class() -> type[Any]:
    """`LeanContext` where aiocoap's Context is as expected, else aiocoap's own."""
    from aiocoap.protocol import Context

    return _lean_context() if check().render else Context


def site_class() -> type[Any]:
    """`LeanSite` where aiocoap's Site is as expected, else aiocoap's own."""
    from aiocoap.resource import Site

    return _lean_site() if check().routing else Site


def _lean_context() -> type[Any]:
    if "context" in _made:
        return _made["context"]
    from aiocoap.pipe import error_to_message
    from aiocoap.protocol import Context

    class LeanContext(Context):  # type: ignore[misc]  # aiocoap is untyped
        """aiocoap's Context minus a per-request `repr()` of the request (and so of its
        remote, which calls getsockname and if_indextoname) that only named the render task;
        and the render coroutine is made inside the task (aiocoap's `run_driving_pipe` makes
        it first, and a pipe whose interest ends before the task runs leaves it "never
        awaited")."""

        def render_to_pipe(self, pipe: Any) -> None:
            out = error_to_message(pipe, self.log)

            async def render() -> None:
                try:
                    await self._render_to_pipe(pipe)
                except Exception as exc:
                    out.add_exception(exc)

            task = asyncio.create_task(render(), name="coap-render")
            out.on_interest_end(task.cancel)

    _made["context"] = LeanContext
    return LeanContext


def _lean_site() -> type[Any]:
    if "site" in _made:
        return _made["site"]
    from aiocoap.message import Message
    from aiocoap.resource import Site

    class LeanSite(Site):  # type: ignore[misc]  # aiocoap is untyped
        """aiocoap's Site, routing without the per-request deep copy and URI rebuild.

        `Site` deep-copies every request (`Message.copy`) and rebuilds its full URI (which
        formats the remote, calling getsockname) before handing it to a resource; measured
        at ~0.3 ms per request here, more than decoding and storing a SenML pack. A resource
        at an exact path does not look at the path, so it gets the request as it is; a
        PathCapable subtree (/d/..., /rd/<id>) still gets a copy with the remaining path."""

        def _find_child_and_pathstripped_message(self, request: Message) -> tuple[Any, Message]:
            path = request.opt.uri_path
            child = self._resources.get(path)
            if child is not None:
                return child, request
            if not path:
                raise KeyError()
            remainder = [path[-1]]
            prefix = path[:-1]
            while prefix:
                sub = self._subsites.get(prefix)
                if sub is not None:
                    if remainder == [""]:
                        remainder = []
                    return sub, request.copy(uri_path=remainder)
                remainder.insert(0, prefix[-1])
                prefix = prefix[:-1]
            raise KeyError()

    _made["site"] = LeanSite
    return LeanSite


# -- addresses -------------------------------------------------------------------------------
def dtls_udp_address(remote: Any) -> Any:
    """The UDP socket address under a DTLS session's remote (aiocoap 0.4.17 keeps it in
    `_underlying_address`), or None."""
    return getattr(getattr(remote, "_underlying_address", None), "address", None)
