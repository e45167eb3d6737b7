"""Reload: any failure keeps the running config, is reported (log, status, `gatewayctl reload`)
and systemd hears READY=1 after RELOADING=1; a broken file on disk does not cut the CLI off
from the running daemon (issue 11, item 9)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, run_cli, start_daemon, write_config

SERIAL_DEVICE = """
[devices.gps]
driver = "serial"
port = "/dev/null"
framing = { type = "delimiter", delimiter = "\\r\\n" }
parser = { type = "nmea", sentences = ["GGA"] }
[devices.gps.points.lat]
field = "gga.lat"
"""

EXTRA_VIRTUAL = """
[devices.tank-1]
driver = "virtual"
interval = 0.05
[devices.tank-1.points.level]
signal = "constant"
"""


def _status(config: Path) -> dict[str, object]:
    out = run_cli(config, "--json", "status")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_a_failing_driver_import_keeps_the_running_config(
    tmp_path: Path, daemon_factory: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The serial driver's package imports the standard `csv` module, which nothing else in
    # a virtual-only daemon does: a broken one on the daemon's path makes that import fail
    # during reload, as a driver with a missing or broken dependency would.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "csv.py").write_text('raise ImportError("simulated: csv is broken on this box")\n')
    config = write_config(tmp_path)
    good = config.read_text()
    monkeypatch.setenv("PYTHONPATH", f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    monkeypatch.delenv("PYTHONPATH")  # the CLI runs with a healthy path

    config.write_text(good + SERIAL_DEVICE)
    assert run_cli(config, "config", "check").returncode == 0  # the file itself is fine
    out = run_cli(config, "reload")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "reload FAILED, the running config stays" in out.stderr
    assert "ImportError: simulated: csv is broken" in out.stderr, out.stderr
    got = d.messages("READY=1")
    assert any("RELOADING=1" in m for m in got), got

    st = _status(config)
    assert st["devices"] == 2 and "csv is broken" in str(st["last_reload_error"]), st
    text = run_cli(config, "status")
    assert text.returncode == 0, text.stderr
    assert "last reload FAILED (the running config stays):" in text.stdout, text.stdout
    assert "csv is broken" in text.stdout

    # The same by SIGHUP: logged, READY=1 again, the daemon still serving.
    d.peer.signal(signal.SIGHUP)
    got = d.messages("READY=1")
    assert any("RELOADING=1" in m for m in got), got
    assert "reload failed, the running config stays" in d.log.read_text()
    assert d.peer.alive()

    # A config that does not need the broken import applies, and clears the error.
    config.write_text(good + EXTRA_VIRTUAL)
    out = run_cli(config, "reload")
    assert out.returncode == 0 and out.stdout.strip() == "reloaded: 3 devices", out
    d.messages("READY=1")
    st = _status(config)
    assert st["devices"] == 3 and st["last_reload_error"] == "", st


def test_a_broken_file_does_not_cut_the_cli_off(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    good = config.read_text()

    # Not even TOML (an edit half done): [gateway] still says where the daemon is.
    config.write_text(good + "\n[devices.broken\ninterval = \n")
    out = run_cli(config, "reload")
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "not valid TOML" in out.stderr
    assert "warning:" in out.stderr and "is invalid (1 error(s)" in out.stderr, out.stderr
    d.messages("READY=1")
    out = run_cli(config, "status")
    assert out.returncode == 0, out.stderr
    assert f"pid {d.pid}" in out.stdout and "last reload FAILED" in out.stdout, out.stdout

    # Valid TOML, invalid config.
    config.write_text(good + '\n[devices.bad]\ndriver = "nope"\n')
    out = run_cli(config, "--json", "status")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == d.pid
    assert "warning:" in out.stderr
