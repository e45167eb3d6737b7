"""Config: every kind of mistake is reported with its TOML path, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config as cfg
from gateway.errors import ConfigError
from tests.core.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]

GOOD_DEVICE = """
[devices.boiler-1]
driver = "virtual"
interval = 1.0
[devices.boiler-1.points.temp]
signal = "sine"
"""


def issues(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        cfg.loads(text)
    return {i.path: i.message for i in info.value.issues}


def test_shipped_config_is_valid() -> None:
    c = cfg.load(ROOT / "config.toml")
    assert c.devices, "the shipped config must have devices so data flows out of the box"
    assert all(d.driver == "virtual" for d in c.devices.values())


def test_wrong_type_names_path_and_types() -> None:
    got = issues(GOOD_DEVICE + '[store]\nquota_mb = "lots"\n')
    assert got == {"store.quota_mb": "must be a number, got a string 'lots'"}


def test_unknown_key_with_did_you_mean() -> None:
    got = issues(GOOD_DEVICE.replace("interval = 1.0", "intervall = 1.0"))
    assert got == {"devices.boiler-1.intervall": "unknown key (did you mean 'interval'?)"}


def test_unknown_key_in_point_is_reported_by_the_driver() -> None:
    got = issues(GOOD_DEVICE + "amplitud = 3\n")
    assert got == {
        "devices.boiler-1.points.temp.amplitud": "unknown key (did you mean 'amplitude'?)"
    }


def test_missing_required_key() -> None:
    got = issues("[devices.pump]\ninterval = 2\n")
    assert got == {"devices.pump.driver": "missing required key (a string)"}


def test_bad_range() -> None:
    got = issues(GOOD_DEVICE.replace("interval = 1.0", "interval = -5"))
    assert got == {"devices.boiler-1.interval": "must be > 0, got -5"}


def test_unknown_driver() -> None:
    got = issues('[devices.x]\ndriver = "modbuss"\n')
    assert list(got) == ["devices.x.driver"]
    assert "must be one of" in got["devices.x.driver"]
    assert "got 'modbuss'" in got["devices.x.driver"]
    assert "did you mean 'modbus'?" in got["devices.x.driver"]


def test_bad_choice_and_unknown_section() -> None:
    got = issues('[store]\noverflow = "drop_newest"\n[stroe]\nfile = "x"\n')
    assert got["store.overflow"].startswith("must be one of 'reject_new', 'drop_oldest'")
    assert got["stroe"] == "unknown key (did you mean 'store'?)"


def test_all_errors_reported_at_once() -> None:
    text = (
        GOOD_DEVICE.replace("interval = 1.0", "interval = 0")
        + "[gateway]\nlog_level = 'loud'\nstop_timeout = true\n"
        + "[devices.pump]\ndriver = 'virtual'\ncolour = 'red'\n"
    )
    got = issues(text)
    assert set(got) == {
        "devices.boiler-1.interval",
        "gateway.log_level",
        "gateway.stop_timeout",
        "devices.pump.colour",
        "devices.pump.points",
    }


def test_invalid_toml_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        cfg.loads("[devices\n", "site.toml")
    assert "site.toml: not valid TOML" in str(info.value)
    assert "line 1" in str(info.value)


def test_point_min_above_max() -> None:
    got = issues(GOOD_DEVICE + "min = 10\nmax = 1\n")
    assert got == {"devices.boiler-1.points.temp.max": "must be >= min (10), got 1"}


def test_device_name_with_unsafe_characters() -> None:
    got = issues('[devices."a/b"]\ndriver = "virtual"\n[devices."a/b".points.t]\n')
    assert list(got) == ['devices."a/b"']
    assert "must use letters, digits" in got['devices."a/b"']


def test_config_check_prints_every_error_and_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD_DEVICE.replace("interval = 1.0", "interval = -5\ncolor = 1"))
    r = run_cli(bad, "config", "check", str(bad))
    assert r.returncode == 3
    assert "devices.boiler-1.interval: must be > 0, got -5" in r.stderr
    assert "devices.boiler-1.color: unknown key" in r.stderr


def test_config_check_ok(tmp_path: Path) -> None:
    r = run_cli(ROOT / "config.toml", "config", "check")
    assert r.returncode == 0, r.stderr
    assert "ok (3 devices" in r.stdout


def test_gatewayd_refuses_invalid_config_with_same_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD_DEVICE.replace("interval = 1.0", "interval = -5"))
    r = subprocess.run(
        [sys.executable, "-m", "gateway.daemon", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 3
    assert "devices.boiler-1.interval: must be > 0, got -5" in r.stderr
    assert not (tmp_path / "var").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    r = run_cli(tmp_path / "nope.toml", "config", "check")
    assert r.returncode == 3
    assert "nope.toml: no such file" in r.stderr


def test_an_odd_baud_rate_is_a_warning_naming_the_likely_one() -> None:
    """Linux takes any rate, so 96000 is valid, and a typo for 9600 fails silently on the
    wire: say so at load (config check, start, reload) without refusing the config."""
    text = """
[gateway]
id = "gw"
[devices.gps]
driver = "serial"
port = "/dev/ttyUSB0"
baudrate = 96000
parser = { type = "nmea" }
[devices.gps.points.lat]
field = "gga.lat"
[devices.rtu]
driver = "modbus"
port = "/dev/ttyUSB1"
baudrate = 20000
unit = 1
[devices.rtu.points.p]
address = 0
[devices.ok]
driver = "modbus"
port = "/dev/ttyUSB2"
baudrate = 115200
unit = 2
[devices.ok.points.p]
address = 0
"""
    c = cfg.loads(text)
    assert [(w.path, w.message) for w in c.warnings] == [
        ("devices.gps.baudrate",
         "96000 is not a standard rate (did you mean 9600?); fine if the device uses it"),
        ("devices.rtu.baudrate",
         "20000 is not a standard rate (the nearest are 14400 and 19200); fine if the device "
         "uses it"),
    ]  # fmt: skip


def test_switch_interval_default_and_bad_values_name_their_path() -> None:
    assert cfg.loads(GOOD_DEVICE).gateway.switch_interval_ms == 0.5  # as before it was a key
    assert (
        cfg.loads(GOOD_DEVICE + "[gateway]\nswitch_interval_ms = 2\n").gateway.switch_interval_ms
        == 2.0
    )
    for bad, message in (
        ("0", "must be > 0, got 0"),
        ("-1", "must be > 0, got -1"),
        ("1000", "must be <= 100"),
        ("'fast'", "must be a number"),
    ):
        got = issues(GOOD_DEVICE + f"[gateway]\nswitch_interval_ms = {bad}\n")
        assert list(got) == ["gateway.switch_interval_ms"], got
        assert got["gateway.switch_interval_ms"].startswith(message), got
