"""Duplicate detection (RFC 7252 section 4.5) with the bounded cache, and the [coap] config."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.coap.config import CoapConfig
from gateway.coap.lean import DedupCache, RateLimiter
from gateway.config import loads
from gateway.errors import ConfigError


def _con_post(mid: int, token: bytes, payload: bytes) -> bytes:
    out = bytearray([0x40 | len(token), 0x02, mid >> 8, mid & 0xFF]) + token
    out += bytes([0xB9]) + b"telemetry" + bytes([0x11, 112]) + b"\xff" + payload
    return bytes(out)


def test_a_retransmitted_con_gets_the_same_answer_and_is_stored_once(
    gateway_factory: Any,
) -> None:
    gw = gateway_factory()
    request = _con_post(0x1234, b"\x07\x08", cbor2.dumps([{-2: "dup-1/", 0: "n", 2: 1.0}]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", gw.port))
        sock.send(request)
        first = sock.recv(2048)
        sock.send(request)  # the same message ID again: a retransmission
        second = sock.recv(2048)
    assert first[1] == 0x44 and first[2:4] == b"\x12\x34"  # ACK 2.04, same message ID
    assert second == first
    conn = sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True)
    try:
        (count,) = conn.execute("SELECT count(*) FROM events WHERE type='readings'").fetchone()
    finally:
        conn.close()
    assert count == 1


def test_dedup_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache = DedupCache(max_entries=100, lifetime=10.0, clock=lambda: now[0])
    for i in range(1000):
        cache.add(f"h 1 {i}")
        assert len(cache) <= 100
    assert cache.get("h 1 999") == b""
    assert cache.get("h 1 0") is None
    assert cache.early_evictions > 0
    cache.set_response("h 1 999", b"resp")
    assert cache.get("h 1 999") == b"resp"
    now[0] = 15.0  # one lifetime later: the newest generation is still remembered...
    cache.add("late")
    assert cache.get("h 1 999") == b"resp"
    now[0] = 26.0  # ...and forgotten after two
    cache.add("later")
    assert cache.get("h 1 999") is None and cache.get("late") == b""


def test_rate_limiter_refills_and_keeps_a_bounded_table() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_sources=100, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, False, False]
    now[0] = 1.0  # two more tokens a second later
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b") and limiter.refused == 3
    for i in range(10_000):  # a spoofed flood from many addresses
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter.buckets) <= 100
    assert RateLimiter(rate=0.0, burst=1).allow("a")  # rate 0: no limit


def _coap(text: str) -> CoapConfig:
    config = loads(text).sections["coap"]
    assert isinstance(config, CoapConfig)
    return config


def test_config_defaults_and_values() -> None:
    c = _coap("[coap]\n")
    assert c.port == 5683 and c.dtls_port == 5684 and c.bind == ("::",)
    assert not c.allow_unauthenticated and not c.accept_unknown_devices
    c = _coap(
        '[coap]\nbind = ["127.0.0.1", "::1"]\nport = 6000\nmax_payload = 512\n'
        '[coap.devices.d1]\npsk_hex = "0a0b"\n'
    )
    assert c.dtls_port == 6001 and c.max_payload == 512
    creds = c.credentials["d1"]
    assert creds.psk == b"\x0a\x0b" and creds.psk_identity == b"d1"
    assert "0a0b" not in repr(c) and "\\n\\x0b" not in repr(c)  # keys stay out of reprs/logs


def test_config_errors_name_their_paths() -> None:
    with pytest.raises(ConfigError) as info:
        loads(
            '[coap]\nbind = ["localhost"]\nport = 70000\nmax_payload = "big"\ntypo = 1\n'
            '[coap.devices.d1]\npsk_identity = "x"\n'
        )
    text = str(info.value)
    assert "coap.bind[0]: 'localhost' is not an IP address" in text
    assert "coap.port: must be <= 65535" in text
    assert "coap.max_payload: must be an integer" in text
    assert "coap.typo: unknown key" in text
    assert "coap.devices.d1.psk: psk_identity is set but there is no psk" in text


def test_limits_have_defaults_and_are_checked() -> None:
    c = _coap("[coap]\n")
    assert (c.rate_per_source, c.burst, c.max_unknown_devices) == (100.0, 200, 1000)
    c = _coap("[coap]\nrate_per_source = 0\nburst = 5\nmax_unknown_devices = 0\n")
    assert (c.rate_per_source, c.burst, c.max_unknown_devices) == (0.0, 5, 0)
    with pytest.raises(ConfigError) as info:
        loads('[coap]\nrate_per_source = -1\nburst = 0\nmax_unknown_devices = "many"\n')
    text = str(info.value)
    assert "coap.rate_per_source: must be >= 0" in text
    assert "coap.burst: must be >= 1" in text
    assert "coap.max_unknown_devices: must be an integer" in text


def test_dtls_needs_specific_bind_addresses() -> None:
    with pytest.raises(ConfigError, match=r"coap\.bind: DTLS-PSK needs specific addresses"):
        loads('[coap]\n[coap.devices.d1]\npsk = "k"\n')


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    creds = tmp_path / "coap-credentials.toml"
    creds.write_text('[devices.s1]\npsk = "s1-key"\n[devices.s2]\noscore_context = "/nope"\n')
    os.chmod(creds, 0o644)
    base = f'[coap]\nbind = ["127.0.0.1"]\ncredentials_file = "{creds}"\n'
    with pytest.raises(ConfigError, match="permissions 0644 let others read the keys"):
        loads(base)
    os.chmod(creds, 0o600)
    with pytest.raises(ConfigError, match=r"s2\.oscore_context: '/nope' is not a directory"):
        loads(base)
    creds.write_text('[devices.s1]\npsk = "s1-key"\n')
    c = _coap(base)
    assert c.credentials["s1"].psk == b"s1-key"
