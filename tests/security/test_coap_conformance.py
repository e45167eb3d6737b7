"""RFC 7252 message format at the datagram (issue 16 items 1-3): raw datagrams, each answered
the way the RFC says (RST, 4.02, 4.06, 4.13 with Size1, or nothing), each rejection kind
counted in `gatewayctl status` and logged at most once a minute per kind."""

from __future__ import annotations

import socket
import struct
from typing import Any

import cbor2

from tests.security.rawcoap import (
    ACK,
    CON,
    GET,
    NON,
    POST,
    URI_PATH,
    Reply,
    decode,
    encode,
    request,
)

OPEN = "allow_unauthenticated = true\naccept_unknown_devices = true\n"
RST = 3
PING_MID = 0x7777


class Raw:
    """A device's socket that reads every datagram, RSTs and empty ACKs included."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.ping_mid = PING_MID

    def first_answer(self, datagram: bytes) -> Reply | None:
        """What `datagram` draws, or None: a CoAP ping (empty CON, answered with RST by
        any CoAP server) goes right after it, so the first datagram back that is not the
        ping's RST is the answer, and the ping's RST coming first means there was none."""
        self.ping_mid = (self.ping_mid + 1) & 0xFFFF
        self.sock.send(datagram)
        self.sock.send(encode(0, self.ping_mid))
        answer = None
        while True:
            reply = decode(self.sock.recv(70000))
            if reply.mtype == RST and reply.mid == self.ping_mid:
                return answer
            if answer is None:
                answer = reply

    def answer(self, datagram: bytes) -> Reply:
        """The answer to a request served after the store (asynchronously): the next
        datagram back with its message ID, or its token after an empty ACK."""
        self.sock.send(datagram)
        mid = struct.unpack("!H", datagram[2:4])[0]
        token = datagram[4 : 4 + (datagram[0] & 0x0F)]
        while True:
            reply = decode(self.sock.recv(70000))
            if reply.mtype == CON:
                self.sock.send(encode(0, reply.mid, mtype=ACK))
            if reply.code != "0.00" and (reply.mid == mid or reply.token == token):
                return reply

    def close(self) -> None:
        self.sock.close()


def _with_first_byte(datagram: bytes, first: int) -> bytes:
    return bytes([first]) + datagram[1:]


def test_message_format_errors_get_what_rfc_7252_says(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN)
    raw = Raw(gw.port)
    pack = cbor2.dumps([{-2: "dev-1/", 0: "t", 2: 1.5}])
    try:
        # Section 3: an unknown version is silently ignored (even a CoAP ping, which a
        # version 1 server answers with RST at once).
        assert raw.first_answer(bytes([0x80, 0, 0, 1])) is None
        # TKL 9-15 is a message format error: a CON is rejected with RST (section 4.2).
        tkl9 = _with_first_byte(request(GET, 2, "/d/boiler-1", token=b"123456789"), 0x49)
        for _ in range(2):
            answer = raw.first_answer(tkl9)
            assert answer is not None and (answer.mtype, answer.mid) == (RST, 2), answer
        # ... and a NON with a format error is ignored.
        assert raw.first_answer(_with_first_byte(tkl9, 0x59)) is None
        # A token shorter than its declared length (8 declared, 3 there).
        short = bytes([0x48, GET, 0, 3]) + b"abc"
        answer = raw.first_answer(short)
        assert answer is not None and (answer.mtype, answer.mid) == (RST, 3)
        # Option delta 15 and option length 15 (not the payload marker): format errors.
        for mid, opt in ((4, b"\xf1x"), (5, b"\x1f"), (6, b"\xd1")):
            answer = raw.first_answer(bytes([0x40, GET, 0, mid]) + opt)
            assert answer is not None and (answer.mtype, answer.mid) == (RST, mid), opt
        # A payload marker with nothing after it.
        answer = raw.first_answer(request(GET, 7, "/d/boiler-1") + b"\xff")
        assert answer is not None and (answer.mtype, answer.mid) == (RST, 7)
        # An empty message (0.00) with a token is a format error too.
        answer = raw.first_answer(bytes([0x41, 0, 0, 8]) + b"t")
        assert answer is not None and (answer.mtype, answer.mid) == (RST, 8)
        # Unknown critical options (section 5.4.1): 4.02 Bad Option, piggybacked; not served.
        for mid, number in ((9, 2049), (10, 65001)):
            req = encode(
                POST, mid, b"tk", [(URI_PATH, b"telemetry"), (12, b"\x70"), (number, b"x")], pack
            )
            answer = raw.first_answer(req)
            assert answer is not None and (answer.mtype, answer.code) == (ACK, "4.02"), answer
            assert answer.mid == mid and answer.token == b"tk"
            assert len(answer.raw) <= 3 * len(req)
        # A critical option that may not repeat, repeated (Accept twice): 4.02 (5.4.5).
        twice = encode(
            GET, 11, b"", [(URI_PATH, b"d"), (URI_PATH, b"boiler-1"), (17, b""), (17, b"\x3c")]
        )
        answer = raw.first_answer(twice)
        assert answer is not None and answer.code == "4.02"
        # A string option that is not UTF-8 (section 5.4.3): 4.02 for a CON ...
        bad_path = encode(GET, 12, b"\x01", [(URI_PATH, b"\xff")])
        for _ in range(3):
            answer = raw.first_answer(bad_path)
            assert answer is not None and (answer.code, answer.token) == ("4.02", b"\x01")
        # ... and a NON is rejected: no answer.
        assert raw.first_answer(encode(GET, 13, b"", [(URI_PATH, b"\xff")], mtype=NON)) is None
        # An elective option with a bad value is ignored: the request is served.
        loc = encode(POST, 14, b"", [(8, b"\xfe"), (URI_PATH, b"telemetry"), (12, b"\x70")], pack)
        assert raw.answer(loc).code == "2.04"
        # A response (CON 2.05) carrying an unknown critical option: RST.
        resp = encode(0x45, 15, b"zz", [(2049, b"x")], b"hi")
        answer = raw.first_answer(resp)
        assert answer is not None and (answer.mtype, answer.mid) == (RST, 15)
        # Accept that cannot be served: 4.06 Not Acceptable (section 5.10.4), not 4.15.
        accept = encode(
            GET, 16, b"", [(URI_PATH, b"d"), (URI_PATH, b"boiler-1"), (17, b"\x27\x0f")]
        )
        assert raw.answer(accept).code == "4.06"
        # A well-formed request still works.
        ok = request(POST, 17, "/telemetry", payload=pack, content_format=112)
        assert raw.answer(ok).code == "2.04"
    finally:
        raw.close()
    status = gw.status()
    rejected = status["rejected"]
    assert rejected["version"] == 1
    assert rejected["token_length"] == 3
    assert rejected["token_short"] == 1
    assert rejected["option_format"] == 3
    assert rejected["payload_marker"] == 1
    assert rejected["empty_format"] == 1
    assert rejected["bad_option"] == 2 + 1 + 3 + 1 + 1
    assert rejected["elective_dropped"] == 1
    assert status["rejected_datagrams"] == sum(rejected.values())
    # One log line per kind (within the minute), no traceback.
    log = gw.log()
    assert "Traceback" not in log
    assert log.count("token length 9-15") == 1, log
    assert log.count("critical option unknown") == 1, log


def test_receive_buffer_is_max_payload_and_truncation_gets_413(gateway_factory: Any) -> None:
    gw = gateway_factory(OPEN + "max_payload = 16384\n")
    raw = Raw(gw.port)
    try:
        # An 8 KB pack (over aiocoap's 4,096-byte buffer, under max_payload): stored.
        records = [{-2: "big-1/", 0: "p0", 2: 0.0}] + [
            {0: f"p{i % 40}", 2: float(i)} for i in range(1, 900)
        ]
        pack = cbor2.dumps(records)
        assert 8000 < len(pack) < 16384
        answer = raw.answer(request(POST, 1, "/telemetry", payload=pack, content_format=112))
        assert answer.code == "2.04", answer
        # A 60 KB POST: 4.13 (not 4.00 for a cut pack), Size1 = the most we take, and the
        # diagnostic names the size sent.
        huge = request(
            POST, 2, "/telemetry", token=b"T", payload=b"\x80" * 60000, content_format=112
        )
        first = raw.first_answer(huge)
        assert first is not None and (first.code, first.mid, first.token) == ("4.13", 2, b"T")
        size1 = first.option(60)
        assert size1 is not None and int.from_bytes(size1, "big") == 16384
        assert str(len(huge)).encode() in first.payload, first.payload
        # Over max_payload but within the buffer: 4.13 from the resource, same Size1.
        over = request(POST, 3, "/telemetry", payload=b"\x80" * 16400, content_format=112)
        answer = raw.answer(over)
        assert answer.code == "4.13"
        assert int.from_bytes(answer.option(60) or b"", "big") == 16384
    finally:
        raw.close()
    assert "Traceback" not in gw.text()


def test_max_payload_default_60k_post_gets_413(gateway_factory: Any) -> None:
    gw = gateway_factory(OPEN)
    raw = Raw(gw.port)
    try:
        huge = request(POST, 9, "/telemetry", payload=b"\x80" * 60000, content_format=112)
        answer = raw.first_answer(huge)
        assert answer is not None and answer.code == "4.13"
        assert int.from_bytes(answer.option(60) or b"", "big") == 1024
        # 3x the request at most, and the request was 60 KB: the diagnostic is there.
        assert b"60" in answer.payload
        assert struct.unpack("!H", answer.raw[2:4])[0] == 9
    finally:
        raw.close()
