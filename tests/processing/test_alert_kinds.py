"""The other alert sources through a real gatewayd: anomaly flags (raised on a flag, cleared
after `quiet`), rate of change, a degraded service, and the store's share of its quota."""

from __future__ import annotations

from pathlib import Path

from tests.processing.support import HEADER, alert_events, events
from tests.support.daemon import Daemon, start_daemon, write_config
from tests.support.peers import wait_until

KINDS = (
    HEADER
    + """
[devices.line]
driver = "virtual"
interval = 0.01
seed = 7
[devices.line.points.flow]
signal = "constant"
base = 20.0
noise = 0.5
spike = 6.0
spike_every = 100

[devices.meter-1]
driver = "virtual"
interval = 0.05
[devices.meter-1.points.energy]
signal = "counter"
step = 1.0

[devices.broken]
driver = "virtual"
interval = 0.05
failure_rate = 1
[devices.broken.points.x]
signal = "constant"

[processing.line.flow]
anomaly = {{ alpha = 0.02, threshold = 5.0, warmup = 50 }}

[alerts.odd-flow]
anomaly = "line/flow"
quiet = "0.3s"

[alerts.energy-rising]
rate_of_change = "meter-1/energy"
raise_above = 5.0

[alerts.energy-racing]
rate_of_change = "meter-1/energy"
raise_above = 1000.0

[alerts.collection-degraded]
service_degraded = "collection"

[alerts.sync-degraded]
service_degraded = "sync"

[alerts.store-filling]
store_above = 0.01
"""
)


def test_anomaly_rate_service_and_store_alerts(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, KINDS)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(
        lambda: sum(t == "alert.cleared" for _, t, _, _ in alert_events(config, "odd-flow")) >= 2,
        "two anomaly episodes",
        attempts=600,
    )
    wait_until(lambda: alert_events(config, "collection-degraded") != [], "collection degraded",
               attempts=400)  # fmt: skip
    wait_until(lambda: alert_events(config, "store-filling") != [], "store filling",
               attempts=400)  # fmt: skip
    assert d.stop() == 0

    odd = alert_events(config, "odd-flow")
    kinds = [t for _, t, _, _ in odd]
    assert kinds[: len(kinds) // 2 * 2] == ["alert.raised", "alert.cleared"] * (len(kinds) // 2)
    flags = {seq: data for seq, *_x, data in events(config, "anomaly", "device:line")}
    for _, t, _, data in odd:
        if t == "alert.raised":
            assert data["value"] == flags[data["at_seq"]]["v"]  # raised by the flag itself

    rising = alert_events(config, "energy-rising")
    assert [t for _, t, _, _ in rising] == ["alert.raised"]  # a counter keeps rising
    assert 5 < rising[0][3]["value"] < 1000
    assert "rate of change of meter-1/energy" in rising[0][3]["message"]
    assert alert_events(config, "energy-racing") == []

    degraded = alert_events(config, "collection-degraded")
    assert [t for _, t, _, _ in degraded] == ["alert.raised"]
    assert degraded[0][3]["value"] == "degraded"
    assert alert_events(config, "sync-degraded") == []  # no [sync]: nothing to judge
    store = alert_events(config, "store-filling")
    assert [t for _, t, _, _ in store] == ["alert.raised"] and store[0][3]["value"] > 0.01
