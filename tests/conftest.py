"""Fixtures shared by several test folders (their helpers live in tests/support), and the
`slow` marker, applied here to every test that starts a peer or another process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.coap import CoapGateway
from tests.support.daemon import Daemon
from tests.support.mqtt import Mosquitto
from tests.support.slow import starts_a_process


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` what needs a peer (a `peer` mark, or a peer started by the test, its
    fixtures or the helpers they call): `-m "not slow"` is the quick loop of pure tests."""
    for item in items:
        if item.get_closest_marker("slow") is None and (
            item.get_closest_marker("peer") is not None or starts_a_process(item)
        ):
            item.add_marker(pytest.mark.slow)
