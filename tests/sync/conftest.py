"""Peers for the sync tests: a real Mosquitto per test on a free port, with its own config,
and a real subscriber (`mosquitto_sub`, QoS 1, persistent session) writing what it sees."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sync.codec import decode_batch
from tests.peers import Peer, free_port, port_open, require_binary, wait_until


def _readable(path: Path) -> None:
    # As root, mosquitto drops to user `mosquitto`: its files must be readable by it.
    path.chmod(0o644)


class Mosquitto:
    def __init__(self, directory: Path, conf: str = "", port: int | None = None) -> None:
        self.binary = require_binary("mosquitto")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o777)
        self.port = port or free_port()
        self.extra = conf
        self.peer: Peer | None = None
        self.starts = 0

    def write_conf(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        text = self.extra if "listener" in self.extra else (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n" + self.extra
        )
        conf.write_text(
            text + f"\npersistence true\npersistence_location {self.dir}/\n"
            "log_dest stdout\nlog_type all\n"
        )
        _readable(conf)
        return conf

    def start(self) -> Mosquitto:
        conf = self.write_conf()
        self.starts += 1
        self.peer = Peer([self.binary, "-c", str(conf)], log=self.dir / f"log.{self.starts}")
        wait_until(lambda: port_open("127.0.0.1", self.port) or not self.peer.alive(),  # type: ignore[union-attr]
                   f"mosquitto on port {self.port}")  # fmt: skip
        assert self.peer.alive(), self.log()
        return self

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("log.*")))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker")
    m.start()
    try:
        yield m
    finally:
        m.stop()


class Subscriber:
    """`mosquitto_sub` at QoS 1 with a persistent session: what the cloud would see."""

    def __init__(self, port: int, directory: Path, topic: str = "gateways/#", **tls: str) -> None:
        self.binary = require_binary("mosquitto_sub")
        self.out = directory / f"sub-{port}.txt"
        self.port = port
        argv = [
            self.binary, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
            "-c", "-i", f"test-sub-{port}", "-x", "86400", "-t", topic, "-F", "%t %x",
        ]  # fmt: skip
        self.peer = Peer(argv, log=self.out)
        # Ready once the broker has the subscription: seen in its log or by a probe message.
        wait_until(self._subscribed, "mosquitto_sub subscribed")

    def _subscribed(self) -> bool:
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-q", "1",
             "-t", "gateways/probe", "-m", "5b5d"],  # payload "[]" in JSON
            check=False, capture_output=True, timeout=5,
        )  # fmt: skip
        return "gateways/probe" in self.out.read_text(errors="replace")

    def messages(self) -> list[tuple[str, list[dict[str, Any]]]]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            topic, _, hexpayload = line.partition(" ")
            if topic == "gateways/probe" or not hexpayload:
                continue
            out.append((topic, decode_batch(bytes.fromhex(hexpayload))))
        return out

    def events(self) -> list[dict[str, Any]]:
        return [e for _, batch in self.messages() for e in batch]

    def stop(self) -> None:
        self.peer.stop()


def have(name: str) -> bool:
    return shutil.which(name) is not None


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    require_binary("openssl")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)  # fmt: skip
    # A second CA and a client certificate from it: a "wrong certificate".
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rogue",
            "-keyout", "rogue.key", "-out", "rogue.pem", cwd=d)  # fmt: skip
    for p in d.iterdir():
        p.chmod(0o644)
    return {p.stem + ("_key" if p.suffix == ".key" else ""): p for p in d.iterdir()
            if p.suffix in (".pem", ".key")}  # fmt: skip


os.environ.setdefault("PYTHONASYNCIODEBUG", "0")
