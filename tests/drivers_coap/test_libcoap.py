"""The CoAP driver against libcoap's example servers (a CoAP stack we did not write).

`coap-server-notls -d N` serves `/time` (observable, Max-Age 1, `?ticks` gives Unix seconds)
and lets clients create resources with PUT, which are observable too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from drivers.coap import CoapDriver
from gateway.config import PointSpec
from gateway.errors import (
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
)
from tests.drivers_coap.conftest import (
    LibcoapServer,
    Recorder,
    assert_observation_survives_restart,
    device_spec,
)
from tests.peers import require_binary


def spec_for(  # type: ignore[no-untyped-def]
    uri: str, points: str, extra: str = "", timeout: float = 10.0, backoff: float = 0.2
):
    return device_spec(
        f'[devices.dev]\ndriver = "coap"\nuri = "{uri}"\ntimeout = {timeout}\n'
        f"retry = {{ initial = {backoff}, cap = {backoff} }}\n{extra}\n{points}"
    )


def coap_client(*args: str) -> bytes:
    """libcoap's client; it exits 0 even on failure, so callers check the exact response
    bytes it writes with -o."""
    binary = require_binary("coap-client-notls")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "response"
        subprocess.run(
            [binary, "-B", "5", "-o", str(out), *args], capture_output=True, timeout=30, check=False
        )
        return out.read_bytes() if out.exists() else b""


def put(server: LibcoapServer, path: str, body: str) -> None:
    coap_client("-m", "put", "-e", body, f"coap://127.0.0.1:{server.port}{path}")


def test_read_polls_with_get(libcoap: LibcoapServer) -> None:
    put(libcoap, "/temp", "21.5")
    put(libcoap, "/label", "boiler room")
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.ticks]\npath = "/time?ticks"\n'
        '[devices.dev.points.temp]\npath = "/temp"\nformat = "text"\n'
        '[devices.dev.points.label]\npath = "/label"\n',
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            before = math.floor(time.time())
            got = {r.point: r.value for r in await drv.read("dev", spec.points)}
            assert got["temp"] == 21.5 and got["label"] == "boiler room"
            assert isinstance(got["ticks"], int) and got["ticks"] >= before
            assert rec.availability == [("dev", True, "answered")]
        finally:
            await drv.stop()

    asyncio.run(main())


def test_a_missing_resource_is_a_protocol_error_not_a_dead_device(libcoap: LibcoapServer) -> None:
    put(libcoap, "/temp", "20")
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.temp]\npath = "/temp"\n[devices.dev.points.gone]\npath = "/gone"\n',
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.start()
        await drv.add_device(spec)
        try:
            # One point of two is missing: the other is still read (and the miss logged).
            assert [(r.point, r.value) for r in await drv.read("dev", spec.points)] == [
                ("temp", 20)
            ]
            gone = [p for p in spec.points if p.name == "gone"]
            with pytest.raises(DeviceProtocolError) as info:
                await drv.read("dev", gone)
            assert info.value.code == "4.04"
            assert all(avail for _, avail, _ in rec.availability)
        finally:
            await drv.stop()

    asyncio.run(main())


def test_write_lands_on_the_server(libcoap: LibcoapServer) -> None:
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.setpoint]\npath = "/setpoint"\nwritable = true\n'
        '[devices.dev.points.mode]\npath = "/mode"\nwritable = true\nformat = "cbor"\n',
    )

    async def main() -> None:
        drv = CoapDriver(Recorder())
        await drv.start()
        await drv.add_device(spec)
        try:
            setpoint, mode = spec.points
            await drv.write("dev", setpoint, 19.5)  # PUT creates it (-d), as text
            await drv.write("dev", mode, "eco")  # CBOR text string
            with pytest.raises(DriverError, match="not writable"):
                await drv.write("dev", PointSpec("setpoint"), 1)
        finally:
            await drv.stop()

    asyncio.run(main())
    url = f"coap://127.0.0.1:{libcoap.port}"
    assert coap_client("-m", "get", f"{url}/setpoint") == b"19.5"
    assert coap_client("-m", "get", f"{url}/mode") == b"\x63eco"


def test_observe_notifications_arrive_through_emit(libcoap: LibcoapServer) -> None:
    put(libcoap, "/level", "1")
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.level]\npath = "/level"\nmode = "observe"\n'
        '[devices.dev.points.ticks]\npath = "/time?ticks"\nmode = "observe"\n',
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.until(lambda: rec.values("level") == [1], "the registration's value")
            # Another client changes the resource: the server notifies, the driver emits.
            await asyncio.to_thread(put, libcoap, "/level", "2")
            await rec.until(lambda: 2 in rec.values("level"), "a notification with 2")
            await rec.until(lambda: len(set(rec.values("ticks"))) >= 2, "two ticks")
            # While observed, a poll of the point does not fetch it again.
            level = [p for p in spec.points if p.name == "level"]
            assert await drv.read("dev", level) == []
        finally:
            await drv.stop()

    asyncio.run(main())


def test_observation_is_registered_again_after_the_server_restarts(
    libcoap: LibcoapServer,
) -> None:
    # /time has Max-Age 1: once notifications stop for 1 s + margin, the driver registers
    # again (aiocoap would wait forever). A restarted server knows no observers: only a new
    # registration brings ticks from it.
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.ticks]\npath = "/time?ticks"\nmode = "observe"\n',
        extra="observe_margin = 0.5",
    )
    assert_observation_survives_restart(spec, libcoap)


def test_breaker_opens_on_a_dead_server_and_closes_when_it_is_back(
    libcoap: LibcoapServer, caplog: pytest.LogCaptureFixture
) -> None:
    put(libcoap, "/temp", "20")
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.temp]\npath = "/temp"\n',
        extra="breaker = { threshold = 2 }",
        timeout=5.0,
        backoff=0.3,
    )
    caplog.set_level(logging.DEBUG, logger="test.drivers.coap")

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.start()
        await drv.add_device(spec)
        try:
            assert (await drv.read("dev", spec.points))[0].value == 20
            await asyncio.to_thread(libcoap.stop)
            # Nothing listens any more: ICMP port unreachable, or silence until the timeout.
            for _ in range(2):
                with pytest.raises((DeviceUnavailableError, DeviceTimeoutError)):
                    await drv.read("dev", spec.points)
            assert rec.availability[-1][:2] == ("dev", False)
            # Open: the next read fails at once, without traffic, and says why.
            with pytest.raises(DeviceUnavailableError, match="not tried: 2 failures in a row"):
                await drv.read("dev", spec.points)
            await asyncio.to_thread(libcoap.start)
            await asyncio.to_thread(put, libcoap, "/temp", "21")
            # Half-open after the backoff: a probe read succeeds and closes the breaker.
            for _ in range(200):
                try:
                    assert (await drv.read("dev", spec.points))[0].value == 21
                    break
                except DeviceUnavailableError:
                    await asyncio.sleep(0.05)  # the breaker's backoff, not synchronisation
            assert rec.availability[-1] == ("dev", True, "answered")
        finally:
            await drv.stop()

    asyncio.run(main())
    levels = [
        (r.levelname, r.getMessage()) for r in caplog.records if "coap device dev" in r.getMessage()
    ]
    warnings = [m for lvl, m in levels if lvl == "WARNING"]
    assert len(warnings) == 1, levels  # first failure only; repeats are DEBUG
    assert any(lvl == "INFO" and "answers again" in m for lvl, m in levels)


def test_psk_key_file_must_be_private(tmp_path: Path, libcoap: LibcoapServer) -> None:
    key = tmp_path / "dev.psk"
    key.write_text("secret\n")
    key.chmod(0o644)
    spec = spec_for(
        f"coaps://127.0.0.1:{libcoap.dtls_port}", '[devices.dev.points.t]\npath = "/t"\n',
        extra=f'psk_identity = "gw"\npsk_key_file = "{key}"',
    )  # fmt: skip

    async def main() -> None:
        drv = CoapDriver(Recorder())
        await drv.start()
        try:
            with pytest.raises(Exception, match="readable by others: chmod 600"):
                await drv.add_device(spec)
        finally:
            await drv.stop()

    asyncio.run(main())


def test_an_observed_device_that_dies_becomes_unavailable_and_comes_back(
    libcoap: LibcoapServer,
) -> None:
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.ticks]\npath = "/time?ticks"\nmode = "observe"\n',
        extra="observe_margin = 0.5\nbreaker = { threshold = 1 }",
        timeout=5.0,
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.until(lambda: rec.values("ticks") != [], "a first notification")
            await asyncio.to_thread(libcoap.kill)
            # Notifications stop; registering again fails: the breaker opens.
            await rec.until(lambda: rec.availability[-1][:2] == ("dev", False), "unavailable")
            seen = len(rec.readings)
            await asyncio.to_thread(libcoap.start)
            await rec.until(lambda: rec.availability[-1][:2] == ("dev", True), "available again")
            await rec.until(lambda: len(rec.readings) > seen, "notifications again")
        finally:
            await drv.stop()
        # A stopped driver leaves no task behind.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_removing_a_device_ends_its_observation(libcoap: LibcoapServer) -> None:
    spec = spec_for(
        f"coap://127.0.0.1:{libcoap.port}",
        '[devices.dev.points.ticks]\npath = "/time?ticks"\nmode = "observe"\n',
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.start()
        await drv.add_device(spec)
        try:
            await rec.until(lambda: rec.values("ticks") != [], "a first notification")
            await drv.remove_device("dev")
            assert [t for t in asyncio.all_tasks() if "coap observe" in t.get_name()] == []
            with pytest.raises(DeviceUnavailableError, match="not a configured coap device"):
                await drv.read("dev", spec.points)
        finally:
            await drv.stop()

    asyncio.run(main())


def test_a_device_with_a_bad_key_does_not_stop_the_others(
    tmp_path: Path, libcoap: LibcoapServer
) -> None:
    put(libcoap, "/temp", "20")
    bad = spec_for(
        f"coaps://127.0.0.1:{libcoap.dtls_port}", '[devices.dev.points.t]\npath = "/t"\n',
        extra=f'psk_identity = "gw"\npsk_key_file = "{tmp_path / "missing.psk"}"',
    )  # fmt: skip
    good = device_spec(
        f'[devices.ok]\ndriver = "coap"\nuri = "coap://127.0.0.1:{libcoap.port}"\n'
        '[devices.ok.points.temp]\npath = "/temp"\n',
        "ok",
    )

    async def main() -> None:
        rec = Recorder()
        drv = CoapDriver(rec)
        await drv.add_device(bad)
        await drv.add_device(good)
        await drv.start()
        try:
            assert rec.availability[0][:2] == ("dev", False)
            assert "cannot read key file" in rec.availability[0][2]
            assert (await drv.read("ok", good.points))[0].value == 20
        finally:
            await drv.stop()

    asyncio.run(main())
