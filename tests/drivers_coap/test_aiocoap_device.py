"""The CoAP driver against an aiocoap server acting as a device (its own process):
SenML records with units, Observe with writes, and OSCORE-protected exchanges."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from drivers.coap import CoapDriver
from gateway.errors import DeviceProtocolError
from tests.drivers_coap.conftest import AiocoapDevice, Recorder, device_spec
from tests.peers import missing

POINTS = """
[devices.dev.points.temp]
path = "/sensors"
format = "senml"
unit = "Cel"
[devices.dev.points.humidity]
path = "/sensors"
format = "senml"
record = "hum"
[devices.dev.points.count]
path = "/count"
[devices.dev.points.setpoint]
path = "/setpoint"
writable = true
"""


def spec_for(uri: str, points: str = POINTS, extra: str = ""):  # type: ignore[no-untyped-def]
    return device_spec(
        f'[devices.dev]\ndriver = "coap"\nuri = "{uri}"\ntimeout = 10\n'
        f"retry = {{ initial = 0.2, cap = 0.5 }}\n{extra}\n{points}"
    )


@pytest.fixture
def device(tmp_path: Path):  # type: ignore[no-untyped-def]
    dev = AiocoapDevice(tmp_path, max_age=30)
    dev.start()
    yield dev
    dev.stop()


def test_read_decodes_senml_records_and_cbor_maps(device: AiocoapDevice) -> None:
    spec = spec_for(device.uri)

    async def main() -> None:
        drv = CoapDriver(Recorder())
        await drv.add_device(spec)
        await drv.start()
        try:
            got = {r.point: r.value for r in await drv.read("dev", spec.points)}
            # Two points from one SenML pack: `/sensors` was fetched once (see /count).
            assert got == {"temp": 21.5, "humidity": 40.0, "count": 1, "setpoint": 18}
            got = {r.point: r.value for r in await drv.read("dev", spec.points)}
            assert got["count"] == 2
        finally:
            await drv.stop()

    asyncio.run(main())


def test_observe_sees_a_write_made_through_the_driver(device: AiocoapDevice) -> None:
    points = """
[devices.dev.points.temp]
path = "/sensors"
mode = "observe"
format = "senml"
[devices.dev.points.hum]
path = "/sensors"
mode = "observe"
format = "senml"
[devices.dev.points.target]
path = "/sensors/temp"
writable = true
write_format = "senml"
record = "temp"
[devices.dev.points.setpoint]
path = "/setpoint"
mode = "observe"
writable = true
"""
    spec = spec_for(device.uri, points)

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.until(lambda: rec.values("temp") == [21.5] and rec.values("hum") == [40],
                            "the registration's values")  # fmt: skip
            await rec.until(lambda: rec.values("setpoint") == [18], "the setpoint")
            target = spec.point("target")
            setpoint = spec.point("setpoint")
            assert target is not None and setpoint is not None
            await drv.write("dev", target, 23.25)  # SenML CBOR PUT
            await rec.until(lambda: 23.25 in rec.values("temp"), "the notification of 23.25")
            await drv.write("dev", setpoint, 20)  # text PUT on an observed resource
            await rec.until(lambda: 20 in rec.values("setpoint"), "the setpoint notification")
        finally:
            await drv.stop()

    asyncio.run(main())


def test_observe_registers_again_when_the_device_restarts(device: AiocoapDevice) -> None:
    # Max-Age 30 here: the stale-observation timer is Max-Age + margin. The device comes
    # back with its initial value; only a new registration can deliver it.
    spec = spec_for(
        device.uri,
        '[devices.dev.points.setpoint]\npath = "/setpoint"\nmode = "observe"\nwritable = true\n',
        extra="observe_margin = 0",
    )
    device.stop()
    dev2 = AiocoapDevice(device.tmp, max_age=1, port=device.port)
    dev2.start()

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.until(lambda: rec.values("setpoint") == [18], "the first value")
            setpoint = spec.point("setpoint")
            assert setpoint is not None
            await drv.write("dev", setpoint, 25)
            await rec.until(lambda: rec.values("setpoint")[-1] == 25, "the notification of 25")
            await asyncio.to_thread(dev2.kill)  # a power cut: nothing tells the driver
            await asyncio.to_thread(dev2.start)  # forgets its observers and its value
            await rec.until(lambda: rec.values("setpoint")[-1] == 18, "the restarted value")
        finally:
            await drv.stop()

    try:
        asyncio.run(main())
    finally:
        dev2.stop()


def write_context(directory: Path, sender: str, recipient: str) -> None:
    directory.mkdir()
    (directory / "settings.json").write_text(json.dumps({
        "sender-id_hex": sender, "recipient-id_hex": recipient,
        "secret_ascii": "gateway-test-master-secret", "salt_hex": "9e7ca92223786340",
    }))  # fmt: skip
    (directory / "settings.json").chmod(0o600)  # it holds the key: world-readable is refused


@pytest.fixture
def oscore_pair(tmp_path: Path) -> tuple[Path, Path]:
    from aiocoap import defaults

    if defaults.oscore_missing_modules():
        missing("aiocoap[oscore] (" + ", ".join(defaults.oscore_missing_modules()) + ")")
    client, server = tmp_path / "gw-ctx", tmp_path / "dev-ctx"
    write_context(client, "01", "02")
    write_context(server, "02", "01")
    return client, server


def test_oscore_protected_device(tmp_path: Path, oscore_pair: tuple[Path, Path]) -> None:
    client_ctx, server_ctx = oscore_pair
    device = AiocoapDevice(tmp_path, oscore=server_ctx)
    device.start()
    try:
        protected = spec_for(device.uri, extra=f'oscore = "{client_ctx}"')
        plain = spec_for(device.uri)

        async def main() -> None:
            rec = Recorder()
            drv = CoapDriver(rec)
            await drv.start()
            await drv.add_device(protected)
            try:
                got = {r.point: r.value for r in await drv.read("dev", protected.points)}
                assert got["temp"] == 21.5 and got["setpoint"] == 18
                setpoint = protected.point("setpoint")
                assert setpoint is not None
                await drv.write("dev", setpoint, 17)
                assert (await drv.read("dev", [setpoint]))[0].value == 17
                # The same device without credentials is refused with 4.01.
                await drv.add_device(plain)
                with pytest.raises(DeviceProtocolError) as info:
                    await drv.read("dev", [setpoint])
                assert info.value.code == "4.01"
            finally:
                await drv.stop()
            # The context's lock is released at stop: another user (a restart) can load it.
            assert not (client_ctx / "lock").exists()

        asyncio.run(main())
        # Sequence numbers were persisted: a fresh copy of the directory is what a restart uses.
        assert json.loads((client_ctx / "sequence.json").read_text())["next-to-send"] > 0
    finally:
        device.stop()
        shutil.rmtree(client_ctx, ignore_errors=True)


def test_no_env_leaks() -> None:
    # aiocoap honours AIOCOAP_CLIENT_TRANSPORT; the driver picks its transports itself.
    assert "AIOCOAP_CLIENT_TRANSPORT" not in os.environ


def test_probe_with_oscore(tmp_path: Path, oscore_pair: tuple[Path, Path]) -> None:
    from tests.drivers_coap.test_probe import gatewayctl

    client_ctx, server_ctx = oscore_pair
    device = AiocoapDevice(tmp_path, oscore=server_ctx)
    device.start()
    try:
        out = gatewayctl(f"{device.uri}/sensors", "--json", "--oscore", str(client_ctx))
        assert out.returncode == 0, out.stderr
        values = json.loads(out.stdout)["values"]
        assert {"n": "dev-1/temp", "u": "Cel", "v": 21.5} in values
        refused = gatewayctl(f"{device.uri}/sensors")
        assert refused.returncode == 1 and refused.stdout.startswith("4.01")
    finally:
        device.stop()
