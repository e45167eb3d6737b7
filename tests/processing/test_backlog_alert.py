"""A backlog-age alert through a real gatewayd and a real Mosquitto: raised while the broker
is stopped and events pile up in the outbox, cleared once it is back and they drained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processing.support import HEADER, alert_events, events
from tests.support.daemon import Daemon, start_daemon, write_config
from tests.support.mqtt import Mosquitto
from tests.support.peers import wait_until

pytestmark = pytest.mark.peer("mosquitto")


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    m = Mosquitto()
    try:
        m.start()
        yield m
    finally:
        m.remove()


def test_outbox_older_than_raises_while_the_broker_is_down_and_clears_after(
    tmp_path: Path, daemon_factory: list[Daemon], broker: Mosquitto
) -> None:
    body = (
        HEADER
        + f"""
[devices.meter-1]
driver = "virtual"
interval = 0.1
[devices.meter-1.points.energy]
signal = "counter"

[sync]
[[sync.endpoints]]
url = "mqtt://127.0.0.1:{broker.port}"

[alerts.backlog]
outbox_older_than = "2s"
severity = "critical"
"""
    )
    config = write_config(tmp_path, body)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(lambda: len(events(config, "readings")) >= 30, "readings flowing", attempts=400)
    assert alert_events(config, "backlog") == []  # delivered as they come: no backlog
    broker.stop()
    wait_until(lambda: len(alert_events(config, "backlog")) == 1, "backlog raised", attempts=400)
    raised = alert_events(config, "backlog")[0][3]
    assert raised["severity"] == "critical" and raised["value"] > 2
    broker.start()
    wait_until(lambda: len(alert_events(config, "backlog")) == 2, "backlog cleared", attempts=600)
    assert [t for _, t, _, _ in alert_events(config, "backlog")] == [
        "alert.raised",
        "alert.cleared",
    ]
    assert d.stop() == 0
