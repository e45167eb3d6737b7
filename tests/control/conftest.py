"""A gatewayd with Modbus devices on a pymodbus server, for the control service's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.support import control_config
from tests.drivers_modbus.support import ModbusServer
from tests.support.daemon import Daemon, start_daemon


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ModbusServer]:
    s = ModbusServer(tmp_path, {1: {"hr": [0] * 10, "co": [0] * 10}}, silent=[9]).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def gatewayd(tmp_path: Path, server: ModbusServer) -> Iterator[Daemon]:
    d = start_daemon(control_config(tmp_path, server.port), tmp_path)
    try:
        yield d
    finally:
        d.stop()
        d.notify.close()
