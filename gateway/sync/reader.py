"""The relay's reader: a lane's outbox rows, chunk after chunk, as batches in its read-ahead.

Where the time goes: the store writes each outbox row with its event already encoded in
the sink's format (`body`, see `gateway.sync.codec.Encoder.bodies`), so SQLite itself cuts
a chunk of the outbox into per-stream batches and joins their bodies: one Python object per
batch, not per event, and the SQLite work runs without the GIL, beside the event loop. Rows
without a body (written before sync was configured, under another format, or with no form
in it) and topics with `{type}` take the per-event path (`gateway.sync.batch.pieces`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import StoreError
from gateway.store import outbox
from gateway.sync.batch import Batch, pieces
from gateway.sync.codec import Encoder
from gateway.sync.config import SyncConfig
from gateway.sync.lanes import Lane

if TYPE_CHECKING:
    from gateway.store import EventStore

log = logging.getLogger("gateway.sync")
NO_UPPER = 2**62


def read_chunk(
    conn: sqlite3.Connection, after: int, upto: int, limit: int, size: int, sep: bytes,
    encode: Encoder, grouped: bool, by_type: bool, skip: bool, names: dict[int, str | None],
) -> tuple[list[Batch], list[tuple[int, str, str]], int, int, bool]:  # fmt: skip
    """Reader thread: the outbox rows with seq in (after, min(upto, after + limit)] as
    batches. Returns (batches, dead rows, rows read, the seq read up to, whether that was
    everything: nothing newer was committed when the rows were read). `skip`: leave out rows
    in `outbox_acked` ranges. `names`: stream ids -> names, filled as ids are met."""
    end = min(upto, after + limit)
    if grouped:
        meta, joined, n, top = outbox.read_grouped(conn, after, end, size, sep, skip)
        last = min(end, max(top, after))
        groups = json.loads(meta)
        # Rows without a body in the chunk (rare), or a stream id with no name (a damaged
        # file): the whole chunk goes the per-event way.
        streams = (
            _stream_names(conn, [g[0] for g in groups], names)
            if all(g[5] == g[2] and g[0] is not None for g in groups)
            else None
        )
        if streams is not None:
            joined = joined or b""  # (NULL for an empty chunk)
            out: list[Batch] = []
            at = 0
            for stream, (_sid, b, count, first, last_seq, _nb, nbytes) in zip(
                streams, groups, strict=True
            ):
                out.append(Batch(stream, (b, None), "", count, first, last_seq, None, None,
                                  joined[at : at + nbytes], sep))  # fmt: skip
                at += nbytes
            if at != len(joined):
                raise StoreError(f"outbox after {after}: batches of {at} bytes, {len(joined)} read")
            return out, [], n, last, last >= min(top, upto)
        end = last
    else:
        top = outbox.newest_seq(conn)
        end = min(end, max(top, after))
    raw = outbox.read_rows(conn, after, end, skip)
    batches, missing_rows = pieces(raw, encode, size, sep, by_type)
    return batches, missing_rows, len(raw), end, end >= min(top, upto)


def _stream_names(
    conn: sqlite3.Connection, sids: list[int], names: dict[int, str | None]
) -> list[str] | None:
    """The streams of these ids, from `names`, which reads `outbox_streams` for ids met for
    the first time. None if one is not there, which only a damaged file can do: such an id
    is kept as None (said once in the log) and its chunks go the per-event way."""
    missing = [s for s in sids if s not in names]
    if missing:
        if len(names) > 50_000:
            names.clear()
            missing = sids
        names.update(outbox.stream_names(conn, missing))
        lost = [s for s in missing if s not in names]
        if lost:
            log.warning("outbox rows name stream ids %s missing from outbox_streams: their "
                        "events are encoded one by one", lost[:5])  # fmt: skip
            names.update(dict.fromkeys(lost))
    out: list[str] = []
    for s in sids:
        name = names[s]
        if name is None:
            return None
        out.append(name)
    return out


def read_ahead(cfg: SyncConfig) -> tuple[int, int]:
    """(rows read ahead per lane, rows per read). The read-ahead holds full batches of many
    streams at once; reads come in chunks, one after the other while it has room, so the
    reader thread keeps working while batches are on the wire. A quarter of the read-ahead
    per read: with fewer, larger reads a batch is cut in fewer pieces (bench/sync.py: an
    eighth was ~10% slower, a larger read-ahead did not help)."""
    prefetch = min(50_000, max(2000, cfg.batch_size * max(cfg.inflight, 8) * 8))
    return prefetch, max(500, prefetch // 4)


class Reader:
    """Fills lanes' read-ahead (`Lane.pending`) from the outbox, in the reader thread, and
    hands dead rows (events gone, or with no form in the format) to `dead`."""

    def __init__(
        self,
        store: EventStore,
        cfg: SyncConfig,
        gateway_id: str,
        progress: asyncio.Event,
        dead: Callable[[int, str, str], None],
    ) -> None:
        self.store = store
        self.gw = gateway_id
        self.size = cfg.batch_size
        self.prefetch, self.chunk = read_ahead(cfg)
        self.by_type = "{type}" in cfg.topics.telemetry or "{type}" in cfg.topics.backfill
        self.encode = Encoder(cfg.format, gateway_id)
        self.grouped = False  # batches cut by SQLite from stored bodies (see module doc)
        self.sep = b""
        #: Commits seen (the store's listener counts them): a read that found nothing more
        #: is the end only if none came while it read.
        self.commits = 0
        self._names: dict[int, str | None] = {}  # stream ids: reader thread only
        self._progress = progress
        self._dead = dead

    def begin(self, item_format: str, item_sep: bytes) -> None:
        """A new session, in the channel's format: batches are cut by SQLite when the
        stored bodies are in that format (and no topic depends on the event type)."""
        self.encode = Encoder(item_format, self.gw)
        self.sep = item_sep
        codec = self.store.outbox_codec
        self.grouped = (
            not self.by_type and codec is not None
            and codec.signature == self.encode.signature
        )  # fmt: skip

    async def fill(self, lane: Lane) -> None:
        """Read the lane's next rows. One job in the reader thread reads chunk after chunk
        (up to the room left in the read-ahead) and hands each to the loop as soon as it is
        read: the reader does not wait for a turn of the event loop between chunks."""
        limit, size, sep = self.chunk, self.size, self.sep
        enc, grouped, by_type = self.encode, self.grouped, self.by_type
        if lane.seqs is not None:
            chunk, lane.seqs = lane.seqs[:500], lane.seqs[500:]
            got, dead = (
                await self.store.read(
                    lambda c: pieces(outbox.rows_in(c, chunk), enc, size, sep, by_type)
                )
                if chunk else ([], [])
            )  # fmt: skip
            if not lane.seqs:
                lane.exhausted = True
            self._take_in(lane, got, dead)
            return
        loop = asyncio.get_running_loop()
        names = self._names
        start = lane.after
        upto = NO_UPPER if lane.upto is None else lane.upto
        budget = max(limit, self.prefetch - lane.npending)

        def job(c: sqlite3.Connection) -> None:  # in the reader thread
            after, got = start, 0
            while got < budget and not lane.dropped:
                commits = self.commits  # (an int read: no lock needed)
                skip = after < lane.skip_upto
                batches, dead, n, last, short = read_chunk(
                    c, after, upto, limit, size, sep, enc, grouped, by_type, skip, names
                )
                loop.call_soon_threadsafe(self._read, lane, batches, dead, short, last, commits)
                got += n
                after = last
                if short:
                    return

        try:
            await self.store.read(job)
        finally:
            # The pump may have looked while this read was finishing: let it look again.
            self._progress.set()

    def _read(
        self, lane: Lane, batches: list[Batch], dead: list[tuple[int, str, str]],
        short: bool, last: int, commits: int,
    ) -> None:  # fmt: skip
        """One chunk read: in the loop, in the order the chunks were read."""
        if lane.dropped:
            return
        # "Nothing more" holds only if nothing committed while it was being read.
        if short and (lane.upto is not None or commits == self.commits):
            lane.exhausted = True
        lane.after = last
        self._take_in(lane, batches, dead)

    def _take_in(self, lane: Lane, batches: list[Batch], dead: list[tuple[int, str, str]]) -> None:
        for seq, stream, reason in dead:
            self._dead(seq, stream, reason)
        pending = lane.pending
        for p in batches:  # per batch, not per event
            q = pending.get(p.stream)
            if q is None:
                q = pending[p.stream] = deque()
            q.append(p)
            lane.npending += p.n
        self._progress.set()


def reraise(f: asyncio.Future[None]) -> bool:
    """A finished read: surface its error (the session then ends); drop it otherwise."""
    exc = f.exception()
    if exc is not None:
        raise exc
    return False
