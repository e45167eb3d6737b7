"""Anomaly flags through a real gatewayd: a seeded noisy signal with injected spikes is
flagged exactly on the spikes, the same signal without spikes not at all; the detector's
state survives a SIGKILL and a SIGTERM (a spike right after a restart is flagged, although
a fresh detector would still be warming up)."""

from __future__ import annotations

from pathlib import Path

from gateway.control import call
from tests.processing.support import HEADER, events, readings, socket_path
from tests.support.daemon import Daemon, start_daemon, write_config
from tests.support.peers import wait_until

LINE = (
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
{spikes}

[processing.line.flow]
anomaly = {{ alpha = 0.02, threshold = 5.0, warmup = 200 }}
"""
)
SPIKES = "spike = 6.0\nspike_every = 40"
N = 600  # readings compared in each run


def processed(config: Path) -> int:
    return int(call(socket_path(config), "status")["services"]["processing"]["processed_seq"])


def run(tmp: Path, factory: list[Daemon], spikes: str, n: int) -> tuple[list[int], set[int]]:
    """Readings' seqs (first `n`) and the seqs of the readings flagged."""
    tmp.mkdir()
    config = write_config(tmp, LINE.replace("{spikes}", spikes))
    d = start_daemon(config, tmp)
    factory.append(d)
    wait_until(lambda: len(readings(config, "line", "flow")) >= n, f"{n} readings", attempts=600)
    nth = readings(config, "line", "flow")[n - 1][0]
    wait_until(lambda: processed(config) >= nth, "processing to see them")
    assert d.stop() == 0
    seqs = [seq for seq, _ in readings(config, "line", "flow")][:n]
    flags = [data for *_x, data in events(config, "anomaly", "device:line")]
    assert all(f["n"] == "flow" and f["band"][0] < 20 < f["band"][1] for f in flags)
    return seqs, {f["seq"] for f in flags if f["seq"] <= nth}


def test_spikes_are_flagged_and_a_clean_signal_is_not(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    seqs, flagged = run(tmp_path / "clean", daemon_factory, "", N)
    assert flagged == set()  # no false positive in N readings
    seqs, flagged = run(tmp_path / "spiky", daemon_factory, SPIKES, N)
    spikes = {seq for i, seq in enumerate(seqs, 1) if i % 40 == 0 and i > 200}
    assert flagged == spikes and len(spikes) == 10


def test_detector_state_survives_sigkill_and_sigterm(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, LINE.replace("{spikes}", SPIKES))
    seen = 0
    for round_, how in enumerate(("first", "kill", "term")):
        d = start_daemon(config, tmp_path, name=f"gatewayd-{round_}")
        daemon_factory.append(d)
        # After a restart the driver counts again: spikes at its 40th and 80th reading.
        want = 300 if how == "first" else 100
        wait_until(
            lambda: len(readings(config, "line", "flow")) >= seen + want,  # noqa: B023
            "readings",
            attempts=600,
        )
        mine = [seq for seq, _ in readings(config, "line", "flow")][seen : seen + want]
        wait_until(lambda: processed(config) >= mine[-1], "processing to see them")  # noqa: B023
        flagged = {data["seq"] for *_x, data in events(config, "anomaly", "device:line")}
        spikes = {seq for i, seq in enumerate(mine, 1) if i % 40 == 0}
        if how == "first":
            assert flagged & spikes == {mine[239], mine[279]}  # after the warm-up only
        else:
            assert spikes <= flagged, f"after {how}: a fresh detector would still warm up"
        if how == "first":
            d.kill()
        else:
            assert d.stop() == 0
        seen = len(readings(config, "line", "flow"))
