"""Fixtures for the CoAP driver's tests (helpers: tests/drivers_coap/support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drivers_coap.support import LibcoapServer


@pytest.fixture
def libcoap(tmp_path: Path) -> Iterator[LibcoapServer]:
    server = LibcoapServer(tmp_path)
    server.start()
    yield server
    server.stop()
