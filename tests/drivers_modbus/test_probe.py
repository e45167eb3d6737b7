"""`gatewayctl probe modbus` against a pymodbus TCP server: read a range as a type, write one
value, JSON output, and errors with their exit status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.drivers_modbus.support import ModbusServer
from tests.support.peers import free_port


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ModbusServer]:
    # float32 1.5 and -2.0 at 0..3 (big/big), then 7 at register 10
    hr = [0x3FC0, 0, 0xC000, 0, 0, 0, 0, 0, 0, 0, 7, 0]
    srv = ModbusServer(
        tmp_path, {1: {"hr": hr, "co": [False] * 8}}, silent=[9], name="probe"
    ).start()
    yield srv
    srv.stop()


def probe(server: ModbusServer, *args: str) -> list[str]:
    return ["probe", "modbus", "--host", "127.0.0.1", "--port", str(server.port), *args]


def test_read_range_as_type(server: ModbusServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = probe(server, "--address", "0", "--count", "2", "--type", "float32", "--json")
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"table": "holding", "address": 0, "value": 1.5},
        {"table": "holding", "address": 2, "value": -2.0},
    ]
    assert main(probe(server, "--address", "10")) == 0
    assert capsys.readouterr().out.split() == ["holding", "10", "7"]
    # scaled the way the collection service scales readings
    assert main(probe(server, "--address", "10", "--scale", "0.5", "--offset", "1")) == 0
    assert capsys.readouterr().out.split() == ["holding", "10", "4.5"]


def test_write_one_value(server: ModbusServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(probe(server, "--table", "coil", "--address", "4", "--write", "on", "--verify")) == 0
    )
    assert "wrote on" in capsys.readouterr().out
    assert main(probe(server, "--table", "coil", "--address", "4", "--json")) == 0
    assert json.loads(capsys.readouterr().out)[0]["value"] is True
    argv = probe(server, "--address", "5", "--type", "int16", "--write", "-300", "--json")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["value"] == -300


def test_errors_have_exit_statuses(
    server: ModbusServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's table: an exception response is a failure (1): the unit did answer...
    assert main(probe(server, "--address", "500")) == EXIT_FAILURE
    assert "ILLEGAL DATA ADDRESS" in capsys.readouterr().err
    assert main(probe(server, "--address", "0", "--unit", "5")) == EXIT_FAILURE  # exception 4
    assert "exception 4" in capsys.readouterr().err
    # ...a unit that never answers, or nothing listening, is unreachable (4).
    assert main(probe(server, "--address", "0", "--unit", "9", "--timeout", "0.3")) == (
        EXIT_UNAVAILABLE
    )
    assert "no answer" in capsys.readouterr().err
    closed = ["probe", "modbus", "--host", "127.0.0.1", "--port", str(free_port())]
    assert main([*closed, "--address", "0", "--timeout", "0.5"]) == EXIT_UNAVAILABLE
    assert "cannot connect" in capsys.readouterr().err
    assert main(probe(server, "--address", "0", "--type", "int32", "--bit", "3")) == EXIT_CONFIG
    assert "--bit: a bit index needs a 16-bit register" in capsys.readouterr().err
    assert main(probe(server, "--address", "0", "--write", "lots")) == EXIT_USAGE
    assert "not a number" in capsys.readouterr().err
