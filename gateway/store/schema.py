"""Schema and migrations. Each component has its own version sequence in `schema_versions`.

The core's sequence is `CORE`; other parts (coap, sync...) add theirs with `register_schema`.
A migration is applied once, in its own transaction, at open; never edited after release:
add a new one instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.store.errors import rollback

CORE: list[str] = [
    # v1
    """
    CREATE TABLE events (
        seq       INTEGER PRIMARY KEY,
        stream    TEXT    NOT NULL,
        version   INTEGER NOT NULL,
        type      TEXT    NOT NULL,
        wall_time REAL    NOT NULL,
        mono_time REAL    NOT NULL,
        boot_id   TEXT    NOT NULL,
        synced    INTEGER NOT NULL,
        data      BLOB    NOT NULL
    );
    CREATE INDEX events_wall_time ON events (wall_time);
    -- The authority on stream versions (optimistic concurrency): updated in the same
    -- transaction as the events by the single writer, and kept when retention prunes a
    -- stream's events. No UNIQUE(stream, version) index on events: with many streams it
    -- dirties one index leaf per stream per commit, which costs more WAL per event than
    -- anything else in a transaction.
    CREATE TABLE streams (
        stream  TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY,
        stream     TEXT    NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE dead_letters (
        seq    INTEGER PRIMARY KEY,
        stream TEXT NOT NULL,
        reason TEXT NOT NULL,
        at     REAL NOT NULL
    );
    CREATE TABLE snapshots (
        stream  TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        seq     INTEGER NOT NULL,
        state   BLOB    NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        id        TEXT PRIMARY KEY,
        driver    TEXT,
        source    TEXT NOT NULL DEFAULT 'config',
        available INTEGER,
        reason    TEXT,
        meta      BLOB
    ) WITHOUT ROWID;
    CREATE TABLE latest (
        device TEXT NOT NULL,
        point  TEXT NOT NULL,
        value  BLOB,
        unit   TEXT,
        ts     REAL NOT NULL,    -- the reading's time (the device's own, or arrival)
        seq    INTEGER NOT NULL,
        seen   REAL NOT NULL,    -- when the gateway committed it
        PRIMARY KEY (device, point)
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # v2: the outbox carries what the relay sends. `body` is the event already encoded in
    # the sink's wire format (written at append time when cloud sync is configured, NULL
    # otherwise), so a backlog drains without a Python object per event; `version` lets
    # SQLite cut a stream's events into batches. Delivery is recorded as a watermark in
    # `counters` ('outbox_delivered': every row at or below it is delivered, except
    # requeued rows, attempts = -1); delivered rows are pruned behind it. Batches acked
    # above the watermark (other streams' batches are acked before the oldest one) are
    # kept as seq ranges of their stream in `outbox_acked`, so a restart skips them.
    """
    ALTER TABLE outbox ADD COLUMN version INTEGER;
    ALTER TABLE outbox ADD COLUMN body BLOB;
    CREATE TABLE outbox_acked (
        stream TEXT    NOT NULL,
        lo     INTEGER NOT NULL,
        hi     INTEGER NOT NULL,
        PRIMARY KEY (stream, lo)
    ) WITHOUT ROWID;
    -- Requeued dead letters, found without a scan of the outbox (normally empty).
    CREATE INDEX outbox_requeued ON outbox (seq) WHERE attempts < 0;
    """,
    # v3: every outbox row with a body also carries its stream's integer id (`sid`, from
    # `outbox_streams`, assigned in the transaction that first needs it): the relay groups
    # a chunk of the outbox by (sid, version bucket), and SQLite sorts integers much faster
    # than stream names (a fifth of the relay's reads). Invariant: a row has a sid if and
    # only if it has a body (the relay still checks both).
    """
    CREATE TABLE outbox_streams (
        sid    INTEGER PRIMARY KEY,
        stream TEXT NOT NULL UNIQUE
    );
    ALTER TABLE outbox ADD COLUMN sid INTEGER;
    INSERT INTO outbox_streams (stream)
        SELECT DISTINCT stream FROM outbox WHERE body IS NOT NULL ORDER BY stream;
    UPDATE outbox SET sid = (SELECT s.sid FROM outbox_streams s WHERE s.stream = outbox.stream)
        WHERE body IS NOT NULL;
    """,
    # v4: no index on wall_time. Every commit wrote one or two pages of it (a third of the
    # WAL bytes per commit, measured by bench/wear.py): SD-card wear for queries that can
    # find a time in the log by bisection over seq instead (`queries.seq_at`), since
    # events are appended in wall-clock order.
    """
    DROP INDEX IF EXISTS events_wall_time;
    """,
]

_REGISTRY: dict[str, list[str]] = {"core": CORE}


def register_schema(component: str, migrations: Sequence[str]) -> None:
    """Declare a component's migrations (v1, v2, ... in order). Idempotent per component."""
    _REGISTRY[component] = list(migrations)


def schemas() -> dict[str, list[str]]:
    return dict(_REGISTRY)


def migrate(conn: sqlite3.Connection) -> dict[str, int]:
    """Bring every registered component to its newest version; returns component -> version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_versions "
        "(component TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID"
    )
    have = dict(conn.execute("SELECT component, version FROM schema_versions").fetchall())
    out: dict[str, int] = {}
    for component, steps in _REGISTRY.items():
        current = int(have.get(component, 0))
        if current > len(steps):
            raise sqlite3.DatabaseError(
                f"database schema of {component!r} is at version {current}, newer than this "
                f"gatewayd knows ({len(steps)}): refusing to touch it"
            )
        for version in range(current + 1, len(steps) + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _split(steps[version - 1]):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_versions VALUES (?, ?) "
                    "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                    (component, version),
                )
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        out[component] = len(steps)
    return out


def _split(script: str) -> list[str]:
    """Split a migration into statements (sqlite3 cannot run a script inside our transaction)."""
    stmts: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                stmts.append(buf.strip())
            buf = ""
    if buf.strip():
        stmts.append(buf.strip())
    return stmts
