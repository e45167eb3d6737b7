"""How the relay cuts batches, against a real Mosquitto: one type per batch when the topic
names the type, and an outbox row whose event is gone goes to dead letters."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import EventStore
from tests.support.mqtt import Mosquitto, Subscriber
from tests.support.wait import until
from tests.sync.helpers import (
    check_order,
    dead_letters,
    mqtt_config,
    open_store,
    outbox_depth,
    running_relay,
)

pytestmark = pytest.mark.peer("mosquitto")


async def _empty(store: EventStore) -> bool:
    return await outbox_depth(store) == 0


async def test_with_type_in_the_topic_each_batch_holds_one_type_in_stream_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            # Runs of one type, of other lengths than the batch size, interleaved streams.
            kinds = ["readings"] * 7 + ["alert.raised"] * 3 + ["readings"] * 12 + ["alert.cleared"]
            for i, kind in enumerate(kinds * 3):
                await store.append(f"device:d{i % 2}", kind, {"i": i})
            n = len(kinds) * 3
            topic = "gateways/{gateway}/events/{stream}/{type}"
            cfg = mqtt_config(mosquitto.port, batch_size=5, inflight=3, topics={"telemetry": topic})
            async with running_relay(store, cfg) as relay:
                await until(lambda: _empty(store), "outbox empty")
                await until(lambda: len(sub.events()) >= n, f"subscriber saw {n} events")
                assert relay.delivered == n
        for topic, batch in sub.messages():
            assert 1 <= len(batch) <= 5
            assert {(e["stream"], e["type"]) for e in batch} == {
                (topic.split("/")[3], topic.split("/")[4])
            }, topic
        per_stream = check_order(sub.events())
        sizes = {s: len(v) for s, v in per_stream.items()}
        assert sizes == {"device:d0": (n + 1) // 2, "device:d1": n // 2}
    finally:
        sub.stop()


async def test_an_outbox_row_whose_event_is_gone_is_dead_and_the_rest_flows(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(10):
                await store.append("device:a", "readings", {"i": i})
            # An outbox row with no event behind it (e.g. a log pruned by hand).
            await store.write(
                lambda c: c.execute(
                    "INSERT INTO outbox (seq, stream, attempts, last_error) "
                    "VALUES (1000, 'device:ghost', 0, NULL)"
                )
            )
            for i in range(10, 20):
                await store.append("device:a", "readings", {"i": i})
            cfg = mqtt_config(mosquitto.port, batch_size=4, inflight=2)
            async with running_relay(store, cfg) as relay:
                await until(lambda: _empty(store), "outbox empty")
                await until(lambda: len(sub.events()) >= 20, "subscriber saw 20 events")
                assert relay.delivered == 20 and relay.dead_lettered == 1
            assert await dead_letters(store) == [
                (1000, "device:ghost", "event missing from the log")
            ]
        assert [e["data"]["i"] for e in sub.events()] == list(range(20))
    finally:
        sub.stop()
