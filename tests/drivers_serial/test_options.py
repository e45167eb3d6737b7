"""Serial device options through the real config loader: good configs compile, every bad
option is reported at once with its TOML path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drivers.serial import parse_options
from drivers.serial.framing import frames
from gateway import config
from gateway.errors import ConfigError
from gateway.retry import RetrySettings

GPS = """
[devices.gps]
driver = "serial"
port = "/dev/serial/by-id/usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00"
baudrate = 38400
framing = { type = "delimiter", delimiter = "\\r\\n" }
parser = { type = "nmea", sentences = ["GGA", "RMC"] }

[devices.gps.points.lat]
field = "gga.lat"
unit = "deg"

[devices.gps.points.speed]
field = "rmc.speed_knots"
unit = "kn"
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    return [str(i) for i in info.value.issues]


def test_good_config_compiles() -> None:
    spec = config.loads(GPS).devices["gps"]
    opts = parse_options(spec)
    assert opts.port.baudrate == 38400
    assert opts.framing.delimiter == b"\r\n"
    assert opts.parser.sentences == ("GGA", "RMC")
    assert {p.name: p.field for p in opts.points.values()} == {
        "lat": "gga.lat", "speed": "rmc.speed_knots",
    }  # fmt: skip
    assert opts.retry == RetrySettings(initial=0.5, cap=30.0, jitter="full")


def test_the_reopen_backoff_comes_from_the_retry_table_or_its_names_before() -> None:
    new = config.loads(GPS.replace("[devices.gps.points.lat]", "retry = { initial = 2, cap = 9 }"
                                   "\n[devices.gps.points.lat]"))  # fmt: skip
    assert parse_options(new.devices["gps"]).retry == RetrySettings(initial=2.0, cap=9.0)
    assert not new.warnings
    old = config.loads(GPS.replace("[devices.gps.points.lat]", "reconnect_min = 2\n"
                                   "reconnect_max = 9\n[devices.gps.points.lat]"))  # fmt: skip
    assert parse_options(old.devices["gps"]).retry == RetrySettings(initial=2.0, cap=9.0)
    assert [str(w) for w in old.warnings] == [
        "devices.gps.reconnect_min: deprecated name: use `retry.initial` instead",
        "devices.gps.reconnect_max: deprecated name: use `retry.cap` instead",
    ]


def test_lines_resynchronise_on_a_start_marker() -> None:
    # NMEA lines resynchronise on '$'/'!' by themselves; other lines on a configured `start`.
    gps = parse_options(config.loads(GPS).devices["gps"])
    assert gps.framing.starts == (b"$", b"!")
    assert gps.framing.deframer().feed(b"\xb5\x62\x24\x00$GPGGA,1*00\r\n")[-1] == b"$GPGGA,1*00"
    text = (
        GPS.replace('delimiter = "\\r\\n" }', 'delimiter = "\\n", start = "#" }')
        .replace('type = "nmea", sentences = ["GGA", "RMC"]', 'type = "raw"')
        .replace("gga.lat", "raw")
        .replace("rmc.speed_knots", "raw")
    )
    opts = parse_options(config.loads(text).devices["gps"])
    assert opts.framing.starts == (b"#",)
    assert frames(opts.framing.deframer().feed(b"noise#12.5\n#13\n")) == [b"#12.5", b"#13"]


def test_binary_framings_and_request_mode() -> None:
    text = """
[devices.scale]
driver = "serial"
port = "/dev/ttyUSB0"
parity = "even"
bytesize = 7
stopbits = 2
mode = "request"
request = "\\u0002W\\u0003"
response_frames = 2
framing = { type = "length", length_size = 2, length_order = "little", start = "\\u00aa" }
parser = { type = "cbor" }
[devices.scale.points.weight]
field = "w"
"""
    opts = parse_options(config.loads(text).devices["scale"])
    assert opts.request == b"\x02W\x03"
    assert opts.framing.start == b"\xaa"
    assert (opts.framing.length_size, opts.framing.length_order) == (2, "little")
    assert (opts.port.parity, opts.port.bytesize, opts.port.stopbits) == ("even", 7, 2.0)


def test_every_bad_option_is_reported_with_its_path() -> None:
    text = """
[devices.x]
driver = "serial"
port = "ttyUSB0"
baudrate = 0
parity = "evn"
stopbits = 3
request = "R"
reconnect_min = 10
reconnect_max = 1
framing = { type = "fixed", delimiter = "\\n", lenght = 3 }
parser = { type = "regex", pattern = '(?P<t>[0-9.]+)' }
[devices.x.points.t]
type = "floaty"
writable = true
[devices.x.points.h]
field = "hum"
"""
    assert issues(text) == [
        "devices.x.port: must be an absolute device path (/dev/ttyUSB0, /dev/serial/by-id/...),"
        " got 'ttyUSB0'",
        "devices.x.baudrate: must be >= 50, got 0",
        "devices.x.parity: must be one of 'none', 'even', 'odd', 'mark', 'space', got 'evn'"
        " (did you mean 'even'?)",
        "devices.x.stopbits: must be 1, 1.5 or 2, got 3",
        "devices.x.request: only used with mode = 'request'",
        "devices.x.reconnect_max: must be >= reconnect_min (10)",
        "devices.x.framing.length: missing required key (an integer)",
        "devices.x.framing.delimiter: only used with framing type = 'delimiter', not 'fixed'",
        "devices.x.framing.lenght: unknown key (did you mean 'length'?)",
        "devices.x.points.t.type: must be one of 'auto', 'str', 'int', 'float', 'bool',"
        " got 'floaty' (did you mean 'float'?)",
        "devices.x.points.t.command: a writable serial point needs a command,"
        " e.g. 'SP {value}\\r\\n'",
        "devices.x.points.h.field: the regex parser gives no field 'hum'; it gives: t",
    ]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('parser = { type = "regex", pattern = "(\\\\d+)" }',
         "devices.d.parser.pattern: needs at least one named group"),
        ('parser = { type = "regex", pattern = "(?P<v" }',
         "devices.d.parser.pattern: not a valid regular expression"),
        ('parser = { type = "csv", columns = ["a", "a", 3] }',
         "devices.d.parser.columns[2]: must be a string"),
        ('parser = { type = "csv", columns = ["a", "a"] }',
         "devices.d.parser.columns: duplicate column names: a"),
        ('parser = { type = "csv", columns = ["v"], separator = ";;" }',
         "devices.d.parser.separator: must be one character"),
        ('parser = { type = "json", encoding = "utf-99" }',
         "devices.d.parser.encoding: unknown text encoding 'utf-99'"),
        ('parser = { type = "cbor" }',
         "devices.d.parser.type: CBOR frames are binary"),
        ('parser = { type = "xml" }',
         "devices.d.parser.type: must be one of"),
        ('parser = { type = "json", pattern = "x" }',
         "devices.d.parser.pattern: only used with parser type = 'regex', not 'json'"),
        ('parser = { type = "nmea", sentences = ["G!A"] }',
         "devices.d.parser.sentences[0]: not a sentence type: 'G!A'"),
        ('parser = { type = "json" }\nframing = { delimiter = "\\u20ac" }',
         "devices.d.framing.delimiter: characters above U+00FF"),
        ('parser = { type = "json" }\nframing = { type = "length", length_size = 3 }',
         "devices.d.framing.length_size: must be 1, 2 or 4"),
        ('parser = { type = "json" }\nmode = "request"',
         "devices.d.request: missing required key"),
        ('parser = { type = "json" }\nmode = "request"\nrequest = "R"\nresponse_timeout = 9.0',
         "devices.d.response_timeout: must be <= the device's timeout (5 s)"),
        ('parser = { type = "json" }\nmax_age = 0',
         "devices.d.max_age: must be > 0"),
        ("", "devices.d.parser: missing required key"),
    ],
)  # fmt: skip
def test_single_bad_option(body: str, expected: str) -> None:
    text = f'[devices.d]\ndriver = "serial"\nport = "/dev/ttyS0"\n{body}\n[devices.d.points.v]\n'
    got = issues(text)
    assert any(i.startswith(expected) for i in got), got


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("lat", "NMEA fields are named <sentence>.<field>"),
        ("gga.latitude", "GGA has no field 'latitude'; it has: time, lat, lon"),
        ("vtg.speed_kmh", "sentence VTG is not in parser.sentences"),
    ],
)
def test_nmea_point_fields_are_checked(field: str, expected: str) -> None:
    text = GPS + f'[devices.gps.points.extra]\nfield = "{field}"\n'
    got = issues(text)
    assert len(got) == 1 and got[0].startswith("devices.gps.points.extra.field: " + expected), got


def test_points_required_and_commands_checked() -> None:
    base = '[devices.d]\ndriver = "serial"\nport = "/dev/ttyS0"\nparser = { type = "json" }\n'
    assert issues(base) == ["devices.d.points: a serial device needs at least one point"]
    got = issues(base + '[devices.d.points.v]\ncommand = "SET {value}"\n')
    assert got == ["devices.d.points.v.command: only used with writable = true"]
    got = issues(base + '[devices.d.points.v]\nwritable = true\ncommand = "SET {valu}"\n')
    assert got[0].startswith("devices.d.points.v.command: bad template")


def test_importing_the_driver_does_not_import_pyserial() -> None:
    code = (
        "import sys, drivers.serial, drivers.serial.probe\n"
        "from gateway import config\n"
        f"config.loads({GPS!r})\n"
        "assert 'serial' not in sys.modules, 'pyserial imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
