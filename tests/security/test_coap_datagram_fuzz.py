"""24,000 mutated CoAP datagrams (header, token, options, payload) at gatewayd's front door
(issue 16): the daemon stays up and answers valid requests, its log holds no traceback and
no line per datagram, and its memory stays bounded."""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

import cbor2

from tests.security.rawcoap import GET, POST, decode, encode, request

OPEN = "allow_unauthenticated = true\naccept_unknown_devices = true\nrate_per_source = 0\n"
MUTATIONS = 24_000
BATCH = 50


def _seeds() -> list[bytes]:
    pack = cbor2.dumps([{-2: "fz-1/", 0: "t", 2: 1.5}, {0: "h", 2: 40.0}])
    return [
        request(POST, 1, "/telemetry", token=b"ab", payload=pack, content_format=112),
        request(POST, 2, "/d/fz-2", payload=b'[{"n":"t","v":2}]', content_format=110),
        encode(GET, 3, b"\x01\x02\x03", [(6, b""), (11, b"d"), (11, b"boiler-1")]),
        request(GET, 4, "/.well-known/core", query=("rt=gw.device",)),
        request(POST, 5, "/rd", query=("ep=fz-ep",), payload=b"</t>;rt=x", content_format=40),
        encode(GET, 6, b"", [(11, b"d"), (11, b"boiler-1"), (17, b"\x3c"), (23, b"\x02")]),
        encode(0x45, 7, b"zz", [(12, b"")], b"response"),  # a response nobody asked for
        bytes([0x40, 0, 0, 8]),  # a ping
    ]


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    tkl = data[0] & 0x0F
    opts_at = 4 + tkl
    for _ in range(rng.randint(1, 3)):
        if len(data) < 4:
            return bytes(data)  # cut inside the header
        op = rng.randrange(10)
        if op == 0:  # header: any bits of the first two bytes
            i = rng.randrange(2)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # token length nibble, token bytes left as they are
            data[0] = (data[0] & 0xF0) | rng.randrange(16)
        elif op == 2 and len(data) > 4:  # cut anywhere
            del data[rng.randrange(1, len(data)) :]
        elif op == 3 and len(data) > opts_at:  # an option header byte: any nibbles
            data[rng.randrange(opts_at, len(data))] = rng.choice((0xF0, 0x0F, 0xDD, 0xEE, 0xFF))
        elif op == 4:  # an extra option, critical or not, any number, maybe not UTF-8
            number = rng.choice((rng.randrange(1, 300), rng.randrange(300, 65536), 11, 15, 3))
            value = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 5, 14, 300))))
            extra = encode(GET, 0, b"", [(number, value)])[4:]
            body = data[opts_at:]
            data[opts_at:] = extra + body
        elif op == 5:  # payload: random bytes after a marker
            data += b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        elif op == 6 and len(data) > 4:  # one random byte anywhere past the header
            data[rng.randrange(4, len(data))] = rng.randrange(256)
        elif op == 7:  # a long token
            data[0] = (data[0] & 0xF0) | 8
            data[4:4] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 9)))
        elif op == 8:  # non-UTF-8 bytes in a path segment
            data[opts_at:opts_at] = b"\xb2\xc3\x28"  # Uri-Path (delta 11), 2 bytes, invalid
        else:  # a big datagram (over the receive buffer)
            data += b"\xff" + b"\x00" * rng.choice((100, 3000, 9000))
    if len(data) >= 4:
        data[2:4] = struct.pack("!H", rng.randrange(65536))
    return bytes(data)


def test_mutated_datagrams_leave_the_daemon_up_quiet_and_bounded(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN)
    rng = random.Random(16)
    seeds = _seeds()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.connect(("127.0.0.1", gw.port))

    def ping(mid: int) -> None:
        """A ping after a batch: its RST means the daemon read the batch (bounded tries)."""
        for _ in range(10):  # a burst can overflow the socket buffer: ping again
            sock.send(bytes([0x40, 0, mid >> 8, mid & 0xFF]))
            try:
                while True:
                    reply = sock.recv(70000)
                    if reply[:1] == b"\x70" and reply[2:4] == struct.pack("!H", mid):
                        return
            except TimeoutError:
                continue
        raise AssertionError(f"no RST for ping {mid}: daemon alive={gw.daemon.peer.alive()}")

    try:
        ping(1)
        rss_before = gw.rss_kb()
        for batch in range(MUTATIONS // BATCH):
            for _ in range(BATCH):
                sock.send(_mutate(rng, rng.choice(seeds)))
            ping(0x8000 + batch)
        assert gw.daemon.peer.alive()
        rss_after = gw.rss_kb()
        # Still answering valid requests.
        valid = request(POST, 0x4321, "/telemetry", token=b"ok", payload=cbor2.dumps(
            [{0: "fz-9/t", 2: 9.0}]), content_format=112)  # fmt: skip
        sock.send(valid)
        while True:
            reply = decode(sock.recv(70000))
            if reply.token == b"ok" and reply.code != "0.00":
                break
        assert reply.code == "2.04", reply
    finally:
        sock.close()
    log = gw.log()
    assert "Traceback" not in log, log[-3000:]
    assert "UnicodeDecodeError" not in log
    assert "never awaited" not in log
    assert log.count("gateway.coap.aiocoap") < 20, log[-3000:]
    # One line per kind (and a summary per minute), not one per datagram.
    assert log.count("CoAP: ") < 40, log[-3000:]
    assert rss_after - rss_before < 24 * 1024, (rss_before, rss_after)
    status = gw.status()
    assert status["rejected_datagrams"] > 1000, status
