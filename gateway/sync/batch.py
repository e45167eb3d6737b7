"""Batches: encoded events of one stream, joined by the sink's separator, as they go out in
one message; and the per-event path that encodes rows here and cuts them into batches."""

from __future__ import annotations

import io
import json
from typing import Any

import cbor2

from gateway.errors import StoreError
from gateway.sync.codec import Encoder, NotRepresentableError


def _decode_items(blob: bytes, sep: bytes) -> tuple[list[int], list[int]]:
    """(seq, encoded length) of each event in a joined batch: the envelopes say their seq.
    Only for the rare batch that has to be split or deleted row by row."""
    seqs: list[int] = []
    lens: list[int] = []
    at = 0
    if sep:  # JSON events, joined by "," (MQTT) or a newline (ndjson files)
        decoder = json.JSONDecoder()
        text = blob.decode()
        while at < len(text):
            obj, end = decoder.raw_decode(text, at)
            seqs.append(int(obj["seq"]))
            lens.append(len(text[at:end].encode()))
            at = end + len(sep)
        return seqs, lens
    buf = io.BytesIO(blob)
    while at < len(blob):
        obj = cbor2.load(buf)
        end = buf.tell()
        seqs.append(int(obj["seq"]))
        lens.append(end - at)
        at = end + len(sep)
        buf.seek(at)
    return seqs, lens


class Batch:
    """Encoded events of one stream, in seq order, joined by the sink's separator. Batches
    cut by SQLite know only their first and last seq: the seq and length of each event are
    decoded from the blob if the batch has to be split or its rows deleted one by one."""

    __slots__ = ("blob", "first", "key", "last", "lens", "n", "sep", "seqs", "stream", "type")

    def __init__(
        self, stream: str, key: Any, type_: str, n: int, first: int, last: int,
        seqs: list[int] | None, lens: list[int] | None, blob: bytes, sep: bytes,
    ) -> None:  # fmt: skip
        self.stream = stream
        self.key = key  # batches with equal keys may be merged (same version bucket, type)
        self.type = type_
        self.n = n
        self.first = first
        self.last = last
        self.seqs = seqs
        self.lens = lens
        self.blob = blob
        self.sep = sep

    def _items(self) -> tuple[list[int], list[int]]:
        if self.seqs is None or self.lens is None:
            self.seqs, self.lens = _decode_items(self.blob, self.sep)
            if len(self.seqs) != self.n:
                raise StoreError(f"batch of {self.stream}: {len(self.seqs)} events, not {self.n}")
        return self.seqs, self.lens

    def seq_list(self) -> list[int]:
        return self._items()[0]

    def merge(self, other: Batch) -> None:
        """Append `other` (the same stream and key, newer events)."""
        self.blob = self.blob + self.sep + other.blob
        self.n += other.n
        self.last = other.last
        if self.seqs is not None and other.seqs is not None:
            self.seqs = self.seqs + other.seqs
        else:
            self.seqs = None
        if self.lens is not None and other.lens is not None:
            self.lens = self.lens + other.lens
        else:
            self.lens = None

    def halves(self) -> tuple[Batch, Batch]:
        seqs, lens = self._items()
        sep, h = self.sep, self.n // 2
        cut = sum(lens[:h]) + len(sep) * (h - 1)
        s, k, t = self.stream, self.key, self.type
        return (
            Batch(s, k, t, h, seqs[0], seqs[h - 1], seqs[:h], lens[:h], self.blob[:cut], sep),
            Batch(s, k, t, self.n - h, seqs[h], seqs[-1], seqs[h:], lens[h:],
                  self.blob[cut + len(sep):], sep),
        )  # fmt: skip


def pieces(
    raw: list[tuple[Any, ...]], encode: Encoder, size: int, sep: bytes, by_type: bool
) -> tuple[list[Batch], list[tuple[int, str, str]]]:
    """The per-event path: rows (in `Row` order) encoded here and cut into batches like
    `gateway.store.outbox.read_grouped` cuts them (and, with `{type}` in a topic, per run
    of one type)."""
    dead: list[tuple[int, str, str]] = []
    rows = raw
    if any(r[3] is None for r in raw):  # outbox rows whose event is gone: nothing to send
        dead += [(r[0], r[1], "event missing from the log") for r in raw if r[3] is None]
        rows = [r for r in raw if r[3] is not None]
    try:
        bodies = encode.many(rows)
    except NotRepresentableError:
        # Rare (JSON only): find the events that have no form in this format, one by one.
        ok, bodies = [], []
        for r in rows:
            try:
                bodies.append(encode(r))
                ok.append(r)
            except NotRepresentableError as exc:
                dead.append((r[0], r[1], f"not representable as {encode.fmt}: {exc}"))
        rows = ok
    out: list[Batch] = []
    parts: dict[int, list[bytes]] = {}
    current: dict[str, Batch] = {}
    for r, body in zip(rows, bodies, strict=True):
        key = ((r[2] - 1) // size, r[3] if by_type else None)
        b = current.get(r[1])
        if b is None or b.key != key:
            b = current[r[1]] = Batch(r[1], key, r[3], 0, r[0], r[0], [], [], b"", sep)
            parts[id(b)] = []
            out.append(b)
        b.n += 1
        b.last = r[0]
        b.seqs.append(r[0])  # type: ignore[union-attr]
        b.lens.append(len(body))  # type: ignore[union-attr]
        parts[id(b)].append(body)
    for b in out:
        b.blob = sep.join(parts[id(b)])
    return out, dead
