"""Unauthenticated writes (issue 11, item 2), over real CoAP (libcoap's coap-client, DTLS-PSK
with coap-client-openssl): with `allow_unauthenticated = true` a peer may post only as names
that are not configured devices; an RD endpoint can never take over or detach a configured
device; posted values of a configured point obey its min/max."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from tests.support.coap import Reply, coap_client
from tests.support.daemon import Daemon, run_cli, start_daemon
from tests.support.peers import free_port

pytestmark = pytest.mark.peer("libcoap")

CLIENT = "coap-client-notls"

OPEN = """allow_unauthenticated = true
accept_unknown_devices = true
[coap.devices.sensor-9]
psk = "sensor-9-secret"
[coap.devices.valve-1]
psk = "valve-1-secret"
"""

# One configured device of each driver that does not post over CoAP, and a Modbus valve
# that does (it has credentials). The CoAP server runs without the drivers.
DEVICES = """
[devices.plc-1]
driver = "modbus"
host = "127.0.0.1"
[devices.plc-1.points.setpoint]
address = 10
writable = true
min = 0
max = 100
[devices.gps-1]
driver = "serial"
port = "/dev/ttyNOPE"
parser = { type = "nmea", sentences = ["GGA"] }
[devices.gps-1.points.lat]
field = "gga.lat"
[devices.tag-1]
driver = "ble"
address = "AA:BB:CC:DD:EE:01"
format = "bthome"
[devices.tag-1.points.temperature]
[devices.node-7]
driver = "coap"
uri = "coap://127.0.0.1:9"
[devices.node-7.points.t]
path = "/s"
[devices.pump-1]
driver = "virtual"
[devices.pump-1.points.t]
[devices.valve-1]
driver = "modbus"
host = "127.0.0.1"
[devices.valve-1.points.setpoint]
address = 11
writable = true
min = 0
max = 100
"""


def _events(db: Path, type_: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT stream, type, data FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(s, t, cbor2.loads(d)) for s, t, d in rows if type_ is None or t == type_]


def _post(gw: Any, tmp: Path, body: str, path: str = "/telemetry") -> Reply:
    return coap_client(CLIENT, ["-m", "post", "-t", "110", "-e", body], gw.uri(path), tmp)


def test_unauthenticated_peer_cannot_post_as_a_configured_or_credentialed_device(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(OPEN, DEVICES)
    # The attack of the issue: an out-of-range setpoint as the Modbus device.
    reply = _post(gw, tmp_path, '[{"bn":"plc-1/","n":"setpoint","v":65535}]')
    assert reply.code == "4.03", reply.log
    assert "'plc-1' is configured" in reply.payload.decode()
    for device in ("gps-1", "tag-1", "node-7", "pump-1"):
        reply = _post(gw, tmp_path, f'[{{"bn":"{device}/","n":"x","v":1}}]')
        assert reply.code == "4.03", (device, reply.log)
    # Through the device's own path, as a plain CBOR map.
    f = tmp_path / "plain.cbor"
    f.write_bytes(cbor2.dumps({"t": 1.0}))
    reply = coap_client(CLIENT, ["-m", "post", "-t", "60", "-f", str(f)], gw.uri("/d/pump-1"),
                        tmp_path)  # fmt: skip
    assert reply.code == "4.03", reply.log
    # Devices with credentials: authenticate (4.01), never a plain datagram.
    for device in ("sensor-9", "valve-1"):
        reply = _post(gw, tmp_path, f'[{{"bn":"{device}/","n":"setpoint","v":1}}]')
        assert reply.code == "4.01", (device, reply.log)
    # One forbidden record refuses the whole pack: nothing of it is stored.
    reply = _post(gw, tmp_path, '[{"n":"free-2/t","v":1},{"n":"plc-1/setpoint","v":2}]')
    assert reply.code == "4.03", reply.log
    assert _events(gw.db, "readings") == []
    # Other names are what allow_unauthenticated is for.
    assert _post(gw, tmp_path, '[{"bn":"free-1/","n":"t","v":1}]').code == "2.04"
    assert [s for s, _t, _d in _events(gw.db, "readings")] == ["device:free-1"]


def test_posted_values_of_a_configured_point_obey_its_min_and_max(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(OPEN, DEVICES)
    uri = f"coaps://127.0.0.1:{gw.dtls_port}/telemetry"

    def post(value: float) -> Reply:
        body = f'[{{"n":"setpoint","v":{value}}}]'
        return coap_client(
            "coap-client-openssl",
            ["-u", "valve-1", "-k", "valve-1-secret", "-m", "post", "-t", "110", "-e", body],
            uri, tmp_path,
        )  # fmt: skip

    for value, word in ((65535, "above the maximum 100"), (-1, "below the minimum 0")):
        reply = post(value)
        assert reply.code == "4.00", reply.log
        text = reply.payload.decode()
        assert "valve-1/setpoint" in text and word in text, text
    assert _events(gw.db, "readings") == []
    reply = post(42)
    assert reply.code == "2.04", reply.log
    assert [d for _s, _t, d in _events(gw.db, "readings")] == [{"r": [{"n": "setpoint", "v": 42}]}]


def test_rd_registration_cannot_take_a_configured_device_name(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(OPEN, DEVICES)
    for ep, code in (("plc-1", "4.03"), ("pump-1", "4.03"), ("sensor-9", "4.01")):
        reply = coap_client(CLIENT, ["-m", "post", "-t", "40", "-e", "</t>"],
                            gw.uri(f"/rd?ep={ep}&lt=600"), tmp_path)  # fmt: skip
        assert reply.code == code, (ep, reply.log)
    assert _events(gw.db) == []
    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep"), tmp_path)
    assert eps.code == "2.05" and "ep=" not in eps.payload.decode()


def test_a_registration_recorded_before_the_device_was_configured_cannot_detach_it(
    gateway_factory: Any, tmp_path: Path
) -> None:
    # Registered while the name was free (or by a gateway without this fix)...
    gw = gateway_factory(OPEN, DEVICES)
    reply = coap_client(CLIENT, ["-m", "post", "-t", "40", "-e", "</t>"],
                        gw.uri("/rd?ep=pump-3&lt=600"), tmp_path)  # fmt: skip
    assert reply.code == "2.01", reply.log
    loc = [line for line in reply.log.splitlines() if "Location-Path" in line][-1]
    reg_id = loc.split("Location-Path:rd, Location-Path:")[1].split(" ")[0].rstrip(",]")
    gw.stop()
    # ... then the device is configured: the registration does not come back, and a
    # DELETE of it cannot unregister (detach) the configured device.
    pump = '[devices.pump-3]\ndriver = "virtual"\n[devices.pump-3.points.t]\n'
    gw.config.write_text(gw.config.read_text() + "\n" + pump)
    gw.start()
    reply = coap_client(CLIENT, ["-m", "delete"], gw.uri(f"/rd/{reg_id}"), tmp_path)
    assert reply.code == "4.04", reply.log
    assert _events(gw.db, "device.unregistered") == []
    eps = coap_client(CLIENT, [], gw.uri("/rd-lookup/ep"), tmp_path)
    assert "pump-3" not in eps.payload.decode()
    assert "not restored: a configured device" in gw.text()


DAEMON = """
[gateway]
id = "gw"
state_dir = "{state}"
runtime_dir = "{run}"
watchdog = false
[devices.pump-1]
driver = "virtual"
interval = 3600
[devices.pump-1.points.t]
signal = "counter"
[coap]
bind = ["127.0.0.1"]
port = {port}
allow_unauthenticated = true
accept_unknown_devices = true
"""


def test_a_device_configured_by_reload_is_taken_back_from_the_rd(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    config = tmp_path / "config.toml"
    config.write_text(DAEMON.format(state=tmp_path / "state", run=tmp_path / "run", port=port))
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    base = f"coap://127.0.0.1:{port}"
    reply = coap_client(CLIENT, ["-m", "post", "-t", "40", "-e", "</t>"],
                        f"{base}/rd?ep=pump-9&lt=600", tmp_path)  # fmt: skip
    assert reply.code == "2.01", reply.log
    loc = [line for line in reply.log.splitlines() if "Location-Path" in line][-1]
    reg_id = loc.split("Location-Path:rd, Location-Path:")[1].split(" ")[0].rstrip(",]")

    def sources() -> dict[str, str]:
        p = run_cli(config, "--json", "devices")
        assert p.returncode == 0, p.stderr
        return {dev["id"]: dev["source"] for dev in json.loads(p.stdout)}

    assert sources() == {"pump-1": "config", "pump-9": "rd"}
    # pump-9 becomes a configured device by SIGHUP.
    config.write_text(
        config.read_text() + '[devices.pump-9]\ndriver = "virtual"\ninterval = 3600\n'
        '[devices.pump-9.points.t]\nsignal = "counter"\n'
    )
    d.peer.signal(signal.SIGHUP)
    d.messages("RELOADING=1")
    d.messages("READY=1")
    assert sources() == {"pump-1": "config", "pump-9": "config"}
    # The old registration cannot detach it, nor can a new one or a post take its name.
    reply = coap_client(CLIENT, ["-m", "delete"], f"{base}/rd/{reg_id}", tmp_path)
    assert reply.code == "4.04", reply.log
    reply = coap_client(CLIENT, ["-m", "post", "-t", "40", "-e", "</t>"],
                        f"{base}/rd?ep=pump-9&lt=600", tmp_path)  # fmt: skip
    assert reply.code == "4.03", reply.log
    reply = coap_client(CLIENT, ["-m", "post", "-t", "110", "-e",
                                 '[{"bn":"pump-9/","n":"t","v":1}]'], f"{base}/telemetry",
                        tmp_path)  # fmt: skip
    assert reply.code == "4.03", reply.log
    assert sources() == {"pump-1": "config", "pump-9": "config"}
    d.stop()
    unregistered = [s for s, _t, _d in _events(tmp_path / "state" / "gateway.db",
                                               "device.unregistered")]  # fmt: skip
    assert unregistered == []
