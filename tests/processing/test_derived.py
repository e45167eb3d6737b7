"""Derived points through a real gatewayd with the virtual driver: values against a hand
computation, a stale input making the value missing, and bad or hostile expressions refused
by `gatewayctl config check` with their TOML path and column."""

from __future__ import annotations

from pathlib import Path

from tests.processing.support import HEADER, events, readings
from tests.support.daemon import Daemon, run_cli, start_daemon, write_config
from tests.support.peers import wait_until

DERIVED = (
    HEADER
    + """
[devices.boiler-1]
driver = "virtual"
interval = 0.05
[devices.boiler-1.points.t_out]
signal = "constant"
base = 80.0
[devices.boiler-1.points.t_in]
signal = "constant"
base = 60.0
[devices.boiler-1.points.flow]
signal = "constant"
base = 2.0
[devices.boiler-1.points.power]
signal = "constant"
base = 10.0

[devices.meter-1]
driver = "virtual"
interval = 0.05
[devices.meter-1.points.energy]
signal = "counter"
step = 1.0

[devices.slow]
driver = "virtual"
interval = 3600
[devices.slow.points.x]
signal = "constant"
base = 5

[derived.boiler-1.efficiency]
expr = "(t_out - t_in) * flow * 4.186 / power"
unit = "%"
[derived.boiler-1.efficiency.inputs]
t_out = "boiler-1/t_out"
t_in = "boiler-1/t_in"
flow = "boiler-1/flow"
power = "boiler-1/power"

[derived.meter-1.shaped]
expr = "clamp(e * 2 + 1, 0, 41) if e % 2 == 0 else -max(e, 3) ** 2"
inputs = {{ e = "meter-1/energy" }}

[derived.meter-1.slowed]
expr = "e * 10"
inputs = {{ e = "meter-1/energy" }}
min_interval = "0.5s"

[derived.site.sum]
expr = "a + x"
inputs = {{ a = "boiler-1/t_out", x = "slow/x" }}
max_age = "1s"
"""
)


def shaped(e: float) -> float:
    """The hand computation of meter-1/shaped."""
    return min(max(e * 2 + 1, 0), 41) if e % 2 == 0 else -(max(e, 3) ** 2)


def test_derived_points_match_a_hand_computation_and_go_missing_when_stale(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, DERIVED)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(lambda: len(readings(config, "meter-1", "shaped")) >= 30, "30 derived values")
    wait_until(
        lambda: any(r.get("v") is None for _, r in readings(config, "site", "sum")),
        "the stale input to make site/sum missing",
    )
    assert d.stop() == 0

    eff = readings(config, "boiler-1", "efficiency")
    assert eff and {r["v"] for _, r in eff} == {16.744}  # (80 - 60) * 2 * 4.186 / 10
    assert {r["u"] for _, r in eff} == {"%"}

    # Each input reading is followed by the derived value computed from it, in order.
    inputs = [r["v"] for _, r in readings(config, "meter-1", "energy")]
    outputs = [r["v"] for _, r in readings(config, "meter-1", "shaped")]
    assert len(outputs) >= 30
    # (Readings committed before the service subscribed, at most a few, have no value.)
    assert any(outputs == [shaped(e) for e in inputs[k : k + len(outputs)]] for k in range(5)), (
        inputs[:40],
        outputs[:40],
    )
    assert 41 in outputs and -9 in outputs  # both branches, the clamp and the power

    # min_interval: at most one value per 0.5 s, each from an input already committed.
    slowed = readings(config, "meter-1", "slowed")
    energy = {r["v"]: seq for seq, r in readings(config, "meter-1", "energy")}
    walls = {seq: wall for seq, _s, _t, wall, _d in events(config, "readings")}
    assert len(slowed) >= 3
    span = walls[slowed[-1][0]] - walls[slowed[0][0]]
    assert len(slowed) <= span / 0.5 + 2 and len(slowed) < len(inputs) / 3
    assert all(energy[r["v"] / 10] < seq for seq, r in slowed)

    # x is read once (interval 1 h): a value while it is fresh, then missing, not wrong.
    sums = [r for _, r in readings(config, "site", "sum")]
    assert sums[0]["v"] == 85
    missing = [r for r in sums if r["v"] is None]
    assert len(missing) == 1 and missing[0]["q"] == "stale" and missing[0]["why"] == ["x"]
    assert all(r["v"] == 85 for r in sums[: sums.index(missing[0])])


BAD = {
    "__import__('os')": "column 12: strings are not allowed",
    "__import__(a)": "column 1: unknown function '__import__'",
    "a.__class__": "column 2: attribute access",
    "9 ** 999999": "column 6: exponent 999999 is too large",
    "2 ** (10 ** 10)": "column 6: exponent 1e+10 is too large",
    "a[0]": "column 2: '[': subscripts",
    "(a + 1": "column 7: expected ')'",
    "a + b": "column 5: unknown name 'b'",
    "a = 1": "column 3: '=' is not an operator",
    "lambda: a": "column 7: unexpected character ':'",
    "a if a > 1": "column 11: expected 'else'",
    "round(a, 1, 2)": "column 1: round() takes 1 to 2 arguments, got 3",
    "(" * 80 + "a" + ")" * 80: "column 31: nested more than 60 deep",
}


def test_bad_and_hostile_expressions_are_config_errors_with_path_and_column(
    tmp_path: Path,
) -> None:
    body = HEADER
    for i, text in enumerate(BAD):
        body += f'\n[derived.dev.p{i}]\nexpr = {text!r}\ninputs = {{{{ a = "dev/x" }}}}\n'
    body += """
[derived.dev.loop1]
expr = "a + 1"
inputs = {{ a = "dev/loop2" }}
[derived.dev.loop2]
expr = "a + 1"
inputs = {{ a = "dev/loop1" }}
[derived.dev.noinput]
expr = "a"
inputs = {{ a = "no-slash" }}
"""
    config = write_config(tmp_path, body)
    r = run_cli(config, "config", "check")
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    for i, message in enumerate(BAD.values()):
        want = f"derived.dev.p{i}.expr: {message}"
        assert any(line.strip().startswith(want) for line in lines), (want, r.stderr)
    assert "derived.dev.loop1.inputs: derived points form a loop: dev/loop1 -> dev/loop2" in (
        r.stderr
    )
    assert 'derived.dev.noinput.inputs.a: must be "device/point"' in r.stderr
    assert "derived.dev.noinput.expr: column 1: unknown name 'a'" in r.stderr
    assert len(lines) == 1 + len(BAD) + 3
