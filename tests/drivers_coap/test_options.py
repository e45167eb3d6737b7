"""Config validation of coap devices: pure, every issue with its TOML path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from drivers.coap.options import compile_device
from gateway import config
from gateway.errors import ConfigError
from gateway.retry import BreakerSettings, RetrySettings

GOOD = """
[devices.thermo]
driver = "coap"
uri = "coaps://127.0.0.1:5684/"
psk_identity = "thermo"
psk_key_file = "/etc/gateway/keys/thermo.psk"
observe_margin = 2
[devices.thermo.points.temp]
path = "/sensors"
mode = "observe"
format = "senml"
record = "temp"
[devices.thermo.points.setpoint]
path = "/setpoint?unit=C"
writable = true
write_method = "post"
"""


def messages(toml: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(toml)
    return [str(i) for i in info.value.issues]


def test_a_good_device_compiles_into_points() -> None:
    spec = config.loads(GOOD).devices["thermo"]
    dev = compile_device(spec)
    assert dev.uri == "coaps://127.0.0.1:5684"
    assert dev.secure and dev.credentials.kind == "dtls-psk"
    assert dev.observe_margin == 2.0
    temp, setpoint = dev.points["temp"], dev.points["setpoint"]
    assert (temp.path, temp.mode, temp.format, temp.record) == (
        "/sensors",
        "observe",
        "senml",
        "temp",
    )
    assert dev.url(setpoint) == "coaps://127.0.0.1:5684/setpoint?unit=C"
    assert (setpoint.mode, setpoint.format, setpoint.write_method) == ("poll", "auto", "post")
    assert setpoint.write_format == "text"
    assert [p.name for p in dev.observed()] == ["temp"]


def test_credentials_never_show_their_key() -> None:
    spec = config.loads(
        GOOD.replace('psk_key_file = "/etc/gateway/keys/thermo.psk"', 'psk_key = "s3cret-key"')
    ).devices["thermo"]
    assert "s3cret" not in repr(compile_device(spec))


def test_retry_and_breaker_come_from_the_shared_tables_or_their_names_before() -> None:
    spec = config.loads(GOOD).devices["thermo"]
    dev = compile_device(spec)
    assert dev.retry == RetrySettings(initial=1.0, cap=60.0, jitter="half")
    assert dev.breaker == BreakerSettings(threshold=3)
    at = "[devices.thermo.points.temp]"
    new = config.loads(GOOD.replace(at, "retry = { initial = 2, cap = 9 }\n"
                                    "breaker = { threshold = 4 }\n" + at))  # fmt: skip
    dev = compile_device(new.devices["thermo"])
    assert dev.retry == RetrySettings(initial=2.0, cap=9.0, jitter="half")
    assert dev.breaker == BreakerSettings(threshold=4) and not new.warnings
    old = config.loads(GOOD.replace(at, "backoff_initial = 2\nbackoff_max = 9\n"
                                    "breaker_threshold = 4\n" + at))  # fmt: skip
    assert compile_device(old.devices["thermo"]) == dev
    assert [str(w) for w in old.warnings] == [
        "devices.thermo.breaker_threshold: deprecated name: use `breaker.threshold` instead",
        "devices.thermo.backoff_initial: deprecated name: use `retry.initial` instead",
        "devices.thermo.backoff_max: deprecated name: use `retry.cap` instead",
    ]


def test_every_issue_is_reported_with_its_path() -> None:
    got = messages("""
[devices.d]
driver = "coap"
uri = "http://example.org"
psk_key = "k"
backoff_initial = 10
backoff_max = 1
[devices.d.points.a]
mode = "observed"
format = "xml"
pth = "/a"
[devices.d.points.b]
path = "b"
write_method = "put"
""")
    joined = "\n".join(got)
    assert "devices.d.uri: must be a coap:// or coaps:// URI" in joined
    assert "devices.d.psk_identity: missing: a PSK needs its identity" in joined
    assert "devices.d.backoff_max: must be >= backoff_initial" in joined
    assert "devices.d.points.a.path: missing required key" in joined
    assert "devices.d.points.a.mode: must be one of 'poll', 'observe', got 'observed'" in joined
    assert "devices.d.points.a.format: must be one of" in joined
    assert "devices.d.points.a.pth: unknown key (did you mean 'path'?)" in joined
    assert "devices.d.points.b.path: must start with '/'" in joined
    assert "devices.d.points.b.writable: write_method/write_format given" in joined


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('uri = "coaps://h"', "devices.d.uri: coaps:// needs DTLS-PSK credentials"),
        (
            'uri = "coap://h"\npsk_identity = "i"\npsk_key = "k"',
            "devices.d.uri: DTLS-PSK credentials need a coaps:// URI",
        ),
        (
            'uri = "coap://h"\npsk_identity = "i"',
            "devices.d.psk_identity: needs psk_key or psk_key_file",
        ),
        (
            'uri = "coaps://h"\npsk_identity = "i"\npsk_key = "k"\npsk_key_file = "f"',
            "devices.d.psk_key: give psk_key or psk_key_file, not both",
        ),
        (
            'uri = "coaps://h"\npsk_identity = "i"\npsk_key = "k"\noscore = "/o"',
            "devices.d.oscore: OSCORE runs over coap://",
        ),
        ('uri = "coap://h:99999"', "devices.d.uri: has an invalid port"),
        ('uri = "coap://h/x?y=1"', "devices.d.uri: must not have a query"),
        ('uri = "coap://h"\nretries = 3', "devices.d.retries: unknown key"),
    ],
)
def test_bad_device_options(options: str, expected: str) -> None:
    got = messages(f'[devices.d]\ndriver = "coap"\n{options}\n')
    assert any(m.startswith(expected) for m in got), got


def test_importing_the_driver_and_checking_config_imports_no_aiocoap() -> None:
    code = (
        "import sys\n"
        "from gateway import config\n"
        f"config.loads({GOOD!r})\n"
        "import drivers.coap, drivers.coap.probe\n"
        "print(sorted(m for m in sys.modules if m.startswith('aiocoap')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
