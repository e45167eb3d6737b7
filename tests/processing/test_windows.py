"""Tumbling windows through a real gatewayd: aggregates equal a computation from the log's
readings, window by window; a SIGKILL inside a window changes nothing (the window is
rebuilt from the log and emitted once); empty windows emit count = 0 where asked."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from gateway.store import maintenance
from tests.processing.support import HEADER, db_path, events
from tests.support.daemon import Daemon, start_daemon, write_config
from tests.support.peers import wait_until

WINDOWS = (
    HEADER
    + """
[devices.meter-1]
driver = "virtual"
interval = 0.05
[devices.meter-1.points.energy]
signal = "counter"
step = 0.5
[devices.meter-1.points.power]
signal = "sine"
base = 10.0
amplitude = 5.0
period = 1.7

[devices.slow]
driver = "virtual"
interval = 3600
[devices.slow.points.level]
signal = "constant"
base = 3

[processing.meter-1.energy]
window = "1s"
counter = true

[processing.meter-1.power]
window = "1s"

[processing.slow.level]
window = "1s"
empty = true
"""
)


def aggregates(config: Path, stream: str) -> list[dict[str, Any]]:
    return [data for *_x, data in events(config, "aggregate", stream)]


def expected(config: Path, device: str, point: str, counter: bool) -> dict[float, dict[str, Any]]:
    """Window start -> the aggregate computed by hand from the log's readings."""
    by_window: dict[float, list[tuple[int, float]]] = defaultdict(list)
    for seq, _s, _t, wall, data in events(config, "readings", f"device:{device}"):
        for rec in data["r"]:
            if rec["n"] == point and rec["v"] is not None:
                by_window[float(math.floor(wall))].append((seq, rec["v"]))
    out = {}
    for start, vals in by_window.items():
        vs = [v for _, v in vals]
        agg: dict[str, Any] = {
            "n": point, "device": device, "start": start, "end": start + 1.0, "window": 1.0,
            "count": len(vs), "min": min(vs), "max": max(vs),
            "mean": round(sum(vs) / len(vs), 9), "last": vs[-1],
        }  # fmt: skip
        if counter:
            agg["sum"] = round(sum(vs), 9)
        out[start] = agg
    return out


def check(config: Path) -> int:
    """Every emitted aggregate equals the hand computation; none twice; none missing between
    the first and the last emitted. Returns how many windows were compared."""
    compared = 0
    for point, counter in (("energy", True), ("power", False)):
        got = aggregates(config, f"aggregate:meter-1:{point}")
        starts = [a["start"] for a in got]
        assert len(starts) == len(set(starts)), f"a window emitted twice: {starts}"
        want = expected(config, "meter-1", point, counter)
        for a in got:
            assert a == want[a["start"]], (a, want[a["start"]])
        compared += len(got)
        inner = [s for s in want if min(starts) <= s <= max(starts)]
        assert sorted(inner) == starts, "a window with readings was not emitted"
    return compared


def test_windows_equal_the_log_and_a_sigkill_inside_one_changes_nothing(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, WINDOWS)
    d = start_daemon(config, tmp_path, name="first")
    daemon_factory.append(d)
    stream = "aggregate:meter-1:energy"
    wait_until(lambda: len(aggregates(config, stream)) >= 3, "three windows", attempts=400)
    assert check(config) >= 6

    d.kill()  # inside a window: its readings so far are only in the log
    last_reading = events(config, "readings", "device:meter-1")[-1][3]
    open_window = float(math.floor(last_reading))
    assert open_window not in {a["start"] for a in aggregates(config, stream)}

    d = start_daemon(config, tmp_path, name="second")
    daemon_factory.append(d)
    wait_until(
        lambda: (
            any(a["start"] > open_window + 1 for a in aggregates(config, stream))
            and any(a["count"] == 0 for a in aggregates(config, "aggregate:slow:level"))
        ),
        "windows after the restart",
        attempts=400,
    )
    assert d.stop() == 0
    got = {a["start"]: a for a in aggregates(config, stream)}
    assert open_window in got  # the window open at the kill, rebuilt and emitted once
    assert (
        got[open_window]["count"]
        == expected(config, "meter-1", "energy", True)[open_window]["count"]
    )
    assert check(config) >= 10
    assert maintenance.projections_match_rebuild(db_path(config))

    # The slow point read once: its window has count 1, later windows count 0 (empty = true).
    level = aggregates(config, "aggregate:slow:level")
    read = [a for a in level if a["count"]]
    assert read and read[0]["count"] == 1 and read[0]["min"] == 3
    empties = [a for a in level if a["count"] == 0]
    assert empties and all(set(a) == {"n", "device", "start", "end", "window", "count"}
                           for a in empties)  # fmt: skip
    starts = [a["start"] for a in level]
    assert starts == [starts[0] + i for i in range(len(starts))]  # every window, once
