"""The server in-process (as gatewayd runs it): start/stop leave nothing behind, device-level
and commands Observe, the control service's hook."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import cbor2

from gateway.coap import projection
from gateway.coap.config import CoapConfig
from gateway.coap.service import CoapServer
from gateway.store import EventStore
from tests.support.peers import free_port


async def _scenario(db: Path, port: int) -> tuple[list[object], list[list[str]]]:
    from aiocoap import GET, POST, Context, Message

    projection.register()  # the coap schema, before the store opens
    store = await EventStore.open(db)
    config = CoapConfig(bind=("127.0.0.1",), port=port, allow_unauthenticated=True,
                        accept_unknown_devices=True)  # fmt: skip
    server = CoapServer(config, store)
    await server.start()
    client = await Context.create_client_context(transports=["udp6"])
    try:
        base = f"coap://127.0.0.1:{port}"
        post = Message(code=POST, uri=f"{base}/d/unit-1", content_format=60,
                       payload=cbor2.dumps({"t": 1.5}))  # fmt: skip
        assert (await client.request(post).response).code.dotted == "2.04"

        state = client.request(Message(code=GET, uri=f"{base}/d/unit-1", observe=0))
        first = cbor2.loads((await state.response).payload)
        cmds = client.request(Message(code=GET, uri=f"{base}/d/unit-1/commands", observe=0))
        seen_cmds = [cbor2.loads((await cmds.response).payload)]

        post = Message(code=POST, uri=f"{base}/d/unit-1", content_format=60,
                       payload=cbor2.dumps({"t": 2.5}))  # fmt: skip
        assert (await client.request(post).response).code.dotted == "2.04"
        async with asyncio.timeout(5):
            async for note in state.observation:
                second = cbor2.loads(note.payload)
                break
        server.devices.set_commands("unit-1", ["open-valve"])
        async with asyncio.timeout(5):
            async for note in cmds.observation:
                seen_cmds.append(cbor2.loads(note.payload))
                break
        state.observation.cancel()
        cmds.observation.cancel()
        return [first["points"]["t"]["v"], second["points"]["t"]["v"]], seen_cmds
    finally:
        await client.shutdown()
        await server.stop()
        await store.close()


async def test_device_state_and_commands_are_observable(tmp_path: Path) -> None:
    values, commands = await _scenario(tmp_path / "db", free_port(socket.SOCK_DGRAM))
    assert values == [1.5, 2.5]
    assert commands == [[], ["open-valve"]]
