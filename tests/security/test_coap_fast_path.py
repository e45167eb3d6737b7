"""The fast ingest path (issue 16 item 5): plain telemetry POSTs answered without aiocoap's
per-message machinery keep every rule of the aiocoap path: the answer only after the
commit, duplicate detection of retransmitted CONs (RFC 7252 section 4.5), names, configured
devices, the token bucket, the 3x amplification bound; and everything else still goes
through aiocoap. Raw datagrams against gatewayd; `fast_path` in `gatewayctl status` shows
which path served them."""

from __future__ import annotations

import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import cbor2

from tests.security.rawcoap import ACK, CON, NON, POST, Reply, decode, encode, request
from tests.support.coap import coap_client
from tests.support.peers import free_port, wait_until

OPEN = "allow_unauthenticated = true\naccept_unknown_devices = true\n"
BLOCK1 = 27


def _readings(gw: Any) -> list[tuple[str, dict[str, Any]]]:
    db = gw.config.parent / "state" / "gateway.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT stream, data FROM events WHERE type = 'readings'").fetchall()
    finally:
        conn.close()
    # (boiler-1, the daemon's virtual device, has readings of its own)
    return [(s, cbor2.loads(d)) for s, d in rows if s.startswith("device:fp-")]


class Sock:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))

    def ask(self, datagram: bytes) -> Reply:
        self.sock.send(datagram)
        return self.recv(datagram)

    def recv(self, datagram: bytes) -> Reply:
        mid = struct.unpack("!H", datagram[2:4])[0]
        token = datagram[4 : 4 + (datagram[0] & 0x0F)]
        while True:
            reply = decode(self.sock.recv(70000))
            if reply.code != "0.00" and (reply.mid == mid or (token and reply.token == token)):
                return reply

    def close(self) -> None:
        self.sock.close()


def test_fast_path_keeps_the_rules_of_the_aiocoap_path(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN)
    s = Sock(gw.port)
    pack = cbor2.dumps([{-2: "fp-1/", 0: "t", 2: 21.5}, {0: "h", 2: 40.0}])
    try:
        assert gw.status()["fast_path"] == 0
        # A CON POST: 2.04 piggybacked, after the commit (the reading is in the database).
        post = request(POST, 0x100, "/telemetry", token=b"fp", payload=pack, content_format=112)
        first = s.ask(post)
        assert (first.mtype, first.code, first.token) == (ACK, "2.04", b"fp")
        assert _readings(gw) == [
            ("device:fp-1", {"r": [{"n": "t", "v": 21.5}, {"n": "h", "v": 40.0}]})
        ]
        # Its retransmission (same message ID): the same answer, stored once (section 4.5).
        again = s.ask(post)
        assert again.raw == first.raw
        assert len(_readings(gw)) == 1
        # A NON POST gets a NON 2.04 with its token.
        non = request(POST, 0x101, "/d/fp-2", token=b"nn", payload=pack[:0] + cbor2.dumps(
            {"t": 1.0}), content_format=60, mtype=NON)  # fmt: skip
        answer = s.ask(non)
        assert (answer.mtype, answer.code, answer.token) == (NON, "2.04", b"nn")
        # A configured device cannot be posted as without authentication: 4.03 ...
        as_boiler = request(POST, 0x102, "/d/boiler-1", payload=cbor2.dumps({"t": 1.0}),
                            content_format=60)  # fmt: skip
        answer = s.ask(as_boiler)
        assert answer.code == "4.03", answer
        assert len(answer.raw) <= 3 * len(as_boiler)  # (its diagnostic cut to fit)
        # ... nor named in the pack.
        named = request(POST, 0x103, "/telemetry", payload=cbor2.dumps(
            [{0: "boiler-1/temperature", 2: 1.0}]), content_format=112)  # fmt: skip
        assert s.ask(named).code == "4.03"
        # A name off the name rule, malformed CBOR, an unknown content-format: 4.00/4.15.
        bad_name = request(POST, 0x104, "/d/a+b", payload=cbor2.dumps({"t": 1}),
                           content_format=60)  # fmt: skip
        assert s.ask(bad_name).code == "4.00"
        garbage = request(POST, 0x105, "/telemetry", payload=b"\x9f\x9f", content_format=112)
        answer = s.ask(garbage)
        assert answer.code == "4.00" and len(answer.raw) <= 3 * len(garbage)
        assert (
            s.ask(request(POST, 0x106, "/telemetry", payload=b"x", content_format=0)).code == "4.15"
        )
        assert gw.status()["fast_path"] == 8
        # Block1 (a block-wise upload) is aiocoap's: refused there with 4.13, as before.
        block = encode(POST, 0x107, b"", [(11, b"telemetry"), (12, b"\x70"), (BLOCK1, b"\x0a")],
                       pack)  # fmt: skip
        assert s.ask(block).code == "4.13"
        assert gw.status()["fast_path"] == 8
        assert len(_readings(gw)) == 2
    finally:
        s.close()
    assert "Traceback" not in gw.log()


def test_fast_path_obeys_the_token_bucket(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN + "rate_per_source = 0.001\nburst = 2\n")
    s = Sock(gw.port)
    pack = cbor2.dumps([{0: "fp-3/t", 2: 1.0}])
    posts = [request(POST, 0x200 + i, "/telemetry", payload=pack, content_format=112)
             for i in range(6)]  # fmt: skip
    try:
        for p in posts:
            s.sock.send(p)
        wait_until(lambda: gw.status()["rate_limited"] == 4, "4 requests past the bucket")
        assert {s.recv(p).code for p in posts[:2]} == {"2.04"}
        s.sock.setblocking(False)
        try:
            extra = s.sock.recv(70000)
        except BlockingIOError:
            extra = b""
        assert extra == b"", decode(extra)  # the four past the bucket got nothing
        status = gw.status()
        assert status["fast_path"] == 6 and status["accepted"] == 2
    finally:
        s.close()


def test_a_con_retransmitted_while_its_commit_runs_gets_one_answer(coap_daemon: Any) -> None:
    """A retransmission that arrives before the first answer exists is not a second
    request: nothing is stored twice, and the one answer comes when the commit is done."""
    gw = coap_daemon(OPEN)
    s = Sock(gw.port)
    pack = cbor2.dumps([{0: "fp-4/t", 2: 4.0}])
    post = request(POST, 0x300, "/telemetry", token=b"r", payload=pack, content_format=112)
    try:
        for _ in range(5):
            s.sock.send(post)
        first = s.recv(post)
        assert first.code == "2.04" and first.mtype == ACK
        wait_until(lambda: gw.status()["duplicates"] >= 4, "the 4 retransmissions seen")
        assert len(_readings(gw)) == 1
        assert CON == 0  # (the requests above are CON)
    finally:
        s.close()


def test_fast_path_over_dtls_psk_and_the_door_in_front_of_it(
    coap_daemon: Any, tmp_path: Path
) -> None:
    """DTLS-PSK (libcoap's coap-client-openssl): telemetry POSTs take the fast path with the
    PSK's identity; the decrypted datagrams pass the door too (a Uri-Path that is not UTF-8
    gets 4.02, not a traceback)."""
    dtls_port = free_port(socket.SOCK_DGRAM)
    gw = coap_daemon(f'dtls_port = {dtls_port}\n[coap.devices.sensor-9]\npsk = "sensor-9-secret"\n')
    base = f"coaps://127.0.0.1:{dtls_port}"

    def post(path: str, body: str, *extra: str) -> Any:
        args = ["-u", "sensor-9", "-k", "sensor-9-secret", "-m", "post", "-t", "110",
                "-e", body, *extra]  # fmt: skip
        return coap_client("coap-client-openssl", args, base + path, tmp_path)

    before = gw.status()["fast_path"]
    reply = post("/telemetry", '[{"n":"t","v":7.5}]')
    assert reply.code == "2.04", reply.log
    reply = post("/d/other-1", '[{"n":"t","v":1}]')
    assert reply.code == "4.03", reply.log
    assert gw.status()["fast_path"] == before + 2
    db = gw.config.parent / "state" / "gateway.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT data FROM events WHERE type = 'readings' AND stream = 'device:sensor-9'"
        ).fetchall()
    finally:
        conn.close()
    assert [cbor2.loads(d) for (d,) in rows] == [{"r": [{"n": "t", "v": 7.5}]}]
    # A second Uri-Path segment of one 0xff byte, inside the DTLS session.
    reply = post("/d", '[{"n":"t","v":1}]', "-O", "11,0xff")
    assert reply.code == "4.02", reply.log
    status = gw.status()
    assert status["rejected"]["bad_option"] == 1
    assert "Traceback" not in gw.log()
