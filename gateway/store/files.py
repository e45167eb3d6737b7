"""The database file: connections (the writer's, the reader's, the CLI's read-only one),
its private mode, the health check at open, and quarantine of a corrupt file."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from gateway.errors import StoreError
from gateway.store.errors import is_corruption, store_error

log = logging.getLogger("gateway.store")

#: How long a connection waits for another one's lock (`commit.stage` in the event loop's
#: thread waits for none).
BUSY_TIMEOUT_MS = 5000


def connect(
    path: Path, synchronous: str, readonly: bool = False, page_size: int | None = None
) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        # Sorts (the relay cuts the outbox into batches with GROUP BY) in memory, not in a
        # temporary file created and removed for every query: ~20% of the relay's reads.
        conn.execute("PRAGMA temp_store=MEMORY")
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if not readonly:
            if page_size is not None:  # only takes effect on a new (empty) database
                conn.execute(f"PRAGMA page_size={int(page_size)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            # Checkpoints: by the store's writer thread (`commit.checkpoint`), never inside
            # a COMMIT, which may run in the event loop's thread.
            conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        # Not left open: SQLite shares a file's -shm state between the connections of a
        # process, and a failed one (a full disk) would spoil the next try.
        conn.close()
        raise
    return conn


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection for the CLI (works while the daemon writes, thanks to WAL)."""
    p = Path(path)
    if not p.exists():
        where = str(p) if p.is_absolute() else f"{p} (relative to {Path.cwd()})"
        raise StoreError(f"{where}: no database here (has gatewayd run with this config?)")
    try:
        return connect(p, "normal", readonly=True)
    except sqlite3.Error as exc:
        raise store_error(exc, f"opening {p} read-only") from exc


#: Database files (and their -wal/-shm, backups, quarantined copies) are the owner's alone:
#: they hold every reading and command. SQLite gives -wal/-shm the main file's mode.
PRIVATE_MODE = 0o600


def make_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if absent; take group/other bits off if present
    (and off its -wal/-shm: files made by an older version were 0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, PRIVATE_MODE)


def quarantine(path: Path, reason: str) -> Path:
    """Move a corrupt database (and its -wal/-shm) aside with a timestamped name; never delete."""
    import shutil  # rarely needed; keeps start-up RSS down

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    shutil.move(str(path), target)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            shutil.move(str(side), str(target) + suffix)
    make_private(target)  # moved aside, still full of data: nobody else reads it
    log.error("database %s is corrupt (%s): moved aside to %s; starting on a fresh file",
              path, reason, target)  # fmt: skip
    return target


def check(path: Path) -> str | None:
    """None if the file is a healthy database (or absent), else what is wrong."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise  # a full disk, an I/O error: not the file's fault
        return str(exc)
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:5])
    return None


def file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += os.stat(str(path) + suffix).st_size
    return total
