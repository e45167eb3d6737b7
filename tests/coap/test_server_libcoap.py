"""The CoAP front door driven by libcoap's coap-client (a CoAP stack we did not write)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.coap import projection
from gateway.store import EventStore
from tests.support.coap import coap_client
from tests.support.peers import wait_until

CLIENT = "coap-client-notls"


def _events(db: Path, type_: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT stream, type, data FROM events ORDER BY seq").fetchall()
    return [(s, t, cbor2.loads(d)) for s, t, d in rows if type_ is None or t == type_]


def test_well_known_core_lists_the_resources(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    reply = coap_client(CLIENT, [], gw.uri("/.well-known/core"), tmp_path)
    assert reply.code == "2.05", reply.log
    text = reply.payload.decode()
    for link in ("</telemetry>", "</rd>;", "</rd-lookup/ep>", "</rd-lookup/res>"):
        assert link in text
    assert 'rt="core.rd"' in text
    # RFC 6690 query filters still apply (the listing is built per asker now).
    only = coap_client(CLIENT, [], gw.uri("/.well-known/core?rt=core.rd"), tmp_path)
    assert only.code == "2.05" and only.payload.decode() == '</rd>;ct="40";rt="core.rd"'


def test_post_senml_cbor_and_json_from_files_then_get_back(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()
    # RFC 8428 integer labels: -2 bn, 0 n, 1 u, 2 v.
    cbor_file = tmp_path / "pack.cbor"
    cbor_file.write_bytes(
        cbor2.dumps(
            [{-2: "boiler-1/", 0: "temp", 1: "Cel", 2: 21.5}, {0: "pressure", 1: "bar", 2: 1.8}]
        )
    )
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "112", "-f", str(cbor_file)], gw.uri("/telemetry"), tmp_path
    )
    assert reply.code == "2.04", reply.log

    json_file = tmp_path / "pack.json"
    json_file.write_text(json.dumps([{"bn": "boiler-1/", "n": "temp", "u": "Cel", "v": 22.25}]))
    reply = coap_client(
        CLIENT,
        ["-m", "post", "-t", "110", "-f", str(json_file)],
        gw.uri("/telemetry", host="::1"),
        tmp_path,
    )
    assert reply.code == "2.04", reply.log

    reply = coap_client(CLIENT, ["-A", "110"], gw.uri("/d/boiler-1/temp"), tmp_path)
    assert reply.code == "2.05", reply.log
    pack = json.loads(reply.payload)
    assert pack[0]["bn"] == "boiler-1/" and pack[0]["n"] == "temp"
    assert pack[0]["v"] == 22.25 and pack[0]["u"] == "Cel"

    reply = coap_client(CLIENT, [], gw.uri("/d/boiler-1/pressure"), tmp_path)
    assert reply.code == "2.05"
    assert cbor2.loads(reply.payload)[0][2] == 1.8  # SenML CBOR by default, label 2 = v

    reply = coap_client(CLIENT, ["-A", "50"], gw.uri("/d/boiler-1"), tmp_path)
    assert reply.code == "2.05"
    state = json.loads(reply.payload)
    assert state["device"] == "boiler-1"
    assert set(state["points"]) == {"temp", "pressure"}

    readings = _events(gw.db, "readings")
    assert [(s, [r["n"] for r in d["r"]]) for s, _t, d in readings] == [
        ("device:boiler-1", ["temp", "pressure"]),
        ("device:boiler-1", ["temp"]),
    ]


def test_plain_cbor_map_to_a_device_path(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    f = tmp_path / "map.cbor"
    f.write_bytes(cbor2.dumps({"temp": 19.5, "door": True, "label": "hall"}))
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "60", "-f", str(f)], gw.uri("/d/esp-7"), tmp_path
    )
    assert reply.code == "2.04", reply.log
    ((_s, _t, data),) = _events(gw.db, "readings")
    assert {r["n"]: r["v"] for r in data["r"]} == {"temp": 19.5, "door": True, "label": "hall"}


@pytest.mark.parametrize(
    ("args", "payload", "code", "diagnostic"),
    [
        (["-t", "112"], b"\xff\xff\xff", "4.00", "malformed CBOR"),
        (["-t", "110"], b'[{"n":"x/t","v":"warm"}]', "4.00", "'v' must be a number"),
        (["-t", "110"], b"{not json", "4.00", "malformed JSON"),
        (["-t", "0"], b"21.5", "4.15", "content-format 0 not supported"),
        (["-t", "110"], b'[{"n":"t","v":1}]', "4.00", "does not say which device"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_diagnostic(
    gateway_factory: Any,
    tmp_path: Path,
    args: list[str],
    payload: bytes,
    code: str,
    diagnostic: str,
) -> None:
    gw = gateway_factory()
    f = tmp_path / "payload"
    f.write_bytes(payload)
    reply = coap_client(CLIENT, ["-m", "post", *args, "-f", str(f)], gw.uri("/telemetry"), tmp_path)
    assert reply.code == code, reply.log
    assert diagnostic in reply.payload.decode()
    assert gw.alive()
    assert _events(gw.db, "readings") == []


def test_oversized_payload_gets_4_13_with_size1(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory(
        "allow_unauthenticated = true\naccept_unknown_devices = true\nmax_payload = 64"
    )
    f = tmp_path / "big.json"
    f.write_text(json.dumps([{"bn": "d1/", "n": f"p{i}", "v": i} for i in range(20)]))
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "110", "-f", str(f)], gw.uri("/telemetry"), tmp_path
    )
    assert reply.code == "4.13", reply.log
    assert "Size1:64" in reply.log.replace(" ", "")


def test_unknown_device_refused_when_unknown_devices_are_not_accepted(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(
        "allow_unauthenticated = true\naccept_unknown_devices = false",
        '[devices.pump-1]\ndriver = "virtual"\n[devices.pump-1.points.t]\n',
    )
    f = tmp_path / "p.json"
    f.write_text('[{"bn":"stranger/","n":"t","v":1}]')
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "110", "-f", str(f)], gw.uri("/telemetry"), tmp_path
    )
    assert reply.code == "4.04", reply.log
    assert "unknown device 'stranger'" in reply.payload.decode()
    # A registered endpoint is known; a configured device is never an unauthenticated
    # sender's to post as (tests/security/test_unauth_writes.py).
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "40", "-e", "</t>"], gw.uri("/rd?ep=node-5"), tmp_path
    )
    assert reply.code == "2.01", reply.log
    f.write_text('[{"bn":"node-5/","n":"t","v":1}]')
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "110", "-f", str(f)], gw.uri("/telemetry"), tmp_path
    )
    assert reply.code == "2.04", reply.log


def test_unauthenticated_refused_unless_allowed(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory("accept_unknown_devices = true")
    f = tmp_path / "p.json"
    f.write_text('[{"bn":"d1/","n":"t","v":1}]')
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "110", "-f", str(f)], gw.uri("/telemetry"), tmp_path
    )
    assert reply.code == "4.01", reply.log


def test_resource_directory_register_lookup_expire(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    reply = coap_client(
        CLIENT,
        ["-m", "post", "-t", "40", "-e", '</temp>;rt="temperature";if="sensor",</fan>'],
        gw.uri("/rd?ep=node-1&lt=2&d=plant"),
        tmp_path,
    )
    assert reply.code == "2.01", reply.log
    assert "Location-Path:rd" in reply.log.replace(" ", "")

    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep?d=plant"), tmp_path)
    assert eps.code == "2.05"
    assert 'ep="node-1"' in eps.payload.decode() and 'd="plant"' in eps.payload.decode()

    res = coap_client(CLIENT, [], gw.uri("/rd-lookup/res?rt=temperature"), tmp_path)
    assert res.code == "2.05"
    text = res.payload.decode()
    assert "/temp>" in text and "/fan>" not in text and "anchor=" in text

    ((_s, _t, data),) = _events(gw.db, "device.registered")
    assert data["source"] == "rd" and data["lt"] == 2
    with sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT source FROM devices WHERE id='node-1'").fetchone() == ("rd",)

    # Expiry after lt = 2 s: the server records it as an event on its own.
    wait_until(
        lambda: bool(_events(gw.db, "device.unregistered")), "RD expiry", attempts=100, pause=0.1
    )
    ((stream, _t, data),) = _events(gw.db, "device.unregistered")
    assert stream == "device:node-1" and data["reason"] == "expired"
    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep"), tmp_path)
    assert "node-1" not in eps.payload.decode()


def test_resource_directory_update_and_delete(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "40", "-e", "</a>"], gw.uri("/rd?ep=node-2&lt=600"), tmp_path
    )
    assert reply.code == "2.01"
    loc = [line for line in reply.log.splitlines() if "Location-Path" in line][-1]
    reg_id = loc.split("Location-Path:rd, Location-Path:")[1].split(" ")[0].rstrip(",]")
    reply = coap_client(CLIENT, ["-m", "post"], gw.uri(f"/rd/{reg_id}?lt=900"), tmp_path)
    assert reply.code == "2.04", reply.log
    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep"), tmp_path)
    assert 'lt="900"' in eps.payload.decode()
    reply = coap_client(CLIENT, ["-m", "delete"], gw.uri(f"/rd/{reg_id}"), tmp_path)
    assert reply.code == "2.02", reply.log
    ((_s, _t, data),) = _events(gw.db, "device.unregistered")
    assert data["reason"] == "removed"
    reply = coap_client(CLIENT, ["-m", "delete"], gw.uri(f"/rd/{reg_id}"), tmp_path)
    assert reply.code == "4.04"


def test_rd_expiry_of_a_credentialed_device_keeps_it_known(
    gateway_factory: Any, tmp_path: Path
) -> None:
    # (A configured [devices] name cannot be registered at all: tests/security.)
    gw = gateway_factory(
        "allow_unauthenticated = false\naccept_unknown_devices = false\n"
        '[coap.devices.pump-2]\npsk = "pump-2-key"'
    )
    dtls = ["-u", "pump-2", "-k", "pump-2-key"]
    base = f"coaps://127.0.0.1:{gw.dtls_port}"
    reply = coap_client(
        "coap-client-openssl", [*dtls, "-m", "post", "-t", "40", "-e", "</t>"],
        f"{base}/rd?lt=1", tmp_path,
    )  # fmt: skip
    assert reply.code == "2.01", reply.log
    wait_until(
        lambda: bool(_events(gw.db, "device.unregistered")), "RD expiry", attempts=100, pause=0.1
    )
    reply = coap_client(
        "coap-client-openssl", [*dtls, "-m", "post", "-t", "110", "-e", '[{"n":"t","v":1}]'],
        f"{base}/telemetry", tmp_path,
    )  # fmt: skip
    assert reply.code == "2.04", reply.log


async def test_rd_registrations_survive_a_restart_and_a_rebuild(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()
    reply = coap_client(
        CLIENT, ["-m", "post", "-t", "40", "-e", "</s>"], gw.uri("/rd?ep=node-9&lt=600"), tmp_path
    )
    assert reply.code == "2.01", reply.log
    gw.stop()
    gw.start()
    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep"), tmp_path)
    assert 'ep="node-9"' in eps.payload.decode()
    gw.stop()

    # The projection can be rebuilt from the log (gatewayctl db rebuild does this).
    async def rebuild() -> list[tuple[Any, ...]]:
        projection.register()  # the RD schema and projection, before the store opens
        store = await EventStore.open(gw.db)
        try:
            await store.rebuild()
            rows: list[tuple[Any, ...]] = await store.read(
                lambda c: c.execute("SELECT ep, lt, links FROM coap_rd").fetchall()
            )
            return rows
        finally:
            await store.close()

    assert await rebuild() == [("node-9", 600, "</s>")]
