"""Database maintenance shared by the daemon and `gatewayctl db`: check, backup, rebuild."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from gateway.store import make_private, queries
from gateway.store.errors import rollback


def backup(conn: sqlite3.Connection, target: str | os.PathLike[str]) -> dict[str, Any]:
    """A consistent copy through SQLite's online backup API (fine while the daemon writes)."""
    dest_path = Path(target)
    if dest_path.exists():
        raise FileExistsError(f"{dest_path}: already exists; refusing to overwrite it")
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_path.with_name(dest_path.name + ".partial")
    make_private(tmp)  # a copy of everything: the owner's alone, like the database
    dest = sqlite3.connect(tmp)
    try:
        conn.backup(dest)
        dest.execute("PRAGMA journal_mode=DELETE")
        ok = dest.execute("PRAGMA quick_check").fetchone()[0]
        last = dest.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    finally:
        dest.close()
    os.replace(tmp, dest_path)
    return {"file": str(dest_path), "bytes": dest_path.stat().st_size, "last_seq": last,
            "check": ok}  # fmt: skip


def check(conn: sqlite3.Connection, full: bool = True) -> dict[str, Any]:
    """integrity_check (or quick_check) plus whether projections match a rebuild."""
    rows = conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
    problems = [r[0] for r in rows if r[0] != "ok"]
    return {"ok": not problems, "problems": problems[:20], **queries.stats(conn)}


def projections_match_rebuild(path: str | os.PathLike[str]) -> bool:
    """Rebuild the projections in a throw-away transaction and compare (read-only effect)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        live = queries.projection_dump(conn)
        queries.rebuild(conn)
        rebuilt = queries.projection_dump(conn)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return live == rebuilt


def rebuild_offline(path: str | os.PathLike[str]) -> int:
    """Rebuild projections on the file directly (daemon down)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = queries.rebuild(conn)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    finally:
        conn.close()
    return n
