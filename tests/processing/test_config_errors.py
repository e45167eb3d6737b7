"""Mistakes in [derived], [processing], [alerts] and [notify] are reported by `gatewayctl
config check`, all at once, each with its TOML path (exit 3)."""

from __future__ import annotations

from pathlib import Path

from tests.processing.support import HEADER
from tests.support.daemon import run_cli, write_config

BAD = (
    HEADER
    + """
[processing.dev.p1]
window = "7s"
[processing.dev.p2]
window = "soon"
[processing.dev.p3]
counter = true
[processing.dev.p4]
anomaly = {{ alpha = 2, warmup = 1 }}

[derived.dev.d1]
expr = "a * 2"
inputs = {{ a = "dev/x", b = "dev/y" }}
min_interval = -1

[alerts.two-sources]
point = "dev/x"
device_unavailable = "dev"
[alerts.nothing]
severity = "urgent"
[alerts.inverted]
point = "dev/x"
raise_above = 10
clear_below = 12
[alerts.no-threshold]
point = "dev/x"
[alerts.no-rate]
rate_of_change = "dev"
raise_above = 1
[alerts.bad-expr]
expr = "a >"
inputs = {{ a = "dev/x" }}
[alerts.typo]
device_unavailable = "dev"
min_duraton = "5s"

[notify.relative]
command = ["siren", "--on"]
[notify.empty]
command = []
timeout = "0s"
"""
)

EXPECTED = [
    "processing.dev.p1.window: must divide a day into whole windows",
    "processing.dev.p2.window: not a duration: 'soon'",
    "processing.dev.p3: needs a window or anomaly (or both)",
    "processing.dev.p4.anomaly.alpha: must be <= 1, got 2",
    "processing.dev.p4.anomaly.warmup: must be >= 2, got 1",
    "derived.dev.d1.min_interval: must be >= 0 s, got -1",
    "derived.dev.d1.inputs: declared but not used by expr: b",
    "alerts.two-sources: needs exactly one of point, expr, rate_of_change, device_unavailable,"
    " anomaly, outbox_older_than, store_above, service_degraded (got point, device_unavailable)",
    "alerts.nothing: needs exactly one of",
    "alerts.nothing.severity: must be one of 'info', 'warning', 'critical', got 'urgent'",
    "alerts.inverted.clear_below: must be <= raise_above (10), got 12",
    "alerts.no-threshold: a point rule needs raise_above or raise_below (or both)",
    "alerts.no-rate.rate_of_change: must be \"device/point\", got 'dev'",
    "alerts.bad-expr.expr: column 4: unexpected end of expression",
    "alerts.typo.min_duraton: unknown key (did you mean 'min_duration'?)",
    "notify.relative.command: the program must be an absolute path, got 'siren'",
    "notify.empty.command: must name a program",
    "notify.empty.timeout: must be > 0 s",
]


def test_every_mistake_is_reported_with_its_path(tmp_path: Path) -> None:
    config = write_config(tmp_path, BAD)
    r = run_cli(config, "config", "check")
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [line.strip() for line in r.stderr.splitlines()[1:]]
    for want in EXPECTED:
        assert any(line.startswith(want) for line in lines), (want, r.stderr)
    assert len(lines) == len(EXPECTED), r.stderr
