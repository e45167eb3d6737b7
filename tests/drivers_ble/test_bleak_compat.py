"""drivers.ble.bleak_compat by both paths, with `gatewayctl probe ble read` against the
dbusmock BlueZ: bleak's manager internals as pinned (the probe closes bleak's D-Bus
connection itself), and changed (the connection is left to bleak, said once)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.ble import bleak_compat
from tests.drivers_ble.bluez import BluezBus

MAC = "C0:FF:EE:00:00:01"


@pytest.fixture
def bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BluezBus]:
    b = BluezBus(tmp_path)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", b.address)
    bleak_compat.reset()
    try:
        b.add_adapter()
        b.add_device(MAC)
        b.add_characteristic(MAC, "00002a6e-0000-1000-8000-00805f9b34fb", b"\x66\x08")
        yield b
    finally:
        bleak_compat.reset()
        b.stop()


def _read(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    from drivers.ble.probe import run_read

    args = argparse.Namespace(address=MAC, char="2a6e", timeout=10.0, adapter=None, json=True)
    assert run_read(args) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def _open_managers() -> int:
    from bleak.backends.bluezdbus import manager

    return len(manager._global_instances)


def test_patched_path_closes_bleaks_connection(
    bus: BluezBus, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    before = _open_managers()
    assert _read(capsys)["hex"] == "6608"
    assert bleak_compat.check() is True
    assert _open_managers() == before  # the probe's loop took its connection along
    assert not [r for r in caplog.records if "internals differ" in r.getMessage()]


def test_stock_path_when_bleaks_internals_differ(
    bus: BluezBus,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bleak.backends.bluezdbus import manager

    real = manager._global_instances
    # Another shape: a mapping that is no dict (bleak itself still works with it).
    changed: collections.UserDict[object, object] = collections.UserDict()
    monkeypatch.setattr(manager, "_global_instances", changed)
    with caplog.at_level(logging.WARNING, logger="drivers.ble"):
        assert _read(capsys)["hex"] == "6608"
        assert _read(capsys)["hex"] == "6608"
    assert bleak_compat.check() is False
    lines = [r.getMessage() for r in caplog.records if "internals differ" in r.getMessage()]
    assert len(lines) == 1 and "_global_instances" in lines[0]
    # Left open by the probe, finalized by bleak when the next loop wants one (its stock
    # path): the second read took the first one's; the last one waits for the next user.
    assert len(changed) == 1
    real.update(changed.data)
    monkeypatch.setattr(manager, "_global_instances", real)
    bleak_compat.reset()

    async def next_user() -> None:
        await manager.get_global_bluez_manager()
        await bleak_compat.close_manager(wait=True)

    asyncio.run(next_user())
    assert not any(loop in real for loop in changed.data)
