"""Names become MQTT topics, log lines and table cells (issue 11, item 4): one name rule at
every door (config, SenML, RD, downlink), a relay that dead-letters what it cannot publish
instead of counting it delivered, a `last_error` that is the current one, and log lines
and CLI cells that show control characters escaped. Real peers: gatewayd, aiocoap's
client, Mosquitto, gatewayctl."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway import config as cfg
from gateway import events as ev
from gateway.errors import ConfigError
from gateway.events import NewEvent
from gateway.store import EventStore
from tests.support.daemon import Daemon, run_cli, start_daemon
from tests.support.mqtt import Mosquitto, Subscriber
from tests.support.peers import free_port, wait_until
from tests.support.wait import until
from tests.sync.helpers import dead_letters, mqtt_config, open_store, running_relay

ROOT = Path(__file__).resolve().parents[2]
FORGED = "x\n2026-12-04 05:00:00,000 ERROR gateway.store: store corrupted"
BAD_NAMES = ["valve+3", "valve#", "bad\nname", "nul\x00x", "a/b", "sp ace", "-dash", "é", FORGED]


def _pub(port: int, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", "gateways/gw/commands", "-m", payload],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


# -- the relay: an event it cannot publish is a dead letter, never "delivered" -------------
@pytest.mark.peer("mosquitto")
@pytest.mark.parametrize("stored_bodies", [False, True], ids=["per-event", "grouped"])
async def test_unpublishable_events_are_dead_lettered_not_delivered(
    mosquitto: Mosquitto, tmp_path: Path, stored_bodies: bool
) -> None:
    # With stored bodies (the daemon with [sync]) SQLite cuts the batches; without, the
    # relay encodes each event: both paths meet the same bad topics.
    from gateway.sync.codec import Encoder

    sub = Subscriber(mosquitto.port, tmp_path)
    good = ["device:ok-a", "device:ok-a", "device:ok-b", "device:ok-c"]
    bad = ["device:valve+3", "device:line\nbreak", "device:nul\x00", "device:hash#"]
    codec = Encoder("cbor", "gw") if stored_bodies else None
    try:
        store = await EventStore.open(tmp_path / "gw.db", gateway_id="gw", outbox_codec=codec)
        try:
            # Streams as a store written before names were checked could hold them.
            order = [good[0], bad[0], good[1], bad[1], good[2], bad[2], bad[3], good[3]]
            for stream in order:
                await store.append(stream, "readings", {"r": [{"n": "t", "v": 1}]})
            async with running_relay(store, mqtt_config(mosquitto.port)) as relay:
                await until(lambda: len(sub.events()) >= len(good), "the good events delivered")

                async def recorded() -> bool:
                    return len(await dead_letters(store)) == len(bad)

                await until(recorded, "the bad ones recorded as dead letters")

                async def drained() -> bool:
                    return (await store.stats()).outbox_depth == 0

                await until(drained, "nothing left undelivered")
                assert relay.delivered == len(good) and relay.dead_lettered == len(bad)
                assert relay.state == "connected"  # the relay did not die on them
                assert "to dead letters: cannot publish" in (relay.last_error or "")
            rows = await dead_letters(store)
            all_seqs = await store.read(
                lambda c: [s for (s,) in c.execute("SELECT seq FROM events ORDER BY seq")]
            )
        finally:
            await store.close()
        delivered = {e["seq"] for e in sub.events()}
        dead = {seq for seq, _s, _r in rows}
        assert delivered.isdisjoint(dead)
        assert delivered | dead == set(all_seqs)  # each one: delivered or a dead letter
        assert sorted(s for _q, s, _r in rows) == sorted(bad)
        reasons = {s: r for _q, s, r in rows}
        assert "wildcard" in reasons["device:valve+3"] and "wildcard" in reasons["device:hash#"]
        assert "control" in reasons["device:line\nbreak"]
        assert "control" in reasons["device:nul\x00"]
        assert "malformed" not in mosquitto.log().lower()
    finally:
        sub.stop()


@pytest.mark.peer("mosquitto")
async def test_downlink_commands_naming_bad_devices_or_points_are_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path, topic="gateways/gw/responses")
    try:
        async with (
            open_store(tmp_path / "gw.db") as store,
            running_relay(store, mqtt_config(mosquitto.port)) as relay,
        ):
            await until(lambda: relay.channel is not None, "connected")
            for body in (
                {"id": "c-1", "device": "valve+3"},
                {"id": "c-2", "device": "ok", "point": "a#"},
                {"id": "c+3", "device": "ok"},
            ):
                _pub(mosquitto.port, json.dumps(body))
            await until(lambda: len(sub.raw()) >= 3, "three refusals answered")
            evs = await store.events(0, 100)
        answers = [cbor2.loads(p) for _, p in sub.raw()]
        assert [a["status"] for a in answers] == ["rejected"] * 3
        assert "'device' 'valve+3' must use letters, digits" in answers[0]["reason"]
        assert "'point' 'a#' must use letters" in answers[1]["reason"]
        assert "command id must be a string of letters" in answers[2]["reason"]
        assert [e for e in evs if e.type == ev.COMMAND_REQUESTED] == []
    finally:
        sub.stop()


# -- config ---------------------------------------------------------------------------------
def test_config_names_follow_the_one_rule_with_their_toml_path() -> None:
    text = (
        "".join(
            f'[devices.{json.dumps(n)}]\ndriver = "virtual"\n[devices.{json.dumps(n)}.points.t]\n'
            for n in ["urn:dev:ow:10e2073a01080063", "boiler-1", "valve+3", "x" * 65]
        )
        + '[devices.ok]\ndriver = "virtual"\n[devices.ok.points."p#1"]\n'
    )
    with pytest.raises(ConfigError) as info:
        cfg.loads(text)
    got = {i.path: i.message for i in info.value.issues}
    assert set(got) == {'devices."valve+3"', "devices." + "x" * 65, 'devices.ok.points."p#1"'}
    assert "must use letters, digits, '.', '_', ':' or '-'" in got['devices."valve+3"']
    assert "longer than 64" in got["devices." + "x" * 65]
    # The shipped config obeys it.
    cfg.load(ROOT / "config.toml")


# -- the daemon: RD, SenML, MQTT, the log, gatewayctl ----------------------------------------
async def _coap(
    port: int, requests: Sequence[tuple[str, list[str], bytes, int | None]]
) -> list[str]:
    from aiocoap import POST, Context, Message

    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        codes = []
        for path, query, payload, cf in requests:
            msg = Message(code=POST, uri=f"coap://127.0.0.1:{port}{path}", payload=payload)
            msg.opt.uri_query = tuple(query)
            if cf is not None:
                msg.opt.content_format = cf
            resp = await asyncio.wait_for(ctx.request(msg).response, 10)
            codes.append(resp.code.dotted)
        return codes
    finally:
        await ctx.shutdown()


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
port = {coap}
allow_unauthenticated = true
accept_unknown_devices = true
[sync]
backoff_base = 0.05
backoff_cap = 0.3
breaker_cooldown = 0.3
[[sync.endpoints]]
url = "mqtt://127.0.0.1:{mqtt}"
"""


def _ctl(config: Path, *args: str) -> Any:
    p = run_cli(config, "--json", *args)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


@pytest.mark.peer("mosquitto")
async def test_names_from_the_network_cannot_reach_topics_logs_or_tables(tmp_path: Path) -> None:
    coap_port = free_port(socket.SOCK_DGRAM)
    broker = Mosquitto(port=free_port())
    config = tmp_path / "config.toml"
    config.write_text(
        DAEMON.format(
            state=tmp_path / "state", run=tmp_path / "run", coap=coap_port, mqtt=broker.port
        )
    )
    daemon: Daemon | None = None
    sub: Subscriber | None = None
    try:
        daemon = start_daemon(config, tmp_path)
        # The broker is not up yet: the error says so...
        wait_until(lambda: "cannot connect" in (_ctl(config, "outbox")["last_error"] or ""),
                   "a connect failure in gatewayctl outbox")  # fmt: skip
        broker.start()
        # ... and once delivery works, that old error is not shown as the current one.
        wait_until(lambda: _ctl(config, "outbox")["link"] == "connected", "connected")
        wait_until(lambda: _ctl(config, "outbox")["backlog"] == 0, "backlog delivered")
        assert _ctl(config, "outbox")["last_error"] is None
        sub = Subscriber(broker.port, tmp_path)

        link = b"</t>"
        attacks = [("/rd", [f"ep={n}", "lt=600"], link, 40) for n in BAD_NAMES]
        attacks.append(("/rd", ["ep=ok-1", "d=plant+1"], link, 40))  # a bad sector
        codes = await _coap(coap_port, attacks)
        assert codes == ["4.00"] * len(attacks), list(zip(BAD_NAMES, codes, strict=False))
        codes = await _coap(coap_port, [
            ("/rd", ["ep=pump-1"], link, 40),  # a configured device: not an RD endpoint
            ("/telemetry", [], b'[{"bn":"ok-1/","n":"t/x","v":1}]', 110),  # '/' in a point
            ("/rd", ["ep=ok-1", "lt=600"], link, 40),
            ("/telemetry", [], b'[{"bn":"ok-1/","n":"t","v":1}]', 110),
        ])  # fmt: skip
        assert codes == ["4.03", "4.00", "2.01", "2.04"]

        wait_until(lambda: {e["type"] for e in sub.events() if e["stream"] == "device:ok-1"}
                   >= {"device.registered", "readings"}, "ok-1 at the subscriber")  # fmt: skip
        wait_until(lambda: _ctl(config, "outbox")["backlog"] == 0, "backlog delivered")
        out = _ctl(config, "outbox")
        assert out["dead_letters"] == 0 and out["last_error"] is None, out
        devices = {d["id"]: d["source"] for d in _ctl(config, "devices")}
        assert devices == {"pump-1": "config", "ok-1": "rd"}
        assert not any(("+" in t or "#" in t) for t, _p in sub.raw())
    finally:
        if sub is not None:
            sub.stop()
        if daemon is not None:
            daemon.stop()
            daemon.notify.close()
        broker.remove()
    log = daemon.log.read_text() if daemon is not None else ""
    assert "store corrupted" not in log
    assert all(" ERROR " not in line for line in log.splitlines()), log


def test_daemon_log_lines_escape_control_characters() -> None:
    # setup_logging is what gatewayd uses: one record, one line, whatever its arguments.
    code = (
        "import logging\nfrom gateway.daemon import setup_logging\nsetup_logging('info')\n"
        f"logging.getLogger('gateway.coap').info('rd: registered %s', {FORGED!r} + '\\x1b[2J')\n"
    )
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=ROOT, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("rd: registered x\\n2026-12-04 05:00:00,000 ERROR gateway.store: "
                             "store corrupted\\x1b[2J")  # fmt: skip


async def test_cli_tables_escape_control_characters(tmp_path: Path) -> None:
    # A database written before names were checked: gatewayctl reads it (daemon down).
    config = tmp_path / "config.toml"
    config.write_text(f'[gateway]\nid = "gw"\nstate_dir = "{tmp_path}"\n'
                      f'runtime_dir = "{tmp_path}"\n')  # fmt: skip

    async def fill() -> None:
        store = await EventStore.open(tmp_path / "gateway.db", gateway_id="gw")
        try:
            await store.append_many([
                NewEvent(ev.device_stream("evil\x1b[2J\nforged  rd  yes"), ev.DEVICE_REGISTERED,
                         {"source": "rd", "driver": "coap"}),
                NewEvent(ev.device_stream("plain-1"), ev.DEVICE_REGISTERED,
                         {"source": "rd", "driver": "coap"}),
            ])  # fmt: skip
        finally:
            await store.close()

    await fill()
    p = run_cli(config, "devices")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "\x1b" not in p.stdout
    rows = [line for line in lines if "evil" in line or "plain-1" in line]
    assert len(rows) == 2, p.stdout
    assert "evil\\x1b[2J\\nforged  rd  yes" in rows[0]


async def test_ble_discovery_keeps_an_invalid_advertised_name_only_as_escaped_text(
    tmp_path: Path,
) -> None:
    # The door a BLE driver reports a stranger through (its DriverContext) into the store.
    from drivers.base import DiscoveredDevice
    from services.collection import CollectionService, _Context

    async def go() -> list[dict[str, Any]]:
        store = await EventStore.open(tmp_path / "gateway.db", gateway_id="gw")
        try:
            svc = CollectionService()
            svc.store, svc.log = store, logging.getLogger("test.collection")
            ctx = _Context(svc, "ble")
            for address, name in (
                ("A4:C1:38:00:00:01", "ATC_1234"),
                ("A4:C1:38:00:00:02", "evil\n2026 ERROR forged+#"),
            ):
                ctx.discovered(DiscoveredDevice("ble", address, name, "bthome", -60, {}))
            await asyncio.gather(*svc._status_tasks)
            evs = await store.events(0, 100, stream="discovered")
            return [dict(e.data) for e in evs]
        finally:
            await store.close()

    found = await go()
    assert [(d["name"], d.get("advertised_name")) for d in found] == [
        ("ATC_1234", None),
        (None, "evil\\n2026 ERROR forged+#"),
    ]
