"""Fixtures of the attack tests: gatewayd with its CoAP front door (`coap_daemon`); the CoAP
front door alone, Mosquitto and gatewayd come from the root conftest."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, run_cli, start_daemon
from tests.support.peers import free_port

COAP_DAEMON_CONFIG = """
[gateway]
id = "gw-sec"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"

[devices.boiler-1]
driver = "virtual"
interval = 5.0

[devices.boiler-1.points.temperature]
signal = "sine"
base = 60.0

[coap]
bind = ["127.0.0.1"]
port = {port}
"""


@dataclass
class CoapDaemon:
    daemon: Daemon
    port: int
    config: Path

    def restart(self) -> None:
        self.daemon.peer.stop(timeout=30)
        self.daemon.notify.close()
        self.daemon = start_daemon(self.config, self.config.parent, name="gatewayd-again")

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}{path}"

    def cli(self, *args: str) -> Any:
        return run_cli(self.config, *args)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        coap: dict[str, Any] = json.loads(proc.stdout)["services"]["coap"]
        return coap

    def devices(self) -> list[dict[str, Any]]:
        proc = self.cli("devices", "--json")
        assert proc.returncode == 0, proc.stderr
        result: list[dict[str, Any]] = json.loads(proc.stdout)
        return result

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.daemon.log.read_text(errors="replace")


@pytest.fixture
def coap_daemon(tmp_path: Path) -> Iterator[Callable[[str], CoapDaemon]]:
    started: list[CoapDaemon] = []

    def make(coap_toml: str) -> CoapDaemon:
        port = free_port(socket.SOCK_DGRAM)
        config = tmp_path / "config.toml"
        config.write_text(
            COAP_DAEMON_CONFIG.format(state=tmp_path / "state", run=tmp_path / "run", port=port)
            + coap_toml
            + "\n"
        )
        gw = CoapDaemon(start_daemon(config, tmp_path), port, config)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.daemon.peer.stop(timeout=30)
        gw.daemon.notify.close()
