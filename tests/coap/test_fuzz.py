"""Fuzz the SenML decoders and the telemetry resource's render path: every bad payload gets
a 4.xx, nothing crashes, nothing gets 5.00.

The store behind the resource is an in-memory stand-in (`RecordingBackend`): this test is
about the decoding/rendering path, thousands of times; the real store is exercised by the
other CoAP tests (durability included)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

import cbor2
from aiocoap import POST, Message
from aiocoap.message import Direction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.coap.base import Backend
from gateway.coap.config import CoapConfig
from gateway.coap.gate import Gate
from gateway.coap.ingest import TelemetryResource
from gateway.coap.resources import DeviceResource
from gateway.events import Event, NewEvent

VALID_CBOR = cbor2.dumps(
    [
        {-2: "boiler-1/", -3: 1.7e9, -4: "Cel", 0: "t1", 2: 21.5},
        {0: "t2", 2: 22.0, 6: -5},
        {0: "label", 3: "hall"},
        {0: "on", 4: True},
        {0: "raw", 8: b"\x01\x02"},
    ]
)
VALID_JSON = (
    b'[{"bn":"boiler-1/","bt":1.7e9,"bu":"Cel","n":"t1","v":21.5},{"n":"t2","v":22,"t":-5},'
    b'{"n":"label","vs":"hall"},{"n":"on","vb":true},{"n":"raw","vd":"AQI"}]'
)
VALID_MAP = cbor2.dumps({"temp": 21.5, "on": True, "mode": "eco", "raw": b"\x00"})


class RecordingBackend(Backend):
    def __init__(self) -> None:
        super().__init__(None)
        self.appended: list[NewEvent] = []

    async def append_many(self, events: Sequence[NewEvent]) -> list[Event]:
        self.appended.extend(events)
        if len(self.appended) > 1000:
            self.appended.clear()
        return []


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _resources() -> tuple[TelemetryResource, DeviceResource]:
    # Mutated names are new point names of one unknown device: no cap on them here.
    config = CoapConfig(
        allow_unauthenticated=True,
        accept_unknown_devices=True,
        max_payload=4096,
        max_unknown_devices=100_000,
        max_unknown_points=100_000,
    )
    gate = Gate(config)
    backend = RecordingBackend()
    telemetry = TelemetryResource(gate, backend)
    return telemetry, DeviceResource(gate, backend, telemetry)


def _request(payload: bytes, cf: int | None, path: tuple[str, ...] = ()) -> Message:
    msg = Message(code=POST, payload=payload, uri_path=path)
    if cf is not None:
        msg.opt.content_format = cf
    msg.direction = Direction.INCOMING
    return msg


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.telemetry, self.devices = _resources()
        self.errors = ErrorLog()
        logging.getLogger("gateway.coap").addHandler(self.errors)
        self.codes: dict[str, int] = {}

    def close(self) -> None:
        logging.getLogger("gateway.coap").removeHandler(self.errors)
        self.loop.close()

    def check(self, payload: bytes, cf: int | None, device_path: bool = False) -> None:
        if device_path:
            coro = self.devices.render(_request(payload, cf, ("fuzz-dev",)))
        else:
            coro = self.telemetry.render(_request(payload, cf))
        response = self.loop.run_until_complete(coro)
        code = response.code.dotted
        self.codes[code] = self.codes.get(code, 0) + 1
        assert code in ("2.04", "4.00", "4.03", "4.13", "4.15"), (code, payload, cf)
        assert not self.errors.records, self.errors.records[0].getMessage()


def _mutate(seed: bytes, rng: random.Random) -> bytes:
    out = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        if not out:
            break
        op = rng.choice(("flip", "set", "insert", "delete", "truncate", "duplicate"))
        i = rng.randrange(len(out))
        if op == "flip":
            out[i] ^= 1 << rng.randrange(8)
        elif op == "set":
            out[i] = rng.randrange(256)
        elif op == "insert":
            out[i:i] = rng.randbytes(rng.randint(1, 4))
        elif op == "delete":
            del out[i]
        elif op == "truncate":
            del out[i:]
        else:
            j = rng.randrange(i, len(out)) + 1
            out[j:j] = out[i:j]
    return bytes(out)


MUTATIONS = 20000  # plain random mutations: cheaper per case than hypothesis, so more of them


def test_mutated_valid_packs_never_crash() -> None:
    h = Harness()
    rng = random.Random(8428)
    seeds = [
        (VALID_CBOR, 112, False),
        (VALID_JSON, 110, False),
        (VALID_MAP, 60, True),
        (VALID_CBOR, None, False),
    ]
    try:
        for seed, cf, device_path in seeds:  # the seeds themselves are accepted
            h.check(seed, cf, device_path)
        assert h.codes == {"2.04": 4}
        for _ in range(MUTATIONS):
            seed, cf, device_path = rng.choice(seeds)
            h.check(_mutate(seed, rng), cf, device_path)
        assert h.codes.get("4.00", 0) > MUTATIONS // 4  # mutations do get refused
    finally:
        h.close()


FAST = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_keys = st.sampled_from([-6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -7]) | st.text(
    max_size=4
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=12,
)


def test_structured_cbor_and_json_never_crash() -> None:
    h = Harness()

    @FAST
    @given(
        st.lists(st.dictionaries(_keys, _values, max_size=6), max_size=4) | _values,
        st.sampled_from([112, 60, None]),
    )
    def run_cbor(value: Any, cf: int | None) -> None:
        h.check(cbor2.dumps(value), cf, device_path=cf == 60)

    @FAST
    @given(st.binary(max_size=64), st.sampled_from([110, 112, 60, 0, 50, 41, None]))
    def run_bytes(payload: bytes, cf: int | None) -> None:
        h.check(payload, cf, device_path=cf == 60)

    try:
        run_cbor()
        run_bytes()
    finally:
        h.close()
