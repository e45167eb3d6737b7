"""The CoAP driver over DTLS-PSK against libcoap's `coap-server-openssl` (OpenSSL's DTLS,
not ours): read, write, Observe; a wrong key never yields data and opens the breaker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from drivers.coap import CoapDriver
from gateway.errors import DeviceTimeoutError, DeviceUnavailableError
from tests.drivers_coap.conftest import (
    LibcoapServer,
    Recorder,
    assert_observation_survives_restart,
    device_spec,
)
from tests.peers import missing

PSK = "gateway-secret-psk"


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    from aiocoap import defaults

    if defaults.dtls_missing_modules():
        missing("DTLSSocket (pip install DTLSSocket; gatewayd[dtls])")
    srv = LibcoapServer(tmp_path, psk=PSK)
    srv.start()
    yield srv
    srv.stop()


def spec_for(  # type: ignore[no-untyped-def]
    server: LibcoapServer, key_file: Path, extra: str = "", timeout: float = 10
):
    return device_spec(f"""
[devices.dev]
driver = "coap"
uri = "coaps://127.0.0.1:{server.dtls_port}"
timeout = {timeout}
psk_identity = "gateway"
psk_key_file = "{key_file}"
retry = {{ initial = 0.2, cap = 0.5 }}
{extra}
[devices.dev.points.ticks]
path = "/time?ticks"
mode = "observe"
[devices.dev.points.valve]
path = "/valve"
writable = true
""")


def key_file(tmp_path: Path, key: str) -> Path:
    path = tmp_path / "dev.psk"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def test_read_write_and_observe_over_dtls_psk(tmp_path: Path, server: LibcoapServer) -> None:
    spec = spec_for(server, key_file(tmp_path, PSK))

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.until(lambda: len(set(rec.values("ticks"))) >= 2, "ticks over DTLS")
            valve = spec.point("valve")
            assert valve is not None
            await drv.write("dev", valve, 35)
            assert [(r.point, r.value) for r in await drv.read("dev", [valve])] == [("valve", 35)]
        finally:
            await drv.stop()

    asyncio.run(main())


def test_a_wrong_key_gets_no_data_and_opens_the_breaker(
    tmp_path: Path, server: LibcoapServer
) -> None:
    spec = spec_for(
        server, key_file(tmp_path, "not-the-key"), extra="breaker = { threshold = 1 }", timeout=2
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.start()
        await drv.add_device(spec)
        try:
            valve = spec.point("valve")
            assert valve is not None
            # OpenSSL drops the handshake: no alert reaches tinydtls, so it is a time-out.
            with pytest.raises((DeviceTimeoutError, DeviceUnavailableError)):
                await drv.read("dev", [valve])
            await rec.until(lambda: ("dev", False) in [a[:2] for a in rec.availability],
                            "the device to be reported unavailable")  # fmt: skip
            assert rec.readings == []
        finally:
            await drv.stop()

    asyncio.run(main())


def test_probe_over_dtls_psk(tmp_path: Path, server: LibcoapServer) -> None:
    from tests.drivers_coap.test_probe import gatewayctl

    key = key_file(tmp_path, PSK)
    url = f"coaps://127.0.0.1:{server.dtls_port}/door"
    out = gatewayctl(url, "-m", "put", "-p", "open", "--psk-identity", "gw", "--psk-key-file",
                     str(key))  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("2.01"), out.stderr
    out = gatewayctl(url, "--json", "--psk-identity", "gw", "--psk-key-file", str(key))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["values"] == [{"n": "", "v": "open"}]
    key.chmod(0o644)
    out = gatewayctl(url, "--psk-identity", "gw", "--psk-key-file", str(key))
    assert out.returncode == 2 and "readable by others" in out.stderr


def test_credentials_are_found_with_or_without_the_default_port() -> None:
    from drivers.coap.client import credentials_patterns

    assert credentials_patterns("coaps://192.0.2.7") == [
        "coaps://192.0.2.7/*", "coaps://192.0.2.7:5684/*",
    ]  # fmt: skip
    assert credentials_patterns("coaps://[::1]:5684") == ["coaps://[::1]/*", "coaps://[::1]:5684/*"]
    assert credentials_patterns("coap://h:61616") == ["coap://h:61616/*"]


def test_observe_over_dtls_survives_a_server_restart(tmp_path: Path, server: LibcoapServer) -> None:
    # The restarted server knows neither our observation nor our DTLS session: the driver
    # must notice the silence and register again over a new handshake.
    spec = spec_for(server, key_file(tmp_path, PSK), extra="observe_margin = 0.5", timeout=3)
    assert_observation_survives_restart(spec, server)
