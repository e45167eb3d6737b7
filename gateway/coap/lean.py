"""Bounded per-request state for aiocoap's CoAP-over-UDP message layer.

Where aiocoap 0.4.17 keeps state per request (measured: ~2.7 KB each, for 247 s):
`MessageManager._deduplicate_message` stores every incoming request's (remote, message-id)
for EXCHANGE_LIFETIME, each with its own `loop.call_later` timer (a TimerHandle and a
`functools.partial` in the loop's heap), and `_store_response_for_duplicates` then keeps the
full response `Message` there, whose `.request` holds the request `Message` with its options,
payload and remote. At 1000 requests/s that is 247 000 live Message graphs: hundreds of MB,
and millions of GC-tracked objects that make every full collection pause for ~0.2 s.

`LeanMessageManager` keeps the same RFC 7252 section 4.5 duplicate detection in a
`DedupCache` (put in aiocoap's place by `gateway.coap.aiocoap_compat`, which holds the
message layer's uses of aiocoap's internals): keys are short strings ("host port mid"),
values the *encoded* response bytes (re-decoded only when a duplicate actually arrives); no
timers, no Message objects. Entries live in two generations that rotate every
EXCHANGE_LIFETIME (an entry is kept between one and two lifetimes), each holding at most
half of `max_entries`. Under a flood that exceeds the cap, the oldest generation is dropped
early and counted (`early_evictions`): the dedup window then shrinks below
EXCHANGE_LIFETIME, which only matters for a client retransmitting a request whose response
was lost that long ago (RFC 7252 allows bounding this state). Neither str nor bytes are
tracked by the GC, so the cache adds nothing to collection pauses.

The manager is also the front door's last word on what goes out and first word on what comes
in: a per-source `RateLimiter` drops requests past a token bucket (counted), and no response
to a peer that has not proven its address (plain UDP, not OSCORE-protected) is more than
`AMPLIFICATION_FACTOR` times its request (RFC 7252 section 11.3): a larger 2.xx answer goes
out as its first Block2 block of a size that fits (every client library follows Block2),
anything else is cut to its code. What is cached for duplicates is what was sent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON
from aiocoap.optiontypes import BlockOption

from gateway.coap import aiocoap_compat

EXCHANGE_LIFETIME = 247.0
#: RFC 7252 section 11.3: at most this many times the request, to a peer not known to be there.
AMPLIFICATION_FACTOR = 3


class RateLimiter:
    """Token buckets per source address: `rate` requests/s, `burst` at once (rate 0: off).

    At most `max_sources` buckets are kept (least recently used go first: a forgotten source
    starts again with a full bucket). `refused` counts the requests dropped."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}
        self.refused = 0

    def allow(self, source: str | None) -> bool:
        if self.rate <= 0 or source is None:
            return True
        now = self.clock()
        entry = self.buckets.pop(source, None)
        if entry is None:
            if len(self.buckets) >= self.max_sources:
                del self.buckets[next(iter(self.buckets))]
            tokens = self.burst
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens < 1.0:
            self.buckets[source] = (tokens, now)
            self.refused += 1
            return False
        self.buckets[source] = (tokens - 1.0, now)
        return True


def source_of(remote: Any) -> str | None:
    """The sender's address (without port) of a UDP or DTLS remote; None if unknown."""
    sockaddr = getattr(remote, "sockaddr", None)
    if sockaddr is None:  # DTLS: the UDP address under the session
        sockaddr = aiocoap_compat.dtls_udp_address(remote)
    if isinstance(sockaddr, tuple) and sockaddr:
        return str(sockaddr[0])
    return None


def wire_size(message: Message) -> int:
    """Bytes of `message` on the wire (incoming or outgoing; no mid/type needed)."""
    payload = len(message.payload)
    return 4 + len(message.token) + len(message.opt.encode()) + (1 + payload if payload else 0)


def block_of(response: Message, number: int, size_exp: int) -> Message:
    """Block `number` of `response` at block size 2**(size_exp+4), statelessly (RFC 7959):
    an ETag from the whole payload lets the client notice a change between blocks."""
    size = 1 << (size_exp + 4)
    start = number * size
    if start >= len(response.payload) and number > 0:
        return Message(code=Code.BAD_REQUEST, payload=b"block out of range")
    out = response.copy(
        payload=response.payload[start : start + size],
        block2=BlockOption.BlockwiseTuple(number, start + size < len(response.payload), size_exp),
    )
    if out.opt.etag is None:
        out.opt.etag = hashlib.blake2s(response.payload, digest_size=4).digest()
    return out


def fit_response(response: Message, limit: int) -> Message:
    """`response` cut to at most `limit` bytes: a 2.xx with payload as its largest first
    Block2 block that fits (a block already cut keeps its position), else without payload."""
    if wire_size(response) <= limit:
        return response
    code = response.code
    if code.is_successful() and response.payload:
        # A block already (the client asked for one) keeps its position in smaller blocks.
        have = response.opt.block2
        start = have.start if have is not None else 0
        more_after = have.more if have is not None else False
        etag = response.opt.etag or hashlib.blake2s(response.payload, digest_size=4).digest()
        top = min(have.size_exponent if have is not None else 6, 6)
        for size_exp in range(top, -1, -1):
            size = 1 << (size_exp + 4)
            more = more_after or len(response.payload) > size
            candidate = response.copy(
                payload=response.payload[:size],
                block2=BlockOption.BlockwiseTuple(start // size, more, size_exp),
            )
            candidate.opt.etag = etag
            candidate.request = getattr(response, "request", None)  # copy() does not keep it
            if wire_size(candidate) <= limit:
                return candidate
    bare = response.copy(code=code if not code.is_successful() else Code.UNAUTHORIZED, payload=b"")
    bare.opt = Message().opt  # no options but these two
    bare.request = getattr(response, "request", None)
    for name in ("observe", "max_age"):
        value = getattr(response.opt, name)
        if value is not None:
            setattr(bare.opt, name, value)
    if wire_size(bare) > limit:
        bare.opt.observe = None
        bare.opt.max_age = None
    # A diagnostic as long as fits (it is for people reading a capture).
    room = limit - wire_size(bare) - 1
    text = b"use Block2 or authenticate" if code.is_successful() else response.payload
    if room > 0 and text:
        bare.payload = text[:room]
    return bare


class DedupCache:
    """(remote, message id) -> encoded response (b"" while none is known yet)."""

    def __init__(
        self,
        max_entries: int,
        lifetime: float = EXCHANGE_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.lifetime = lifetime
        self.clock = clock
        self.current: dict[Any, bytes] = {}
        self.previous: dict[Any, bytes] = {}
        self.rotated_at = clock()
        self.early_evictions = 0

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def get(self, key: Any) -> bytes | None:
        value = self.current.get(key)
        if value is None:
            value = self.previous.get(key)
        return value

    def add(self, key: Any) -> None:
        now = self.clock()
        age = now - self.rotated_at
        if age >= self.lifetime:
            # `previous` is older than one lifetime: done with it. `current` is kept for
            # one more lifetime, unless it is that old too.
            self.previous = self.current if age < 2 * self.lifetime else {}
            self.current = {}
            self.rotated_at = now
        elif len(self.current) >= self.max_entries // 2:
            # A flood: each generation holds at most half the cap, so the oldest one goes
            # before its time (counted: the dedup window is now shorter than a lifetime).
            self.early_evictions += len(self.previous)
            self.previous = self.current
            self.current = {}
            self.rotated_at = now
        self.current[key] = b""

    def set_response(self, key: Any, encoded: bytes) -> None:
        if key in self.current:
            self.current[key] = encoded
        elif key in self.previous:
            self.previous[key] = encoded


def dedup_key(remote: Any, mid: int) -> Any:
    """A compact, GC-untracked key for UDP remotes; other remotes (DTLS sessions, which
    compare by identity and are few) are keyed by the object itself."""
    sockaddr = getattr(remote, "sockaddr", None)
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return f"{sockaddr[0]} {sockaddr[1]} {mid}"
    return (remote, mid)


def cap_for_unproven(response: Message, request_size: int, token_length: int) -> Message | None:
    """RFC 7252 section 11.3 for a peer that has not proven its address: `response` cut to
    AMPLIFICATION_FACTOR x the request's `request_size` bytes, or None if it fits as is."""
    size = wire_size(response)
    # Any request is at least its header and token: most answers (a bare 2.04) fit that
    # without measuring the request.
    if size <= AMPLIFICATION_FACTOR * (4 + token_length):
        return None
    limit = AMPLIFICATION_FACTOR * request_size
    if size <= limit:
        return None
    return fit_response(response, limit)


class LeanMessageManager(MessageManager):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's MessageManager with a `DedupCache`, a rate limiter and the amplification
    cap; `message_manager_class()` makes the cache aiocoap's duplicate-detection state."""

    def __init__(
        self,
        token_manager: Any,
        max_entries: int,
        *,
        limiter: RateLimiter | None = None,
        verify_address: bool = True,
    ) -> None:
        super().__init__(token_manager)
        self.dedup = DedupCache(max_entries)
        self.duplicates = 0
        self.limiter = limiter
        #: False where the transport proved the peer's address itself (DTLS: cookie).
        self.verify_address = verify_address
        #: Responses cut to AMPLIFICATION_FACTOR x their request (counted for health).
        self.cut = 0

    def dispatch_message(self, message: Message) -> None:
        if not self.admit(message):
            return  # dropped: a CON sender retransmits later; counted in the limiter
        super().dispatch_message(message)

    def send_message(self, message: Message, messageerror_monitor: Any) -> None:
        request = getattr(message, "request", None)
        if (
            self.verify_address
            and request is not None
            and message.code.is_response()
            and message.opt.oscore is None  # protected: the request was no replay of a spoofer
        ):
            cut = cap_for_unproven(message, wire_size(request), len(request.token))
            if cut is not None:
                message = cut
                self.cut += 1
        super().send_message(message, messageerror_monitor)

    def admit(self, message: Message) -> bool:
        """The token bucket of the sender (False: drop it; counted in the limiter)."""
        if message.code.is_request() or message.mtype is CON:
            return self.allow_source(source_of(message.remote))
        return True

    def allow_source(self, source: str | None) -> bool:
        return self.limiter is None or self.limiter.allow(source)

    def first_time(self, key: Any) -> tuple[bool, bytes]:
        """RFC 7252 section 4.5: (True, b"") for a new (sender, message ID), now remembered;
        else (False, the answer kept for it: b"" while there is none yet), counted."""
        stored = self.dedup.get(key)
        if stored is None:
            self.dedup.add(key)
            return True, b""
        self.duplicates += 1
        return False, stored


def message_manager_class() -> type[LeanMessageManager]:
    """`LeanMessageManager` with its `DedupCache` as aiocoap's duplicate detection where
    aiocoap's internals are as expected (`gateway.coap.aiocoap_compat`); else as it is, and
    aiocoap keeps its own duplicate state for what is not answered on the fast path."""
    if aiocoap_compat.check().dedup:
        return aiocoap_compat.with_bounded_dedup(LeanMessageManager, dedup_key)
    return LeanMessageManager
