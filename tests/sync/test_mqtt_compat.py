"""gateway.sync.mqtt_compat against a real Mosquitto, by both paths: the patched one (paho's
and aiomqtt's internals as pinned) and the stock one (those internals changed shape)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Peer, require_binary, wait_until
from tests.sync.conftest import Mosquitto
from tests.sync.helpers import aio, mqtt_config

pytestmark = pytest.mark.peer("mosquitto")


@pytest.fixture(params=["patched", "stock"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which path the link takes; "stock" wraps every private name relied on in a function
    of other parameters (the libraries still work; their internals no longer look pinned)."""
    import aiomqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties

    from gateway.sync import mqtt_compat

    if request.param == "stock":
        for cls, names in (
            (aiomqtt.Client, mqtt_compat.AIOMQTT_METHODS),
            (mqtt.Client, mqtt_compat.PAHO_METHODS),
            (Properties, {"pack": ()}),
        ):
            for name in names:
                real = getattr(cls, name)
                monkeypatch.setattr(cls, name, _changed(real))
    mqtt_compat.reset()
    yield request.param
    mqtt_compat.reset()


def _changed(real: Any) -> Any:
    def changed(self: Any, *args: Any, **kwargs: Any) -> Any:
        return real(self, *args, **kwargs)

    return changed


def _differ(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "internals differ" in r.getMessage()]


@aio
async def test_publish_acks_refusals_limit_and_session_end_by_both_paths(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import paho.mqtt._packet as packet

    from gateway.sync import mqtt_compat
    from gateway.sync.link import MqttLink

    decoded: list[int] = []
    real = packet.decode_puback

    def counting(*args: Any) -> Any:
        decoded.append(1)
        return real(*args)

    monkeypatch.setattr(packet, "decode_puback", counting)
    broker = Mosquitto("max_packet_size 2000\n")
    acl = broker.file("acl", "topic deny gateways/gw/events/device:no\ntopic readwrite #\n")
    broker.extra += f"acl_file {acl}\n"
    broker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="test"):
            link = MqttLink(mqtt_config(broker.port), "gw", logging.getLogger("test"))
            MqttLink(mqtt_config(broker.port), "gw", logging.getLogger("test"))  # said once
        found = mqtt_compat.check()
        if path == "stock":
            assert found == mqtt_compat.Internals(False, False, False)
            [line] = _differ(caplog)
            for name in ("aiomqtt.Client._on_publish", "paho Client._handle_pubackcomp"):
                assert name in line
        else:
            assert found == mqtt_compat.Internals(True, True, True)
            assert _differ(caplog) == []
        ch = await link.connect()
        try:
            # The broker's Maximum Packet Size (CONNACK) bounds what the channel sends.
            assert ch.max_payload == 2000
            assert ch.fits("live", "device:a", "readings", 1000)
            assert not ch.fits("live", "device:a", "readings", 1990)
            acks = [await ch.send("live", "device:a", "readings", 1, b"\xa0") for _ in range(3)]
            assert [(a.ok, a.code) for a in acks] == [(True, 0x10)] * 3
            assert len(decoded) == (3 if path == "stock" else 0)
            refused = await ch.send("live", "device:no", "readings", 1, b"\xa0")
            assert (refused.ok, refused.code, refused.reason) == (False, 0x87, "Not authorized")
            broker.stop()  # the session ends: the channel says so
            await ch.closed
        finally:
            await ch.close()
    finally:
        broker.remove()


@aio
async def test_without_a_broker_limit_there_is_none(path: str) -> None:
    from gateway.sync.link import MqttLink

    broker = Mosquitto().start()
    try:
        link = MqttLink(mqtt_config(broker.port), "gw", logging.getLogger("test"))
        ch = await link.connect()
        try:
            assert ch.max_payload is None
            assert ch.fits("live", "device:a", "readings", 10_000_000)
        finally:
            await ch.close()
    finally:
        broker.remove()


@aio
@pytest.mark.parametrize("fmt", ["cbor", "json"])
async def test_every_batch_carries_its_content_type(path: str, fmt: str, tmp_path: Path) -> None:
    # The PUBLISH properties are packed once (patched) or by paho each time (stock): a
    # subscriber we did not write sees the same Content-Type and Payload Format Indicator.
    from gateway.sync.link import MqttLink

    broker = Mosquitto().start()
    out = tmp_path / "sub.txt"
    sub = Peer(
        [require_binary("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(broker.port),
         "-V", "mqttv5", "-q", "1", "-t", "gateways/#", "-F", "%t|%C|%F"],
        log=out,
    )  # fmt: skip
    try:
        wait_until(lambda: "Received SUBSCRIBE" in broker.log(), "mosquitto_sub subscribed")
        link = MqttLink(mqtt_config(broker.port, format=fmt), "gw", logging.getLogger("test"))
        ch = await link.connect()
        try:
            for _ in range(2):
                assert (await ch.send("live", "device:a", "readings", 1, b"{}")).ok
        finally:
            await ch.close()
        wait_until(lambda: out.read_text().count("gateways/gw/") >= 2, "subscriber saw both")
        lines = [x for x in out.read_text().splitlines() if x.startswith("gateways/gw/")]
        want = "application/json|1" if fmt == "json" else "application/cbor|"
        assert lines == [f"gateways/gw/events/device:a|{want}"] * 2
    finally:
        sub.stop()
        broker.remove()
