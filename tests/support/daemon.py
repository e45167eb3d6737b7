"""gatewayd as a real process on a temporary config, with a notify socket; and its CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import Peer

VIRTUAL_CONFIG = """
[gateway]
id = "gw-test"
state_dir = "{state}"
runtime_dir = "{run}"
log_level = "info"
stop_timeout = {stop_timeout}

[store]
synchronous = "full"
check_interval = 3600

[devices.boiler-1]
driver = "virtual"
interval = 0.05

[devices.boiler-1.points.temperature]
signal = "sine"
base = 60.0
unit = "Cel"

[devices.boiler-1.points.pressure]
signal = "random_walk"
base = 1.5
step = 0.01
unit = "bar"

[devices.meter-1]
driver = "virtual"
interval = 0.05

[devices.meter-1.points.energy]
signal = "counter"
unit = "kWh"
"""


def write_config(tmp: Path, text: str | None = None, stop_timeout: float = 10.0) -> Path:
    path = tmp / "config.toml"
    body = (text or VIRTUAL_CONFIG).format(
        state=tmp / "state", run=tmp / "run", stop_timeout=stop_timeout
    )
    path.write_text(body)
    return path


def notify_until(sock: socket.socket, until: str, log: Path, limit: int = 1000) -> list[str]:
    """sd_notify datagrams until one contains `until` (blocking; bounded by the socket's
    timeout: a daemon that never says it is a failure, not a hang)."""
    got: list[str] = []
    for _ in range(limit):
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(
                f"gatewayd never sent {until!r}; got {got}; log:\n{log.read_text()}"
            ) from None
        got.append(data)
        if until in data:
            return got
    raise AssertionError(f"no {until!r} in {limit} notify messages")


@dataclass
class Daemon:
    peer: Peer
    config: Path
    notify: socket.socket
    log: Path

    @property
    def pid(self) -> int:
        return self.peer.pid

    def messages(self, until: str, limit: int = 1000) -> list[str]:
        return notify_until(self.notify, until, self.log, limit)

    def stop(self) -> int | None:
        rc = self.peer.stop(timeout=30)
        return rc

    def kill(self) -> None:
        self.peer.signal(signal.SIGKILL)
        self.peer.proc.wait(10)


def start_daemon(config: Path, tmp: Path, name: str = "gatewayd") -> Daemon:
    notify_path = tmp / f"{name}-notify.sock"
    if notify_path.exists():
        notify_path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = str(notify_path)
    env.pop("STATE_DIRECTORY", None)
    env.pop("RUNTIME_DIRECTORY", None)
    log = tmp / f"{name}.log"
    peer = Peer([sys.executable, "-m", "gateway.daemon", "--config", str(config)], env=env, log=log)
    d = Daemon(peer, config, sock, log)
    try:
        d.messages("READY=1")
    except BaseException:  # never ready: stop what was started before saying why
        peer.stop(timeout=30)
        sock.close()
        raise
    return d


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
