"""CoAP commands with libcoap's clients: POST /d/{device}/commands over DTLS-PSK by a panel
whose identity has the operator role writes the Modbus register (mbpoll reads it back); an
observer of /d/{device}/commands hears the outcome; an anonymous peer is refused (4.01)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.control.support import control_config
from tests.drivers_modbus.support import ModbusServer, mbpoll
from tests.support.coap import coap_client
from tests.support.daemon import run_cli, start_daemon
from tests.support.peers import free_port, require_binary, wait_until

pytestmark = pytest.mark.peer("libcoap")

PANEL = ["-u", "panel-1", "-k", "panel-1-secret"]


def test_coap_command_over_dtls_psk(tmp_path: Path, server: ModbusServer) -> None:
    port, dtls = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    extra = f"""
[auth.coap]
panel-1 = "operator"
lamp-1 = "viewer"

[coap]
bind = ["127.0.0.1"]
port = {port}
dtls_port = {dtls}
[coap.devices.panel-1]
psk = "panel-1-secret"
[coap.devices.lamp-1]
psk = "lamp-1-secret"
"""
    d = start_daemon(control_config(tmp_path, server.port, extra=extra), tmp_path)
    exe = require_binary("coap-client-openssl")
    log = tmp_path / "observe.log"
    uri = f"coaps://127.0.0.1:{dtls}/d/plc/commands"
    with open(log, "wb") as out:
        observer = subprocess.Popen(
            [exe, *PANEL, "-s", "20", "-B", "22", "-v", "6", "-A", "50", uri],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "Observe:" in log.read_text(errors="replace"), "observing")
        body = json.dumps({"point": "setpoint", "value": 33.3, "id": "p-1"})
        post = [*PANEL, "-m", "post", "-t", "50", "-e"]
        got = coap_client("coap-client-openssl", [*post, body], uri, tmp_path)
        assert got.code == "2.01", got.log
        assert (
            "Location-Path:d, Location-Path:plc, Location-Path:commands, Location-Path:p-1"
            in got.log
        )
        wait_until(lambda: '"status":"succeeded"' in log.read_text(errors="replace"),
                   "the outcome notified")  # fmt: skip
        assert mbpoll("127.0.0.1", "-m", "tcp", "-p", str(server.port), "-a", "1", "-t", "4",
                      "-r", "0", "-c", "1") == ["333"]  # fmt: skip

        # refusals: out of range (4.00 with its reason), a viewer (4.03), anonymous (4.01)
        bad = json.dumps({"point": "setpoint", "value": 500})
        got = coap_client("coap-client-openssl", [*post, bad], uri, tmp_path)
        assert got.code == "4.00" and b"above the maximum" in got.payload, got.log
        lamp = ["-u", "lamp-1", "-k", "lamp-1-secret", "-m", "post", "-t", "50", "-e", body]
        got = coap_client("coap-client-openssl", lamp, uri, tmp_path)
        assert got.code == "4.03", got.log
        assert "coap.command" in run_cli(d.config, "events", "tail", "--stream", "operator").stdout
        anon = coap_client("coap-client-notls", ["-m", "post", "-t", "50", "-e", body],
                           f"coap://127.0.0.1:{port}/d/plc/commands", tmp_path)  # fmt: skip
        assert anon.code == "4.01", anon.log
        assert server.writes() == 1
    finally:
        if observer.poll() is None:
            observer.send_signal(signal.SIGTERM)
        observer.wait(10)
        d.stop()
        d.notify.close()
