"""The file sink: same relay, batches to rotating NDJSON / CBOR-sequence files, acked after
fsync; a torn tail from a power cut is cut back at the next start."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.sync.filesink import FileSink, complete_length
from gateway.sync.relay import Relay
from tests.support.wait import until
from tests.sync.helpers import check_order, open_store, outbox_depth, sync_config


def read_records(directory: Path, fmt: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(directory.glob("events-*")):
        data = f.read_bytes()
        if fmt == "ndjson":
            out += [json.loads(line) for line in data.splitlines()]
        else:
            buf = io.BytesIO(data)
            while buf.tell() < len(data):
                out.append(cbor2.load(buf))
    return out


@pytest.mark.slow  # thousands of events through the sink
@pytest.mark.parametrize("fmt", ["ndjson", "cbor-seq"])
async def test_events_land_in_rotating_files_in_order(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "spool"
    cfg = sync_config(
        {"file": {"directory": str(out), "format": fmt, "rotate_mb": 0.01}, "batch_size": 7}
    )
    assert cfg.file is not None
    async with open_store(tmp_path / "gw.db") as store:
        for i in range(300):
            await store.append(f"device:d{i % 4}", "readings", {"r": [{"n": "t", "v": i}]})
        sink = FileSink(cfg.file, logging.getLogger("test.sync"))
        relay = Relay(store, sink, cfg, "gw")
        task = asyncio.create_task(relay.run())
        try:
            await until(lambda: _empty(store), "outbox drained to files")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sink.close()
    assert relay.delivered == 300
    finished = sorted(out.glob("events-*[!t]"))
    assert len(finished) >= 2, "rotated at 10 KiB"
    # The open file is finalised at the next start; then every record is there, in order.
    sink2 = FileSink(cfg.file, logging.getLogger("test.sync"))
    sink2._open()
    sink2.close()
    records = read_records(out, fmt)
    assert len({r["key"] for r in records}) == 300
    check_order(records)


async def _empty(store: object) -> bool:
    from gateway.store import EventStore

    assert isinstance(store, EventStore)
    return await outbox_depth(store) == 0


@pytest.mark.parametrize(
    ("fmt", "good", "torn"),
    [
        ("ndjson", b'{"a":1}\n{"b":2}\n', b'{"c":'),
        ("cbor-seq", cbor2.dumps({"a": 1}) + cbor2.dumps({"b": 2}), cbor2.dumps({"c": 3})[:-1]),
    ],
)
def test_a_torn_record_is_cut_at_the_next_start(
    tmp_path: Path, fmt: str, good: bytes, torn: bytes
) -> None:
    assert complete_length(good + torn, fmt) == len(good)
    cfg = sync_config({"file": {"directory": str(tmp_path), "format": fmt}}).file
    assert cfg is not None
    part = (
        tmp_path
        / f"events-20260101T000000.000000Z{'.ndjson' if fmt == 'ndjson' else '.cbors'}.part"
    )
    part.write_bytes(good + torn)
    sink = FileSink(cfg, logging.getLogger("test.sync"))
    sink._open()
    sink.close()
    assert part.with_suffix("").read_bytes() == good


async def test_an_event_json_cannot_carry_goes_to_dead_letters(tmp_path: Path) -> None:
    from tests.sync.helpers import dead_letters

    cfg = sync_config({"file": {"directory": str(tmp_path / "spool"), "format": "ndjson"}})
    assert cfg.file is not None
    async with open_store(tmp_path / "gw.db") as store:
        await store.append("device:a", "readings", {"r": [{"n": "t", "v": 1}]})
        await store.append("device:a", "blob", {"raw": b"\x00\x01"})  # bytes: no JSON form
        await store.append("device:a", "readings", {"r": [{"n": "t", "v": 2}]})
        sink = FileSink(cfg.file, logging.getLogger("test.sync"))
        relay = Relay(store, sink, cfg, "gw")
        task = asyncio.create_task(relay.run())
        try:
            await until(lambda: _empty(store), "outbox drained")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sink.close()
        dead = await dead_letters(store)
    assert [(d[0], d[1]) for d in dead] == [(2, "device:a")]
    assert "not representable as json: data.raw: a bytes has no JSON form" in dead[0][2]
    sink2 = FileSink(cfg.file, logging.getLogger("test.sync"))
    sink2._open()
    sink2.close()
    assert [r["seq"] for r in read_records(tmp_path / "spool", "ndjson")] == [1, 3]
