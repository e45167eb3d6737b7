"""Resource exhaustion through the CoAP front door (issue 11 item 3): invented device names,
RD registrations, unpaged lookups; and the operator's way out, `gatewayctl devices forget`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import cbor2

from tests.security.rawcoap import MAX_AGE, POST, Reply, Udp, request
from tests.support.coap import coap_client

OPEN = "allow_unauthenticated = true\naccept_unknown_devices = true\n"


def _post(name: str, mid: int) -> bytes:
    body = cbor2.dumps([{-2: f"{name}/", 0: "temp", 2: 21.5}])
    return request(
        POST, mid, "/telemetry", token=struct.pack("!I", mid), payload=body, content_format=112
    )


def _flood(udp: Udp, datagrams: list[bytes], window: int = 50) -> list[Reply]:
    """Send in windows of `window`, each answered before the next (a device's NSTART, x50)."""
    replies: list[Reply] = []
    for start in range(0, len(datagrams), window):
        batch = datagrams[start : start + window]
        want = {d[4 : 4 + (d[0] & 0x0F)] for d in batch}
        for d in batch:
            udp.send(d)
        while want:
            reply = udp.recv()
            if reply.token in want:
                want.discard(reply.token)
                replies.append(reply)
    return replies


def _db_bytes(state: Path) -> int:
    return sum(f.stat().st_size for f in state.glob("*.db*"))


def test_a_flood_of_invented_names_is_capped(coap_daemon: Any, tmp_path: Path) -> None:
    gw = coap_daemon(OPEN + "rate_per_source = 0\nmax_unknown_devices = 50\n")
    udp = Udp(gw.port)
    try:
        warm = _flood(udp, [_post(f"warm-{i}", i) for i in range(10)])
        assert {r.code for r in warm} == {"2.04"}
        rss_before, db_before = gw.rss_kb(), _db_bytes(tmp_path / "state")
        replies = _flood(udp, [_post(f"x{i:05d}", 1000 + i) for i in range(3000)])
    finally:
        udp.close()
    codes = [r.code for r in replies]
    assert codes.count("2.04") == 40 and codes.count("5.03") == 2960, set(codes)
    refused = [r for r in replies if r.code == "5.03"]
    assert all(r.option(MAX_AGE) for r in refused)  # when to try again
    telemetry = [d for d in gw.devices() if d["source"] == "telemetry"]
    assert len(telemetry) == 50
    coap = gw.status()
    assert coap["unknown_devices"] == 50 and coap["unknown_refused"] == 2960
    # Bounded: nothing of the 2,960 refused names was kept (generous bounds: no timing).
    assert _db_bytes(tmp_path / "state") - db_before < 2 * 1024 * 1024
    assert gw.rss_kb() - rss_before < 32 * 1024
    # A warning a minute with the count (one for a flood of seconds), not one per name.
    warnings = [line for line in gw.log().splitlines() if "max_unknown_devices" in line]
    assert 1 <= len(warnings) <= 3 and "1 refused" in warnings[0], warnings


def test_invented_point_names_of_an_unknown_device_are_capped(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN + "rate_per_source = 0\nmax_unknown_points = 64\n")

    def pack(i: int) -> bytes:
        body = cbor2.dumps([{-2: "inv-1/", 0: f"p{i}-{j}", 2: 1.0} for j in range(10)])
        token = struct.pack("!I", i)
        return request(POST, i, "/telemetry", token=token, payload=body, content_format=112)

    udp = Udp(gw.port)
    try:
        codes = [r.code for r in _flood(udp, [pack(i) for i in range(50)], window=1)]
        assert codes == ["2.04"] * 6 + ["5.03"] * 44, codes
        gw.restart()  # the count of points comes back from the database
        assert udp.ask(pack(99)).code == "5.03"
    finally:
        udp.close()
    assert gw.status()["unknown_refused"] == 1  # since the restart
    assert [d["points"] for d in gw.devices() if d["id"] == "inv-1"] == [60]


def test_rd_registrations_are_capped_and_counted(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN + "rd_max_registrations = 5\n")
    udp = Udp(gw.port)
    try:
        replies = _flood(
            udp,
            [
                request(POST, 0x100 + i, "/rd", query=(f"ep=ep-{i:02d}",), token=bytes([i]))
                for i in range(20)
            ],
            window=1,
        )
    finally:
        udp.close()
    codes = [r.code for r in replies]
    assert codes.count("2.01") == 5 and codes.count("5.03") == 15, codes
    assert all(r.option(MAX_AGE) for r in replies if r.code == "5.03")
    assert gw.status()["rd_refused"] == 15
    assert 1 <= sum("rd_max_registrations" in line for line in gw.log().splitlines()) <= 3
    assert len([d for d in gw.devices() if d["source"] == "rd"]) == 5


def _links(payload: bytes) -> list[str]:
    return [part.split(">", 1)[0].lstrip("<") for part in payload.decode().split(",") if part]


def test_rd_lookup_honours_page_and_count(coap_daemon: Any, tmp_path: Path) -> None:
    gw = coap_daemon(OPEN + "rate_per_source = 0\n")
    udp = Udp(gw.port)
    base = f"coap://127.0.0.1:{udp.sock.getsockname()[1]}"  # the registrations' base
    try:
        for i in range(30):
            reg = request(
                POST, 0x200 + i, "/rd", query=(f"ep=ep-{i:02d}",), token=bytes([i]),
                payload=b"</s/a>,</s/b>,</s/c>", content_format=40,
            )  # fmt: skip
            assert udp.ask(reg).code == "2.01"
    finally:
        udp.close()

    def lookup(what: str) -> list[str]:
        reply = coap_client("coap-client-notls", ["-m", "get"], gw.uri(what), tmp_path)
        assert reply.code == "2.05", reply.log
        return _links(reply.payload)

    page = lookup("/rd-lookup/res?count=4&page=1")
    assert page == [f"{base}/s/b", f"{base}/s/c", f"{base}/s/a", f"{base}/s/b"], page
    assert len(lookup("/rd-lookup/ep?count=7&page=4")) == 2  # 30 endpoints: 28, 29
    assert len(lookup("/rd-lookup/res")) == 64  # of 90: bounded without paging too
    eps = lookup("/rd-lookup/ep?count=3&page=0")
    assert len(eps) == 3
    bad = coap_client("coap-client-notls", ["-m", "get"], gw.uri("/rd-lookup/ep?page=x"), tmp_path)
    assert bad.code == "4.00"


def test_gatewayctl_devices_forget(coap_daemon: Any) -> None:
    gw = coap_daemon(OPEN + "max_unknown_devices = 3\n")
    udp = Udp(gw.port)
    try:
        assert [r.code for r in _flood(udp, [_post(f"u-{i}", i) for i in range(1, 5)], 1)] == [
            "2.04", "2.04", "2.04", "5.03",
        ]  # fmt: skip
        reg = udp.ask(request(POST, 0x300, "/rd", query=("ep=r-1",), token=b"\x30"))
        assert reg.code == "2.01"

        done = gw.cli("devices", "forget", "u-1", "u-2", "r-1")
        assert done.returncode == 0, done.stderr
        assert "forgotten: u-1" in done.stdout
        ids = {d["id"] for d in gw.devices()}
        assert not ids & {"u-1", "u-2", "r-1"} and {"u-3", "boiler-1"} <= ids
        # Room again under the cap, at once (the CoAP service saw the events).
        assert udp.ask(_post("u-4", 99)).code == "2.04"
        # The RD registration went with it.
        eps = udp.ask(request(1, 0x301, "/rd-lookup/ep", token=b"\x31"))
        assert b"r-1" not in eps.payload
    finally:
        udp.close()
    events = gw.cli("events", "tail", "--stream", "device:u-1", "--json")
    assert events.returncode == 0, events.stderr
    assert "device.forgotten" in events.stdout
    audit = gw.cli("events", "tail", "--stream", "operator", "--json")  # who asked
    assert "control.verb" in audit.stdout and "devices.forget" in audit.stdout, audit.stdout

    configured = gw.cli("devices", "forget", "boiler-1", "u-3")
    assert configured.returncode == 2
    assert "'boiler-1' is a configured device" in configured.stderr
    assert "nothing forgotten" in configured.stderr
    assert {"boiler-1", "u-3"} <= {d["id"] for d in gw.devices()}
    missing = gw.cli("devices", "forget", "no-such")
    assert missing.returncode == 2 and "no device 'no-such'" in missing.stderr
    listing = gw.cli("devices", "--json")
    assert json.loads(listing.stdout)  # the plain verb still lists
