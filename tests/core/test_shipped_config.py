"""The shipped config.toml as a user starts it: the CoAP front door is on, on loopback."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.coap import coap_client
from tests.support.daemon import Daemon, run_cli, start_daemon
from tests.support.peers import free_port

ROOT = Path(__file__).resolve().parents[2]


def shipped_copy(tmp: Path) -> Path:
    """config.toml with its directories under `tmp` and a free CoAP port (tests run side by
    side; aiocoap binds with SO_REUSEPORT, so two daemons on 5683 would share datagrams)."""
    text = (ROOT / "config.toml").read_text()
    edits = {
        'state_dir = "var/lib"': f'state_dir = "{tmp / "state"}"',
        'runtime_dir = "var/run"': f'runtime_dir = "{tmp / "run"}"',
        "port = 5683": f"port = {free_port(socket.SOCK_DGRAM)}",
    }
    for old, new in edits.items():
        assert text.count(old) == 1, f"config.toml no longer has {old!r} once"
        text = text.replace(old, new)
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_serves_coap_on_loopback(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    coap = tomllib.loads((ROOT / "config.toml").read_text()).get("coap")
    assert coap is not None, "config.toml ships without the CoAP front door"
    assert coap["bind"] and all(ipaddress.ip_address(a).is_loopback for a in coap["bind"])
    config = shipped_copy(tmp_path)
    port = tomllib.loads(config.read_text())["coap"]["port"]
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    payload = tmp_path / "p.json"
    for host, value in (("127.0.0.1", 21.5), ("[::1]", 22.5)):
        payload.write_text(json.dumps([{"bn": "probe-1/", "n": "temperature", "v": value}]))
        reply = coap_client(
            "coap-client-notls",
            ["-m", "post", "-t", "110", "-f", str(payload)],
            f"coap://{host}:{port}/telemetry",
            tmp_path,
        )
        assert reply.code == "2.04", reply.log
        # 2.04 means committed: the CLI reads it back at once.
        r = run_cli(config, "--json", "readings", "probe-1", "temperature")
        assert r.returncode == 0, r.stderr
        [latest] = json.loads(r.stdout)
        assert (latest["device"], latest["point"], latest["value"]) == (
            "probe-1", "temperature", value,
        )  # fmt: skip


def test_start_up_imports_stay_out_of_the_daemon() -> None:
    """RSS at READY with CoAP on is bounded (30 MiB, bench/daemon.py): modules the daemon
    never uses stay out. argparse's default help formatter imported shutil (and with it bz2
    and lzma) for the terminal width; the RD's href tokens imported secrets (hmac, hashlib)."""
    code = (
        "import sys, contextlib\n"
        "from gateway import daemon\n"
        "import gateway.coap.rd, gateway.coap.resources, gateway.coap.lean\n"
        "with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):\n"
        "    daemon.main(['--version'])\n"
        "print(','.join(m for m in ('shutil', 'bz2', 'lzma', 'secrets', 'hmac') "
        "if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
