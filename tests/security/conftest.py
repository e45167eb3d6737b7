"""Fixtures for the attack tests, re-used from the suites that own them."""

from tests.core.conftest import daemon_factory  # noqa: F401
