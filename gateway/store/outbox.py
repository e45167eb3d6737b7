"""The outbox's statements, each behind a named function: what the store writes at append
time, what the relay reads and records, dead letters, requeue, pruning and figures. Plain
functions on a sqlite3 connection (the writer's inside its transaction, the reader's, or the
CLI's read-only one); no other module runs SQL on the outbox tables."""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.store.errors import rollback

#: Groups of a grouped read, as JSON arrays: [sid, version bucket, rows, first seq, last
#: seq, rows with a body, bytes of the joined bodies].
Group = list[Any]


class OutboxCodec(Protocol):
    """Encodes events for the outbox at append time, in the sink's wire format (given by
    the cloud sync: `gateway.sync.codec.Encoder`). `signature` names the format and the
    gateway id: bodies written under another signature are dropped at open."""

    @property
    def signature(self) -> str: ...

    def bodies(self, rows: Sequence[tuple[Any, ...]]) -> list[bytes | None]:
        """Rows in `events` column order; None for an event with no form in the format."""
        ...


# -- appending (writer thread, inside the append's transaction) ------------------------------


def insert_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """New outbox rows: (seq, stream, version, body, sid)."""
    conn.executemany(
        "INSERT INTO outbox (seq, stream, attempts, version, body, sid) VALUES (?, ?, 0, ?, ?, ?)",
        rows,
    )


def stream_id(conn: sqlite3.Connection, stream: str) -> int:
    """The stream's id in `outbox_streams`, given now if it has none."""
    row = conn.execute("SELECT sid FROM outbox_streams WHERE stream = ?", (stream,)).fetchone()
    if row is not None:
        return int(row[0])
    cur = conn.execute("INSERT INTO outbox_streams (stream) VALUES (?)", (stream,))
    return int(cur.lastrowid or 0)


def resolve_sids(
    conn: sqlite3.Connection, boxed: list[tuple[Any, ...]], fresh: dict[str, int]
) -> list[tuple[Any, ...]]:
    """Inside the append's transaction: the ids of streams not in the cache, read from
    `outbox_streams` or given there now (so an id is never used before it is durable).
    `fresh` receives them; the cache takes them once the transaction commits."""
    out = []
    for r in boxed:
        if r[4] is not None or r[3] is None:
            out.append(r)
            continue
        stream = r[1]
        sid = fresh.get(stream)
        if sid is None:
            sid = fresh[stream] = stream_id(conn, stream)
        out.append((r[0], stream, r[2], r[3], sid))
    return out


def check_codec(conn: sqlite3.Connection, codec: OutboxCodec | None) -> None:
    """At open: bodies encoded under another format or gateway id are dropped (the relay
    encodes those rows itself when it sends them)."""
    sig = 0 if codec is None else zlib.crc32(codec.signature.encode())
    if codec_signature(conn) == sig:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        drop_bodies(conn, sig)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def codec_signature(conn: sqlite3.Connection) -> int | None:
    """The signature (crc32) of the codec the stored bodies were encoded with, if any."""
    row = conn.execute("SELECT value FROM counters WHERE name = 'outbox_codec'").fetchone()
    return None if row is None else int(row[0])


def drop_bodies(conn: sqlite3.Connection, signature: int) -> None:
    """Bodies of another codec are dropped (the relay encodes those rows when it sends them);
    `signature` is the codec's from now on."""
    conn.execute("UPDATE outbox SET body = NULL, sid = NULL WHERE body IS NOT NULL")
    conn.execute(
        "INSERT INTO counters VALUES ('outbox_codec', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (signature,),
    )


def drop_upto(conn: sqlite3.Connection, upto: int, keep_stream: str) -> None:
    """Over quota: the rows of events dropped from the log (all but `keep_stream`'s)."""
    conn.execute("DELETE FROM outbox WHERE seq <= ? AND stream != ?", (upto, keep_stream))


# -- delivery watermark -----------------------------------------------------------------------

# Delivery is a watermark: outbox rows at or below it are delivered (and pruned behind it),
# except requeued dead letters (attempts = -1), which are delivered one by one.
DELIVERED = "(SELECT coalesce((SELECT value FROM counters WHERE name = 'outbox_delivered'), 0))"
UNDELIVERED = f"o.seq > {DELIVERED} OR o.attempts < 0"


def delivered_upto(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT " + DELIVERED).fetchone()[0])


def set_delivered_upto(conn: sqlite3.Connection, seq: int) -> None:
    """Raise the watermark (never lowers it); acked ranges below it are no longer needed."""
    conn.execute(
        "INSERT INTO counters VALUES ('outbox_delivered', ?) "
        "ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
        (seq,),
    )
    conn.execute("DELETE FROM outbox_acked WHERE hi <= ?", (seq,))


def record_delivery(
    conn: sqlite3.Connection, upto: int | None, acked: list[list[int] | tuple[str, int, int]],
    dead: list[tuple[int, str, str, float]], ranges: Sequence[tuple[str, int, int]] = (),
) -> None:  # fmt: skip
    """What the relay had acked and refused, in one transaction: `ranges` (stream, lo, hi)
    acked above the watermark, the watermark raised to `upto`, `acked` rows deleted (their
    seqs, or all of a stream's rows in a (stream, lo, hi) range) and `dead` (seq, stream,
    reason, at) moved to the dead letters."""
    if ranges:
        conn.executemany("INSERT OR REPLACE INTO outbox_acked VALUES (?, ?, ?)", ranges)
    if upto is not None:
        set_delivered_upto(conn, upto)
    seqs = [s for a in acked if isinstance(a, list) for s in a]
    if seqs:
        # One statement for the whole group: SQLite walks the list without the GIL (a
        # statement per row or per run hands the GIL back and forth once per step).
        conn.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?))",
            ("[" + ",".join(map(str, seqs)) + "]",),
        )
    spans = [a for a in acked if isinstance(a, tuple)]
    if spans:
        conn.executemany(
            "DELETE FROM outbox WHERE seq BETWEEN ? AND ? AND stream = ? AND attempts >= 0",
            [(lo, hi, stream) for stream, lo, hi in spans],
        )
    for seq, stream, reason, at in dead:
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT OR REPLACE INTO dead_letters (seq, stream, reason, at) VALUES (?,?,?,?)",
            (seq, stream, reason, at),
        )


def prune_delivered(conn: sqlite3.Connection, limit: int | None) -> int:
    """Delete delivered outbox rows, the oldest `limit` of them (all when None)."""
    upto = delivered_upto(conn)
    if limit is None:
        cur = conn.execute("DELETE FROM outbox WHERE seq <= ? AND attempts >= 0", (upto,))
    else:
        cur = conn.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox "
            "WHERE seq <= ? AND attempts >= 0 ORDER BY seq LIMIT ?)",
            (upto, limit),
        )
    return int(cur.rowcount)


# -- retention ----------------------------------------------------------------------------


def prunable_events(
    conn: sqlite3.Connection, before_seq: int, cutoff: float, limit: int, sink: bool
) -> list[tuple[int, str]]:
    """(seq, stream) of the oldest events retention may delete: below `before_seq`, older
    than `cutoff` (wall time), not dead letters and, with a sink, delivered."""
    undelivered = (
        f"AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = e.seq AND ({UNDELIVERED})) "
        if sink
        else ""  # nothing will ever deliver them: retention alone decides
    )
    rows: list[tuple[int, str]] = conn.execute(
        "SELECT e.seq, e.stream FROM events e WHERE e.seq < ? AND e.wall_time < ? "
        + undelivered
        + "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = e.seq) "
        "ORDER BY e.seq LIMIT ?",
        (before_seq, cutoff, limit),
    ).fetchall()
    return rows


def delete_rows(conn: sqlite3.Connection, seqs: Sequence[tuple[int]]) -> None:
    """Delete these rows, delivered or not (retention without a sink)."""
    conn.executemany("DELETE FROM outbox WHERE seq = ?", seqs)


# -- reading for the relay (reader thread) ----------------------------------------------------

# In `Row` order; an outbox row whose event is gone has a NULL type (and its own stream).
_SELECT = (
    "SELECT o.seq, coalesce(e.stream, o.stream), e.version, e.type, e.wall_time, e.mono_time, "
    "e.boot_id, e.synced, e.data FROM outbox o LEFT JOIN events e ON e.seq = o.seq "
)

# A chunk of the outbox (rows with seq in (after, end]) cut into batches by SQLite: per
# stream, events whose versions fall in the same `size`-wide bucket, bodies joined by the
# sink's separator. Streams are grouped by their integer id (`sid`, schema v3): SQLite sorts
# integers much faster than names. Rows without a body come back as groups with count(body)
# < count(*) (a NULL sid as a group of its own); the chunk then goes the per-event way.
# SQLite's sorter keeps rows with equal keys in their input (seq) order: each group lists
# its bodies oldest first (the tests compare every byte with the per-event path).
# The whole chunk comes back as ONE row (the groups described in a JSON array, their
# bodies end to end in one blob): every row a query returns costs a hand-over of the GIL
# between the reader thread and the event loop, which cost more than the query itself.
# The chunk is a seq range, not a LIMIT: a subquery with a LIMIT would be run as a
# co-routine that copies every body once more. The same statement reads the newest seq,
# so "nothing more to read" is judged on the snapshot the rows came from.
# (The joined bodies travel as TEXT, read with text_factory=bytes: a CAST of the whole to
# BLOB would copy them twice more. A group's size in bytes is the length of its blob as a
# BLOB, once per group: length() of TEXT counts characters.)
_GROUPED = (
    "SELECT json_group_array(json_array(sid, b, n, lo, hi, nb, length(CAST(blob AS BLOB)))), "
    "group_concat(blob, ''), coalesce(sum(n), 0), (SELECT coalesce(max(seq), 0) FROM outbox) "
    "FROM (SELECT sid, (version - 1) / :size AS b, count(*) AS n, min(seq) AS lo, "
    "max(seq) AS hi, group_concat(body, :sep) AS blob, count(body) AS nb "
    "FROM outbox o WHERE seq > :after AND seq <= :end AND attempts >= 0 {skip} "
    "GROUP BY sid, b)"
)
# After a restart: rows of batches acked above the watermark by the previous session.
_SKIP_ACKED = (
    "AND NOT EXISTS (SELECT 1 FROM outbox_acked a "
    "WHERE a.stream = o.stream AND a.lo <= o.seq AND a.hi >= o.seq)"
)
_QUERIES = {
    (grouped, skip): (_GROUPED if grouped else _SELECT + (
        "WHERE o.seq > ? AND o.seq <= ? AND o.attempts >= 0 {skip} ORDER BY o.seq"
    )).format(skip=_SKIP_ACKED if skip else "")
    for grouped in (False, True) for skip in (False, True)
}  # fmt: skip


def read_grouped(
    conn: sqlite3.Connection, after: int, end: int, size: int, sep: bytes, skip: bool
) -> tuple[str, bytes | None, int, int]:
    """The rows with seq in (after, end] cut into per-stream batches by SQLite (see above):
    (the groups as a JSON array, their bodies end to end, rows read, the newest seq in the
    outbox). `skip`: leave out rows in `outbox_acked` ranges."""
    args = {"sep": sep, "size": size, "after": after, "end": end}
    conn.text_factory = bytes
    try:
        meta, joined, n, top = conn.execute(_QUERIES[True, skip], args).fetchone()
    finally:
        conn.text_factory = str
    return meta, joined, n, top


def newest_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])


def read_rows(conn: sqlite3.Connection, after: int, end: int, skip: bool) -> list[tuple[Any, ...]]:
    """The rows with seq in (after, end], in `Row` order (a NULL type: the event is gone)."""
    rows: list[tuple[Any, ...]] = conn.execute(_QUERIES[False, skip], (after, end)).fetchall()
    return rows


def rows_in(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    """The rows of these seqs, in `Row` order, by seq."""
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(seqs), 5000):
        part = seqs[i : i + 5000]
        marks = ",".join("?" * len(part))
        out += conn.execute(_SELECT + f"WHERE o.seq IN ({marks}) ORDER BY o.seq", part).fetchall()
    return out


def stream_names(conn: sqlite3.Connection, sids: Sequence[int]) -> list[tuple[int, str]]:
    """(sid, stream) of these stream ids (those in `outbox_streams`)."""
    marks = ",".join("?" * len(sids))
    q = f"SELECT sid, stream FROM outbox_streams WHERE sid IN ({marks})"
    rows: list[tuple[int, str]] = conn.execute(q, list(sids)).fetchall()
    return rows


def survey(conn: sqlite3.Connection, threshold: int) -> tuple[int, int, int, list[int], int]:
    """What a new relay session starts from: (the watermark, the backlog's depth, the newest
    seq (at least the watermark), requeued dead letters' seqs, the highest seq acked above
    the watermark). No count over the whole outbox (its rows carry their bodies: a backlog
    is a scan of megabytes): at most `threshold` rows are counted, and only when the seq
    range says the backlog may be that deep; a deeper one is counted for the backfill
    figure only then."""
    w = delivered_upto(conn)
    mark = max(w, newest_seq(conn))
    depth = 0
    if mark - w > threshold:
        depth = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM outbox "
            "WHERE seq > ? AND attempts >= 0 LIMIT ?)", (w, threshold + 1)
        ).fetchone()[0]  # fmt: skip
        if depth > threshold:
            depth = conn.execute(
                "SELECT count(*) FROM outbox WHERE seq > ? AND attempts >= 0", (w,)
            ).fetchone()[0]  # fmt: skip
    requeued = [r[0] for r in conn.execute(
        "SELECT seq FROM outbox WHERE attempts < 0 ORDER BY seq")]  # fmt: skip
    skip = conn.execute("SELECT coalesce(max(hi), 0) FROM outbox_acked").fetchone()[0]
    return w, depth, mark, requeued, skip


# -- dead letters -------------------------------------------------------------------------


def requeue(conn: sqlite3.Connection, seqs: Sequence[int] | None) -> list[int]:
    """Move dead letters back to the outbox (all when `seqs` is None); returns their seqs.
    They are marked requeued (attempts = -1): below the watermark, yet not delivered."""
    if seqs is None:
        rows = conn.execute("SELECT seq, stream FROM dead_letters ORDER BY seq").fetchall()
    else:
        rows = []
        for s in seqs:
            r = conn.execute("SELECT seq, stream FROM dead_letters WHERE seq = ?", (s,)).fetchone()
            if r is not None:
                rows.append(r)
    for seq, stream in rows:
        conn.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT INTO outbox (seq, stream, attempts, last_error) VALUES (?, ?, -1, ?) "
            "ON CONFLICT(seq) DO UPDATE SET attempts = -1, last_error = excluded.last_error",
            (seq, stream, "requeued"),
        )
    return [r[0] for r in rows]


def dead_letters(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    """The dead letters, oldest first, with their event's type, version and size."""
    rows = conn.execute(
        "SELECT d.seq, d.stream, d.reason, d.at, e.type, e.version, length(e.data) "
        "FROM dead_letters d LEFT JOIN events e ON e.seq = d.seq ORDER BY d.seq LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        {"seq": r[0], "stream": r[1], "reason": r[2], "at": r[3], "type": r[4],
         "version": r[5], "bytes": r[6]}
        for r in rows
    ]  # fmt: skip


# -- figures ------------------------------------------------------------------------------


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """The backlog: undelivered rows (requeued ones included), their bytes, the wall time of
    the oldest, and how many dead letters."""
    upto = delivered_upto(conn)
    # The encoded body is what goes on the wire; without one, the event's data.
    size = "coalesce(sum(coalesce(length(o.body), (SELECT length(e.data) FROM events e "
    size += "WHERE e.seq = o.seq))), 0)"
    depth, oldest, outbox_bytes = conn.execute(
        f"SELECT count(*), min(o.seq), {size} FROM outbox o WHERE o.seq > ? AND o.attempts >= 0",
        (upto,),
    ).fetchone()
    requeued, first, more_bytes = conn.execute(
        f"SELECT count(*), min(o.seq), {size} FROM outbox o WHERE o.attempts < 0"
    ).fetchone()
    if requeued:
        depth += requeued
        outbox_bytes += more_bytes
        oldest = first if oldest is None else min(oldest, first)
    oldest_wall = None
    if oldest is not None:
        row = conn.execute("SELECT wall_time FROM events WHERE seq = ?", (oldest,)).fetchone()
        oldest_wall = row[0] if row else None
    dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return {
        "outbox_depth": depth,
        "outbox_bytes": outbox_bytes,
        "oldest_undelivered": oldest_wall,
        "dead_letters": dead,
    }
