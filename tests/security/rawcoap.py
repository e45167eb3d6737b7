"""CoAP as raw UDP datagrams (RFC 7252 section 3), byte for byte what an attacker sends:
no client library between the test and the wire."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

GET, POST, PUT, DELETE = 1, 2, 3, 4
CON, NON, ACK = 0, 1, 2
URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY, BLOCK2 = 11, 12, 14, 15, 23


def _opt_nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def encode(
    code: int,
    mid: int,
    token: bytes = b"",
    options: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
    mtype: int = CON,
) -> bytes:
    out = bytearray([0x40 | (mtype << 4) | len(token), code]) + struct.pack("!H", mid) + token
    last = 0
    for number, value in sorted(options or [], key=lambda o: o[0]):
        dn, dext = _opt_nibble(number - last)
        ln, lext = _opt_nibble(len(value))
        out += bytes([(dn << 4) | ln]) + dext + lext + value
        last = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def request(
    code: int,
    mid: int,
    path: str,
    query: tuple[str, ...] = (),
    token: bytes = b"",
    payload: bytes = b"",
    content_format: int | None = None,
    mtype: int = CON,
) -> bytes:
    opts = [(URI_PATH, seg.encode()) for seg in path.strip("/").split("/") if seg]
    opts += [(URI_QUERY, q.encode()) for q in query]
    if content_format is not None:
        opts.append((CONTENT_FORMAT, bytes([content_format]) if content_format else b""))
    return encode(code, mid, token, opts, payload, mtype)


@dataclass
class Reply:
    raw: bytes
    mtype: int
    code: str
    mid: int
    token: bytes
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        return next((v for n, v in self.options if n == number), None)


def decode(raw: bytes) -> Reply:
    tkl = raw[0] & 0x0F
    code = f"{raw[1] >> 5}.{raw[1] & 0x1F:02d}"
    (mid,) = struct.unpack("!H", raw[2:4])
    pos, number, opts = 4 + tkl, 0, []
    while pos < len(raw) and raw[pos] != 0xFF:
        byte = raw[pos]
        pos += 1
        parts = []
        for nib in (byte >> 4, byte & 0x0F):
            if nib == 13:
                parts.append(raw[pos] + 13)
                pos += 1
            elif nib == 14:
                parts.append(struct.unpack("!H", raw[pos : pos + 2])[0] + 269)
                pos += 2
            else:
                parts.append(nib)
        number += parts[0]
        opts.append((number, raw[pos : pos + parts[1]]))
        pos += parts[1]
    payload = raw[pos + 1 :] if pos < len(raw) else b""
    return Reply(raw, (raw[0] >> 4) & 3, code, mid, raw[4 : 4 + tkl], opts, payload)


class Udp:
    """One UDP socket: the attacker's (or a device's) end."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))

    def send(self, datagram: bytes) -> None:
        self.sock.send(datagram)

    def recv(self) -> Reply:
        """The next response; a separate (CON) response is acknowledged, empty ACKs skipped."""
        while True:
            reply = decode(self.sock.recv(65536))
            if reply.mtype == CON:
                self.sock.send(encode(0, reply.mid, mtype=ACK))
            if reply.code != "0.00":
                return reply

    def ask(self, datagram: bytes) -> Reply:
        self.send(datagram)
        mid = struct.unpack("!H", datagram[2:4])[0]
        while True:
            reply = self.recv()
            if reply.mid == mid or reply.token == datagram[4 : 4 + (datagram[0] & 0x0F)]:
                return reply

    def close(self) -> None:
        self.sock.close()
