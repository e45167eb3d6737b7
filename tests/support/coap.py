"""The CoAP front door in its own process (tests/coap/serve.py: real store + CoapServer),
and libcoap's coap-client as the peer that talks to it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import Peer, free_port, require_binary, wait_until

ROOT = Path(__file__).resolve().parents[2]

# One response line of `coap-client -v 6`: "v:1 t:ACK c:2.04 i:1a2b {01} [ ... ]".
_CODE = re.compile(r"v:1 t:(?:ACK|CON|NON) c:(\d\.\d\d) ")


@dataclass
class Reply:
    code: str | None
    payload: bytes
    log: str


class CoapGateway:
    def __init__(self, directory: Path, coap_toml: str, extra_toml: str = "") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(socket.SOCK_DGRAM)
        self.dtls_port = free_port(socket.SOCK_DGRAM)
        self.db = directory / "gateway.db"
        self.config = directory / "config.toml"
        self.config.write_text(
            f'[gateway]\nid = "gw-test"\nstate_dir = "{directory}"\n'
            f'[coap]\nbind = ["127.0.0.1", "::1"]\nport = {self.port}\n'
            f"dtls_port = {self.dtls_port}\n" + coap_toml + "\n" + extra_toml
        )
        self.log = directory / "server.log"
        self.peer: Peer | None = None

    def start(self) -> None:
        self.peer = Peer(
            [sys.executable, "-m", "tests.coap.serve", str(self.config), str(self.db)],
            cwd=ROOT,
            log=self.log,
        )
        wait_until(lambda: "READY" in self.text() or not self.alive(), "CoAP server ready")
        assert self.alive(), self.text()

    def alive(self) -> bool:
        return self.peer is not None and self.peer.alive()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None

    def uri(self, path: str, host: str = "127.0.0.1") -> str:
        h = f"[{host}]" if ":" in host else host
        return f"coap://{h}:{self.port}{path}"


def coap_client(binary: str, args: list[str], uri: str, tmp: Path, timeout: int = 3) -> Reply:
    """Run libcoap's client; it exits 0 even on failure, so read the response it logged."""
    exe = require_binary(binary)
    out = tmp / "coap-client.out"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [exe, "-B", str(timeout), "-v", "6", "-o", str(out), *args, uri],
        capture_output=True,
        timeout=timeout + 10,
        check=False,
    )
    log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    codes = _CODE.findall(log)
    responses = [c for c in codes if not c.startswith("0.")]
    code = responses[-1] if responses else None
    payload = out.read_bytes() if out.exists() else b""
    if not payload and code is not None and not code.startswith("2."):
        # Error responses are not written to -o; their diagnostic is in the dump line.
        for line in reversed(log.splitlines()):
            if f"c:{code} " in line and " :: '" in line:
                payload = line.split(" :: '", 1)[1].rsplit("'", 1)[0].encode()
                break
    return Reply(code, payload, log)
