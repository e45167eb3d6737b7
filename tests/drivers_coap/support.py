"""Peers and helpers for the CoAP driver's tests: libcoap servers and an aiocoap device process
(the recording DriverContext is `drivers.testing.RecordingContext`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from drivers.testing import RecordingContext
from gateway import config
from gateway.config import DeviceSpec
from tests.support.peers import Peer, free_port, require_binary, wait_until

HERE = Path(__file__).parent
BOUND = 30.0  # seconds: a bound against hangs, not a measurement


def coap_ping(port: int, host: str = "127.0.0.1") -> bool:
    """CoAP ping (RFC 7252 4.3): an empty CON is answered with a RST by any CoAP server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(b"\x40\x00\x12\x34", (host, port))
            data = s.recv(64)
        except OSError:
            return False
    return len(data) >= 4 and data[2:4] == b"\x12\x34"


class LibcoapServer:
    """`coap-server-notls` (or `-openssl` with a PSK) on 127.0.0.1; `-d` allows PUT-created
    resources, which are observable."""

    def __init__(self, tmp: Path, *, psk: str | None = None, port: int | None = None) -> None:
        binary = "coap-server-openssl" if psk else "coap-server-notls"
        self.binary = require_binary(binary)
        self.port = port or free_port(socket.SOCK_DGRAM)
        self.psk = psk
        self.tmp = tmp
        self.peer: Peer | None = None
        self.starts = 0

    @property
    def dtls_port(self) -> int:
        return self.port + 1  # libcoap listens for DTLS on port + 1

    def start(self) -> None:
        argv = [self.binary, "-A", "127.0.0.1", "-p", str(self.port), "-v", "0", "-d", "20"]
        if self.psk:
            argv += ["-k", self.psk, "-h", "CoAP"]
        self.starts += 1
        self.peer = Peer(argv, log=self.tmp / f"{Path(self.binary).name}-{self.starts}.log")
        wait_until(lambda: coap_ping(self.port), f"{self.binary} on port {self.port}")

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None

    def kill(self) -> None:
        """SIGKILL, like a power cut: libcoap sends its observers nothing (on SIGTERM it
        ends each observation with a 4.04, which a client notices without any timer)."""
        if self.peer is not None:
            self.peer.signal(signal.SIGKILL)
            self.peer.stop()
            self.peer = None


class AiocoapDevice:
    """tests/drivers_coap/coap_server.py as a process: an aiocoap server acting as a device."""

    def __init__(
        self, tmp: Path, *, max_age: int = 60, oscore: Path | None = None, port: int = 0
    ) -> None:
        self.port = port or free_port(socket.SOCK_DGRAM)
        self.tmp = tmp
        self.spec = tmp / f"server-{self.port}.json"
        self.ready = tmp / f"server-{self.port}.ready"
        self.spec.write_text(json.dumps({
            "port": self.port, "ready": str(self.ready), "max_age": max_age,
            "oscore": str(oscore) if oscore else None,
        }))  # fmt: skip
        self.peer: Peer | None = None

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
        self.peer = Peer(
            [sys.executable, str(HERE / "coap_server.py"), str(self.spec)], env=env,
            log=self.tmp / f"server-{self.port}.log",
        )  # fmt: skip
        wait_until(
            lambda: self.ready.exists() or not self.peer.alive(),  # type: ignore[union-attr]
            "the aiocoap device to start",
        )
        assert self.peer.alive(), (self.tmp / f"server-{self.port}.log").read_text()

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None

    def kill(self) -> None:
        if self.peer is not None:
            self.peer.signal(signal.SIGKILL)
            self.peer.stop()
            self.peer = None


def device_spec(toml: str, dev_id: str = "dev") -> DeviceSpec:
    """A DeviceSpec through the real config parser (so tests use the documented keys)."""
    return config.loads(toml).devices[dev_id]


async def assert_observation_survives_restart(spec: DeviceSpec, server: LibcoapServer) -> None:
    """libcoap's /time ticks once a second (Max-Age 1). A restarted server knows neither our
    observation nor a DTLS session: only a new registration brings ticks from it, and the old
    server's last tick is <= the second it stopped, so a tick 2 s later is the new one's."""
    import math

    from drivers.coap import CoapDriver

    async def main() -> None:
        rec = RecordingContext("test.drivers.coap")
        drv = CoapDriver(rec)
        await drv.add_device(spec)
        await drv.start()
        try:
            await rec.wait_for(lambda: len(rec.series("ticks")) >= 2, "notifications")
            await asyncio.to_thread(server.kill)
            stopped = math.floor(time.time())
            await asyncio.to_thread(server.start)
            await rec.wait_for(
                lambda: any(v >= stopped + 2 for v in rec.series("ticks")),  # type: ignore[operator]
                "a notification from the restarted server",
            )
        finally:
            await drv.stop()

    await main()
