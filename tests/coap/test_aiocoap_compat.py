"""gateway.coap.aiocoap_compat by both paths, the server in-process against libcoap's client
and raw datagrams: aiocoap's internals as pinned (bounded duplicate cache, lean context and
site), and changed (aiocoap's own classes, said once in the log)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.coap import aiocoap_compat, projection
from gateway.coap.config import CoapConfig
from gateway.coap.service import CoapServer
from gateway.store import EventStore
from tests.support.coap import coap_client
from tests.support.peers import free_port


@pytest.fixture(params=["patched", "stock"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The "stock" path wraps every private name relied on in a function of other
    parameters (aiocoap still works; its internals no longer look as pinned)."""
    from aiocoap.messagemanager import MessageManager
    from aiocoap.protocol import Context
    from aiocoap.resource import Site
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    if request.param == "stock":
        for cls, names in (
            (MessageManager, aiocoap_compat.MESSAGE_MANAGER),
            (Context, aiocoap_compat.CONTEXT),
            (Site, aiocoap_compat.SITE),
            (MessageInterfaceUDP6, aiocoap_compat.UDP6),
        ):
            for name in names:
                monkeypatch.setattr(cls, name, _changed(getattr(cls, name)))
    aiocoap_compat.reset()
    yield request.param
    aiocoap_compat.reset()


def _changed(real: Any) -> Any:
    def changed(self: Any, *args: Any, **kwargs: Any) -> Any:
        return real(self, *args, **kwargs)

    return changed


def _con_get_core(mid: int) -> bytes:
    # CON GET /.well-known/core, token 0x0a: answered by aiocoap's path (not the fast one).
    return bytes([0x41, 0x01, mid >> 8, mid & 0xFF, 0x0A, 0xBB]) + b".well-known" + b"\x04core"


def _twice(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.send(request)
        first = sock.recv(4096)
        sock.send(request)  # the same message ID again: a retransmission
        return first, sock.recv(4096)


async def test_server_answers_by_both_paths(
    path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aiocoap import GET, Context, Message

    projection.register()  # the coap schema, before the store opens
    store = await EventStore.open(tmp_path / "gw.db")
    port = free_port(socket.SOCK_DGRAM)
    config = CoapConfig(bind=("127.0.0.1",), port=port, allow_unauthenticated=True,
                        accept_unknown_devices=True)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gateway.coap"):
        server = CoapServer(config, store)
        await server.start()
    client = await Context.create_client_context(transports=["udp6"])
    try:
        found = aiocoap_compat.check()
        names = {type(server.site).__name__, type(server.context).__name__}
        differ = [r.getMessage() for r in caplog.records if "internals differ" in r.getMessage()]
        transports = {type(m.message_interface).__name__ for m in server.managers}
        if path == "stock":
            assert found == aiocoap_compat.Internals(False, False, False, False)
            assert names == {"Site", "Context"}
            assert transports == {"MessageInterfaceUDP6"}  # no door: aiocoap reads the socket
            assert len(differ) == 1
            assert "MessageManager._deduplicate_message" in differ[0]
            assert "MessageInterfaceUDP6.__init__" in differ[0]
        else:
            assert found == aiocoap_compat.Internals(True, True, True, True)
            assert names == {"LeanSite", "LeanContext"}
            assert transports == {"DoorUDP6"}
            assert differ == []
        # libcoap's client: a POST (the fast path) and a GET of a subtree (aiocoap's Site).
        base = f"coap://127.0.0.1:{port}"
        reply = await asyncio.to_thread(
            coap_client, "coap-client-notls", ["-m", "post", "-t", "60", "-f",
                                               str(_cbor(tmp_path, {"t": 1.5}))],
            f"{base}/d/unit-1", tmp_path,
        )  # fmt: skip
        assert reply.code == "2.04", reply.log
        reply = await asyncio.to_thread(
            coap_client, "coap-client-notls", ["-m", "get"], f"{base}/d/unit-1", tmp_path
        )
        assert reply.code == "2.05", reply.log
        assert cbor2.loads(reply.payload)["points"]["t"]["v"] == 1.5
        # aiocoap's client: an exact path.
        core = await client.request(Message(code=GET, uri=f"{base}/.well-known/core")).response
        assert core.code.dotted == "2.05" and b"</telemetry>" in core.payload
        # A retransmitted CON gets the same answer, from our cache or from aiocoap's.
        first, second = await asyncio.to_thread(_twice, port, _con_get_core(0x4242))
        assert first[1] == 0x45 and first[2:4] == b"\x42\x42"  # 2.05, same message ID
        assert second == first
        assert server.figures()["duplicates"] == (1 if path == "patched" else 0)
        # The POST took the fast path only behind the door.
        assert server.figures()["fast_path"] == (1 if path == "patched" else 0)
    finally:
        await client.shutdown()
        await server.stop()
        await store.close()


def _cbor(tmp: Path, value: object) -> Path:
    p = tmp / "payload.cbor"
    p.write_bytes(cbor2.dumps(value))
    return p


@pytest.mark.parametrize("dtls_path", ["patched", "stock"])
async def test_dtls_psk_by_both_paths(
    dtls_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DTLS-PSK behind the door (DoorDTLS: checks and the fast path) or, when aiocoap's
    tinydtls server transport is not as pinned, through aiocoap's own: a POST with libcoap's
    client (OpenSSL) is stored either way."""
    pytest.importorskip("DTLSSocket")
    from aiocoap.transports.tinydtls_server import MessageInterfaceTinyDTLSServer

    from gateway.coap.config import DeviceCredentials

    if dtls_path == "stock":
        for name in aiocoap_compat.DTLS_SERVER:
            monkeypatch.setattr(
                MessageInterfaceTinyDTLSServer, name,
                _changed(getattr(MessageInterfaceTinyDTLSServer, name)),
            )  # fmt: skip
    aiocoap_compat.reset()
    projection.register()  # the coap schema, before the store opens
    store = await EventStore.open(tmp_path / "gw.db")
    port, dtls_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    creds = {"sensor-9": DeviceCredentials("sensor-9", b"sensor-9", b"sensor-9-secret")}
    config = CoapConfig(bind=("127.0.0.1",), port=port, dtls_port=dtls_port,
                        credentials=creds)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gateway.coap"):
        server = CoapServer(config, store)
        await server.start()
    try:
        transports = {type(m.message_interface).__name__ for m in server.managers}
        differ = [r.getMessage() for r in caplog.records if "internals differ" in r.getMessage()]
        if dtls_path == "stock":
            assert transports == {"DoorUDP6", "MessageInterfaceTinyDTLSServer"}
            assert len(differ) == 1 and "_received_datagram" in differ[0]
        else:
            assert transports == {"DoorUDP6", "DoorDTLS"}
            assert differ == []
        reply = await asyncio.to_thread(
            coap_client, "coap-client-openssl",
            ["-u", "sensor-9", "-k", "sensor-9-secret", "-m", "post", "-t", "110",
             "-e", '[{"n":"temp","v":18.5}]'],
            f"coaps://127.0.0.1:{dtls_port}/telemetry", tmp_path,
        )  # fmt: skip
        assert reply.code == "2.04", reply.log
        assert server.figures()["fast_path"] == (1 if dtls_path == "patched" else 0)
        rows = await store.read(
            lambda c: c.execute("SELECT stream FROM events WHERE type = 'readings'").fetchall()
        )
        assert rows == [("device:sensor-9",)]
    finally:
        await server.stop()
        await store.close()
        aiocoap_compat.reset()
