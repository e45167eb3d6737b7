"""GATT building blocks without a bus: value codecs, the connection pool, the breaker."""

from __future__ import annotations

import asyncio
import struct

import pytest

from drivers.ble.config import GattPoint
from drivers.ble.gatt import ConnectionPool, decode, encode
from gateway.breaker import Breaker, State
from gateway.errors import DeviceProtocolError, PayloadError


@pytest.mark.parametrize(
    ("typ", "endian", "value", "data"),
    [
        ("int16", "little", -2, b"\xfe\xff"),
        ("uint16", "big", 0x0102, b"\x01\x02"),
        ("int24", "little", -1, b"\xff\xff\xff"),
        ("float32", "little", 0.5, struct.pack("<f", 0.5)),
        ("bool", "little", True, b"\x01"),
        ("utf8", "little", "hi", b"hi"),
        ("bytes", "little", b"\x00\x01", b"\x00\x01"),
    ],
)
def test_round_trip(typ: str, endian: str, value: object, data: bytes) -> None:
    p = GattPoint("x", "c", typ, endian)
    assert encode(p, value) == data
    assert decode(p, data) == value


def test_byte_offset_and_short_data() -> None:
    p = GattPoint("x", "c", "uint16", byte_offset=1)
    assert decode(p, b"\x09\x34\x12") == 0x1234
    with pytest.raises(DeviceProtocolError, match="needs 3"):
        decode(p, b"\x09\x34")


@pytest.mark.parametrize(
    ("typ", "value"), [("uint8", 256), ("uint8", -1), ("int16", 1.5), ("utf8", 3), ("bytes", "zz")]
)
def test_bad_writes_are_payload_errors(typ: str, value: object) -> None:
    with pytest.raises(PayloadError, match="cannot write"):
        encode(GattPoint("x", "c", typ), value)


def test_pool_limits_and_queues_in_order() -> None:
    async def main() -> tuple[int, list[int]]:
        pool = ConnectionPool(2)
        peak = 0
        order: list[int] = []
        gate = asyncio.Event()

        async def user(i: int) -> None:
            nonlocal peak
            async with pool.slot():
                order.append(i)
                peak = max(peak, pool.in_use)
                await gate.wait()

        tasks = [asyncio.create_task(user(i)) for i in range(5)]
        await asyncio.sleep(0)  # one turn: each task runs up to its slot (or the queue)
        assert pool.waiting == 3
        gate.set()
        await asyncio.gather(*tasks)
        return peak, order

    peak, order = asyncio.run(main())
    assert peak == 2 and order == [0, 1, 2, 3, 4]


def test_breaker() -> None:
    # The shared breaker as GattLink uses it: a fixed rest of `breaker.cooldown` seconds.
    b = Breaker(threshold=3, cooldown=10)
    b.failure(0)
    b.failure(1)
    assert b.state == "closed" and b.wait(1) == 0
    b.failure(2)
    assert b.state == "open" and b.wait(5) == 7
    assert b.wait(13) == 0 and b.allow(13)  # one trial allowed...
    assert b.state is State.HALF_OPEN and not b.allow(13)  # ...and only one
    b.success()
    assert b.state == "closed" and b.failures == 0
