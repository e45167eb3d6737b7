"""Outages against a real Mosquitto: broker stopped and restarted under load, a broker that
never acknowledges, and a poison event refused with a real PUBACK reason code."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from gateway.store import EventStore, outbox
from tests.sync.conftest import Mosquitto, Subscriber
from tests.sync.helpers import (
    aio,
    check_order,
    dead_letters,
    mqtt_config,
    open_store,
    outbox_depth,
    running_relay,
    until,
)

pytestmark = pytest.mark.peer("mosquitto")


async def _produce(store: EventStore, produced: list[int], streams: int = 3) -> None:
    i = 0
    while True:
        e = await store.append(f"device:d{i % streams}", "readings", {"r": [{"n": "t", "v": i}]})
        produced.append(e.seq)
        i += 1
        await asyncio.sleep(0.002)  # a steady producer, not synchronisation


@aio
async def test_broker_stopped_and_restarted_while_events_keep_coming(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(mosquitto.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            cfg = mqtt_config(mosquitto.port, batch_size=10, inflight=4)
            async with running_relay(store, cfg) as relay:
                produced: list[int] = []
                producer = asyncio.create_task(_produce(store, produced))
                try:
                    await until(lambda: len(sub.events()) >= 50, "first events delivered")
                    mosquitto.stop()
                    await until(lambda: relay.channel is None, "relay noticed the outage")
                    during = len(produced)
                    await until(lambda: len(produced) >= during + 200, "events made while down")
                    assert await outbox_depth(store) >= 200  # kept, not dropped
                    mosquitto.start()
                    await until(lambda: relay.channel is not None, "relay reconnected")
                    await until(lambda: len(produced) >= during + 400, "events made after")
                finally:
                    producer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await producer
                await until(lambda: _empty(store), "outbox drained")
                # From the log, not from `produced`: a cancelled append may still commit.
                want = {f"gw:{e.seq}" for e in await store.events(0, 100_000)}
                await until(lambda: want <= {e["key"] for e in sub.events()}, "all delivered")
        events = sub.events()
        check_order(events)
        assert {e["key"] for e in events} == want
        assert relay.delivered >= len(want)
    finally:
        sub.stop()


async def _empty(store: EventStore) -> bool:
    return await outbox_depth(store) == 0


class SilentBroker:
    """A broker that accepts CONNECT and swallows every PUBLISH without a PUBACK.

    The one fake in these tests, and on purpose: no real broker can be told to withhold
    PUBACKs while staying connected (a SIGSTOPped Mosquitto does not even answer CONNECT).
    It speaks just enough MQTT 5 for the client to believe it is connected."""

    def __init__(self) -> None:
        self.connects = 0
        self.publishes = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _read_packet(self, r: asyncio.StreamReader) -> tuple[int, bytes]:
        head = (await r.readexactly(1))[0]
        n, mult = 0, 1
        while True:
            b = (await r.readexactly(1))[0]
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return head >> 4, await r.readexactly(n)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.append(w)
        try:
            while True:
                kind, _body = await self._read_packet(r)
                if kind == 1:  # CONNECT -> CONNACK (v5: flags, reason, no properties)
                    self.connects += 1
                    w.write(b"\x20\x03\x00\x00\x00")
                elif kind == 3:  # PUBLISH: swallowed, never acknowledged
                    self.publishes += 1
                elif kind == 12:  # PINGREQ -> PINGRESP keeps the link looking healthy
                    w.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self._writers:
            w.close()
        await self.server.wait_closed()


@aio
async def test_a_broker_that_never_acks_never_gets_a_row_deleted(tmp_path: Path) -> None:
    broker = SilentBroker()
    await broker.start()
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(30):
                await store.append("device:a", "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(broker.port, batch_size=5, inflight=2, ack_timeout=0.3,
                              commands=False)  # fmt: skip
            async with running_relay(store, cfg) as relay:
                # Several sessions: each one sends, waits for PUBACKs that never come, gives up.
                await until(lambda: broker.connects >= 3 and broker.publishes >= 3,
                            "several unacknowledged sessions")  # fmt: skip
                assert relay.delivered == 0
                assert "no PUBACK" in (relay.last_error or "")
            assert await outbox_depth(store) == 30
    finally:
        await broker.stop()


@aio
async def test_poison_events_go_to_dead_letters_the_rest_flows_and_requeue_works(
    tmp_path: Path,
) -> None:
    # The broker's ACL denies one stream's topic: MQTT 5 PUBACK 0x87 "Not authorized".
    broker = Mosquitto()
    acl = broker.file("acl", "topic deny gateways/gw/events/device:poison\ntopic readwrite #\n")
    broker.extra = f"acl_file {acl}\n"
    broker.start()
    sub = Subscriber(broker.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(40):
                stream = "device:poison" if 10 <= i < 15 else "device:a"
                await store.append(stream, "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(broker.port, batch_size=8)
            async with running_relay(store, cfg) as relay:
                await until(lambda: _empty(store), "outbox emptied")
                dead = await dead_letters(store)
                assert [d[1] for d in dead] == ["device:poison"] * 5
                assert all(d[2].startswith("0x87 Not authorized") for d in dead), dead
                assert relay.refusals >= 5  # the batch of 5 was split down to single events
                await until(lambda: len(sub.events()) >= 35, "the rest delivered")
                assert {e["stream"] for e in sub.events()} == {"device:a"}

                # The operator fixes the ACL and requeues: the events now flow.
                acl.write_text("topic readwrite #\n")
                broker.stop()
                broker.start()
                # Mosquitto 2.0.11 with an acl_file drops messages for a restored session
                # whose client is not back yet: wait for the subscriber (the "cloud") first.
                await until(lambda: broker.log().count("as test-sub-") >= 2, "subscriber back")
                seqs = await store.write(lambda c: outbox.requeue(c, None))
                assert len(seqs) == 5
                relay.requeued(seqs)
                await until(lambda: _empty(store), "requeued events delivered")
                await until(
                    lambda: len({e["key"] for e in sub.events()}) == 40,
                    "subscriber saw the requeued ones",
                )
                assert await dead_letters(store) == []
        per_stream = check_order(sub.events())
        assert per_stream["device:poison"] == [1, 2, 3, 4, 5]
    finally:
        sub.stop()
        broker.remove()


@aio
async def test_an_event_over_the_brokers_maximum_packet_size_is_dead_not_a_loop(
    tmp_path: Path,
) -> None:
    # Mosquitto announces max_packet_size in CONNACK (MQTT 5) and drops a client that sends
    # more; the relay splits batches to fit and dead-letters an event too big alone.
    broker = Mosquitto("max_packet_size 2000\n")
    broker.start()
    sub = Subscriber(broker.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(30):
                data = {"blob": "x" * 5000} if i == 12 else {"r": [{"n": "t", "v": i}]}
                await store.append("device:a", "readings", data)
            async with running_relay(store, mqtt_config(broker.port, batch_size=50)) as relay:
                await until(lambda: _empty(store), "outbox emptied")
                dead = await dead_letters(store)
                assert [(d[0], d[1]) for d in dead] == [(13, "device:a")]
                assert "too large for" in dead[0][2]
                await until(lambda: len(sub.events()) >= 29, "the rest delivered")
                assert relay.sink.figures()["connects"] == 1  # never kicked off
        assert [e["seq"] for e in sub.events()] == [s for s in range(1, 31) if s != 13]
    finally:
        sub.stop()
        broker.remove()
