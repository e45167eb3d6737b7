"""What `gatewayctl` says when something is missing or wrong: one message per line, named for
the CLI, and a useful answer instead of "unknown verb" (issue 11, item 17)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.core.conftest import Daemon, run_cli, start_daemon, write_config


def test_outbox_without_sync_says_so_and_shows_the_local_backlog(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path)  # no [sync], like the shipped config
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    r = run_cli(config, "outbox")
    assert r.returncode == 0, r.stderr
    assert "unknown verb" not in r.stdout + r.stderr
    assert "cloud sync is not configured" in r.stdout
    assert "local backlog: " in r.stdout
    r = run_cli(config, "--json", "outbox")
    data = json.loads(r.stdout)
    assert data["configured"] is False and isinstance(data["backlog"], int)
    r = run_cli(config, "outbox", "dead-letters")
    assert r.returncode == 0 and r.stdout.strip() == "no dead letters", r.stderr
    r = run_cli(config, "outbox", "retry")
    assert r.returncode == 1 and "cloud sync is not configured" in r.stderr
    r = run_cli(config, "outbox", "requeue", "--all")
    assert r.returncode == 1 and "cloud sync is not configured" in r.stderr
    assert d.stop() == 0
    r = run_cli(config, "status")
    assert r.returncode == 0 and "gatewayd:" not in r.stdout
    assert r.stdout.startswith("daemon not running")


def test_a_broken_config_is_reported_one_issue_per_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[gateway]\nid = "gw"\nstate_dir = "s"\n'
        '[devices.a]\ndriver = "virtual"\ninterval = -1\n'
        '[devices.a.points.t]\nsignal = "sine"\n'
        '[devices.b]\ndriver = "virtual"\ninterval = 0\n'
        '[devices.b.points.t]\nsignal = "sine"\n'
    )
    r = run_cli(config, "config", "check")
    assert r.returncode == 3, r.stderr
    assert "gatewayd" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"{config}: 2 error(s)"
    assert "  devices.a.interval: must be > 0, got -1" in lines
    assert "  devices.b.interval: must be > 0, got 0" in lines
    # Other verbs still find the daemon's files, and say once why the config is not used.
    r = run_cli(config, "status")
    assert r.stderr.startswith(f"gatewayctl: warning: {config} is invalid (2 error(s)")
    # A config that cannot be read at all: one heading, then one issue per line.
    missing = tmp_path / "missing.toml"
    r = run_cli(missing, "status")
    assert r.returncode == 3
    assert r.stderr.splitlines() == [
        f"gatewayctl: invalid configuration {missing}:",
        f"  {missing}: no such file",
    ]


def test_config_check_warns_about_each_deprecated_retry_name_with_its_new_key(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[gateway]\nid = "gw"\nstate_dir = "s"\n'
        "[drivers.ble]\nretry_max = 30\n"
        '[devices.m]\ndriver = "modbus"\nhost = "127.0.0.1"\nbreaker_cooldown = 5\n'
        "retry = { cap = 9 }\n"
        "[devices.m.points.p]\naddress = 0\n"
    )
    r = run_cli(config, "config", "check")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "warning: devices.m.breaker_cooldown: deprecated name: use `breaker.cooldown` instead",
        "warning: drivers.ble.retry_max: deprecated name: use `retry.cap` instead",
    ]
    r = run_cli(config, "--json", "config", "check")
    assert json.loads(r.stdout)["warnings"] == [
        {"path": "devices.m.breaker_cooldown",
         "message": "deprecated name: use `breaker.cooldown` instead"},
        {"path": "drivers.ble.retry_max", "message": "deprecated name: use `retry.cap` instead"},
    ]  # fmt: skip
