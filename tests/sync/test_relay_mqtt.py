"""The relay against a real Mosquitto: delivery, order, idempotency keys, downlink."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sync.conftest import Mosquitto, Subscriber
from tests.sync.helpers import (
    aio,
    check_order,
    mqtt_config,
    open_store,
    outbox_depth,
    running_relay,
    until,
)

pytestmark = pytest.mark.peer("mosquitto")


@aio
async def test_delivers_everything_in_order_and_deletes_only_after_puback(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(250):
                await store.append(f"device:d{i % 3}", "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(mosquitto.port, batch_size=20, inflight=4)
            async with running_relay(store, cfg) as relay:
                await until(lambda: _zero(store), "outbox empty")
                await until(lambda: len(sub.events()) >= 250, "subscriber saw 250 events")
                assert relay.delivered == 250
        per_stream = check_order(sub.events())
        assert sorted(per_stream) == ["device:d0", "device:d1", "device:d2"]
        assert sum(len(v) for v in per_stream.values()) == 250
        topics = {t for t, _ in sub.messages()}
        assert topics == {f"gateways/gw/events/device:d{i}" for i in range(3)}
    finally:
        sub.stop()


async def _zero(store: object) -> bool:
    from gateway.store import EventStore

    assert isinstance(store, EventStore)
    return await outbox_depth(store) == 0


def _pub(port: int, topic: str, payload: str) -> None:
    import subprocess

    from tests.peers import require_binary

    subprocess.run(
        [require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5",
         "-q", "1", "-t", topic, "-m", payload],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


@aio
async def test_commands_from_the_cloud_become_one_event_each_and_bad_ones_are_answered(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    import cbor2

    sub = Subscriber(mosquitto.port, tmp_path, topic="gateways/gw/responses")
    try:
        async with (
            open_store(tmp_path / "gw.db") as store,
            running_relay(store, mqtt_config(mosquitto.port)) as relay,
        ):
            await until(lambda: relay.channel is not None, "connected")
            cmd = '{"id": "c-1", "device": "boiler", "point": "setpoint", "value": 21.5}'
            _pub(mosquitto.port, "gateways/gw/commands", cmd)
            _pub(mosquitto.port, "gateways/gw/commands", cmd)  # redelivery: same id
            _pub(mosquitto.port, "gateways/gw/commands", '{"id": "c 2", "device": "x"}')
            _pub(mosquitto.port, "gateways/gw/commands", "not json")
            await until(lambda: len(sub.raw()) >= 3, "two refusals answered, c-1 evented")
            # The valid command's event committed before the broker got its PUBACK;
            # the refusals were published after it (one session, in order).
            evs = await store.events(0, 100, stream="command:c-1")
        assert [(e.type, e.version) for e in evs] == [("command.requested", 1)]
        assert evs[0].data["device"] == "boiler" and evs[0].data["value"] == 21.5
        assert evs[0].data["source"] == "cloud"
        # format "cbor" (the default); the command's own events (a batch: an array) come
        # on this topic too, through the outbox
        answers = [a for _, p in sub.raw() if isinstance(a := cbor2.loads(p), dict)]
        assert all(a["status"] == "rejected" for a in answers)
        assert "command id must be a string" in answers[0]["reason"]
        assert answers[0]["id"] is None or answers[0]["id"] == "c 2"
        assert "neither a JSON nor a CBOR map" in answers[1]["reason"]
    finally:
        sub.stop()


@aio
async def test_live_events_overtake_a_rate_limited_backlog(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(400):  # the backlog of an outage
                await store.append(f"device:old{i % 2}", "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(
                mosquitto.port, batch_size=10, backfill={"threshold": 100, "rate": 40.0}
            )
            async with running_relay(store, cfg) as relay:
                await until(lambda: relay.live_first, "live-first mode")
                live = await store.append("device:new", "readings", {"r": [{"n": "t", "v": 1}]})
                old = await store.append("device:old0", "readings", {"r": [{"n": "t", "v": -1}]})
                keys = {f"gw:{live.seq}", f"gw:{old.seq}"}
                await until(lambda: keys <= {e["key"] for e in sub.events()}, "live events")
                backfilled = [e for t, b in sub.messages() if "/backfill/" in t for e in b]
                # The live events are out while most of the backlog still waits its turn.
                assert len(backfilled) < 400
                assert relay.backfill_left > 0
        msgs = sub.messages()
        live_topics = {t for t, b in msgs if any(e["key"] in keys for e in b)}
        assert live_topics == {"gateways/gw/events/device:new", "gateways/gw/events/device:old0"}
        # Each lane is in order per stream.
        check_order([e for t, b in msgs if "/backfill/" in t for e in b])
        check_order([e for t, b in msgs if "/events/" in t for e in b])
    finally:
        sub.stop()


@aio
async def test_mqtt_311_and_failover_to_the_second_endpoint(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from tests.peers import free_port

    dead = free_port()  # nobody listens here: the first endpoint fails, the second works
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(10):
                await store.append("device:a", "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(
                0, mqtt_version="3.1.1", format="json",
                endpoints=[{"url": f"mqtt://127.0.0.1:{dead}"},
                           {"url": f"mqtt://127.0.0.1:{mosquitto.port}"}],
            )  # fmt: skip
            async with running_relay(store, cfg) as relay:
                await until(lambda: _zero(store), "outbox drained through the second endpoint")
                fig = relay.sink.figures()
                assert fig["endpoint"] == f"mqtt://127.0.0.1:{mosquitto.port}"
                assert "Connection refused" in (fig["last_error"] or "")
            await until(lambda: len(sub.events()) >= 10, "subscriber saw them")
        assert sub.raw()[0][1].startswith(b"[{")  # JSON arrays
        assert check_order(sub.events())["device:a"] == list(range(1, 11))
    finally:
        sub.stop()


@aio
async def test_plain_pubacks_skip_pahos_decoding_and_refusals_keep_their_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path for success PUBACKs (gateway.sync.mqtt_compat.fast_puback) must give the
    # relay what paho's own path gives: the broker's reason code, for every packet id.
    import logging

    import paho.mqtt._packet as packet

    from gateway.sync.link import MqttLink
    from gateway.sync.mqtt_compat import fast_puback

    assert fast_puback(object()) is False  # not the paho it was written for: not installed
    decoded: list[int] = []
    real = packet.decode_puback

    def counting(*args: object) -> object:
        decoded.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(packet, "decode_puback", counting)
    broker = Mosquitto()
    acl = broker.file("acl", "topic deny gateways/gw/events/device:no\ntopic readwrite #\n")
    broker.extra = f"acl_file {acl}\n"
    broker.start()
    sub: Subscriber | None = None
    try:
        link = MqttLink(mqtt_config(broker.port), "gw", logging.getLogger("test"))
        ch = await link.connect()
        try:
            # Nobody subscribed: Mosquitto answers 0x10 "No matching subscribers" (success).
            acks = [await ch.send("live", "device:a", "readings", 1, b"\xa0") for _ in range(5)]
            assert [(a.ok, a.code) for a in acks] == [(True, 0x10)] * 5
            sub = Subscriber(broker.port, tmp_path)
            acks = [await ch.send("live", "device:a", "readings", 1, b"\xa0") for _ in range(5)]
            assert [(a.ok, a.code) for a in acks] == [(True, 0x00)] * 5
            assert decoded == []  # none of the ten took paho's decoding
            refused = await ch.send("live", "device:no", "readings", 1, b"\xa0")
            assert (refused.ok, refused.code) == (False, 0x87)
            assert refused.reason == "Not authorized"
            assert decoded == [1]  # paho's own path, with its reason string
            after = await ch.send("live", "device:a", "readings", 1, b"\xa0")
            assert after.ok
        finally:
            await ch.close()
    finally:
        if sub is not None:
            sub.stop()
        broker.remove()
