"""Cloud commands: `mosquitto_pub` on the command topic -> the relay's `command.requested` ->
the control service -> the pymodbus slave (read back by mbpoll); the outcome reaches
`mosquitto_sub` on the response topic, through the outbox. Cloud writes need
`remote_write = true` on the point (or `[control] allow_remote`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sync.codec import decode_batch
from tests.control.support import control_config
from tests.drivers_modbus.support import ModbusServer, mbpoll
from tests.support.daemon import run_cli, start_daemon
from tests.support.mqtt import Mosquitto, Subscriber
from tests.support.peers import require_binary, wait_until


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    m = Mosquitto()
    try:
        m.start()
        yield m
    finally:
        m.remove()


def pub(port: int, payload: str) -> None:
    subprocess.run(
        [require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5",
         "-q", "1", "-t", "gateways/gw-control/commands", "-m", payload],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


def answers(sub: Subscriber) -> dict[str, list[dict[str, Any]]]:
    """command id -> the lifecycle events the cloud got on the response topic."""
    out: dict[str, list[dict[str, Any]]] = {}
    for topic, payload in sub.raw():
        if topic != "gateways/gw-control/responses":
            continue
        for e in decode_batch(payload):
            out.setdefault(e["stream"].removeprefix("command:"), []).append(e)
    return out


def test_cloud_command_writes_and_the_outcome_comes_back(
    broker: Mosquitto, server: ModbusServer, tmp_path: Path
) -> None:
    sync = (
        '\n[sync]\nbackoff_base = 0.05\nbackoff_cap = 0.5\nformat = "json"\n'
        f'[[sync.endpoints]]\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
    )
    sagas = '\n[sagas.flip]\nsteps = [{ write = "plc/setpoint", value = 12.5 }]\n'
    config = control_config(tmp_path, server.port, extra=sync + sagas,
                            extra_control='remote_sagas = ["flip"]')  # fmt: skip
    d = start_daemon(config, tmp_path)
    sub = Subscriber(broker.port, tmp_path, topic="gateways/gw-control/responses")
    try:
        wait_until(
            lambda: '"connected"' in run_cli(d.config, "--json", "status").stdout,
            "the relay connected (and subscribed to the command topic)",
        )
        pub(broker.port, '{"id": "k-1", "device": "plc", "point": "run", "value": true}')
        pub(broker.port, '{"id": "k-1", "device": "plc", "point": "run", "value": true}')
        # setpoint has no remote_write and no allow_remote pattern: refused, nothing written
        pub(broker.port, '{"id": "k-2", "device": "plc", "point": "setpoint", "value": 5}')
        # a saga by name: started where [control] remote_sagas lists it
        pub(broker.port, '{"id": "k-3", "device": "plc", "saga": "flip"}')
        pub(broker.port, '{"id": "k-4", "device": "plc", "saga": "other"}')

        def done() -> bool:
            got = answers(sub)
            return all(any(e["type"] == t for e in got.get(k, [])) for k, t in (
                ("k-1", "command.succeeded"), ("k-2", "command.rejected"),
                ("k-3", "command.succeeded"), ("k-4", "command.rejected")))  # fmt: skip

        wait_until(done, "both outcomes on the response topic")
        got = answers(sub)
        ok = next(e for e in got["k-1"] if e["type"] == "command.succeeded")
        assert ok["data"]["value"] is True
        no = next(e for e in got["k-2"] if e["type"] == "command.rejected")
        assert no["data"]["reason"] == "remote_write_not_allowed"
        saga = next(e for e in got["k-3"] if e["type"] == "command.succeeded")
        assert saga["data"]["saga"] == "completed"
        other = next(e for e in got["k-4"] if e["type"] == "command.rejected")
        assert "remote_sagas" in other["data"]["error"]
        assert server.writes() == 2  # run (k-1, once), setpoint by the saga (k-3)
        assert mbpoll("127.0.0.1", "-m", "tcp", "-p", str(server.port), "-a", "1", "-t", "4",
                      "-r", "0", "-c", "1") == ["125"]  # fmt: skip
        assert mbpoll("127.0.0.1", "-m", "tcp", "-p", str(server.port), "-a", "1", "-t", "0",
                      "-r", "0", "-c", "1") == ["1"]  # fmt: skip
    finally:
        sub.stop()
        d.stop()
        d.notify.close()
