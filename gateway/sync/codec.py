"""Wire formats of the relay: event rows -> batch payloads (CBOR array, JSON array, NDJSON,
CBOR sequence), and cloud command messages -> validated command data. Pure: no I/O.

Every event carries its idempotency key `"<gateway>:<seq>"`: a receiver that has seen a key
drops the message (delivery is at-least-once). For CBOR the event's stored data blob (already
CBOR) is spliced in as is: the relay never decodes what it only forwards.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import cbor2

from gateway import names
from gateway.errors import PayloadError

if TYPE_CHECKING:
    from gateway.sync.config import SyncConfig


class Row(NamedTuple):
    """One undelivered event as read from `outbox JOIN events`."""

    seq: int
    stream: str
    version: int
    type: str
    wall_time: float
    mono_time: float
    boot_id: str
    synced: int
    data: bytes


ENVELOPE_KEYS = (
    "key", "gateway", "seq", "stream", "version", "type",
    "wall_time", "mono_time", "boot_id", "clock_synced", "data",
)  # fmt: skip
_CBOR_KEYS = [cbor2.dumps(k) for k in ENVELOPE_KEYS]
_CBOR_MAP_HEADER = bytes([0xA0 + len(ENVELOPE_KEYS)])  # a map of < 24 pairs: one byte


def _cbor_array_header(n: int) -> bytes:
    if n < 24:
        return bytes([0x80 + n])
    if n < 256:
        return bytes([0x98, n])
    if n < 65536:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


def idempotency_key(gateway: str, seq: int) -> str:
    return f"{gateway}:{seq}"




_SMALL_UINTS = [bytes((n,)) for n in range(24)]
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in (">BB", ">BH", ">BI", ">BQ"))


def _cbor_uint(n: int) -> bytes:
    if n < 24:
        return _SMALL_UINTS[n]
    if n < 0x100:
        return _U8.pack(0x18, n)
    if n < 0x10000:
        return _U16.pack(0x19, n)
    if n < 0x100000000:
        return _U32.pack(0x1A, n)
    return _U64.pack(0x1B, n)


def _cbor_int(n: int) -> bytes:
    if n >= 0:
        return _cbor_uint(n)
    b = bytearray(_cbor_uint(-1 - n))
    b[0] |= 0x20  # major type 1: negative integer
    return bytes(b)


class CborEncoder:
    """Encodes event envelopes for one gateway, byte for byte what `cbor2.dumps` of the
    envelope map would give (doubles as 8-byte floats), without building the map: the
    repeated strings (stream, type, boot id) are encoded once and kept, and the constant
    runs between values are joined beforehand, so an event is one `b"".join` of ten pieces."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        k = _CBOR_KEYS
        self._key_prefix = (gateway + ":").encode()
        # Map header, "key", then the text header of the key (its length varies with seq).
        self._key_heads = [
            _CBOR_MAP_HEADER + k[0] + (bytes((0x60 + n,)) if n < 24 else bytes((0x78, n)))
            for n in range(256)
        ]
        self._gw = k[1] + cbor2.dumps(gateway) + k[2]
        # wall_time, "mono_time", mono_time: one pack for both doubles.
        self._times = struct.Struct(f">Bd{len(k[7])}sBd")
        self._streams: dict[str, bytes] = {}
        self._types: dict[str, bytes] = {}
        self._boots: dict[str, tuple[bytes, bytes]] = {}

    @staticmethod
    def _bounded(cache: dict[str, Any]) -> dict[str, Any]:
        if len(cache) > 10_000:  # bounded: streams come and go
            cache.clear()
        return cache

    def event(self, row: Sequence[Any]) -> bytes:
        """`row` in `Row` order (a Row, or the plain tuple a query returned)."""
        return self.many((row,))[0]

    def many(self, rows: Iterable[Sequence[Any]]) -> list[bytes]:
        """`event` for each row (in `Row` order), in one loop (this runs per event: everything
        is local; a row is unpacked by name in `Row` order, cheaper than indexing it)."""
        k = _CBOR_KEYS
        prefix, key_heads, gw, k7 = self._key_prefix, self._key_heads, self._gw, k[7]
        streams, types, boots = self._streams, self._types, self._boots
        times, join, uint, sint = self._times.pack, b"".join, _cbor_uint, _cbor_int
        out: list[bytes] = []
        append = out.append
        for seq, stream, version, type_, wall_time, mono_time, boot_id, synced, data in rows:
            key = b"%s%d" % (prefix, seq)
            sp = streams.get(stream)
            if sp is None:
                sp = self._bounded(streams)[stream] = k[3] + cbor2.dumps(stream) + k[4]
            tp = types.get(type_)
            if tp is None:
                tp = self._bounded(types)[type_] = k[5] + cbor2.dumps(type_) + k[6]
            both = boots.get(boot_id)  # (not synced, synced): no key tuple per event
            if both is None:
                head = k[8] + cbor2.dumps(boot_id) + k[9]
                both = self._bounded(boots)[boot_id] = (
                    head + b"\xf4" + k[10],
                    head + b"\xf5" + k[10],
                )
            bp = both[1] if synced else both[0]
            append(join((
                key_heads[len(key)], key, gw, uint(seq), sp,
                uint(version) if version >= 0 else sint(version), tp,
                times(0xFB, wall_time, k7, 0xFB, mono_time), bp, data,
            )))  # fmt: skip
        return out


def cbor_event(gateway: str, row: Row) -> bytes:
    """One event as a CBOR map; the stored data blob is spliced in without re-encoding."""
    return CborEncoder(gateway).event(row)


def event_dict(gateway: str, row: Row) -> dict[str, Any]:
    return {
        "key": idempotency_key(gateway, row.seq),
        "gateway": gateway,
        "seq": row.seq,
        "stream": row.stream,
        "version": row.version,
        "type": row.type,
        "wall_time": row.wall_time,
        "mono_time": row.mono_time,
        "boot_id": row.boot_id,
        "clock_synced": bool(row.synced),
        "data": cbor2.loads(row.data),
    }


class NotRepresentableError(PayloadError):
    """An event that cannot be written in the chosen format (e.g. bytes in JSON)."""


def _json_safe(value: Any, where: str) -> None:
    if isinstance(value, str | int | bool) or value is None:
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotRepresentableError(f"{where}: {value!r} has no JSON form")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise NotRepresentableError(f"{where}: map key {k!r} is not a string")
            _json_safe(v, f"{where}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _json_safe(v, f"{where}[{i}]")
        return
    raise NotRepresentableError(f"{where}: a {type(value).__name__} has no JSON form")


def json_event(gateway: str, row: Row) -> bytes:
    """One event as compact JSON (raises NotRepresentableError for bytes, NaN, ...)."""
    try:
        obj = event_dict(gateway, row)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise NotRepresentableError(f"stored data is not valid CBOR: {exc}") from None
    _json_safe(obj["data"], "data")
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode_one(fmt: str, gateway: str, row: Row) -> bytes:
    """One event in `fmt` ("cbor" or "json"): the unit of a batch and of a file record."""
    return cbor_event(gateway, row) if fmt == "cbor" else json_event(gateway, row)


class Encoder:
    """`encode_one` for a stream of rows, with the CBOR encoder's caches kept."""

    def __init__(self, fmt: str, gateway: str) -> None:
        self.fmt = fmt
        self.gateway = gateway
        self._cbor = CborEncoder(gateway)

    def __call__(self, row: Sequence[Any]) -> bytes:
        """`row` in `Row` order; extra trailing columns are ignored."""
        if self.fmt == "cbor":
            return self._cbor.event(row)
        return json_event(self.gateway, Row._make(row[:9]))

    def many(self, rows: Sequence[Sequence[Any]]) -> list[bytes]:
        """Each row encoded; for CBOR in one loop. Raises NotRepresentableError (JSON) for
        the first row that has no form in the format: call `__call__` per row to find it."""
        if self.fmt == "cbor":
            return self._cbor.many(rows)
        return [json_event(self.gateway, Row._make(r[:9])) for r in rows]

    # -- as the store's outbox codec (gateway.store.OutboxCodec) ---------------------------
    @property
    def signature(self) -> str:
        """What a stored body depends on: the wire format and the gateway id."""
        return f"envelope-v1 {self.fmt} {self.gateway}"

    def bodies(self, rows: Sequence[Sequence[Any]]) -> list[bytes | None]:
        """`many`, with None for an event that has no form in the format (the relay finds
        it again when it sends, and puts it in dead letters with the reason)."""
        try:
            return list(self.many(rows))
        except NotRepresentableError:
            out: list[bytes | None] = []
            for r in rows:
                try:
                    out.append(self(r))
                except NotRepresentableError:
                    out.append(None)
            return out


def outbox_encoder(cfg: SyncConfig, gateway: str) -> Encoder:
    """The store's outbox codec for a `[sync]` section: events encoded as the configured
    sink takes them."""
    fmt = cfg.file.format if cfg.file is not None else cfg.format
    return Encoder(item_format(fmt), gateway)


def item_format(fmt: str) -> str:
    """How each event is encoded for a sink format: mqtt "cbor"/"json", file "ndjson" (JSON
    records) or "cbor-seq" (CBOR records)."""
    return {"ndjson": "json", "cbor-seq": "cbor"}.get(fmt, fmt)


def batch_payload(fmt: str, items: Sequence[bytes]) -> bytes:
    """A batch message: a CBOR array or a JSON array of already encoded events."""
    return joined_payload(fmt, len(items), (b"," if fmt == "json" else b"").join(items))


def joined_payload(fmt: str, n: int, joined: bytes) -> bytes:
    """A batch message from `n` encoded events already joined (JSON: by commas)."""
    if fmt == "cbor":
        return _cbor_array_header(n) + joined
    return b"[" + joined + b"]"


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """Inverse of batch_payload (for receivers and tests): JSON if it starts with '['."""
    if payload[:1] == b"[":
        out: list[dict[str, Any]] = json.loads(payload)
        return out
    res: list[dict[str, Any]] = cbor2.loads(payload)
    return res


# -- downlink ----------------------------------------------------------------------------
MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    data: dict[str, Any]


def parse_command(payload: bytes) -> Command:
    """A command from the cloud: a JSON or CBOR map with a string `id` (the idempotency key:
    the same id twice is one command) and a string `device`; other keys are kept as given.
    Raises PayloadError naming what is wrong; the reason goes back on the response topic."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise PayloadError(f"command is {len(payload)} bytes, over {MAX_COMMAND_BYTES}")
    if not payload:
        raise PayloadError("empty command")
    obj: Any
    try:
        obj = json.loads(payload) if payload.lstrip()[:1] == b"{" else cbor2.loads(payload)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise PayloadError(f"command is neither a JSON nor a CBOR map: {exc}") from None
    if not isinstance(obj, dict):
        raise PayloadError(f"command must be a map, got {type(obj).__name__}")
    cid = obj.get("id")
    if not names.is_valid(cid):
        shown = names.escape(cid) if isinstance(cid, str) else cid
        raise PayloadError(f"command id must be a string of {names.RULE}, got {shown!r}")
    device = obj.get("device")
    if not isinstance(device, str) or not device:
        raise PayloadError(f"command {cid}: 'device' must be a non-empty string, got {device!r}")
    problem = names.problem(device, "'device'")
    if problem is not None:
        raise PayloadError(f"command {cid}: {problem}")
    point = obj.get("point")
    if point is not None and not isinstance(point, str):
        raise PayloadError(f"command {cid}: 'point' must be a string, got {point!r}")
    problem = None if point is None else names.problem(point, "'point'")
    if problem is not None:
        raise PayloadError(f"command {cid}: {problem}")
    for k in obj:
        if not isinstance(k, str):
            raise PayloadError(f"command {cid}: map key {k!r} is not a string")
    data = dict(obj)
    data["source"] = "cloud"
    return Command(cid, data)


def response_payload(fmt: str, body: Mapping[str, Any]) -> bytes:
    if fmt == "cbor":
        return cbor2.dumps(dict(body))
    return json.dumps(dict(body), separators=(",", ":"), default=repr).encode()
