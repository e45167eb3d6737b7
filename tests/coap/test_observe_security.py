"""Observe (aiocoap's API and libcoap's `coap-client -s`), DTLS-PSK with
`coap-client-openssl`, and OSCORE with aiocoap's client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import cbor2

from tests.support.coap import coap_client
from tests.support.peers import require_binary, wait_until


def _post_json(gw: Any, tmp: Path, body: str, path: str = "/telemetry") -> str | None:
    reply = coap_client(
        "coap-client-notls", ["-m", "post", "-t", "110", "-e", body], gw.uri(path), tmp
    )
    return reply.code


def _readings(db: Path) -> list[tuple[str, dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT stream, data FROM events WHERE type='readings' ORDER BY seq")
        return [(s, cbor2.loads(d)) for s, d in rows.fetchall()]
    finally:
        conn.close()


async def _observe(gw: Any, tmp: Path) -> list[float]:
    from aiocoap import GET, Context, Message

    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        request = ctx.request(Message(code=GET, uri=gw.uri("/d/obs-1/temp"), observe=0))
        first = await asyncio.wait_for(request.response, 5)
        values = [cbor2.loads(first.payload)[0][2]]
        loop = asyncio.get_running_loop()
        # A new value (from another client, libcoap) must produce a notification; the same
        # value again must not.
        for body in (
            '[{"bn":"obs-1/","n":"temp","v":20.0}]',
            '[{"bn":"obs-1/","n":"temp","v":23.5}]',
        ):
            code = await loop.run_in_executor(None, _post_json, gw, tmp, body)
            assert code == "2.04"
        async with asyncio.timeout(5):
            async for notification in request.observation:
                values.append(cbor2.loads(notification.payload)[0][2])
                break
        request.observation.cancel()
        return values
    finally:
        await ctx.shutdown()


async def test_observe_point_sees_a_new_committed_value(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()
    assert _post_json(gw, tmp_path, '[{"bn":"obs-1/","n":"temp","v":20.0}]') == "2.04"
    assert await _observe(gw, tmp_path) == [20.0, 23.5]


def test_observe_with_coap_client(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    assert _post_json(gw, tmp_path, '[{"bn":"obs-2/","n":"hum","v":40}]') == "2.04"
    exe = require_binary("coap-client-notls")
    log = tmp_path / "observe.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "-s", "4", "-B", "6", "-v", "6", "-A", "110", gw.uri("/d/obs-2/hum")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: '"v":40' in log.read_text(errors="replace"), "first notification")
        assert _post_json(gw, tmp_path, '[{"bn":"obs-2/","n":"hum","v":41}]') == "2.04"
        wait_until(lambda: '"v":41' in log.read_text(errors="replace"), "new-value notification")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert "Observe:" in log.read_text(errors="replace")


def test_observe_commands_resource(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory()
    reply = coap_client("coap-client-notls", ["-A", "50"], gw.uri("/d/obs-3/commands"), tmp_path)
    assert reply.code == "2.05" and json.loads(reply.payload) == []


DTLS_TOML = """allow_unauthenticated = false
accept_unknown_devices = false
[coap.devices.sensor-9]
psk = "sensor-9-secret"
"""


def test_dtls_psk_with_coap_client_openssl(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory(DTLS_TOML)
    uri = f"coaps://127.0.0.1:{gw.dtls_port}/telemetry"
    ok = coap_client(
        "coap-client-openssl",
        [
            "-u",
            "sensor-9",
            "-k",
            "sensor-9-secret",
            "-m",
            "post",
            "-t",
            "110",
            "-e",
            '[{"n":"temp","v":18.5}]',
        ],
        uri,
        tmp_path,
    )
    assert ok.code == "2.04", ok.log
    # The identity came from the DTLS session: no base name needed, and it is stored there.
    assert _readings(gw.db) == [("device:sensor-9", {"r": [{"n": "temp", "v": 18.5}]})]

    # The base name must name the authenticated device.
    other = coap_client(
        "coap-client-openssl",
        ["-u", "sensor-9", "-k", "sensor-9-secret", "-m", "post", "-t", "110",
         "-e", '[{"bn":"sensor-1/","n":"temp","v":5}]'],
        uri,
        tmp_path,
    )  # fmt: skip
    assert other.code == "4.03", other.log
    assert "device 'sensor-1', not 'sensor-9'" in other.payload.decode()

    # Read back over DTLS.
    got = coap_client(
        "coap-client-openssl",
        ["-u", "sensor-9", "-k", "sensor-9-secret", "-A", "110"],
        f"coaps://127.0.0.1:{gw.dtls_port}/d/sensor-9/temp",
        tmp_path,
    )
    assert got.code == "2.05" and json.loads(got.payload)[0]["v"] == 18.5

    wrong = coap_client(
        "coap-client-openssl",
        [
            "-u",
            "sensor-9",
            "-k",
            "not-the-key",
            "-m",
            "post",
            "-t",
            "110",
            "-e",
            '[{"n":"temp","v":99}]',
        ],
        uri,
        tmp_path,
        timeout=2,
    )
    assert wrong.code is None or not wrong.code.startswith("2."), wrong.log

    # The same device without DTLS: refused, even with its name in the base name.
    plain = coap_client(
        "coap-client-notls",
        ["-m", "post", "-t", "110", "-e", '[{"bn":"sensor-9/","n":"temp","v":99}]'],
        gw.uri("/telemetry"),
        tmp_path,
    )
    assert plain.code == "4.01", plain.log
    assert "has credentials" in plain.payload.decode()
    assert len(_readings(gw.db)) == 1
    assert "sensor-9-secret" not in gw.text()  # keys never in logs


def _oscore_dirs(base: Path) -> tuple[Path, Path]:
    common = {"secret_hex": "0102030405060708090a0b0c0d0e0f10", "salt_hex": "9e7ca92223786340"}
    server, client = base / "oscore-server", base / "oscore-client"
    for d, sender, recipient in ((server, "01", "02"), (client, "02", "01")):
        d.mkdir()
        settings = {"sender-id_hex": sender, "recipient-id_hex": recipient, **common}
        (d / "settings.json").write_text(json.dumps(settings))
        os.chmod(d / "settings.json", 0o600)
    return server, client


async def _oscore_requests(gw: Any, client_dir: Path) -> tuple[str, str, str]:
    from aiocoap import GET, POST, Context, Message

    ctx = await Context.create_client_context(transports=["oscore", "udp6"])
    try:
        ctx.client_credentials.load_from_dict(
            {f"coap://127.0.0.1:{gw.port}/*": {"oscore": {"basedir": str(client_dir)}}}
        )
        post = Message(
            code=POST,
            uri=gw.uri("/telemetry"),
            content_format=110,
            payload=b'[{"n":"level","v":3}]',
        )
        r1 = await asyncio.wait_for(ctx.request(post).response, 10)
        get = Message(code=GET, uri=gw.uri("/d/valve-2/level"), accept=110)
        r2 = await asyncio.wait_for(ctx.request(get).response, 10)
    finally:
        await ctx.shutdown()
    plain_ctx = await Context.create_client_context(transports=["udp6"])
    try:
        plain = Message(
            code=POST,
            uri=gw.uri("/d/valve-2"),
            content_format=110,
            payload=b'[{"n":"level","v":4}]',
        )
        r3 = await asyncio.wait_for(plain_ctx.request(plain).response, 10)
    finally:
        await plain_ctx.shutdown()
    return f"{r1.code.dotted}", r2.payload.decode(), f"{r3.code.dotted}"


async def test_oscore_with_aiocoap_client(gateway_factory: Any, tmp_path: Path) -> None:
    server_dir, client_dir = _oscore_dirs(tmp_path)
    gw = gateway_factory(
        f'accept_unknown_devices = false\n[coap.devices.valve-2]\noscore_context = "{server_dir}"\n'
    )
    posted, value, unprotected = await _oscore_requests(gw, client_dir)
    assert posted == "2.04"
    assert json.loads(value)[0]["v"] == 3
    assert unprotected == "4.01"
    assert _readings(gw.db) == [("device:valve-2", {"r": [{"n": "level", "v": 3}]})]
