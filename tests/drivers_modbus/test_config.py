"""Bad register maps and connection settings: config errors naming the TOML path, all at once."""

from __future__ import annotations

import pytest

from gateway.config import loads
from gateway.errors import ConfigError
from gateway.retry import BreakerSettings, RetrySettings


def issues(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return {i.path: i.message for i in info.value.issues}


GOOD = """
[devices.boiler]
driver = "modbus"
host = "127.0.0.1"
port = 1502
unit = 3
max_gap = 4
breaker = { threshold = 2, cooldown = 5.0 }
retry = { initial = 0.25, cap = 8 }

[devices.boiler.points.temp]
address = 0
type = "int16"
scale = 0.1
unit = "°C"

[devices.boiler.points.energy]
table = "input"
address = 10
type = "uint32"
word_order = "little"

[devices.boiler.points.pump]
table = "coil"
address = 3
writable = true

[devices.boiler.points.alarm]
address = 20
bit = 4

[devices.boiler.points.name]
address = 30
type = "string"
length = 8

[devices.meter]
driver = "modbus"
port = "/dev/serial/by-id/usb-FTDI-if00-port0"
baudrate = 9600
parity = "N"
device_id = 7

[devices.meter.points.v]
table = "input"
address = 0
type = "float32"
"""


def test_a_good_map_loads() -> None:
    from drivers.modbus.config import parse_device

    cfg = loads(GOOD)
    boiler = parse_device(cfg.devices["boiler"])
    assert boiler.unit == 3 and boiler.bus.key == ("tcp", "127.0.0.1:1502")
    assert {p.name: p.table for p in boiler.points}["pump"] == "coil"
    meter = parse_device(cfg.devices["meter"])
    assert meter.unit == 7 and meter.bus.transport == "rtu"
    assert meter.bus.frame_gap == pytest.approx(3.5 * 11 / 9600)
    assert boiler.breaker == BreakerSettings(threshold=2, cooldown=5.0)
    assert boiler.bus.retry == RetrySettings(initial=0.25, cap=8.0)
    assert meter.bus.retry == RetrySettings(initial=0.5, cap=30.0, jitter="full")
    assert not cfg.warnings


def test_the_names_before_the_retry_and_breaker_tables_still_work_with_a_warning() -> None:
    from drivers.modbus.config import parse_device

    old = GOOD.replace(
        "breaker = { threshold = 2, cooldown = 5.0 }\nretry = { initial = 0.25, cap = 8 }\n",
        "breaker_threshold = 2\nbreaker_cooldown = 5.0\nreconnect_delay = 0.25\n"
        "reconnect_delay_max = 8\n",
    )
    cfg = loads(old)
    boiler = parse_device(cfg.devices["boiler"])
    assert boiler.breaker == BreakerSettings(threshold=2, cooldown=5.0)
    assert boiler.bus.retry == RetrySettings(initial=0.25, cap=8.0)
    assert [(w.path, w.message) for w in cfg.warnings] == [
        ("devices.boiler.reconnect_delay", "deprecated name: use `retry.initial` instead"),
        ("devices.boiler.reconnect_delay_max", "deprecated name: use `retry.cap` instead"),
        ("devices.boiler.breaker_threshold", "deprecated name: use `breaker.threshold` instead"),
        ("devices.boiler.breaker_cooldown", "deprecated name: use `breaker.cooldown` instead"),
    ]


BAD = """
[devices.b]
driver = "modbus"
host = "127.0.0.1"
baudrate = 9600
unit = 300
colaesce = 3

[devices.b.points.big]
address = 70000

[devices.b.points.end]
address = 65535
type = "uint32"

[devices.b.points.bit32]
address = 10
type = "int32"
bit = 3

[devices.b.points.text]
address = 20
type = "string"

[devices.b.points.a]
address = 40
type = "float32"

[devices.b.points.overlap]
address = 41

[devices.b.points.wat]
address = 50
type = "int24"

[devices.b.points.ro]
table = "input"
address = 60
writable = true

[devices.b.points.coilf]
table = "coil"
address = 1
type = "float32"

[devices.b.points.scaledbit]
address = 70
bit = 1
scale = 2.0

[devices.b.points.nolength]
address = 80
length = 2

[devices.b.points.typo]
address = 90
tpye = "int16"

[devices.b.points.toobig]
address = 91
max = 70000.0

[devices.b.points.tenths]
address = 92
type = "int16"
scale = 0.1
min = -4000.0
"""


def test_every_bad_entry_is_named_by_its_path() -> None:
    found = issues(BAD)
    p = "devices.b.points"
    expected = {
        "devices.b.baudrate": "serial",
        "devices.b.unit": "<= 255",
        "devices.b.colaesce": "unknown key",
        f"{p}.big.address": "<= 65535",
        f"{p}.end.address": "past the last address",
        f"{p}.bit32.bit": "16-bit register",
        f"{p}.text.length": "a string needs its length",
        f"{p}.overlap.address": "overlaps point 'a'",
        f"{p}.wat.type": "must be one of",
        f"{p}.ro.writable": "read-only",
        f"{p}.coilf.type": "must be 'bool'",
        f"{p}.scaledbit.scale": "cannot be scaled",
        f"{p}.nolength.length": "only a string has a length",
        f"{p}.typo.tpye": "did you mean 'type'",
        f"{p}.toobig.max": "outside what uint16 can hold here (0..65535)",
        f"{p}.tenths.min": "(-3276.8..3276.7 after scale and offset)",
    }
    for path, words in expected.items():
        assert path in found, f"{path} not reported; got {sorted(found)}"
        assert words in found[path], f"{path}: {found[path]!r}"


def test_connection_errors() -> None:
    found = issues('[devices.x]\ndriver = "modbus"\n')
    assert "missing connection" in found["devices.x"]
    found = issues('[devices.x]\ndriver = "modbus"\nport = 502\nbaudrate = 9600\n')
    assert "serial device path" in found["devices.x.port"]
    assert list(found) == ["devices.x.port"]  # one mistake, one message
    found = issues(
        '[devices.x]\ndriver = "modbus"\nport = "/dev/ttyUSB0"\nparity = "X"\nstopbits = 3\n'
        "unit = 0\ndevice_id = 2\nqueue_size = 0\n"
    )
    assert "must be one of" in found["devices.x.parity"]
    assert "<= 2" in found["devices.x.stopbits"]
    assert "not both" in found["devices.x.device_id"]
    assert ">= 1" in found["devices.x.unit"]  # 0 is broadcast on a serial line
    assert ">= 1" in found["devices.x.queue_size"]


def test_flags_may_share_a_register_but_not_a_bit() -> None:
    text = """
[devices.f]
driver = "modbus"
host = "127.0.0.1"
[devices.f.points.a]
address = 5
bit = 0
[devices.f.points.b]
address = 5
bit = 1
[devices.f.points.c]
address = 5
bit = 1
"""
    found = issues(text)
    assert list(found) == ["devices.f.points.c.address"]
    assert "bit 1 of holding 5..5 overlaps point 'b'" in found["devices.f.points.c.address"]


def test_import_does_not_load_pymodbus() -> None:
    import subprocess
    import sys

    code = (
        "import sys, drivers.modbus, gateway.config as c\n"
        "c.loads(open(sys.argv[1]).read())\n"
        "assert 'pymodbus' not in sys.modules, 'pymodbus imported'\n"
    )
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(GOOD)
        f.flush()
        subprocess.run([sys.executable, "-c", code, f.name], check=True)
