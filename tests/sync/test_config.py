"""`[sync]` parsing: good configs become frozen dataclasses, bad ones name every TOML path."""

from __future__ import annotations

import pytest

from gateway.config import loads
from gateway.errors import ConfigError
from gateway.retry import BreakerSettings, RetrySettings
from gateway.sync.config import SyncConfig


def sync(text: str) -> SyncConfig:
    cfg = loads('[gateway]\nid = "gw"\n' + text).sections["sync"]
    assert isinstance(cfg, SyncConfig)
    return cfg


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads('[gateway]\nid = "gw"\n' + text)
    return [str(i) for i in ei.value.issues]


def test_endpoints_in_failover_order_with_tls_and_credentials() -> None:
    cfg = sync(
        """
[sync]
format = "json"
batch_size = 50
mqtt_version = "3.1.1"
[[sync.endpoints]]
url = "mqtts://primary.example:8883"
ca_file = "/etc/gw/ca.pem"
cert_file = "/etc/gw/gw.pem"
key_file = "/etc/gw/gw.key"
username = "gw"
password_file = "/etc/gw/pass"
[[sync.endpoints]]
host = "backup.example"
[sync.topics]
telemetry = "t/{gateway}/{stream}/{type}"
[sync.backfill]
threshold = 10
rate = 5.5
"""
    )
    assert [e.label for e in cfg.endpoints] == [
        "mqtts://primary.example:8883", "mqtt://backup.example:1883",
    ]  # fmt: skip
    assert cfg.endpoints[0].cert_file == "/etc/gw/gw.pem"
    assert cfg.endpoints[0].password_file == "/etc/gw/pass"
    assert (cfg.format, cfg.batch_size, cfg.mqtt_version) == ("json", 50, "3.1.1")
    assert cfg.topics.telemetry == "t/{gateway}/{stream}/{type}"
    assert (cfg.backfill_threshold, cfg.backfill_rate) == (10, 5.5)


def test_retry_and_breaker_come_from_the_shared_tables_or_their_names_before() -> None:
    endpoint = '[[sync.endpoints]]\nurl = "mqtt://h"\n'
    cfg = sync("[sync]\n" + endpoint)
    assert cfg.retry == RetrySettings(initial=1.0, cap=300.0, jitter="full")
    assert cfg.breaker == BreakerSettings(threshold=5, cooldown=60.0)
    new = loads('[sync.retry]\ninitial = 2\ncap = 9\nmultiplier = 3\n'
                '[sync.breaker]\nthreshold = 4\ncooldown = 7\n' + endpoint)  # fmt: skip
    assert new.sections["sync"].retry == RetrySettings(initial=2.0, cap=9.0, multiplier=3.0)
    assert new.sections["sync"].breaker == BreakerSettings(threshold=4, cooldown=7.0)
    assert not new.warnings
    old = loads("[sync]\nbackoff_base = 2\nbackoff_cap = 9\nbreaker_threshold = 4\n"
                "breaker_cooldown = 7\n" + endpoint)  # fmt: skip
    assert old.sections["sync"].retry == RetrySettings(initial=2.0, cap=9.0)
    assert old.sections["sync"].breaker == BreakerSettings(threshold=4, cooldown=7.0)
    assert [str(w) for w in old.warnings] == [
        "sync.backoff_base: deprecated name: use `retry.initial` instead",
        "sync.backoff_cap: deprecated name: use `retry.cap` instead",
        "sync.breaker_threshold: deprecated name: use `breaker.threshold` instead",
        "sync.breaker_cooldown: deprecated name: use `breaker.cooldown` instead",
    ]


def test_file_sink() -> None:
    cfg = sync('[sync.file]\ndirectory = "/var/spool/gw"\nformat = "cbor-seq"\nrotate_mb = 1\n')
    assert cfg.file is not None and cfg.file.format == "cbor-seq"
    assert cfg.file.rotate_bytes == 1024 * 1024 and cfg.endpoints == ()


def test_every_problem_is_reported_with_its_path() -> None:
    got = issues(
        """
[sync]
format = "xml"
batch_sise = 3
backoff_base = 10.0
backoff_cap = 1.0
[[sync.endpoints]]
url = "http://x"
[[sync.endpoints]]
url = "mqtt://h:1883"
ca_file = "ca.pem"
password = "p"
[sync.topics]
telemetry = "a/{device}/#"
"""
    )
    text = "\n".join(got)
    assert "sync.format: must be one of 'cbor', 'json', got 'xml'" in text
    assert "sync.batch_sise: unknown key (did you mean 'batch_size'?)" in text
    assert "sync.backoff_cap: must be >= backoff_base" in text
    assert "sync.endpoints[0].url: scheme must be mqtt:// or mqtts://" in text
    assert "sync.endpoints[1].tls: certificate files are given but TLS is off" in text
    assert "sync.endpoints[1].username: a password needs a username" in text
    assert "sync.topics.telemetry: unknown placeholder {device}" in text
    assert "sync.topics.telemetry: a topic to publish on must not contain the wildcards" in text


def test_needs_a_destination() -> None:
    assert issues("[sync]\n") == [
        "sync.endpoints: give at least one [[sync.endpoints]] or a [sync.file] sink"
    ]


def test_remote_config_is_off_by_default_and_checked() -> None:
    cfg = sync('[[sync.endpoints]]\nurl = "mqtt://h"\n')
    assert cfg.remote_config is False and cfg.remote_config_probation == 60.0
    assert cfg.topics.config == "gateways/{gateway}/config"
    cfg = sync('[sync]\nremote_config = true\nremote_config_probation = 5\n'
               '[[sync.endpoints]]\nurl = "mqtt://h"\n')  # fmt: skip
    assert cfg.remote_config is True and cfg.remote_config_probation == 5.0
    got = issues(
        """
[sync]
remote_config = "yes"
remote_config_probation = 0
[sync.topics]
config = "gateways/{gateway}/commands"
[sync.file]
directory = "/var/spool/gw"
"""
    )
    assert got == [
        "sync.topics.config: must differ from the commands and responses topics",
        "sync.remote_config: must be true or false, got a string 'yes'",
        "sync.remote_config_probation: must be > 0, got 0",
    ]
    assert issues('[sync]\nremote_config = true\n[sync.file]\ndirectory = "/d"\n') == [
        "sync.remote_config: needs [[sync.endpoints]]: config documents come over MQTT"
    ]
