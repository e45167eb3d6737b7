"""drivers.coap.aiocoap_compat by both paths: an OSCORE-protected device (an aiocoap server
in its own process) read through the driver; at stop the context's lock is released at once
(aiocoap's `_destroy` as pinned) or when aiocoap collects the context (changed, said once)."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.coap import CoapDriver, aiocoap_compat
from tests.drivers_coap.conftest import AiocoapDevice, Recorder
from tests.drivers_coap.test_aiocoap_device import spec_for, write_context
from tests.peers import missing


@pytest.fixture(params=["patched", "stock"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from aiocoap import defaults

    if defaults.oscore_missing_modules():
        missing("aiocoap[oscore] (" + ", ".join(defaults.oscore_missing_modules()) + ")")
    from aiocoap.oscore import FilesystemSecurityContext

    if request.param == "stock":
        real = FilesystemSecurityContext._destroy

        def changed(self: Any, *args: Any) -> Any:  # other parameters: not as pinned
            return real(self, *args)

        monkeypatch.setattr(FilesystemSecurityContext, "_destroy", changed)
    aiocoap_compat.reset()
    yield request.param
    aiocoap_compat.reset()


def test_oscore_context_is_released_by_both_paths(
    path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client_ctx, server_ctx = tmp_path / "gw-ctx", tmp_path / "dev-ctx"
    write_context(client_ctx, "01", "02")
    write_context(server_ctx, "02", "01")
    device = AiocoapDevice(tmp_path, oscore=server_ctx)
    device.start()
    try:
        spec = spec_for(device.uri, extra=f'oscore = "{client_ctx}"')

        async def main() -> None:
            drv = CoapDriver(Recorder())
            await drv.start()
            await drv.add_device(spec)
            try:
                got = {r.point: r.value for r in await drv.read("dev", spec.points)}
                assert got["temp"] == 21.5
                assert (client_ctx / "lock").exists()  # held while in use
            finally:
                await drv.stop()
            if path == "patched":
                assert not (client_ctx / "lock").exists()  # released at stop

        with caplog.at_level(logging.WARNING):
            asyncio.run(main())
        gc.collect()  # the stock path: aiocoap releases it when it collects the context
        assert not (client_ctx / "lock").exists()
        differ = [r.getMessage() for r in caplog.records if "internals differ" in r.getMessage()]
        assert aiocoap_compat.check() is (path == "patched")
        assert len(differ) == (1 if path == "stock" else 0)
    finally:
        device.stop()
        shutil.rmtree(client_ctx, ignore_errors=True)
