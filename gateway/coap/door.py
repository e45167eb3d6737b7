"""The datagram layer of the CoAP front door: every UDP datagram passes RFC 7252's message
format here before aiocoap (or the fast ingest path) sees it.

`parse` checks what aiocoap 0.4.17 does not (or crashes on): the version (others are
ignored, section 3), token lengths 9-15 and a token shorter than declared (message format
errors), option delta/length nibble 15 and options running past the end (section 3.1), a
payload marker with nothing after it, critical options we do not know, repeat when they may
not, or whose value has the wrong length or is not UTF-8 (sections 5.4.1, 5.4.3, 5.4.5:
4.02 Bad Option in a CON request; elective ones are dropped). A message format error in a
CON is answered with RST, anything else malformed is ignored (section 4.2/4.3).

`DoorUDP6` is aiocoap's UDP transport with its own reader: the receive buffer is
`max_payload` plus room for the header and options (aiocoap's is 4,096 bytes and ignores
truncation), read with MSG_TRUNC so that an oversized request gets 4.13 with Size1 (the
most we take, RFC 7252 section 5.10.9) and a diagnostic naming the size sent, instead of
being cut. Each rejection kind is counted (`Door.rejected`, in health) and logged at most
once a minute per kind.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoap.message import Direction, Message
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

from gateway.logs import RateLimitedLog

CON, NON, ACK, RST = 0, 1, 2, 3
PAYLOAD_MARKER = 0xFF
#: Room for header, token and options on top of `max_payload` in the receive buffer.
HEADROOM = 1024
#: Datagrams read per readiness event (fairness towards the rest of the loop).
BATCH = 32

# Option number -> (min length, max length, format, repeatable), RFC 7252 section 5.10
# and the RFCs aiocoap implements; "s" = UTF-8 string, "u" = uint, "o" = opaque, "e" = empty.
OPTIONS: dict[int, tuple[int, int, str, bool]] = {
    1: (0, 8, "o", True),  # If-Match
    3: (1, 255, "s", False),  # Uri-Host
    4: (1, 8, "o", True),  # ETag
    5: (0, 0, "e", False),  # If-None-Match
    6: (0, 3, "u", False),  # Observe (RFC 7641)
    7: (0, 2, "u", False),  # Uri-Port
    8: (0, 255, "s", True),  # Location-Path
    9: (0, 255, "o", False),  # OSCORE (RFC 8613)
    11: (0, 255, "s", True),  # Uri-Path
    12: (0, 2, "u", False),  # Content-Format
    14: (0, 4, "u", False),  # Max-Age
    15: (0, 255, "s", True),  # Uri-Query
    16: (1, 1, "u", False),  # Hop-Limit (RFC 8768)
    17: (0, 2, "u", False),  # Accept
    20: (0, 255, "s", True),  # Location-Query
    23: (0, 3, "u", False),  # Block2 (RFC 7959)
    27: (0, 3, "u", False),  # Block1
    28: (0, 4, "u", False),  # Size2
    35: (1, 1034, "s", False),  # Proxy-Uri
    39: (1, 255, "s", False),  # Proxy-Scheme
    60: (0, 4, "u", False),  # Size1
    252: (1, 40, "o", False),  # Echo (RFC 9175)
    258: (0, 1, "u", False),  # No-Response (RFC 7967)
    292: (0, 8, "o", True),  # Request-Tag (RFC 9175)
}

#: Rejection kinds (health figure keys) and what each means, for the log line.
KINDS = {
    "short": "datagram shorter than a CoAP header",
    "version": "CoAP version is not 1",
    "token_length": "token length 9-15 (reserved)",
    "token_short": "token shorter than its declared length",
    "empty_format": "empty message (code 0.00) with token, options or payload",
    "code_class": "reserved code class (1, 6 or 7)",
    "option_format": "malformed option (delta/length 15, or past the end)",
    "payload_marker": "payload marker without a payload",
    "bad_option": "critical option unknown, repeated or with a bad value",
    "elective_dropped": "elective option with a bad value (dropped)",
    "truncated": "request larger than the receive buffer (4.13)",
    "undecodable": "message aiocoap could not decode",
    "internal": "error while dispatching a message (a bug)",
}


class RejectedError(Exception):
    """`data` breaks the message format; `answer` is what RFC 7252 says to do about it:
    "ignore", "rst" (CON: Reset; else ignore) or "4.02" (CON request: Bad Option)."""

    def __init__(self, kind: str, detail: str, answer: str, mtype: int = NON, mid: int = 0):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.answer = answer
        self.mtype = mtype
        self.mid = mid


@dataclass(slots=True)
class Datagram:
    """A well-formed CoAP message (RFC 7252 section 3)."""

    mtype: int
    code: int
    mid: int
    token: bytes
    options: list[tuple[int, bytes]]
    payload: bytes
    #: True if elective options with bad values were dropped: aiocoap gets `encode()`.
    changed: bool = False

    @property
    def is_request(self) -> bool:
        return 1 <= self.code <= 31

    def option(self, number: int) -> bytes | None:
        for n, v in self.options:
            if n == number:
                return v
        return None

    def encode(self) -> bytes:
        return encode(self.mtype, self.code, self.mid, self.token, self.options, self.payload)


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def encode(
    mtype: int,
    code: int,
    mid: int,
    token: bytes,
    options: list[tuple[int, bytes]] | tuple[()] = (),
    payload: bytes = b"",
) -> bytes:
    """A CoAP message; `options` in ascending order of number."""
    out = bytearray((0x40 | mtype << 4 | len(token), code)) + mid.to_bytes(2, "big") + token
    last = 0
    for number, value in options:
        dn, dext = _nibble(number - last)
        ln, lext = _nibble(len(value))
        out.append(dn << 4 | ln)
        out += dext + lext + value
        last = number
    if payload:
        out.append(PAYLOAD_MARKER)
        out += payload
    return bytes(out)


def uint_option(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _extended(
    nibble: int, data: bytes, pos: int, what: str, mtype: int, mid: int
) -> tuple[int, int]:
    """An option delta or length of nibble 13 (one more byte, + 13) or 14 (two more bytes,
    + 269), RFC 7252 section 3.1: (value, position after it)."""
    size = 1 if nibble == 13 else 2
    if pos + size > len(data):
        raise RejectedError("option_format", f"option {what} past the end", "rst", mtype, mid)
    if size == 1:
        return data[pos] + 13, pos + 1
    return (data[pos] << 8 | data[pos + 1]) + 269, pos + 2


def parse(data: bytes, *, truncated: bool = False) -> Datagram:
    """`data` as a `Datagram`, or `RejectedError` saying why and what to answer. `truncated`:
    only the header and token need to be there (the options may be cut)."""
    n = len(data)
    if n < 4:
        raise RejectedError("short", f"{n} bytes", "ignore")
    first = data[0]
    mtype = (first >> 4) & 3
    mid = data[2] << 8 | data[3]
    if first >> 6 != 1:
        raise RejectedError("version", f"version {first >> 6}", "ignore", mtype, mid)
    tkl = first & 0x0F
    if tkl > 8:
        raise RejectedError("token_length", f"token length {tkl}", "rst", mtype, mid)
    end_token = 4 + tkl
    if n < end_token:
        raise RejectedError(
            "token_short", f"token of {n - 4} bytes, {tkl} declared", "rst", mtype, mid
        )
    code = data[1]
    token = data[4:end_token]
    if code == 0:
        if n != 4:
            raise RejectedError("empty_format", f"{n} bytes with code 0.00", "rst", mtype, mid)
        return Datagram(mtype, 0, mid, b"", [], b"")
    if code >> 5 in (1, 6, 7):
        raise RejectedError("code_class", f"code {code >> 5}.{code & 31:02d}", "rst", mtype, mid)
    if truncated:
        return Datagram(mtype, code, mid, token, [], b"")
    options: list[tuple[int, bytes]] = []
    payload = b""
    pos = end_token
    number = 0
    while pos < n:
        byte = data[pos]
        if byte == PAYLOAD_MARKER:
            if pos + 1 == n:
                raise RejectedError(
                    "payload_marker", "payload marker at the end", "rst", mtype, mid
                )
            payload = data[pos + 1 :]
            break
        pos += 1
        delta = byte >> 4
        length = byte & 0x0F
        if delta == 15 or length == 15:
            raise RejectedError("option_format", f"nibble 15 at byte {pos - 1}", "rst", mtype, mid)
        if delta >= 13:
            delta, pos = _extended(delta, data, pos, "delta", mtype, mid)
        if length >= 13:
            length, pos = _extended(length, data, pos, "length", mtype, mid)
        number += delta
        if number > 0xFFFF:
            raise RejectedError("option_format", f"option number {number}", "rst", mtype, mid)
        if pos + length > n:
            raise RejectedError("option_format", f"option {number} past the end", "rst", mtype, mid)
        options.append((number, data[pos : pos + length]))
        pos += length
    msg = Datagram(mtype, code, mid, token, options, payload)
    if options:
        _check_options(msg)
    return msg


def _check_options(msg: Datagram) -> None:
    """RFC 7252 section 5.4: critical options must be known, well-formed and not repeated
    unless repeatable; elective ones that are not are dropped."""
    seen: set[int] = set()
    keep: list[tuple[int, bytes]] = []
    for number, value in msg.options:
        spec = OPTIONS.get(number)
        problem = None
        if spec is None:
            problem = "unknown" if number & 1 else None
        else:
            lo, hi, fmt, repeatable = spec
            if not lo <= len(value) <= hi:
                problem = f"of {len(value)} bytes"
            elif number in seen and not repeatable:
                problem = "repeated"
            elif fmt == "s":
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    problem = "not UTF-8"
        seen.add(number)
        if problem is None:
            keep.append((number, value))
        elif number & 1:  # critical
            answer = "4.02" if msg.is_request else "rst"
            raise RejectedError(
                "bad_option", f"option {number} {problem}", answer, msg.mtype, msg.mid
            )
        else:
            msg.changed = True
    if msg.changed:
        msg.options = keep


def reset(mid: int) -> bytes:
    return bytes((0x70, 0, mid >> 8, mid & 0xFF))


class OncePerMinute(logging.Filter):
    """Lets a log message (by its format string) through at most once per `interval` s;
    the next one that passes says how many were held back."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) > 256:
            self._seen.clear()
        held = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last minute)"
        return True


class Door:
    """Counts and logs rejections (one line per kind a minute) and builds the answers."""

    def __init__(self, max_payload: int, logger: logging.Logger) -> None:
        self.max_payload = max_payload
        self.bufsize = max_payload + HEADROOM
        self.rejected: dict[str, int] = {}
        self.log = RateLimitedLog(logger)
        self._mid = int.from_bytes(os.urandom(2), "big")

    def count(self, kind: str, detail: str, source: Any) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        host = source[0] if isinstance(source, tuple) and source else source
        self.log.warning(kind, "CoAP: %s from %s (%s)", KINDS.get(kind, kind), host, detail)

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def response(
        self,
        request_size: int,
        mtype: int,
        mid: int,
        token: bytes,
        code: int,
        options: list[tuple[int, bytes]] | tuple[()] = (),
        diagnostic: bytes = b"",
    ) -> bytes:
        """A piggybacked (CON) or NON answer of at most 3x the request (RFC 7252 section
        11.3): the diagnostic is cut to fit, then dropped with the options."""
        from gateway.coap.lean import AMPLIFICATION_FACTOR

        if mtype == CON:
            rtype, rmid = ACK, mid
        else:
            rtype, rmid = NON, self.next_mid()
        limit = AMPLIFICATION_FACTOR * request_size
        out = encode(rtype, code, rmid, token, options)
        room = limit - len(out) - 1
        if room > 0 and diagnostic:
            return out + b"\xff" + diagnostic[:room]
        if len(out) > limit:
            out = encode(rtype, code, rmid, token)
        return out

    def answer_rejected(self, exc: RejectedError, data: bytes) -> bytes | None:
        if exc.answer == "rst" and exc.mtype == CON:
            return reset(exc.mid)
        if exc.answer == "4.02":
            if exc.mtype == CON:
                tkl = data[0] & 0x0F
                return self.response(
                    len(data), CON, exc.mid, data[4 : 4 + tkl], 0x82, (), exc.detail.encode()
                )
            return None  # a NON request with a bad critical option is rejected: ignored
        return None

    def too_large(self, msg: Datagram, size: int) -> bytes | None:
        """4.13 for a request cut by the receive buffer (Size1: the most we take)."""
        if not msg.is_request or msg.mtype not in (CON, NON):
            return None
        text = f"request of {size} bytes is over the limit of {self.max_payload}".encode()
        opts = [(60, uint_option(self.max_payload))]
        return self.response(size, msg.mtype, msg.mid, msg.token, 0x8D, opts, text)


class DoorUDP6(MessageInterfaceUDP6):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's UDP transport behind the door: its own reader (buffer sized to
    `max_payload`, truncation detected, several datagrams per wake-up) and `parse` before
    aiocoap decodes anything."""

    door: Door
    #: (datagram, parsed, ancdata, address) -> True if handled (the fast ingest path).
    fast: Callable[[bytes, Datagram, Any, Any], bool] | None = None

    def install(self, door: Door) -> None:
        self.door = door
        self._buf = bytearray(door.bufsize)
        self._view = memoryview(self._buf)
        self._sock: socket.socket = self.transport.get_extra_info("socket")
        self.loop.add_reader(self._sock.fileno(), self._read_ready)  # replaces aiocoap's

    def _read_ready(self) -> None:
        sock = self._sock
        bufs = [self._buf]
        size = len(self._buf)
        read = 0
        for read in range(BATCH):  # noqa: B007 - `read`: how many came, after the loop
            try:
                n, ancdata, flags, address = sock.recvmsg_into(bufs, 1024, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.error_received(exc)
                break
            if n > size:
                self._datagram(bytes(self._view[:size]), ancdata, address, n)
            else:
                self._datagram(bytes(self._view[:n]), ancdata, address, 0)
        if read:
            # Datagrams came: the error queue waits for a wake-up without any (epoll
            # reports a socket with queued errors as ready until they are read), which
            # saves a system call per wake-up under load.
            return
        # ICMP errors (IPV6_RECVERR), as aiocoap's reader would have taken them.
        try:
            data, ancdata, flags, address = sock.recvmsg(1024, 1024, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.error_received(exc)
            return
        self.datagram_errqueue_received(data, ancdata, flags, address)

    def _reply(self, data: bytes, ancdata: Any, address: Any) -> None:
        anc = [c for c in ancdata if c[0] == socket.IPPROTO_IPV6 and c[1] == socket.IPV6_PKTINFO]
        try:
            self._sock.sendmsg((data,), anc, 0, address)
        except OSError as exc:
            self.error_received(exc)

    def _datagram(self, data: bytes, ancdata: Any, address: Any, truncated: int) -> None:
        door = self.door
        try:
            msg = parse(data, truncated=bool(truncated))
        except RejectedError as exc:
            door.count(exc.kind, exc.detail, address)
            answer = door.answer_rejected(exc, data)
            if answer is not None:
                self._reply(answer, ancdata, address)
            return
        if truncated:
            door.count("truncated", f"{truncated} bytes", address)
            answer = door.too_large(msg, truncated)
            if answer is not None:
                self._reply(answer, ancdata, address)
            elif msg.mtype == CON:
                self._reply(reset(msg.mid), ancdata, address)
            return
        if msg.changed:
            door.count("elective_dropped", "option dropped", address)
            data = msg.encode()
        fast = self.fast
        if fast is not None and fast(data, msg, ancdata, address):
            return
        pktinfo = None
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                pktinfo = value
        try:
            message = Message.decode(data, UDP6EndpointAddress(address, self, pktinfo=pktinfo))
        except Exception as exc:  # parse() let through something aiocoap cannot take
            door.count("undecodable", f"{type(exc).__name__}: {exc}", address)
            if msg.mtype == CON:
                self._reply(reset(msg.mid), ancdata, address)
            return
        message.direction = Direction.INCOMING
        try:
            self._ctx.dispatch_message(message)
        except Exception as exc:  # a bug: counted and said once a minute, not per datagram
            door.count("internal", f"{type(exc).__name__}: {exc}", address)
