"""CoAP as an amplifier (issue 11 item 1): what one spoofable datagram can draw from the
gateway, measured on real datagrams; discovery's access rules; the per-source token bucket;
no library version in any answer."""

from __future__ import annotations

import asyncio
import signal
import struct
import subprocess
from pathlib import Path
from typing import Any

import aiocoap.meta
import cbor2

from tests.coap.test_observe_security import _oscore_dirs
from tests.security.rawcoap import BLOCK2, GET, POST, PUT, Reply, Udp, encode, request
from tests.support.coap import coap_client
from tests.support.peers import require_binary, wait_until

OPEN = "allow_unauthenticated = true\naccept_unknown_devices = true\n"


def test_discovery_answer_is_at_most_3x_the_request_replays_included(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(OPEN + "rate_per_source = 0\n")  # the ratio alone, no bucket
    udp = Udp(gw.port)
    try:
        for i in range(40):
            ep = f"ep=dev-{i:02d}"
            token = struct.pack("!H", i)
            assert udp.ask(request(POST, 0x100 + i, "/rd", query=(ep,), token=token)).code == "2.01"
        # The 21-byte request of the report: GET /.well-known/core, no token.
        req = request(GET, 0x4242, "/.well-known/core")
        assert len(req) == 21
        first = udp.ask(req)
        assert first.code == "2.05"
        assert len(first.raw) <= 3 * len(req), (len(first.raw), first.raw)
        # The same message ID again (a spoofer's replay): the cached answer, no bigger.
        sent = received = 0
        for _ in range(200):
            udp.send(req)
            again = udp.recv()
            assert again.raw == first.raw
            sent += len(req)
            received += len(again.raw)
        assert received <= 3 * sent
        # A request asking for one block of 16 bytes gets that (and fits too).
        block = encode(
            GET, 0x4243, b"\x03", [(11, b".well-known"), (11, b"core"), (BLOCK2, b"\x10")]
        )
        small = udp.ask(block)
        assert small.code == "2.05" and len(small.raw) <= 3 * len(block)
    finally:
        udp.close()
    # A real client still gets the whole listing, block by block.
    full = coap_client("coap-client-notls", ["-m", "get"], gw.uri("/.well-known/core"), tmp_path)
    assert full.code == "2.05", full.log
    for i in range(40):
        assert f"</d/dev-{i:02d}>".encode() in full.payload, full.payload
    assert b"impl-info" not in full.payload and b"aiocoap" not in full.payload


def test_discovery_is_empty_where_unauthenticated_requests_are_refused(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory("allow_unauthenticated = false\n")
    udp = Udp(gw.port)
    try:
        req = request(GET, 0x5151, "/.well-known/core", token=b"\x09")
        reply = udp.ask(req)
    finally:
        udp.close()
    assert reply.code == "4.01"
    assert b"</" not in reply.payload and len(reply.raw) <= 3 * len(req)


async def _oscore_discovery(gw: Any, client_dir: Path) -> tuple[str, bytes]:
    from aiocoap import GET as AGET
    from aiocoap import Context, Message

    ctx = await Context.create_client_context(transports=["oscore", "udp6"])
    try:
        ctx.client_credentials.load_from_dict(
            {f"coap://127.0.0.1:{gw.port}/*": {"oscore": {"basedir": str(client_dir)}}}
        )
        msg = Message(code=AGET, uri=gw.uri("/.well-known/core"))
        r = await asyncio.wait_for(ctx.request(msg).response, 10)
    finally:
        await ctx.shutdown()
    return r.code.dotted, bytes(r.payload)


async def test_discovery_lists_only_what_the_asker_may_read(
    gateway_factory: Any, tmp_path: Path
) -> None:
    server_dir, client_dir = _oscore_dirs(tmp_path)
    gw = gateway_factory(
        "allow_unauthenticated = true\naccept_unknown_devices = false\n"
        f'[coap.devices.valve-2]\noscore_context = "{server_dir}"\n'
    )
    udp = Udp(gw.port)
    try:
        reg = udp.ask(request(POST, 0x6161, "/rd", query=("ep=open-1",), token=b"\x61"))
        assert reg.code == "2.01"
    finally:
        udp.close()
    plain = coap_client("coap-client-notls", ["-m", "get"], gw.uri("/.well-known/core"), tmp_path)
    assert plain.code == "2.05", plain.log
    assert b"</d/open-1>" in plain.payload
    # valve-2 has credentials: an unauthenticated peer may not read it, so is not told of it.
    assert b"valve-2" not in plain.payload
    code, listing = await _oscore_discovery(gw, client_dir)
    assert code == "2.05"
    assert b"</d/valve-2>" in listing and b"open-1" not in listing


def test_token_bucket_per_source_drops_and_counts(coap_daemon: Any) -> None:
    gw = coap_daemon("rate_per_source = 0.001\nburst = 10\n")
    udp = Udp(gw.port, timeout=2.0)
    try:
        for i in range(100):
            udp.send(request(GET, 0x7000 + i, "/.well-known/core", token=struct.pack("!H", i)))
        answered = []
        try:
            while True:
                answered.append(udp.recv())
        except TimeoutError:
            pass  # nothing more is coming: the rest was dropped
    finally:
        udp.close()
    assert len(answered) == 10
    coap = gw.status()
    assert coap["rate_limited"] == 90
    text = gw.cli("status")
    assert "90 rate-limited" in text.stdout, text.stdout
    # Counted, not logged one line each.
    assert sum("rate" in line for line in gw.log().splitlines()) <= 1


def test_no_library_version_in_any_answer(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory(OPEN)
    version = aiocoap.meta.version.encode()
    udp = Udp(gw.port)
    replies = []
    try:
        replies.append(udp.ask(request(GET, 1, "/.well-known/core", token=b"\x01")))
        replies.append(udp.ask(request(GET, 2, "/no/such/thing", token=b"\x02")))
        replies.append(udp.ask(request(PUT, 3, "/telemetry", token=b"\x03", payload=b"x")))
        replies.append(udp.ask(request(POST, 4, "/telemetry", token=b"\x04", payload=b"\xff\xff")))
        # An unknown critical option (number 2001... odd = critical).
        replies.append(udp.ask(encode(GET, 5, b"\x05", [(11, b"telemetry"), (2001, b"x")])))
        replies.append(udp.ask(request(GET, 6, "/rd-lookup/res", token=b"\x06")))
    finally:
        udp.close()
    full = coap_client("coap-client-notls", ["-m", "get"], gw.uri("/.well-known/core"), tmp_path)
    for r in [*replies, Reply(b"", 0, full.code or "", 0, b"", [], full.payload)]:
        assert b"aiocoap" not in r.raw + r.payload and version not in r.raw + r.payload, r


def test_observe_of_a_large_state_arrives_whole_block_by_block(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(OPEN)
    udp = Udp(gw.port)

    def post(value: float, mid: int) -> None:
        pack = [{-2: "big-1/", 0: f"point-{i:02d}", 2: value + i} for i in range(12)]
        body = cbor2.dumps(pack)
        token = struct.pack("!H", mid)
        reply = udp.ask(
            request(POST, mid, "/telemetry", token=token, payload=body, content_format=112)
        )
        assert reply.code == "2.04"

    exe = require_binary("coap-client-notls")
    log = tmp_path / "observe.log"
    try:
        post(100.0, 1)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [exe, "-s", "6", "-B", "8", "-A", "50", gw.uri("/d/big-1")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(lambda: '"point-11":{"v":111' in log.read_text(errors="replace"), "first")
            post(200.0, 2)
            wait_until(lambda: '"point-11":{"v":211' in log.read_text(errors="replace"), "second")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    finally:
        udp.close()
