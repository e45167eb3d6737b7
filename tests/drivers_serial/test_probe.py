"""`gatewayctl probe serial PORT` over a socat PTY pair, with the device played by a thread
on the other end (the probe runs its own event loop in the test's thread)."""

from __future__ import annotations

import json
import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE
from tests.drivers_serial.ptys import PtyPair

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
GGA_BAD = b"$GPGGA,123519,4807.038,N,01131.000,E,1,09,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


class Device(threading.Thread):
    """The far end: `step(fd, incoming)` runs whenever bytes arrive or `period` passes.

    A talker that writes every period, like a GPS at its output rate: the probe cannot tell
    the test when it has opened the port, and bytes sent to a closed PTY are lost.
    """

    def __init__(self, pty: PtyPair, step: Callable[[int, bytes], None], period: float) -> None:
        super().__init__(daemon=True)
        self.fd = pty.open_device_end()
        self.step = step
        self.period = period
        self.stopping = threading.Event()

    def run(self) -> None:
        for _ in range(2000):  # bounded: at most 2000 periods
            if self.stopping.is_set():
                return
            ready, _, _ = select.select([self.fd], [], [], self.period)
            self.step(self.fd, os.read(self.fd, 1024) if ready else b"")

    def __enter__(self) -> Device:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(10)
        os.close(self.fd)


def test_stream_nmea_table_and_json(pty: PtyPair, capsys: pytest.CaptureFixture[str]) -> None:
    def talk(fd: int, incoming: bytes) -> None:
        os.write(fd, GGA + GGA_BAD + RMC)

    with Device(pty, talk, 0.05):
        argv = ["probe", "serial", str(pty.a), "--parser", "nmea", "--delimiter", "\\r\\n"]
        assert main([*argv, "--frames", "3", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert main([*argv, "--frames", "3", "--sentences", "RMC"]) == 0
        table = capsys.readouterr().out
    assert doc["port"] == str(pty.a)
    rows = doc["rows"]
    assert len(rows) == 3
    # Rows come in the device's order, whichever sentence the probe happened to start at.
    kinds = ["gga" if "values" in r and "gga.lat" in r["values"] else
             "rmc" if "values" in r else "bad" for r in rows]  # fmt: skip
    assert "".join(k[0] for k in kinds) in ("gbr", "brg", "rgb")
    for r in rows:
        if "error" in r:
            assert r["error"].startswith("checksum mismatch: sentence says 47, computed 46")
        elif "gga.lat" in r["values"]:
            assert r["values"]["gga.satellites"] == 8
        else:
            assert r["values"]["rmc.speed_knots"] == 22.4
            assert r["ts"] == 764426119.0
    lines = table.splitlines()
    assert lines[0].startswith(f"# {pty.a} 9600 8N1, framing delimiter, parser nmea")
    assert "rmc.speed_knots=22.4" in table
    assert "gga.lat" not in table  # filtered by --sentences
    assert lines[-1].startswith("# ")


def test_request_mode_csv(pty: PtyPair, capsys: pytest.CaptureFixture[str]) -> None:
    def answer(fd: int, incoming: bytes) -> None:
        if incoming == b"M?\r":
            os.write(fd, b"A7;21.5;on\r")

    with Device(pty, answer, 0.05):
        argv = ["probe", "serial", str(pty.a), "--request", "M?\\r", "--interval", "0.05",
                "--delimiter", "\\r", "--parser", "csv", "--columns", "id,temp,state",
                "--separator", ";", "--frames", "2", "--json"]  # fmt: skip
        assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["values"] for r in doc["rows"]] == [{"id": "A7", "temp": "21.5", "state": "on"}] * 2
    assert (doc["frames"], doc["malformed"]) == (2, 0)


def test_bad_options_and_missing_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["probe", "serial", str(tmp_path / "nothing"), "--baudrate", "3", "--parser", "regex",
            "--pattern", "(\\d+)", "--columns", "a"]  # fmt: skip
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--baudrate: must be >= 50, got 3" in err
    assert "--pattern: needs at least one named group" in err
    assert "--columns: only used with parser type = 'csv', not 'regex'" in err
    assert main(["probe", "serial", str(tmp_path / "nothing"), "--seconds", "1"]) == (
        EXIT_UNAVAILABLE
    )
    assert "cannot open" in capsys.readouterr().err


def test_garbage_only_is_a_failure_and_silence_is_unreachable(
    pty: PtyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["probe", "serial", str(pty.a), "--parser", "nmea", "--delimiter", "\\r\\n"]

    def talk(fd: int, incoming: bytes) -> None:
        os.write(fd, GGA_BAD)  # a device that talks, but never a valid sentence

    with Device(pty, talk, 0.05):
        assert main([*argv, "--frames", "3"]) == EXIT_FAILURE
    assert "3 malformed frame(s) and none readable" in capsys.readouterr().err
    # Nobody on the line: nothing within the probe's own --seconds.
    assert main([*argv, "--seconds", "0.5"]) == EXIT_UNAVAILABLE
    assert "no frame within 0.5 s" in capsys.readouterr().err
