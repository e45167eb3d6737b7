"""Files the gateway writes are the owner's alone; secret files it reads must not be readable
by every local user; systemd credentials work (issue 11, item 6)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, run_cli, start_daemon, write_config


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask a shell usually has: files would be 0644 unless the gateway says otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_database_wal_shm_backup_and_quarantine_are_private(
    tmp_path: Path, daemon_factory: list[Daemon], loose_umask: None
) -> None:
    path = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    # A damaged database from an earlier life, world-readable: it is moved aside at start.
    (state / "gateway.db").write_bytes(b"this is not an SQLite database" * 100)
    (state / "gateway.db").chmod(0o644)
    d = start_daemon(path, tmp_path)
    daemon_factory.append(d)
    db = state / "gateway.db"
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert p.exists(), p
        assert _mode(p) == 0o600, (p, oct(_mode(p)))
    moved = [p for p in state.iterdir() if ".corrupt-" in p.name]
    assert moved, list(state.iterdir())
    assert all(_mode(p) == 0o600 for p in moved), [(p, oct(_mode(p))) for p in moved]

    backup = tmp_path / "backups" / "copy.db"
    out = run_cli(path, "db", "backup", str(backup))
    assert out.returncode == 0, out.stderr
    assert _mode(backup) == 0o600, oct(_mode(backup))


BLE_DEVICE = """
[devices.kitchen]
driver = "ble"
address = "54:48:E6:8F:80:A5"
format = "bthome"
bindkey_file = "{bindkey}"
[devices.kitchen.points.temperature]

[sync]
[[sync.endpoints]]
url = "mqtts://broker.example.com"
cert_file = "{cert}"
key_file = "{key}"
username = "gw"
password_file = "{password}"
"""


def _secrets_config(tmp_path: Path, bindkey: str, key: str, password: str) -> Path:
    path = write_config(tmp_path)
    cert = tmp_path / "gw.pem"
    cert.write_text("not read by config check\n")
    path.write_text(
        path.read_text() + BLE_DEVICE.format(bindkey=bindkey, cert=cert, key=key, password=password)
    )
    return path


def _secret(p: Path, text: str, mode: int) -> Path:
    p.write_text(text)
    p.chmod(mode)
    return p


def test_world_readable_secret_files_are_refused_with_path_and_fix(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    bindkey = _secret(keys / "kitchen.key", "00112233445566778899aabbccddeeff\n", 0o644)
    key = _secret(keys / "gw.key", "-----BEGIN PRIVATE KEY-----\n", 0o604)
    password = _secret(keys / "mqtt.pass", "s3cret-mqtt\n", 0o644)
    path = _secrets_config(tmp_path, str(bindkey), str(key), str(password))
    out = run_cli(path, "config", "check")
    assert out.returncode == 3, out
    text = out.stdout + out.stderr
    for toml_path, file, mode in (
        ("devices.kitchen.bindkey_file", bindkey, "0644"),
        ("sync.endpoints[0].key_file", key, "0604"),
        ("sync.endpoints[0].password_file", password, "0644"),
    ):
        assert (
            f"{toml_path}: {file}: mode {mode} lets every local user read this secret; "
            f"run `chmod 600 {file}`"
        ) in text, (toml_path, text)
    assert "LoadCredential=" in text
    assert "s3cret-mqtt" not in text and "00112233445566" not in text

    for p in (bindkey, key, password):
        p.chmod(0o640)  # owner and group: fine
    out = run_cli(path, "config", "check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_systemd_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`LoadCredential=mqtt.pass:/etc/gateway/mqtt.pass` puts a copy the dynamic user may read
    in $CREDENTIALS_DIRECTORY; the config names it by its credential name."""
    from drivers.ble.config import compile_device
    from gateway import config as cfg
    from gateway.sync.config import SyncConfig

    creds = tmp_path / "credentials"
    creds.mkdir()
    _secret(creds / "kitchen.key", "00112233445566778899aabbccddeeff\n", 0o400)
    _secret(creds / "gw.key", "-----BEGIN PRIVATE KEY-----\n", 0o400)
    _secret(creds / "mqtt.pass", "s3cret-mqtt\n", 0o400)
    path = _secrets_config(tmp_path, "kitchen.key", "gw.key", "mqtt.pass")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    out = run_cli(path, "config", "check")
    assert out.returncode == 0, out.stdout + out.stderr

    c = cfg.load(path)
    assert compile_device(c.devices["kitchen"], load_secrets=True).key == bytes.fromhex(
        "00112233445566778899aabbccddeeff"
    )
    sync = c.section("sync", SyncConfig)
    assert sync is not None
    ep = sync.endpoints[0]
    assert ep.password_file == str(creds / "mqtt.pass")
    assert ep.key_file == str(creds / "gw.key")

    (creds / "mqtt.pass").chmod(0o444)  # a credential copied world-readable by hand
    out = run_cli(path, "config", "check")
    assert out.returncode == 3
    assert f"sync.endpoints[0].password_file: {creds / 'mqtt.pass'}: mode 0444" in out.stderr


def test_world_readable_oscore_key_is_refused(tmp_path: Path) -> None:
    ctx = tmp_path / "oscore-boiler"
    ctx.mkdir()
    (ctx / "settings.json").write_text('{"sender-id_hex": "01", "recipient-id_hex": "02"}')
    secret = _secret(ctx / "secret.json", '{"secret_hex": "00112233445566778899"}', 0o644)
    path = write_config(tmp_path)
    path.write_text(
        path.read_text() + f'[coap]\nbind = ["127.0.0.1"]\n'
        f'[coap.devices.boiler-1]\noscore_context = "{ctx}"\n'
    )
    out = run_cli(path, "config", "check")
    assert out.returncode == 3, out
    assert f"coap.devices.boiler-1.oscore_context: {secret}: mode 0644 lets every local user" in (
        out.stderr
    ), out.stderr
    secret.chmod(0o600)
    assert run_cli(path, "config", "check").returncode == 0


def test_daemon_logs_in_with_a_password_from_systemd_credentials(
    tmp_path: Path, daemon_factory: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: gatewayd reads `password_file = "mqtt.pass"` from $CREDENTIALS_DIRECTORY
    and a real Mosquitto that requires the password receives its events."""
    from tests.support.mqtt import Mosquitto, Subscriber
    from tests.support.peers import free_port, require_binary, wait_until

    broker = Mosquitto()
    try:
        passwd = broker.file("passwd", "")
        subprocess.run(
            [require_binary("mosquitto_passwd"), "-b", str(passwd), "gw", "s3cret-mqtt"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        passwd.chmod(0o644)  # the broker (user mosquitto) reads it
        auth_port = free_port()
        broker.extra = (
            f"per_listener_settings true\nlistener {auth_port} 127.0.0.1\n"
            f"allow_anonymous false\npassword_file {passwd}\n"
            f"listener {broker.port} 127.0.0.1\nallow_anonymous true\n"
        )
        broker.start()
        sub = Subscriber(broker.port, tmp_path)
        try:
            creds = tmp_path / "credentials"
            creds.mkdir()
            _secret(creds / "mqtt.pass", "s3cret-mqtt\n", 0o400)
            path = write_config(tmp_path)
            path.write_text(
                path.read_text() + f'[sync]\nformat = "json"\n[[sync.endpoints]]\n'
                f'url = "mqtt://127.0.0.1:{auth_port}"\nusername = "gw"\n'
                'password_file = "mqtt.pass"\n'
            )
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
            d = start_daemon(path, tmp_path)
            daemon_factory.append(d)
            wait_until(lambda: len(sub.events()) >= 10, "events through the password listener")
            assert "s3cret-mqtt" not in d.log.read_text()
        finally:
            sub.stop()
    finally:
        broker.remove()
