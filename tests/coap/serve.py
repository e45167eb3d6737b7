"""Run the CoAP front door on its own (store + CoapServer) for tests that need a process:
`python -m tests.coap.serve CONFIG.toml DB` prints READY and serves until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from gateway import config as cfg
from gateway import parts
from gateway.coap.config import CoapConfig
from gateway.coap.service import CoapServer
from gateway.store import EventStore


async def main(config_path: str, db: str) -> None:
    config = cfg.load(config_path)
    parts.register_tables(config.sections)  # as the daemon does, before the store opens
    store = await EventStore.open(db, config.store, gateway_id=config.gateway.id)
    coap = config.section("coap", CoapConfig)
    assert coap is not None
    server = CoapServer(coap, store, devices=config.devices)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    ports = " ".join(f"{kind}:{port}" for _h, port, kind in server.addresses)
    print(f"READY {ports}", flush=True)
    await stop.wait()
    await server.stop()
    await store.close()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
