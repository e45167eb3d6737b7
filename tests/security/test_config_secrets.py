"""Secrets never leave the config: not in `gatewayctl config check` (text or --json), not in a
repr, not in the log or the status when a bad config comes by SIGHUP (issue 11, item 5)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from gateway import config as cfg
from tests.support.daemon import VIRTUAL_CONFIG, Daemon, run_cli, start_daemon, write_config

# Every secret below is distinctive enough that finding any 8 characters of it in an output
# means it leaked.
BINDKEY_SHORT = "0123456789abcdef0123456789abcde"  # 31 digits
BINDKEY_BAD = "fedcba9876543210fedcba987654321Z"  # 32 characters, one not hex
PSK_HEX_ODD = "c0ffee15c0ffee15c0ffee1"
PSK_INT = 86611069198
MQTT_URL_PASSWORD = "Secr3tInUrl"
MQTT_INT_PASSWORD = 42424242424242
COAP_URL_PASSWORD = "UriPassw0rd"
COAP_PSK_KEY_INT = 977553311
SECRETS = [
    BINDKEY_SHORT, BINDKEY_BAD, PSK_HEX_ODD, str(PSK_INT), MQTT_URL_PASSWORD,
    str(MQTT_INT_PASSWORD), COAP_URL_PASSWORD, str(COAP_PSK_KEY_INT),
]  # fmt: skip

BAD_SECRETS = f"""
[devices.ble-short]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey = "{BINDKEY_SHORT}"
[devices.ble-short.points.temperature]

[devices.ble-bad]
driver = "ble"
address = "54:48:E6:8F:80:A6"
format = "bthome"
bindkey = "{BINDKEY_BAD}"
[devices.ble-bad.points.temperature]

[devices.thermo]
driver = "coap"
uri = "coaps://gw:{COAP_URL_PASSWORD}@192.0.2.7:99999"
psk_identity = "thermo"
psk_key = {COAP_PSK_KEY_INT}
[devices.thermo.points.t]
path = "/t"

[coap]
bind = ["127.0.0.1"]
[coap.devices.dev-a]
psk_hex = "{PSK_HEX_ODD}"
[coap.devices.dev-b]
psk = {PSK_INT}

[sync]
[[sync.endpoints]]
url = "mqtts://gw:{MQTT_URL_PASSWORD}@broker.example.com:88x"
[[sync.endpoints]]
url = "mqtts://broker.example.com"
username = "gw"
password = {MQTT_INT_PASSWORD}
"""


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if any(s[i : i + 8] in text for i in range(len(s) - 7))]


def _bad_config(tmp_path: Path) -> Path:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + BAD_SECRETS)
    return path


def test_config_check_names_what_is_wrong_without_the_secret(tmp_path: Path) -> None:
    path = _bad_config(tmp_path)
    text = run_cli(path, "config", "check")
    assert text.returncode == 3, text
    out = text.stdout + text.stderr
    assert _leaks(out) == [], out
    expected = [
        "devices.ble-short.bindkey: must be hexadecimal, 32 digits (a 16-byte key); it has 31",
        "devices.ble-bad.bindkey: must be hexadecimal, 32 digits (a 16-byte key); "
        "1 character(s) not 0-9/a-f",
        "devices.thermo.uri: must not hold credentials",
        "devices.thermo.uri: has an invalid port: 'coaps://***@192.0.2.7:99999'",
        "devices.thermo.psk_key: must be a string, got an integer\n",
        "coap.devices.dev-a.psk_hex: must be hexadecimal, an even number of digits; "
        "it has an odd number of characters (23)",
        "coap.devices.dev-b.psk: must be a string, got an integer\n",
        "sync.endpoints[0].url: must not hold credentials (user:password@): remove them and set "
        "sync.endpoints[0].username and sync.endpoints[0].password_file (or password)",
        "sync.endpoints[0].url: bad port in 'mqtts://***@broker.example.com:88x'",
        "sync.endpoints[1].password: must be a string, got an integer\n",
    ]
    for line in expected:
        assert line in out, (line, out)

    js = run_cli(path, "--json", "config", "check")
    assert js.returncode == 3
    assert _leaks(js.stdout + js.stderr) == [], js.stdout
    errors = json.loads(js.stdout)["errors"]
    wrong_type = "must be a string, got an integer"
    assert {"path": "sync.endpoints[1].password", "message": wrong_type} in errors


def test_password_in_clear_to_a_remote_broker_is_a_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text()
        + '[sync]\n[[sync.endpoints]]\nurl = "mqtt://192.0.2.9"\nusername = "gw"\n'
        + 'password = "PlainTextPass"\n[[sync.endpoints]]\nurl = "mqtt://127.0.0.1:1884"\n'
        + 'username = "gw"\npassword = "LocalPass1"\n'
    )
    text = run_cli(path, "config", "check")
    assert text.returncode == 0, text
    assert (
        "warning: sync.endpoints[0].password: is sent in clear text over mqtt:// to 192.0.2.9"
        in text.stderr
    ), text.stderr
    assert "endpoints[1]" not in text.stderr  # loopback: no warning
    assert "PlainTextPass" not in text.stdout + text.stderr
    js = json.loads(run_cli(path, "--json", "config", "check").stdout)
    assert [w["path"] for w in js["warnings"]] == ["sync.endpoints[0].password"]


def test_reprs_hide_secrets(tmp_path: Path) -> None:
    from drivers.ble.config import compile_device

    c = cfg.loads(
        VIRTUAL_CONFIG.format(state=tmp_path, run=tmp_path, stop_timeout=5)
        + f"""
[devices.kitchen]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey = "{BINDKEY_SHORT}f"
[devices.kitchen.points.temperature]
[coap]
bind = ["127.0.0.1"]
[coap.devices.dev-a]
psk = "CoapPskValue1"
[sync]
[[sync.endpoints]]
url = "mqtts://broker.example.com"
username = "gw"
password = "MqttPassValue"
"""
    )
    shown = repr(c) + repr(compile_device(c.devices["kitchen"]))
    for secret in (BINDKEY_SHORT, "CoapPskValue1", "MqttPassValue"):
        assert secret not in shown, shown


def test_reload_by_sighup_logs_no_secret(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    path = write_config(tmp_path)
    d = start_daemon(path, tmp_path)
    daemon_factory.append(d)
    path.write_text(path.read_text() + BAD_SECRETS)
    d.peer.signal(signal.SIGHUP)
    got = d.messages("READY=1")
    assert any("RELOADING=1" in m for m in got), got
    log = d.log.read_text()
    assert "reload rejected" in log and "it has 31" in log, log
    assert _leaks(log) == [], log
    status = run_cli(path, "--json", "status")
    assert status.returncode == 0, status
    err = json.loads(status.stdout)["last_reload_error"]
    assert "bad port" in err and _leaks(err) == [], err
