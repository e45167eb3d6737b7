"""Peers for the sync tests: a real Mosquitto per test on a free port, with its own config,
and a real subscriber (`mosquitto_sub`, QoS 1, persistent session) writing what it sees."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sync.codec import decode_batch
from tests.peers import Peer, free_port, port_open, require_binary, wait_until


def _readable(path: Path) -> None:
    # As root, mosquitto drops to user `mosquitto`: its files must be readable by it.
    path.chmod(0o644)


def shared_dir(prefix: str) -> Path:
    """A directory user `mosquitto` can reach (pytest's tmp_path sits under a 0700 parent)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o777)
    return d


class Mosquitto:
    """A broker of our own: its config, ACL, certificates and log live in `self.dir`."""

    def __init__(self, conf: str = "", port: int | None = None) -> None:
        self.binary = require_binary("mosquitto")
        self.dir = shared_dir("sync-mosquitto-")
        self.port = port or free_port()
        self.extra = conf
        self.peer: Peer | None = None
        self.starts = 0

    def write_conf(self) -> Path:
        conf = self.dir / "mosquitto.conf"
        text = (
            self.extra
            if "listener" in self.extra
            else (f"listener {self.port} 127.0.0.1\nallow_anonymous true\n" + self.extra)
        )
        conf.write_text(
            text + f"\npersistence true\npersistence_location {self.dir}/\n"
            f"log_dest file {self.dir}/mosquitto.log\nlog_type all\n"
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

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def file(self, name: str, text: str) -> Path:
        p = self.dir / name
        p.write_text(text)
        _readable(p)
        return p

    def log(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    m = Mosquitto()
    try:
        m.start()
        yield m
    finally:
        m.remove()


class Subscriber:
    """`mosquitto_sub` at QoS 1 with a persistent session: what the cloud would see."""

    def __init__(self, port: int, directory: Path, topic: str = "gateways/#", **tls: str) -> None:
        self.binary = require_binary("mosquitto_sub")
        self.out = directory / f"sub-{port}.txt"
        self.port = port
        argv = [
            self.binary, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
            "-c", "-i", f"test-sub-{port}", "-x", "86400", "-t", topic, "-t", "gateways/probe",
            "-F", "%t %x",
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

    def raw(self) -> list[tuple[str, bytes]]:
        out = []
        text = self.out.read_text(errors="replace")
        # Only whole lines: the last one may be half written (its hex can still parse).
        for line in text[: text.rfind("\n") + 1].splitlines():
            topic, _, hexpayload = line.partition(" ")
            if topic == "gateways/probe" or not hexpayload:
                continue
            try:
                out.append((topic, bytes.fromhex(hexpayload)))
            except ValueError:
                continue  # a line being written right now
        return out

    def messages(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """Event batches (telemetry and backfill topics), decoded."""
        return [
            (t, decode_batch(p)) for t, p in self.raw()
            if "/events/" in t or "/backfill/" in t
        ]  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        return [e for _, batch in self.messages() for e in batch]

    def stop(self) -> None:
        self.peer.stop()


def have(name: str) -> bool:
    return shutil.which(name) is not None


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    require_binary("openssl")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    openssl("req", "-x509", *EC_KEY, "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", *EC_KEY, "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)  # fmt: skip
    # A second CA and a client certificate from it: a "wrong certificate".
    openssl("req", "-x509", *EC_KEY, "-nodes", "-days", "2", "-subj", "/CN=rogue",
            "-keyout", "rogue.key", "-out", "rogue.pem", cwd=d)  # fmt: skip
    for p in d.iterdir():
        # The broker (user mosquitto) reads its files; the gateway's own keys stay private.
        p.chmod(0o600 if p.name in ("client.key", "rogue.key") else 0o644)
    return {p.stem + ("_key" if p.suffix == ".key" else ""): p for p in d.iterdir()
            if p.suffix in (".pem", ".key")}  # fmt: skip
