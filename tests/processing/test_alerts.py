"""Alert rules through a real gatewayd: hysteresis (one raise and one clear per episode),
minimum duration, device unavailable via SIGHUP, SIGKILL while active, acknowledgement, and
the local command channel (one JSON per raise/clear, failures recorded, never fatal)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.control import call
from gateway.store import maintenance
from tests.processing.support import (
    HEADER,
    alert_events,
    db_path,
    events,
    readings,
    socket_path,
)
from tests.support.daemon import Daemon, run_cli, start_daemon, write_config
from tests.support.peers import wait_until

APPEND = """import sys
data = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(data.replace("\\n", " ") + "\\n")
"""


def channel(tmp: Path) -> tuple[str, Path]:
    """A [notify.file] channel: a script that appends each JSON it gets to a file."""
    script, out = tmp / "append.py", tmp / "delivered.jsonl"
    script.write_text(APPEND)
    toml = f'\n[notify.file]\ncommand = ["{sys.executable}", "{script}", "{out}"]\n'
    return toml, out


FLAKY = """import os, sys
if not os.path.exists(sys.argv[2]):
    open(sys.argv[2], "w").close()
    print("modem busy")
    sys.exit(3)
data = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(data.replace("\\n", " ") + "\\n")
"""


def more_channels(tmp: Path) -> tuple[str, Path]:
    """[notify.flaky] fails its first run only; [notify.slow] never exits in time."""
    script, out = tmp / "flaky.py", tmp / "flaky.jsonl"
    script.write_text(FLAKY)
    toml = (
        f'\n[notify.flaky]\ncommand = ["{sys.executable}", "{script}", "{out}", "{tmp / "m"}"]\n'
        "retries = 2\n"
        '\n[notify.slow]\ncommand = ["/bin/sh", "-c", "sleep 2; sleep 2"]\n'
        'timeout = "0.2s"\nretries = 0\n'
    )
    return toml, out


def delivered(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


SINE = (
    HEADER
    + """
[devices.boiler-1]
driver = "virtual"
interval = 0.05
[devices.boiler-1.points.temperature]
signal = "sine"
base = 50.0
amplitude = 10.0
period = 2.0
noise = 2.0

[alerts.hot]
point = "boiler-1/temperature"
raise_above = 55
clear_below = 45
severity = "critical"

[alerts.hot-brief]
point = "boiler-1/temperature"
raise_above = 55
min_duration = "0.3s"

[alerts.hot-long]
point = "boiler-1/temperature"
raise_above = 55
min_duration = "5s"

[notify.broken]
command = ["/bin/false"]
retries = 0
"""
)


def model(values: list[tuple[int, float]], above: float, below: float) -> list[tuple[str, int]]:
    """The hand computation: raised above `above`, cleared below `below`."""
    active, out = False, []
    for seq, v in values:
        if not active and v > above:
            active = True
            out.append(("alert.raised", seq))
        elif active and v < below:
            active = False
            out.append(("alert.cleared", seq))
    return out


def test_hysteresis_min_duration_ack_and_command_channel(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    toml, out = channel(tmp_path)
    config = write_config(tmp_path, SINE + toml)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(
        lambda: sum(t == "alert.raised" for _, t, _, _ in alert_events(config, "hot")) >= 4,
        "four episodes of hot",
        attempts=400,
    )
    # Acknowledge while it is active (it comes and goes with the sine).
    acks: list[Any] = []

    def ack() -> bool:
        r = run_cli(config, "alerts", "ack", "hot", "--by", "tester")
        acks.append(r)
        return r.returncode == 0

    wait_until(ack, "an acknowledgement of an active hot")
    assert acks[-1].stdout.startswith("acknowledged hot (episode ")
    assert any("alert hot is not active" in r.stderr for r in acks[:-1]) or len(acks) == 1
    r = run_cli(config, "alerts", "ack", "no-such-rule")
    assert r.returncode == 2 and "no alert rule 'no-such-rule'" in r.stderr
    r = run_cli(config, "--json", "alerts", "--all")
    shown = json.loads(r.stdout)
    assert shown["live"] is True and {a["id"] for a in shown["alerts"]} >= {"hot", "hot-brief"}
    assert call(socket_path(config), "status")["services"]["notification"]["state"] == "ok"
    assert d.stop() == 0

    temps = [(seq, rec["v"]) for seq, rec in readings(config, "boiler-1", "temperature")]
    # One raise and one clear per episode, exactly where the hand computation puts them.
    hot = [(t, data["at_seq"]) for _, t, _, data in alert_events(config, "hot")]
    assert len(hot) >= 7
    # (From the first clear on: the readings before the service subscribed are not its.)
    assert [t for t, _ in hot[:2]] == ["alert.raised", "alert.cleared"]
    after = [(seq, v) for seq, v in temps if seq > hot[1][1]]
    assert hot[2:] == model(after, 55, 45)[: len(hot) - 2]
    # The signal did bounce around the threshold: without hysteresis it would have flapped.
    assert len(model(temps, 55, 55)) > len(model(temps, 55, 45))

    # Minimum duration: raised only after 0.3 s above 55 with no reading at or below it;
    # the 5 s rule never (the sine is above 55 for about 0.67 s at a time).
    assert alert_events(config, "hot-long") == []
    walls = {seq: wall for seq, _s, _t, wall, _d in events(config, "readings")}
    brief = [(s, t, w, data) for s, t, w, data in alert_events(config, "hot-brief")]
    raised = [(s, w, data) for s, t, w, data in brief if t == "alert.raised"]
    assert raised
    for _seq, wall, data in raised:
        start, decided = data["since_seq"], data["at_seq"]
        assert wall - walls[start] >= 0.3
        assert all(v > 55 for s, v in temps if start <= s <= decided)

    # Acknowledged, with who.
    acked = [data for _, _, t, _, data in events(config, "alert.acked")]
    assert len(acked) == 1 and acked[0]["by"] == "tester"
    audit = [data for *_x, data in events(config, "control.verb")]
    acks_audited = [a for a in audit if a["verb"] == "alerts.ack"]
    done = [a for a in acks_audited if a["ok"]]
    assert len(done) == 1 and done[0]["args"]["id"] == "hot" and done[0]["uid"] == os.getuid()
    assert acks_audited[-1]["args"]["id"] == "no-such-rule" and acks_audited[-1]["ok"] is False
    assert not any(a["verb"] == "alerts" for a in audit)  # reading is not audited

    # The command channel got each raise and clear once, as JSON; the broken one failed
    # each time, recorded, and the daemon carried on (it stopped cleanly above).
    all_alerts = {
        (rule, seq)
        for rule in ("hot", "hot-brief")
        for seq, _t, _w, _d in alert_events(config, rule)
    }
    got = [(m["id"], m["seq"]) for m in delivered(out)]
    assert len(got) == len(set(got))
    assert set(got) <= all_alerts and len(got) >= len(all_alerts) - 2
    recorded = {(data["channel"], data["of"]) for *_x, data in events(config, "alert.delivered")}
    assert {("file", seq) for _id, seq in got} == recorded
    failed = [data for *_x, data in events(config, "alert.delivery_failed")]
    assert failed and all(f["channel"] == "broken" and f["final"] for f in failed)
    assert all(f["error"] == "exit status 1" for f in failed)
    assert maintenance.projections_match_rebuild(db_path(config))
    sample = delivered(out)[0]
    assert sample["event"] == "alert.raised" and sample["gateway"] == "gw-test"
    assert sample["severity"] in ("critical", "warning") and sample["episode"] == 1


PUMP = (
    HEADER
    + """
[devices.pump]
driver = "virtual"
interval = 0.05
failure_rate = {failure_rate}
[devices.pump.points.speed]
signal = "constant"
base = {base}

[alerts.pump-fast]
point = "pump/speed"
raise_above = 90
clear_below = 80

[alerts.pump-down]
device_unavailable = "pump"
severity = "critical"
"""
)


def pump(base: float, failure_rate: float) -> str:
    return PUMP.replace("{base}", str(base)).replace("{failure_rate}", str(failure_rate))


def evaluated(config: Path) -> int:
    return int(call(socket_path(config), "status")["services"]["notification"]["evaluated"])


def test_unavailable_via_sighup_and_sigkill_while_active_raise_and_deliver_once(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    toml, out = channel(tmp_path)
    toml2, flaky = more_channels(tmp_path)
    config = write_config(tmp_path, pump(100, 0) + toml + toml2)
    d = start_daemon(config, tmp_path, name="first")
    daemon_factory.append(d)
    wait_until(lambda: len(delivered(out)) == 1, "pump-fast raised and delivered")
    wait_until(lambda: events(config, "alert.delivered") != [], "the delivery recorded")
    # The flaky channel's first run failed: recorded before the SIGKILL (else the restarted
    # daemon's first try is the flaky channel's first run, and fails instead).
    wait_until(
        lambda: any(f["channel"] == "flaky" for *_x, f in events(config, "alert.delivery_failed")),
        "the flaky channel's failure recorded",
    )
    d.kill()  # SIGKILL while pump-fast is active

    d = start_daemon(config, tmp_path, name="second")
    daemon_factory.append(d)
    wait_until(lambda: evaluated(config) >= 20, "readings evaluated after the restart")
    assert [t for _, t, _, _ in alert_events(config, "pump-fast")] == ["alert.raised"]
    r = run_cli(config, "alerts")
    assert r.returncode == 0 and "pump-fast" in r.stdout and "ACTIVE" in r.stdout

    config.write_text(config.read_text().replace("failure_rate = 0\n", "failure_rate = 1\n"))
    d.peer.signal(signal.SIGHUP)
    wait_until(lambda: len(alert_events(config, "pump-down")) == 1, "pump-down raised")
    # A channel added by SIGHUP gets the alerts active now, then what follows.
    late = tmp_path / "late.jsonl"
    config.write_text(
        config.read_text()
        + f'[notify.late]\ncommand = ["{sys.executable}", "{tmp_path / "append.py"}", "{late}"]\n'
    )
    d.peer.signal(signal.SIGHUP)
    wait_until(lambda: len(delivered(late)) == 2, "the active alerts on the new channel")
    config.write_text(
        config.read_text()
        .replace("failure_rate = 1\n", "failure_rate = 0\n")
        .replace("base = 100\n", "base = 50\n")
    )
    d.peer.signal(signal.SIGHUP)
    wait_until(lambda: len(alert_events(config, "pump-down")) == 2, "pump-down cleared")
    wait_until(lambda: len(alert_events(config, "pump-fast")) == 2, "pump-fast cleared")
    wait_until(lambda: len(delivered(out)) == 4, "four deliveries")
    wait_until(lambda: len(delivered(late)) == 4, "four deliveries on the new channel")
    wait_until(lambda: len(delivered(flaky)) == 4, "four deliveries on the flaky channel")
    wait_until(
        lambda: len([1 for *_x, f in events(config, "alert.delivery_failed")
                     if f["channel"] == "slow"]) == 4,
        "four time-outs of the slow channel",
    )  # fmt: skip
    r = run_cli(config, "alerts")
    assert r.returncode == 0 and "no active alerts" in r.stdout
    assert d.stop() == 0

    for rule in ("pump-fast", "pump-down"):
        kinds = [t for _, t, _, _ in alert_events(config, rule)]
        assert kinds == ["alert.raised", "alert.cleared"], rule
    down = alert_events(config, "pump-down")
    assert down[0][3]["severity"] == "critical" and down[0][3]["message"] == (
        "device pump unavailable"
    )
    late_got = [(m["id"], m["event"]) for m in delivered(late)]
    assert late_got[:2] == [("pump-fast", "alert.raised"), ("pump-down", "alert.raised")]
    assert sorted(late_got[2:]) == [("pump-down", "alert.cleared"), ("pump-fast", "alert.cleared")]
    got = [(m["id"], m["event"]) for m in delivered(out)]
    assert sorted(got) == sorted(
        (rule, t) for rule in ("pump-fast", "pump-down") for t in ("alert.raised", "alert.cleared")
    )
    # Retried with backoff after a failure: delivered once, the failure recorded first.
    assert len(delivered(flaky)) == 4
    failures = [data for *_x, data in events(config, "alert.delivery_failed")]
    first = [f for f in failures if f["channel"] == "flaky"]
    assert len(first) == 1 and first[0]["final"] is False and first[0]["attempts"] == 1
    assert first[0]["error"] == "exit status 3" and first[0]["output"] == "modem busy\n"
    ok = [x for *_y, x in events(config, "alert.delivered") if x["channel"] == "flaky"]
    # (the first one may have been retried by the restarted daemon: still once)
    assert len(ok) == 4 and len({x["of"] for x in ok}) == 4
    slow = [f for f in failures if f["channel"] == "slow"]
    assert len(slow) == 4 and all(f["final"] for f in slow)
    assert {f["error"] for f in slow} == {"no exit within 0.2 s (killed)"}
    assert maintenance.projections_match_rebuild(db_path(config))
    r = run_cli(config, "--json", "alerts", "--all")
    rows = json.loads(r.stdout)
    assert rows["live"] is False and {a["id"]: a["active"] for a in rows["alerts"]} == {
        "pump-fast": False,
        "pump-down": False,
    }


GATE = """import os, sys, time
with open(sys.argv[2], "a") as f:
    f.write(f"{os.getpid()}\\n")
data = sys.stdin.read()
deadline = time.monotonic() + 30  # bounded: a peer script never outlives its test for long
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.02)
with open(sys.argv[1], "a") as f:
    f.write(data.replace("\\n", " ") + "\\n")
"""


def test_a_delivery_cut_by_sigkill_is_made_after_the_restart_once(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    script, out, pids, go = (tmp_path / n for n in ("gate.py", "out.jsonl", "pids", "go"))
    script.write_text(GATE)
    toml = (
        f'\n[notify.gate]\ncommand = ["{sys.executable}", "{script}", "{out}", "{pids}", "{go}"]\n'
        'timeout = "60s"\n'
    )
    config = write_config(tmp_path, pump(100, 0) + toml)
    d = start_daemon(config, tmp_path, name="first")
    daemon_factory.append(d)
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 1, "delivery started")
    d.kill()  # while the command runs: nothing recorded as delivered
    os.kill(int(pids.read_text().split()[0]), signal.SIGKILL)  # the orphan, by its PID
    assert not out.exists() and events(config, "alert.delivered") == []
    go.touch()

    d = start_daemon(config, tmp_path, name="second")
    daemon_factory.append(d)
    wait_until(lambda: events(config, "alert.delivered") != [], "delivered after the restart")
    raised = alert_events(config, "pump-fast")
    assert [t for _, t, _, _ in raised] == ["alert.raised"]
    got = delivered(out)
    assert [(m["id"], m["seq"]) for m in got] == [("pump-fast", raised[0][0])]
    (rec,) = [data for *_x, data in events(config, "alert.delivered")]
    assert rec["of"] == raised[0][0] and rec["channel"] == "gate"

    # The rule leaves the configuration while its alert is active: cleared, with why.
    text = config.read_text()
    start = text.index("[alerts.pump-fast]")
    config.write_text(text[:start] + text[text.index("[alerts.pump-down]") :])
    d.peer.signal(signal.SIGHUP)
    wait_until(lambda: len(alert_events(config, "pump-fast")) == 2, "the orphan cleared")
    cleared = alert_events(config, "pump-fast")[1]
    assert cleared[1] == "alert.cleared" and cleared[3]["reason"] == "rule removed"
    wait_until(lambda: len(delivered(out)) == 2, "the clear delivered")
    assert d.stop() == 0
    r = run_cli(config, "alerts")
    assert r.returncode == 0 and "no active alerts" in r.stdout
