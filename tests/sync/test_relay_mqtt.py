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
