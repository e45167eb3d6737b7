"""Fixtures of the attack tests, re-used from the suites that own the peers: the CoAP front
door in its own process (tests/coap), a real gatewayd (tests/core) and a real Mosquitto
(tests/sync)."""

from __future__ import annotations

from tests.coap.conftest import gateway_factory
from tests.core.conftest import daemon_factory
from tests.sync.conftest import mosquitto

__all__ = ["daemon_factory", "gateway_factory", "mosquitto"]
