"""CoAP `/alerts` on a real gatewayd, with libcoap's clients: refused to an anonymous peer
(4.01, an answer no larger than the request), served and observable over DTLS-PSK: the
observer hears the raise and the clear."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.processing.support import HEADER, alert_events
from tests.support.coap import coap_client
from tests.support.daemon import Daemon, start_daemon, write_config
from tests.support.peers import free_port, require_binary, wait_until

pytestmark = pytest.mark.peer("libcoap")

PSK = ["-u", "siren-1", "-k", "siren-1-secret"]


def test_alerts_over_coap_for_authenticated_peers_only(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    port, dtls = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    body = (
        HEADER
        + f"""
[devices.pump]
driver = "virtual"
interval = 0.05
[devices.pump.points.speed]
signal = "constant"
base = 100

[alerts.pump-fast]
point = "pump/speed"
raise_above = 90
clear_below = 80
severity = "critical"

[coap]
bind = ["127.0.0.1"]
port = {port}
dtls_port = {dtls}
[coap.devices.siren-1]
psk = "siren-1-secret"
"""
    )
    config = write_config(tmp_path, body)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(lambda: len(alert_events(config, "pump-fast")) == 1, "pump-fast raised")

    anon = coap_client("coap-client-notls", [], f"coap://127.0.0.1:{port}/alerts", tmp_path)
    assert anon.code == "4.01", anon.log
    assert len(anon.payload) < 3 * 20  # no list for an anonymous peer

    uri = f"coaps://127.0.0.1:{dtls}/alerts"
    got = coap_client("coap-client-openssl", [*PSK, "-A", "50"], uri, tmp_path)
    assert got.code == "2.05", got.log
    (alert,) = json.loads(got.payload)
    assert alert["id"] == "pump-fast" and alert["severity"] == "critical"
    assert alert["value"] == 100 and alert["episode"] == 1

    # An observer hears the clear (the value goes to 50 by SIGHUP).
    exe = require_binary("coap-client-openssl")
    log = tmp_path / "observe.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, *PSK, "-s", "20", "-B", "22", "-v", "6", "-A", "50", uri],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: '"id":"pump-fast"' in log.read_text(errors="replace"), "first")
        config.write_text(config.read_text().replace("base = 100\n", "base = 50\n"))
        d.peer.signal(signal.SIGHUP)
        wait_until(lambda: len(alert_events(config, "pump-fast")) == 2, "pump-fast cleared")
        wait_until(lambda: ":: '[]'" in log.read_text(errors="replace"), "the notification")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    text = log.read_text(errors="replace")
    assert "Observe:1" in text and text.count(":: '") == 2  # the first answer, one notification
    assert d.stop() == 0
