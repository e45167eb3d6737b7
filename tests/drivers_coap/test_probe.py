"""`gatewayctl probe coap` against libcoap's server: GET, PUT, observe, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.drivers_coap.support import LibcoapServer
from tests.drivers_coap.test_libcoap import coap_client, put

ROOT = Path(__file__).parents[2]


def gatewayctl(*args: str) -> subprocess.CompletedProcess[str]:
    # A generous answer time-out where an answer is expected: a bound, not a measurement.
    extra = [] if "--timeout" in args else ["--timeout", "30"]
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "probe", "coap", *args, *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


def test_get_shows_a_table_and_json(libcoap: LibcoapServer) -> None:
    put(libcoap, "/temp", "21.5")
    url = f"coap://127.0.0.1:{libcoap.port}/temp"
    out = gatewayctl(url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("2.05  no content-format  max-age 60 s")
    assert "(value)  21.5" in out.stdout
    out = gatewayctl(url, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["code"], got["text"], got["values"]) == ("2.05", "21.5", [{"n": "", "v": 21.5}])


def test_put_senml_and_read_it_back(libcoap: LibcoapServer) -> None:
    url = f"coap://127.0.0.1:{libcoap.port}/pack"
    pack = '[{"bn": "dev-1/", "n": "temp", "u": "Cel", "v": 22}]'
    out = gatewayctl(url, "--method", "put", "--payload", pack, "--content-format", "senml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2.01")
    # libcoap stored exactly the SenML CBOR (integer labels) we sent.
    assert coap_client("-m", "get", url) == (
        b"\x81\xa4\x21\x66dev-1/\x00\x64temp\x01\x63Cel\x02\x16"
    )
    got = json.loads(gatewayctl(url, "--json").stdout)
    assert got["content_format"] == 112
    assert got["values"] == [{"n": "dev-1/temp", "u": "Cel", "v": 22.0}]


def test_observe_prints_each_notification(libcoap: LibcoapServer) -> None:
    put(libcoap, "/level", "1")
    url = f"coap://127.0.0.1:{libcoap.port}/level"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "probe", "coap", url, "--observe", "60",
         "--json", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert (first["values"], first["observe"] is not None) == ([{"n": "", "v": 1}], True)
        put(libcoap, "/level", "2")
        second = json.loads(proc.stdout.readline())
        assert second["values"] == [{"n": "", "v": 2}]
        assert second["observe"] > first["observe"]
    finally:
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_exit_statuses(libcoap: LibcoapServer, tmp_path: Path) -> None:
    base = f"coap://127.0.0.1:{libcoap.port}"
    missing = gatewayctl(f"{base}/nothing")
    assert missing.returncode == 1 and missing.stdout.startswith("4.04")
    # Nothing listens on the DTLS-less port + 1 of a notls server: unreachable is 4.
    dead = gatewayctl(f"coap://127.0.0.1:{libcoap.port + 1}/x", "--timeout", "2")
    assert dead.returncode == 4, dead.stderr
    assert "probe: coap://127.0.0.1" in dead.stderr
    assert gatewayctl("http://example.org/").returncode == 2
    assert gatewayctl(f"coaps://127.0.0.1:{libcoap.port}/x").returncode == 2  # no PSK
    bad = gatewayctl(f"{base}/x", "-m", "put", "-p", "{", "-t", "cbor")
    assert bad.returncode == 2 and "--payload is not JSON" in bad.stderr
    unknown = gatewayctl(f"{base}/x", "-t", "yaml")
    assert unknown.returncode == 2 and "unknown content-format 'yaml'" in unknown.stderr
    assert gatewayctl(f"{base}/x", "--observe", "5", "-m", "put").returncode == 2
