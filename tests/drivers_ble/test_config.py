"""BLE config: every option checked, every problem reported with its TOML path, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drivers.ble.config import compile_device, normalize_uuid, parse_options
from gateway.config import loads
from gateway.errors import ConfigError
from gateway.retry import BreakerSettings, RetrySettings

KEY = "231d39c1d7cc1ab1aee224cd096db932"


def issues(toml: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        loads(toml)
    return [str(i) for i in exc.value.issues]


def test_good_devices_compile() -> None:
    cfg = loads(
        f"""
[drivers.ble]
scan_mode = "passive"
adapter = "hci1"
max_connections = 2

[devices.kitchen]
driver = "ble"
address = "54:48:e6:8f:80:a5"
format = "bthome"
bindkey = "{KEY}"
min_interval = 5
unseen_timeout = 120
[devices.kitchen.points.temp]
field = "temperature"
[devices.kitchen.points.temperature_2]

[devices.plant]
driver = "ble"
address = "11:22:33:44:55:66"
format = "custom"
manufacturer_id = 0x0059
match_prefix = "01"
[devices.plant.points.moisture]
byte_offset = 1
type = "uint16"
endian = "big"
scale = 0.1

[devices.lamp]
driver = "ble"
address = "C0:FF:EE:00:00:01"
format = "gatt"
[devices.lamp.points.level]
char = "0x2A6E"
type = "int16"
notify = true
[devices.lamp.points.on]
char = "0000ff01-0000-1000-8000-00805f9b34fb"
type = "bool"
writable = true
"""
    )
    k = compile_device(cfg.devices["kitchen"])
    assert k.address == "54:48:E6:8F:80:A5" and k.key == bytes.fromhex(KEY)
    assert k.fields == {"temp": "temperature", "temperature_2": "temperature_2"}
    p = compile_device(cfg.devices["plant"])
    assert p.custom is not None and p.custom.manufacturer_id == 0x59 and p.custom.prefix == b"\x01"
    assert p.custom.fields[0].endian == "big"
    lamp = compile_device(cfg.devices["lamp"])
    assert lamp.gatt[0].char == "00002a6e-0000-1000-8000-00805f9b34fb" and lamp.gatt[0].notify
    assert cfg.drivers["ble"]["scan_mode"] == "passive"


def test_retry_and_breaker_come_from_the_shared_tables_or_their_names_before() -> None:
    new = loads("[drivers.ble]\nretry = { initial = 0.5, cap = 8 }\n"
                "breaker = { threshold = 2, cooldown = 3 }\n")  # fmt: skip
    opts = parse_options(new.drivers["ble"], "drivers.ble")
    assert opts.retry == RetrySettings(initial=0.5, cap=8.0)
    assert opts.breaker == BreakerSettings(threshold=2, cooldown=3.0)
    assert not new.warnings
    assert parse_options({}, "drivers.ble").retry == RetrySettings(initial=1.0, cap=60.0)
    old = loads("[drivers.ble]\nretry_initial = 0.5\nretry_max = 8\n"
                "breaker_failures = 2\nbreaker_reset = 3\n")  # fmt: skip
    opts = parse_options(old.drivers["ble"], "drivers.ble")
    assert opts.retry == RetrySettings(initial=0.5, cap=8.0)
    assert opts.breaker == BreakerSettings(threshold=2, cooldown=3.0)
    assert [str(w) for w in old.warnings] == [
        "drivers.ble.retry_initial: deprecated name: use `retry.initial` instead",
        "drivers.ble.retry_max: deprecated name: use `retry.cap` instead",
        "drivers.ble.breaker_failures: deprecated name: use `breaker.threshold` instead",
        "drivers.ble.breaker_reset: deprecated name: use `breaker.cooldown` instead",
    ]


def test_every_problem_is_reported_with_its_path() -> None:
    got = issues(
        """
[drivers.ble]
scan_mode = "sniff"
adapter = "bluetooth0"
max_connectons = 2

[devices.a]
driver = "ble"
address = "54:48:E6:8F:80"
format = "bthome"
bindkey = "abc"
[devices.a.points.temprature]

[devices.b]
driver = "ble"
address = "11:22:33:44:55:66"
format = "custom"
[devices.b.points.x]
type = "uint17"

[devices.c]
driver = "ble"
address = "11:22:33:44:55:67"
format = "gatt"
unseen_timeout = 5
[devices.c.points.y]
char = "not-a-uuid"

[devices.d]
driver = "ble"
address = "11:22:33:44:55:68"
format = "ruuvi"
[devices.d.points.temperature]
writable = true
"""
    )
    expected = [
        "devices.a.address: must be a MAC address",
        "devices.a.bindkey: must be hexadecimal",
        "devices.a.points.temprature: 'temprature' is not a bthome field (did you mean "
        "'temperature'?)",
        "devices.b: a custom format needs exactly one of manufacturer_id or service_uuid",
        "devices.b.points.x.byte_offset: missing required key",
        "devices.b.points.x.type: must be one of",
        "devices.c.unseen_timeout: unknown key",
        "devices.c.points.y.char: must be a 16-bit or 128-bit UUID",
        "devices.d.points.temperature.writable: advertisement points cannot be written",
        "drivers.ble.adapter: must name a BlueZ adapter",
        "drivers.ble.scan_mode: must be one of 'active', 'passive', got 'sniff'",
        "drivers.ble.max_connectons: unknown key (did you mean 'max_connections'?)",
    ]
    for e in expected:
        assert any(g.startswith(e) for g in got), (e, got)
    assert len(got) == len(expected), got


def test_bindkey_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "kitchen.key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)  # a world-readable key file is refused
    toml = f"""
[devices.k]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey_file = "{keyfile}"
[devices.k.points.temperature]
"""
    spec = loads(toml).devices["k"]
    assert compile_device(spec).key is None  # validation does no I/O
    assert compile_device(spec, load_secrets=True).key == bytes.fromhex(KEY)
    keyfile.write_text("nope")
    with pytest.raises(ConfigError, match=r"devices\.k\.bindkey_file: .* must hold 32 hex"):
        compile_device(spec, load_secrets=True)
    keyfile.unlink()
    with pytest.raises(ConfigError, match=r"devices\.k\.bindkey_file: cannot read"):
        compile_device(spec, load_secrets=True)


def test_bindkey_and_file_are_exclusive() -> None:
    got = issues(
        f"""
[devices.k]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey = "{KEY}"
bindkey_file = "/etc/gateway/k.key"
[devices.k.points.temperature]
"""
    )
    assert got == ["devices.k.bindkey_file: give either bindkey or bindkey_file, not both"]


def test_device_without_points() -> None:
    got = issues('[devices.k]\ndriver = "ble"\naddress = "54:48:E6:8F:80:A5"\nformat = "ruuvi"\n')
    assert got == ["devices.k.points: a BLE device needs at least one point"]


@pytest.mark.parametrize(
    ("text", "uuid"),
    [
        ("fcd2", "0000fcd2-0000-1000-8000-00805f9b34fb"),
        ("0xFCD2", "0000fcd2-0000-1000-8000-00805f9b34fb"),
        ("0000FCD2", "0000fcd2-0000-1000-8000-00805f9b34fb"),
        ("6E400001-B5A3-F393-E0A9-E50E24DCCA9E", "6e400001-b5a3-f393-e0a9-e50e24dcca9e"),
        ("fcd", None),
        ("zzzz", None),
    ],
)
def test_normalize_uuid(text: str, uuid: str | None) -> None:
    assert normalize_uuid(text) == uuid


def test_importing_the_driver_does_not_import_bleak() -> None:
    code = (
        "import sys, drivers.ble, drivers.ble.probe\n"
        "from drivers import driver_class\n"
        "from gateway.config import loads\n"
        "assert driver_class('ble').kind == 'ble'\n"
        'loads(\'[devices.k]\\ndriver = "ble"\\naddress = "54:48:E6:8F:80:A5"\\n'
        'format = "bthome"\\nbindkey = "' + KEY + "\"\\n[devices.k.points.temperature]\\n')\n"
        "heavy = [m for m in ('bleak', 'dbus_fast', 'cryptography') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
