"""Fixtures shared by several test folders (their helpers live in tests/support)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.coap import CoapGateway
from tests.support.daemon import Daemon
from tests.support.mqtt import Mosquitto


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.peer.stop(timeout=30)
        d.notify.close()


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    m = Mosquitto()
    try:
        m.start()
        yield m
    finally:
        m.remove()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., CoapGateway]]:
    started: list[CoapGateway] = []

    def make(
        coap_toml: str = "allow_unauthenticated = true\naccept_unknown_devices = true",
        extra_toml: str = "",
        start: bool = True,
    ) -> CoapGateway:
        gw = CoapGateway(tmp_path / f"gw{len(started)}", coap_toml, extra_toml)
        started.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in reversed(started):
        gw.stop()
