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
from tests.support.wait import until


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


async def test_an_observer_gone_away_is_dropped_on_the_icmp_error(tmp_path: Path) -> None:
    """The door reads the socket itself: ICMP errors (a notification to a port nobody
    listens on any more) must still reach aiocoap, which ends that observation."""
    projection.register()  # the coap schema, before the store opens
    store = await EventStore.open(tmp_path / "gw.db")
    port = free_port(socket.SOCK_DGRAM)
    config = CoapConfig(bind=("127.0.0.1",), port=port, allow_unauthenticated=True,
                        accept_unknown_devices=True)  # fmt: skip
    server = CoapServer(config, store)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        post = bytes([0x51, 0x02, 0, 1, 0x01]) + b"\xb1d\x06unit-1\x11\x3c\xff"  # NON POST
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poster:
            poster.connect(("127.0.0.1", port))
            poster.setblocking(False)
            await loop.sock_sendall(poster, post + cbor2.dumps({"t": 1.5}))
            assert (await asyncio.wait_for(loop.sock_recv(poster, 512), 5))[1] == 0x44
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as observer:
                observer.connect(("127.0.0.1", port))
                observer.setblocking(False)
                # CON GET /d/unit-1, Observe: 0, token 0x77
                get = bytes([0x41, 0x01, 0, 2, 0x77, 0x60, 0x51]) + b"d\x06unit-1"
                await loop.sock_sendall(observer, get)
                answer = await asyncio.wait_for(loop.sock_recv(observer, 512), 5)
                assert answer[1] == 0x45 and server.figures()["observations"] == 1
            # The observer's socket is closed: the next notification gets an ICMP error.
            second = bytes([0x51, 0x02, 0, 3, 0x02]) + b"\xb1d\x06unit-1\x11\x3c\xff"
            await loop.sock_sendall(poster, second + cbor2.dumps({"t": 2.5}))
            await until(lambda: server.figures()["observations"] == 0, "observation dropped")
    finally:
        await server.stop()
        await store.close()
